"""The sessions' timelines of the local engine (:mod:`streamchat.engine.vllm`), with no vLLM here.

A session asking on its timeline (:mod:`streamchat.engine.timeline`, the
context of ``hello``) keeps one prompt that grows by new segments and answered
turns, so each ask finds all but its news in vLLM's prefix cache. What that
takes besides rendering prompts lives here, apart from the adapter, which only
renders and submits:

* **appending an ask** (:meth:`TimelineSessions.prepare`): the draft of the ask
  on its session's timeline, rebased on the ask's path when it must be;
* **rebasing ahead** (:meth:`TimelineSessions.answered`): after an answer, a
  timeline that will soon be over its frames or the context is copied,
  rebased to the window and computed in the background; the copy then takes
  over;
* **prefilling** (:meth:`TimelineSessions.prefill`): new full segments computed
  while nobody waits, ahead of the next ask;
* the counts ``/metrics`` exports (:meth:`TimelineSessions.families`).

The adapter hands over four doings (render a prompt with its media, forget a
render never submitted, compute a prompt for the prefix cache, a draft's
messages), so everything here is testable without vLLM.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..window import Frame
from .base import FinishReason, GenerationRequest, Message, Request, TimelineContext
from .prompt import media_frames
from .timeline import MAX_SEGMENTS, Draft, Timeline

__all__ = ["Prepared", "Rendered", "TimelineSessions"]

logger = logging.getLogger("streamchat.engine")


@dataclass(frozen=True, slots=True)
class Rendered:
    """A prompt as vLLM's renderer made it, or its refusal of a text over the context."""

    engine_input: Any
    length: int | None
    """Tokens, video tokens included; None when the text alone was over the context."""
    counted: object
    """What vLLM counted, for the client (None: it counted characters)."""

    def fits(self, answer: int, limit: int) -> bool:
        """The prompt and an answer of ``answer`` tokens fit a context of ``limit``."""
        return self.length is not None and self.length + answer <= limit


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request ready to submit: vLLM's input, the request as fitted, what it shows."""

    engine_input: Any
    request: Request
    frames: int
    length: int
    """Prompt tokens, video tokens included."""
    draft: Draft | None = None
    """The timeline draft the prompt renders (None: one prompt, no timeline)."""
    context: TimelineContext | None = None


@dataclass
class _SessionContext:
    """A session's timeline and what the engine learnt about its prompts."""

    timeline: Timeline
    prompt_tokens: int = 0
    """The last answered prompt with its answer (0: unknown, after a rebase)."""
    warming: asyncio.Task[None] | None = None
    prefilling: asyncio.Task[None] | None = None
    """New segments computed ahead of the next ask (:meth:`TimelineSessions.prefill`)."""

    def prefilled(self, task: asyncio.Task[None]) -> None:
        if self.prefilling is task:
            self.prefilling = None


class TimelineSessions:
    """Every session's timeline in one engine, and the work done ahead for them.

    ``messages`` gives a draft's messages, ``render`` their prompt with its
    media, ``forget`` drops a render never submitted from vLLM's multimodal
    cache, ``compute`` computes a rendered prompt (one token of answer) for the
    prefix cache under a request id. ``max_model_len`` is the context.
    """

    def __init__(
        self,
        *,
        max_model_len: int,
        messages: Callable[[Draft], list[Message]],
        render: Callable[[Sequence[Message]], Awaitable[Rendered]],
        forget: Callable[[Any], None],
        compute: Callable[[Any, str], Awaitable[None]],
    ) -> None:
        self._max_model_len = max_model_len
        self._messages = messages
        self._render = render
        self._forget = forget
        self._submit = compute
        self._sessions: dict[str, _SessionContext] = {}
        self._rebases = {"ahead": 0, "on_ask": 0}
        self._prefills = 0
        self._closed = False

    def families(self) -> Iterator[Metric]:
        """The timelines' metric families (docs/metrics.md)."""
        sessions = GaugeMetricFamily(
            "streamchat_timeline_sessions", "Sessions whose timeline the engine holds"
        )
        sessions.add_metric([], len(self._sessions))
        yield sessions
        rebases = CounterMetricFamily(
            "streamchat_timeline_rebases",
            "Timelines rebased to their window: ahead of the next ask (and warmed up), or on "
            "an ask's path (that ask computes its whole prompt)",
            labels=["when"],
        )
        for when, count in self._rebases.items():
            rebases.add_metric([when], count)
        yield rebases
        prefills = CounterMetricFamily(
            "streamchat_timeline_prefills",
            "Timelines extended by new segments computed ahead of the next ask",
        )
        prefills.add_metric([], self._prefills)
        yield prefills

    def prefill(self, context: TimelineContext, frames: Sequence[Frame]) -> None:
        """Compute the full segments new in ``frames`` now, ahead of the next ask.

        Only for a session that has asked on its timeline, one prefill at a time
        (the next call catches up), never while a rebased copy warms up (the
        call after it took over brings what it missed) nor past the timeline's
        frames or the context. The segments stay pending on the timeline, so the
        next ask shows them as it would have cut them and finds them in the
        prefix cache: it computes its question and at most a cache block more.
        The work is what that ask would do anyway, done while nobody waits.
        """
        session = self._sessions.get(context.session)
        if self._closed or session is None or session.warming is not None:
            return
        if session.prefilling is not None:
            return
        draft = session.timeline.ahead(frames)
        if draft is None or self._over(session.timeline, draft, context):
            return
        self._prefills += 1
        task = asyncio.create_task(
            self._compute(draft, f"{context.session}-ahead-{self._prefills}")
        )
        task.add_done_callback(session.prefilled)
        session.prefilling = task

    def end_session(self, session: str) -> None:
        """Drop ``session``'s timeline; work running ahead for it is cancelled (and aborted)."""
        context = self._sessions.pop(session, None)
        if context is not None:
            for task in (context.warming, context.prefilling):
                if task is not None:
                    task.cancel()

    def warming(self, session: str) -> asyncio.Task[None] | None:
        """The warm-up of ``session``'s rebased timeline, if one was started."""
        context = self._sessions.get(session)
        return context.warming if context is not None else None

    def prefilling(self, session: str) -> asyncio.Task[None] | None:
        """``session``'s prefill running ahead of its next ask, if any."""
        context = self._sessions.get(session)
        return context.prefilling if context is not None else None

    def close(self) -> None:
        """End every session's timeline; nothing is prefilled after."""
        self._closed = True
        for session in list(self._sessions):
            self.end_session(session)

    async def prepare(
        self, request: GenerationRequest, context: TimelineContext
    ) -> Prepared | None:
        """``request`` appended to its session's timeline, rebased first if it must be.

        While a rebased copy warms up, asks go on with the timeline as it is
        (it was rebased ahead, with room left); one that would take it over its
        frames or videos waits for the copy instead. The timeline is rebased on
        the ask's path when it would hold more frames or videos than it may, or
        when its prompt and the answer would not fit the context; a rebased one
        that still does not fit is left to the one-prompt path (None), which
        trims history or refuses.
        """
        session = self._sessions.get(context.session)
        if session is None:
            session = self._sessions[context.session] = _SessionContext(Timeline(fps=request.fps))
        wanted, limit = request.sampling.max_tokens, self._max_model_len
        draft = session.timeline.draft(request.frames, request.question)
        if session.warming is not None and self._over(session.timeline, draft, context):
            await asyncio.wait([session.warming])  # the copy takes over, with the cut segments
            draft = session.timeline.draft(request.frames, request.question)
        for rebased in (False, True):
            if rebased and session.warming is not None:
                await asyncio.wait([session.warming])  # never rebase under a copy's feet
            if rebased or self._over(session.timeline, draft, context):
                self._rebase(session, request, context, when="on_ask")
                draft = session.timeline.draft(request.frames, request.question)
            messages = self._messages(draft)
            rendered = await self._render(messages)
            if rendered.fits(wanted, limit) and len(draft.segments) <= MAX_SEGMENTS:
                assert rendered.length is not None
                return Prepared(
                    rendered.engine_input,
                    request,
                    media_frames(messages),
                    rendered.length,
                    draft=draft,
                    context=context,
                )
            self._forget(rendered.engine_input)
            if rebased:
                break
        logger.info("request %s: the timeline does not fit the context", request.request_id)
        return None

    def answered(
        self, prepared: Prepared, reason: FinishReason | None, text: str, completion_tokens: int
    ) -> None:
        """A finished answer joins its session's timeline; rebase ahead if it soon must.

        The next asks are expected to add what this one added (frames and
        tokens). Once half the slack is used (or the next ask but one would
        not fit the context), a rebased copy is made and computed in the
        background (one token of answer) while asks go on with the timeline;
        the copy then takes over, and the ask after finds it in the prefix cache.
        """
        draft, context, request = prepared.draft, prepared.context, prepared.request
        if draft is None or context is None or not isinstance(request, GenerationRequest):
            return
        if reason not in ("stop", "length"):
            return
        session = self._sessions.get(context.session)
        if session is None:
            return
        timeline = session.timeline
        timeline.commit(draft, text)
        if session.warming is not None:  # a rebased copy is on its way already
            return
        # What the next ask adds is guessed from what this one added, unless this one
        # started the timeline (then the whole window was new).
        grown = prepared.length - session.prompt_tokens if session.prompt_tokens else 0
        session.prompt_tokens = prepared.length + completion_tokens
        new_frames = sum(len(s.frames) for s in draft.new) if draft.entries else 0
        slack = max(context.max_frames - len(request.frames), 0)
        next_tokens = session.prompt_tokens + 2 * max(grown, 0) + request.sampling.max_tokens
        if (
            timeline.frames + new_frames > len(request.frames) + slack // 2
            or len(timeline.segments) + 2 * len(draft.new) > MAX_SEGMENTS
            or next_tokens > self._max_model_len
        ):
            copy = self._rebase(session, request, context, when="ahead")
            mark = len(timeline.entries)
            warming = asyncio.create_task(
                self._compute(copy.draft((), ""), f"{request.request_id}-warm")
            )
            warming.add_done_callback(lambda _: self._adopt(session, copy, mark))
            session.warming = warming

    # -- helpers --------------------------------------------------------------

    @staticmethod
    def _over(timeline: Timeline, draft: Draft, context: TimelineContext) -> bool:
        """``draft`` takes ``timeline`` over its frames or its videos."""
        return timeline.frames > context.max_frames or len(draft.segments) > MAX_SEGMENTS

    def _rebase(
        self,
        session: _SessionContext,
        request: GenerationRequest,
        context: TimelineContext,
        *,
        when: str,
    ) -> Timeline:
        """Rebase ``session``'s timeline to ``request``'s window: now (on an ask's path), or
        ``ahead`` as a copy that :meth:`_compute` computes and that then takes over."""
        start = request.frames[0].pts if request.frames else float("inf")
        logger.info(
            "request %s: timeline of %d frames rebased to t=%.1fs (%s)",
            request.request_id,
            session.timeline.frames,
            start,
            when.replace("_", " "),
        )
        self._rebases[when] += 1
        if when == "ahead":
            return session.timeline.rebased(start, turns=context.keep_turns)
        session.timeline.rebase(start, turns=context.keep_turns)
        session.prompt_tokens = 0
        return session.timeline

    def _adopt(self, session: _SessionContext, copy: Timeline, mark: int) -> None:
        """The warm-up ended (or failed, or was cancelled): the rebased copy takes over."""
        copy.adopt(session.timeline, mark)
        session.timeline, session.warming, session.prompt_tokens = copy, None, 0

    async def _compute(self, draft: Draft, request_id: str) -> None:
        """Compute ``draft``'s prompt (one token of answer) for the prefix cache: a rebased
        copy's, or the timeline's with segments cut ahead of the next ask."""
        try:
            rendered = await self._render(self._messages(draft))
            if not rendered.fits(1, self._max_model_len):
                self._forget(rendered.engine_input)
                return
            await self._submit(rendered.engine_input, request_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # it only saves time: the next ask computes it
            logger.info("computing %s failed: %s", request_id, exc)
