"""A remote vLLM server's streamed answer: server-sent events to deltas (pure).

:class:`~streamchat.engine.remote.RemoteEngine` reads the lines of a streamed
``POST /chat/completions`` and feeds them to one :class:`SseAnswer` per
answer; everything the stream may say (text, finish, usage, an error, or
something malformed) is decided here, with no HTTP, so it is tested line by line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..errors import EngineFailure
from .base import Delta, FinishReason, Usage

__all__ = ["MALFORMED", "SseAnswer"]

MALFORMED = "the engine's answer stream is malformed"
_FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "abort": "cancelled",
    "repetition": "stop",
}


class SseAnswer:
    """One answer's server-sent events -> deltas (pure: lines in, deltas out).

    vLLM's stream: ``data: <json>`` events (blank lines between them, ``:``
    comments as keep-alives); content in ``choices[0].delta.content``; the
    finishing chunk's ``finish_reason``; then a chunk with no choices and the
    ``usage``; then ``data: [DONE]``. The finish is held until the usage has
    come, so the last delta carries both. An ``error`` object is the engine's
    failure; anything else unexpected, or an end without finish, usage and
    ``[DONE]``, is a malformed stream.
    """

    def __init__(self, video_token_id: int | None, frames: int) -> None:
        self.video_token_id = video_token_id
        self.frames = frames
        self.prompt_ids: Sequence[int] = ()
        self.reason: FinishReason | None = None
        self.counted: dict[str, Any] | None = None
        self.done = False
        self.started = False
        """A delta with text was produced."""

    def line(self, line: str) -> Delta | None:
        """The delta ``line`` makes (None: none yet); the last one once ``[DONE]`` came."""
        if not line or line.startswith(":"):
            return None
        if self.done or not line.startswith("data:"):
            raise EngineFailure(f"{MALFORMED}: {line[:80]!r}")
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return self.final()
        try:
            event = json.loads(data)
        except ValueError:
            raise EngineFailure(f"{MALFORMED}: {data[:80]!r}") from None
        if not isinstance(event, dict):
            raise EngineFailure(f"{MALFORMED}: {data[:80]!r}")
        if "error" in event:
            error = event["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise EngineFailure(f"the model failed: {str(message)[:200]}")
        if isinstance(event.get("prompt_token_ids"), list):
            self.prompt_ids = event["prompt_token_ids"]
        usage, choices = event.get("usage"), event.get("choices")
        if isinstance(usage, dict):
            self.counted = usage
        if not isinstance(choices, list) or (not choices and not isinstance(usage, dict)):
            raise EngineFailure(f"{MALFORMED}: {data[:80]!r}")
        text = ""
        for choice in choices[:1]:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                raise EngineFailure(f"{MALFORMED}: {data[:80]!r}")
            content = delta.get("content")
            text = content if isinstance(content, str) else ""
            if choice.get("finish_reason") is not None:
                self.reason = _finish_reason(choice["finish_reason"])
        if text:
            self.started = True
            return Delta(text=text)
        return None

    def final(self) -> Delta:
        """The last delta: the finish and the usage (both must have come)."""
        if self.reason is None or self.counted is None:
            raise EngineFailure(f"{MALFORMED}: it ended without a finish and its usage")
        return Delta(text="", finish_reason=self.reason, usage=self.usage())

    def usage(self) -> Usage:
        """What the engine counted (what it has counted so far, if it has not finished)."""
        counted = self.counted or {}
        details = counted.get("prompt_tokens_details") or {}
        prompt = int(counted.get("prompt_tokens") or len(self.prompt_ids))
        video = self.video_token_id
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=int(counted.get("completion_tokens") or 0),
            video_tokens=sum(1 for t in self.prompt_ids if t == video) if video is not None else 0,
            frames=self.frames,
            cached_tokens=min(int(details.get("cached_tokens") or 0), prompt),
        )


def _finish_reason(reason: object) -> FinishReason:
    mapped = _FINISH_REASONS.get(str(reason))
    if mapped is None:
        raise EngineFailure(f"the model failed: it finished the answer with {reason!r}")
    return mapped
