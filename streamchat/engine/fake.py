"""A scripted engine for fast protocol tests (and ingest benchmarks).

It answers every question with a sentence derived from the request, one word
per delta, so a test can check that frames and history arrived. A test can
hold answers mid-stream with :attr:`FakeEngine.gate` to exercise ``cancel``
and disconnects deterministically, and read :attr:`FakeEngine.requests` to see
what the session asked for. Like the vLLM adapter, closing a stream early
removes it from :meth:`running`.

Its prefix cache is a deterministic stand-in for vLLM's, so the doors'
``cached_tokens`` can be tested without vLLM: a prompt identical to one of the
last :data:`CACHED_PROMPTS` it was asked (same frames' times, turns and
question) reports all its prompt tokens but the last as cached (vLLM, too,
always computes a prompt's last token); any other prompt reports 0.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Sequence

from ..budget import VisionCosts
from ..window import Frame
from .base import (
    ContextKind,
    Delta,
    EngineError,
    GenerationRequest,
    Request,
    TimelineContext,
    Usage,
    Video,
)
from .prompt import conversation, media_frames

__all__ = ["CACHED_PROMPTS", "FakeEngine"]

CACHED_PROMPTS = 64
"""Prompts the fake's prefix cache remembers, the least recently asked going first."""
PREFILLS_KEPT = 256
"""Prefill calls a fake remembers (every decoded frame of a timeline session makes one)."""


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
        self._cache: OrderedDict[str, None] = OrderedDict()
        self.context: ContextKind = "window"
        """What :attr:`default_context` tells (a test may set it)."""
        self.ended_sessions: list[str] = []
        """Sessions told ended (:meth:`end_session`), in order."""
        self.prefills: deque[tuple[str, int, float]] = deque(maxlen=PREFILLS_KEPT)
        """The last :meth:`prefill` calls: the session, the frames and the newest one's time."""

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def frame_factor(self) -> int | None:
        return None

    @property
    def default_context(self) -> ContextKind:
        return self.context

    def running(self) -> frozenset[str]:
        return frozenset(self._running)

    def healthy(self) -> bool:
        return not (self.dead or self.closed)

    @staticmethod
    def script(request: Request) -> list[str]:
        """The words the fake answers ``request`` with: a fixed-choice answer is its first
        choice (one piece, as a grammar-bound answer is)."""
        if request.sampling.choices:
            return [request.sampling.choices[0]]
        words = _describe(request).split(" ")
        return [w if i == 0 else " " + w for i, w in enumerate(words)][
            : request.sampling.max_tokens
        ]

    async def generate(self, request: Request) -> AsyncGenerator[Delta, None]:
        if self.closed or self.dead:
            raise EngineError("engine is closed" if self.closed else "engine is dead")
        self.requests.append(request)
        cached = self._prefill(request)
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
            prompt_tokens = 10 + len(_question(request).split())
            usage = Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=len(words),
                video_tokens=4 * shown,
                frames=shown,
                cached_tokens=prompt_tokens - 1 if cached else 0,
            )
            finished = True
            yield Delta(text="", finish_reason="length" if full else "stop", usage=usage)
        finally:
            self._running.discard(request.request_id)
            if not finished:
                self.aborted.append(request.request_id)
            async with self.started:
                self.started.notify_all()

    def _prefill(self, request: Request) -> bool:
        """Whether ``request``'s prompt was in the cache; it is in it from now on.

        As in vLLM, the prompt is cached when its prefill runs, so an answer
        cancelled after its first word still leaves it for the next ask.
        """
        prompt = _describe(request)
        hit = prompt in self._cache
        self._cache[prompt] = None
        self._cache.move_to_end(prompt)
        while len(self._cache) > CACHED_PROMPTS:
            self._cache.popitem(last=False)
        return hit

    async def abort(self, request_id: str) -> None:
        self._running.discard(request_id)

    def prefill(self, context: TimelineContext, frames: Sequence[Frame]) -> None:
        if frames:
            self.prefills.append((context.session, len(frames), frames[-1].pts))

    def end_session(self, session: str) -> None:
        self.ended_sessions.append(session)

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


def _describe(request: Request) -> str:
    """The fake's whole answer to ``request``: what it saw and was asked (its prompt's key too)."""
    messages, _ = conversation(request)
    frames = [f for m in messages for p in m.content if isinstance(p, Video) for f in p.frames]
    span = f"{frames[0].pts:.1f}-{frames[-1].pts:.1f}s" if frames else "none"
    turns = sum(m.role == "assistant" for m in messages)
    return (
        f"I see {media_frames(messages)} frames ({span}) after {turns} turns; "
        f"you asked: {_question(request)}"
    )


def _question(request: Request) -> str:
    """The question: a live session's, or the last text of a conversation's last message."""
    if isinstance(request, GenerationRequest):
        return request.question
    texts = [part for part in request.messages[-1].content if isinstance(part, str)]
    return texts[-1] if texts else ""
