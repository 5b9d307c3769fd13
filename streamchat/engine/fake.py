"""A scripted engine for fast protocol tests (and ingest benchmarks).

It answers every question with a sentence derived from the request, one word
per delta, so a test can check that frames and history arrived. A test can
hold answers mid-stream with :attr:`FakeEngine.gate` to exercise ``cancel``
and disconnects deterministically, and read :attr:`FakeEngine.requests` to see
what the session asked for. Like the vLLM adapter, closing a stream early
removes it from :meth:`running`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from ..budget import VisionCosts
from .base import Delta, EngineError, GenerationRequest, Request, Usage, Video
from .prompt import conversation, media_frames

__all__ = ["FakeEngine"]


class FakeEngine:
    def __init__(
        self,
        *,
        model_name: str = "fake",
        fail_with: str | None = None,
        vision_costs: VisionCosts | None = None,
    ) -> None:
        self._model_name = model_name
        self.vision_costs = vision_costs
        """What video costs the fake's "model" (None: no context to fit, as before)."""
        self._running: set[str] = set()
        self.requests: list[Request] = []
        self.aborted: list[str] = []
        self.fail_with = fail_with
        """When set, every answer fails with an ``EngineError`` after its first delta."""
        self.gate = asyncio.Event()
        """Answers stream their first word, then wait for this to be set."""
        self.gate.set()
        self.started = asyncio.Condition()
        self.closed = False
        self.dead = False
        """Set by a test: the engine failed for good, every answer fails at once."""

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def frame_factor(self) -> int | None:
        return None

    def running(self) -> frozenset[str]:
        return frozenset(self._running)

    def healthy(self) -> bool:
        return not (self.dead or self.closed)

    @staticmethod
    def script(request: Request) -> list[str]:
        """The words the fake answers ``request`` with."""
        messages, _ = conversation(request)
        frames = [f for m in messages for p in m.content if isinstance(p, Video) for f in p.frames]
        span = f"{frames[0].pts:.1f}-{frames[-1].pts:.1f}s" if frames else "none"
        turns = sum(m.role == "assistant" for m in messages)
        text = (
            f"I see {media_frames(messages)} frames ({span}) after {turns} turns; "
            f"you asked: {_question(request)}"
        )
        words = text.split(" ")
        return [w if i == 0 else " " + w for i, w in enumerate(words)][
            : request.sampling.max_tokens
        ]

    async def generate(self, request: Request) -> AsyncGenerator[Delta, None]:
        if self.closed or self.dead:
            raise EngineError("engine is closed" if self.closed else "engine is dead")
        self.requests.append(request)
        self._running.add(request.request_id)
        async with self.started:
            self.started.notify_all()
        words = self.script(request)
        finished = False
        try:
            for index, word in enumerate(words):
                if index == 1:
                    await self.gate.wait()
                    if self.fail_with is not None:
                        raise EngineError(self.fail_with)
                yield Delta(text=word)
            full = len(words) == request.sampling.max_tokens
            shown = media_frames(conversation(request)[0])
            usage = Usage(
                prompt_tokens=10 + len(_question(request).split()),
                completion_tokens=len(words),
                video_tokens=4 * shown,
                frames=shown,
            )
            finished = True
            yield Delta(text="", finish_reason="length" if full else "stop", usage=usage)
        finally:
            self._running.discard(request.request_id)
            if not finished:
                self.aborted.append(request.request_id)
            async with self.started:
                self.started.notify_all()

    async def abort(self, request_id: str) -> None:
        self._running.discard(request_id)

    async def wait_running(self, count: int) -> None:
        """Return once at least ``count`` requests are streaming."""
        async with self.started:
            await self.started.wait_for(lambda: len(self._running) >= count)

    async def wait_idle(self) -> None:
        """Return once no request is streaming (ended, or closed early and so aborted)."""
        async with self.started:
            await self.started.wait_for(lambda: not self._running)

    async def aclose(self) -> None:
        self.closed = True


def _question(request: Request) -> str:
    """The question: a live session's, or the last text of a conversation's last message."""
    if isinstance(request, GenerationRequest):
        return request.question
    texts = [part for part in request.messages[-1].content if isinstance(part, str)]
    return texts[-1] if texts else ""
