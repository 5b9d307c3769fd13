"""The session state machine: client messages and events in, actions out. No I/O.

:class:`SessionProtocol` decides everything about a session that needs no
socket, thread or engine: whether a message is allowed now, what the
effective options are, which frames a question sees, and every message the
client is told, which it builds itself. Like ``websockets.protocol`` it can be
tested exhaustively without an event loop. Who calls what::

    endpoint reader ── a decoded ClientMessage ──▶ Session.handle ──▶ receive()
    the session's work ── events ──▶ frame_decoded(), image_decoded(), source_ended(),
        (decoder threads,             answer_delta(), answer_finished(), flush_status()
         fetches, answers)
    receive() and the events ──▶ [Action] ──▶ Session._run carries them out:
        Send(ServerMessage)          queued in the outbox; the endpoint writer encodes it
        StartSource, StopSource, FeedChunk, EndSource, DecodeImage
        StartAnswer, CancelAnswer

The session (:class:`State`)::

    AWAITING_HELLO ──hello──▶ OPEN ──close()──▶ CLOSED
    (anything else before hello is refused with hello_required; after close, ignored)

Its video, one source at a time (:class:`SourceState`): a chunk when no
source is decoding, and every ``video.url``, start a new source, which
replaces the current one and clears the window (its frames are a new
stream's)::

    DECODING ──video.end──▶ ENDING                         video.status: "decoding"
    DECODING | ENDING ──the decoder reached the end──▶ ENDED             "ended"
    DECODING | ENDING ──the decoder or the fetch failed──▶ FAILED        "failed"
    DECODING | ENDING ──replaced by a new source, or closed──▶ ENDED

Its answers: an accepted ``ask`` is in :attr:`SessionProtocol.answers` from
its :class:`StartAnswer` until :meth:`~SessionProtocol.answer_finished`,
which the session calls exactly once per accepted ``ask`` and which yields
its one ``answer.done``; a ``cancel`` marks it, so that ``answer.done`` says
``cancelled`` whatever the engine said. Completed answers (``stop``,
``length``) join the history replayed to later questions.

A refusal is raised inside as a typed :class:`~streamchat.errors.StreamchatError`
and turned into an ``error`` by :meth:`SessionProtocol.error`: :meth:`receive`
never raises for a valid message.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from .config import Settings, timeline_slack
from .engine.base import ChatTurn, ContextKind, GenerationRequest, SamplingOptions, TimelineContext
from .engine.base import Usage as Counted
from .errors import (
    DuplicateHello,
    DuplicateId,
    HelloRequired,
    InvalidField,
    NoFrames,
    ServerShutdown,
    SourceBusy,
    StreamchatError,
    TooManyAsks,
    UnknownId,
    to_error_fields,
)
from .messages import (
    PROTOCOL_VERSION,
    AnswerDelta,
    AnswerDone,
    Ask,
    Cancel,
    ClientMessage,
    Error,
    Generation,
    GoingAway,
    Hello,
    Image,
    Limits,
    Ready,
    ServerMessage,
    SourceStatus,
    Usage,
    VideoChunk,
    VideoEnd,
    VideoStatus,
    VideoUrl,
    message_id,
)
from .window import Frame, FrameWindow

__all__ = [
    "Action",
    "CancelAnswer",
    "DecodeImage",
    "EndSource",
    "FeedChunk",
    "FeedLevel",
    "Send",
    "SessionOptions",
    "SessionProtocol",
    "SourceKind",
    "SourceState",
    "StartAnswer",
    "StartSource",
    "State",
    "StopSource",
]


class State(enum.Enum):
    """The session's state (drawn in the module's docstring)."""

    AWAITING_HELLO = "awaiting_hello"
    OPEN = "open"
    CLOSED = "closed"


class SourceKind(enum.Enum):
    PUSH = "push"
    URL = "url"


class SourceState(enum.Enum):
    """A source's state (drawn in the module's docstring); only :meth:`_Source.move` changes it."""

    DECODING = "decoding"
    """Bytes come in (pushed, or fetched) and are decoded as they do."""
    ENDING = "ending"
    """``video.end`` was received: the decoder drains what it has, then ends."""
    ENDED = "ended"
    """The decoder reached the end, or the source was stopped (replaced, closed)."""
    FAILED = "failed"
    """The decoder or the fetch failed: the client was told why."""

    @property
    def told(self) -> SourceStatus:
        """The state as ``video.status`` tells it: an ending source is still decoding."""
        return _TOLD[self]


_TOLD: dict[SourceState, SourceStatus] = {
    SourceState.DECODING: "decoding",
    SourceState.ENDING: "decoding",
    SourceState.ENDED: "ended",
    SourceState.FAILED: "failed",
}

_MOVES: dict[SourceState, frozenset[SourceState]] = {
    SourceState.DECODING: frozenset({SourceState.ENDING, SourceState.ENDED, SourceState.FAILED}),
    SourceState.ENDING: frozenset({SourceState.ENDED, SourceState.FAILED}),
    SourceState.ENDED: frozenset(),
    SourceState.FAILED: frozenset(),
}


# --- actions for the shell -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    message: ServerMessage


@dataclass(frozen=True, slots=True)
class StartSource:
    """Start decoding source ``number``; a running source was stopped first."""

    number: int
    kind: SourceKind
    container: str | None
    url: str | None = None


@dataclass(frozen=True, slots=True)
class StopSource:
    """Abandon source ``number`` now (it is being replaced)."""

    number: int


@dataclass(frozen=True, slots=True)
class FeedChunk:
    number: int
    data: bytes


@dataclass(frozen=True, slots=True)
class EndSource:
    """No more bytes for source ``number``: decode what is buffered, then end."""

    number: int


@dataclass(frozen=True, slots=True)
class DecodeImage:
    data: bytes
    pts: float


@dataclass(frozen=True, slots=True)
class StartAnswer:
    id: str
    request: GenerationRequest


@dataclass(frozen=True, slots=True)
class CancelAnswer:
    id: str


Action = (
    Send
    | StartSource
    | StopSource
    | FeedChunk
    | EndSource
    | DecodeImage
    | StartAnswer
    | CancelAnswer
)


# --- state -----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionOptions:
    """The effective per-session options after ``hello``, within server limits."""

    fps: float
    window_frames: int
    max_pixels: int
    sampling: SamplingOptions
    keyframes_only: bool = False
    context: ContextKind = "window"
    """How asks reach the engine: ``hello.context``, else the server's default."""
    slack: int = 0
    """Frames a ``timeline`` context holds beyond the window before it is rebased."""


@dataclass(slots=True)
class _Source:
    number: int
    kind: SourceKind
    state: SourceState = SourceState.DECODING
    frames_decoded: int = 0
    bytes_received: int = 0

    @property
    def live(self) -> bool:
        """Its decoder still runs (it has not ended, failed or been stopped)."""
        return self.state in (SourceState.DECODING, SourceState.ENDING)

    def move(self, to: SourceState) -> None:
        """The one place a source changes state; a move the diagram does not draw is a bug."""
        if to not in _MOVES[self.state]:
            raise AssertionError(f"source {self.number}: {self.state.name} -> {to.name}")
        self.state = to


_NOTHING_COUNTED = Counted(prompt_tokens=0, completion_tokens=0, video_tokens=0, frames=0)


@dataclass(slots=True)
class _Answer:
    question: str
    cancelled: bool = False


@dataclass(frozen=True, slots=True)
class FeedLevel:
    """How far a source's decoder is behind: told to the client in ``video.status``."""

    lag: float = 0.0
    """Seconds the oldest undecoded byte has waited."""
    backlog_bytes: int = 0
    """Bytes received but not yet decoded."""


@dataclass(slots=True)
class _StatusClock:
    """Throttles ``video.status`` to one per interval, remembering a skipped one."""

    interval: float
    last: float = field(default=float("-inf"))
    pending: bool = False

    def due(self, now: float) -> bool:
        if now - self.last >= self.interval:
            self.last = now
            self.pending = False
            return True
        self.pending = True
        return False


class SessionProtocol:
    """One client session, from ``hello`` to close."""

    def __init__(self, settings: Settings, *, session_id: str, model: str) -> None:
        self.settings = settings
        self.session_id = session_id
        self.model = model
        self.state = State.AWAITING_HELLO
        self.options = self._options(Hello())
        self.window = FrameWindow(
            max_frames=self.options.window_frames, max_bytes=settings.window_bytes
        )
        self.source: _Source | None = None
        self.answers: dict[str, _Answer] = {}
        self.history: deque[ChatTurn] = deque(maxlen=max(settings.history_turns, 0))
        self._sources = 0
        self._requests = 0
        self._asked_on_timeline = False
        self._status = _StatusClock(settings.status_interval)
        self._image_clock_origin: float | None = None
        self._level = FeedLevel()
        self.draining = False
        """The server is stopping: answers in flight go on, new questions are refused."""

    # -- client messages ----------------------------------------------------

    def receive(self, message: ClientMessage, *, now: float) -> list[Action]:
        """Actions for one valid client message; protocol errors become ``error``s."""
        try:
            return self._receive(message, now)
        except StreamchatError as exc:
            return [self.error(exc)]

    def _receive(self, message: ClientMessage, now: float) -> list[Action]:
        if self.state is State.CLOSED:
            return []
        if isinstance(message, Hello):
            return self._hello(message)
        if self.state is State.AWAITING_HELLO:
            raise HelloRequired(f"send 'hello' before '{message.type}'", id=message_id(message))
        match message:
            case VideoChunk():
                return self._chunk(message)
            case VideoUrl():
                return self._url(message)
            case VideoEnd():
                return self._end()
            case Image():
                return self._image(message, now)
            case Ask():
                return self._ask(message)
            case Cancel():
                return self._cancel(message)
        raise AssertionError(f"unhandled message {message!r}")  # pragma: no cover

    def _hello(self, hello: Hello) -> list[Action]:
        if self.state is not State.AWAITING_HELLO:
            raise DuplicateHello("'hello' was already received")
        self.options = self._options(hello)
        self.window = FrameWindow(
            max_frames=self.options.window_frames, max_bytes=self.settings.window_bytes
        )
        self.state = State.OPEN
        limits = self.limits()
        ready = Ready(
            session=self.session_id, model=self.model, protocol=PROTOCOL_VERSION, limits=limits
        )
        return [Send(ready)]

    def _options(self, hello: Hello) -> SessionOptions:
        s = self.settings
        window_frames = min(hello.window_frames or s.window_frames, s.max_window_frames)
        return SessionOptions(
            fps=min(hello.fps or s.fps, s.max_fps),
            window_frames=window_frames,
            max_pixels=max(min(hello.max_pixels or s.max_pixels, s.max_pixels), s.min_pixels),
            sampling=self._sampling(hello.generation, SamplingOptions(max_tokens=s.max_tokens)),
            keyframes_only=bool(hello.keyframes_only),
            context=hello.context or self._default_context(),
            slack=timeline_slack(s, window_frames),
        )

    def _default_context(self) -> ContextKind:
        """The server's default; ``auto`` left unresolved (no app met the engine) is the window."""
        return "window" if self.settings.context == "auto" else self.settings.context

    @property
    def ask_frames(self) -> int:
        """The most frames an ask without a range carries: the window, unless the model's
        context holds fewer (then the window is thinned to this)."""
        s = self.settings
        return min(
            self.options.window_frames, s.max_window_frames, s.max_ask_frames or s.max_window_frames
        )

    @property
    def context_frames(self) -> int:
        """The most frames an ask may see (``ready.limits.context_frames``): what it
        carries, and on a timeline the slack held before a rebase too."""
        if self.options.context == "timeline":
            return self.ask_frames + self.options.slack
        return self.ask_frames

    def _sampling(self, given: Generation, base: SamplingOptions) -> SamplingOptions:
        return SamplingOptions(
            max_tokens=min(given.max_tokens or base.max_tokens, self.settings.max_tokens_limit),
            temperature=base.temperature if given.temperature is None else given.temperature,
            top_p=base.top_p if given.top_p is None else given.top_p,
            seed=base.seed if given.seed is None else given.seed,
            choices=base.choices if given.choices is None else given.choices,
        )

    def limits(self) -> Limits:
        """Effective limits, told to the client in ``ready``."""
        s, o = self.settings, self.options
        return Limits(
            fps=o.fps,
            window_frames=o.window_frames,
            window_bytes=s.window_bytes,
            min_pixels=s.min_pixels,
            max_pixels=o.max_pixels,
            frame_factor=s.factor,
            max_message_bytes=s.max_message_bytes,
            video_buffer_bytes=s.feed_bytes,
            max_concurrent_asks=s.max_concurrent_asks,
            max_question_chars=s.max_question_chars,
            max_tokens=o.sampling.max_tokens,
            max_tokens_limit=s.max_tokens_limit,
            tokens_per_frame=s.tokens_per_frame or 0,
            max_ask_frames=s.max_ask_frames or 0,
            keyframes_only=o.keyframes_only,
            messages_per_second=s.messages_per_second,
            message_burst=s.message_burst,
            video_bytes_per_second=s.video_bytes_per_second,
            idle_timeout=s.idle_timeout,
            context=o.context,
            context_frames=self.context_frames,
        )

    def _new_source(self, kind: SourceKind, container: str | None, url: str | None) -> list[Action]:
        actions: list[Action] = []
        if self.source is not None and self.source.live:
            self.source.move(SourceState.ENDED)
            actions.append(StopSource(self.source.number))
        self._sources += 1
        self.source = _Source(self._sources, kind)
        self.window.clear()
        actions.append(StartSource(self._sources, kind, container, url))
        return actions

    def _chunk(self, chunk: VideoChunk) -> list[Action]:
        actions: list[Action] = []
        source = self.source
        if source is None or source.state is not SourceState.DECODING:
            actions += self._new_source(SourceKind.PUSH, chunk.format, None)
            source = self.source
            assert source is not None
        elif source.kind is SourceKind.URL:
            raise SourceBusy("a URL source is playing: send 'video.end' before pushing chunks")
        source.bytes_received += len(chunk.data)
        actions.append(FeedChunk(source.number, chunk.data))
        return actions

    def _url(self, message: VideoUrl) -> list[Action]:
        return self._new_source(SourceKind.URL, message.format, message.url)

    def _end(self) -> list[Action]:
        source = self.source
        if source is None or source.state is not SourceState.DECODING:
            return []
        source.move(SourceState.ENDING)
        return [EndSource(source.number)]

    def _image(self, image: Image, now: float) -> list[Action]:
        if image.pts is not None:
            pts = image.pts
        else:
            if self._image_clock_origin is None:
                self._image_clock_origin = now
            pts = now - self._image_clock_origin
        return [DecodeImage(image.data, pts)]

    def _ask(self, ask: Ask) -> list[Action]:
        s = self.settings
        if self.draining:
            raise ServerShutdown("the server is shutting down: no new questions", id=ask.id)
        if ask.id in self.answers:
            raise DuplicateId(f"an answer with id {ask.id!r} is in flight", id=ask.id)
        if len(self.answers) >= s.max_concurrent_asks:
            raise TooManyAsks(
                f"at most {s.max_concurrent_asks} answers may be in flight", id=ask.id
            )
        if len(ask.text) > s.max_question_chars:
            raise InvalidField(
                f"ask: 'text' is longer than {s.max_question_chars} characters", id=ask.id
            )
        if not ask.text.strip():
            raise InvalidField("ask: 'text' must not be empty", id=ask.id)
        timeline = self._timeline(ask)
        if timeline is not None:
            self._asked_on_timeline = True
            # The newest frames, never thinned: a timeline appends frames as they came.
            frames = self.window.select()[-self.ask_frames :]
        else:
            frames = self.window.select(
                start=ask.start,
                end=ask.end,
                last_seconds=ask.last_seconds,
                max_frames=min(ask.max_frames or self.ask_frames, self.ask_frames),
            )
        if not frames:
            what = "in the asked range" if len(self.window) else "yet"
            raise NoFrames(f"no video frames {what}: push video before asking", id=ask.id)
        self._requests += 1
        request = GenerationRequest(
            request_id=f"{self.session_id}-{self._requests}",
            question=ask.text,
            frames=frames,
            history=tuple(self.history),
            sampling=self._sampling(ask.generation, self.options.sampling),
            fps=self.options.fps,
            timeline=timeline,
        )
        self.answers[ask.id] = _Answer(ask.text)
        return [StartAnswer(ask.id, request)]

    def _timeline(self, ask: Ask) -> TimelineContext | None:
        """The session's timeline for an ask about the whole window, else None.

        An ask with a range (``start``, ``end``, ``last_seconds``) or ``max_frames``
        sees other frames than the timeline holds: it goes as one new prompt of its
        own (its frames and the history), which may cost a cold ask, and leaves the
        timeline as it was.
        """
        ranged = (ask.start, ask.end, ask.last_seconds, ask.max_frames)
        if self.options.context != "timeline" or any(v is not None for v in ranged):
            return None
        return self._timeline_context()

    def _timeline_context(self) -> TimelineContext:
        return TimelineContext(
            session=self.session_id,
            max_frames=self.context_frames,
            keep_turns=self.settings.history_turns,
        )

    def ahead(self) -> tuple[TimelineContext, list[Frame]] | None:
        """What the engine may compute before the next question (``Engine.prefill``).

        The frames a timeline ask would carry now, once the session has asked on
        its timeline (before, the engine holds none to extend): the shell hands
        them over as frames arrive, so the next question costs little more than
        itself. None for a window session, or before its first timeline ask.
        """
        if not self._asked_on_timeline or self.state is not State.OPEN:
            return None
        return self._timeline_context(), self.window.select()[-self.ask_frames :]

    def _cancel(self, cancel: Cancel) -> list[Action]:
        answer = self.answers.get(cancel.id)
        if answer is None or answer.cancelled:
            raise UnknownId(f"no answer with id {cancel.id!r} is in flight", id=cancel.id)
        answer.cancelled = True
        return [CancelAnswer(cancel.id)]

    # -- events from the shell ----------------------------------------------

    def frame_decoded(
        self, number: int, frame: Frame, *, now: float, level: FeedLevel
    ) -> list[Action]:
        """A frame of source ``number`` is ready (frames of stopped sources are dropped).

        Status updates are throttled; when one is skipped, :attr:`status_pending`
        tells the shell to call :meth:`flush_status` one interval later, so the
        client's last word on the window is never stale.
        """
        source = self.source
        if source is None or source.number != number:
            return []
        self.window.push(frame)
        source.frames_decoded += 1
        self._level = level
        if self._status.due(now):
            return [Send(self.status())]
        return []

    @property
    def status_pending(self) -> bool:
        return self._status.pending

    def flush_status(self, *, now: float) -> list[Action]:
        """The status skipped by throttling, if any is still owed."""
        if self._status.pending and self.state is State.OPEN and self._status.due(now):
            return [Send(self.status())]
        return []

    def image_decoded(self, frame: Frame) -> list[Action]:
        self.window.push(frame)
        return [Send(self.status())]

    def source_ended(
        self, number: int, error: BaseException | None, *, level: FeedLevel
    ) -> list[Action]:
        """Source ``number`` finished: cleanly, or with ``error``. Frames stay.

        Only a live source's end is told: one already stopped (the session
        closed) has nobody left to tell.
        """
        source = self.source
        if source is None or source.number != number or not source.live:
            return []
        source.move(SourceState.ENDED if error is None else SourceState.FAILED)
        actions: list[Action] = []
        if error is not None:
            actions.append(self.error(error))
        self._level = level
        actions.append(Send(self.status()))
        return actions

    def answer_delta(self, id: str, text: str) -> list[Action]:
        """The engine produced more of answer ``id``: pass it on at once."""
        if id not in self.answers:
            return []
        return [Send(AnswerDelta(id=id, text=text))]

    def answer_finished(
        self, id: str, text: str, finish_reason: str, usage: Counted | None, ttft: float | None
    ) -> list[Action]:
        """Answer ``id`` ended with ``text``; a completed one joins the history.

        ``usage`` is what the engine counted (None if it counted nothing:
        refused, failed, cancelled before it began), ``ttft`` the seconds the
        session measured to the first delta (None if none came).
        """
        answer = self.answers.pop(id, None)
        if answer is None:
            return []
        if answer.cancelled:
            finish_reason = "cancelled"
        if finish_reason in ("stop", "length"):
            self.history.append(ChatTurn(answer.question, text))
        counted = usage or _NOTHING_COUNTED
        told = Usage(
            prompt_tokens=counted.prompt_tokens,
            completion_tokens=counted.completion_tokens,
            video_tokens=counted.video_tokens,
            frames=counted.frames,
            time_to_first_token=ttft,
            cached_tokens=counted.cached_tokens,
        )
        return [Send(AnswerDone(id=id, finish_reason=finish_reason, usage=told))]

    def error(self, exc: BaseException, *, id: str | None = None) -> Send:
        """The ``error`` for ``exc``, naming the error's own id, else ``id``.

        ``id`` is that of the ``ask`` or ``cancel`` being handled when ``exc``
        (a bug, say) was raised: it was refused, so the client must hear which.
        """
        code, message, fatal = to_error_fields(exc)
        if isinstance(exc, StreamchatError) and exc.id is not None:
            id = exc.id
        return Send(Error(code=code, message=message, id=id, fatal=fatal))

    def status(self) -> VideoStatus:
        """Where the current source and the window stand, as ``video.status`` tells it."""
        source = self.source
        width, height = self.window.newest_size
        return VideoStatus(
            source=source.number if source else 0,
            state=source.state.told if source else "ended",
            frames=len(self.window),
            span=round(self.window.span, 3),
            first_pts=self.window.first_pts,
            last_pts=self.window.last_pts,
            decode_lag=round(self._level.lag, 3),
            backlog_bytes=self._level.backlog_bytes,
            frames_decoded=source.frames_decoded if source else 0,
            frames_dropped=self.window.evicted,
            bytes_received=source.bytes_received if source else 0,
            width=width,
            height=height,
        )

    def going_away(self, reason: str, timeout: float) -> list[Action]:
        """The server is stopping: say so, and refuse new questions from now on."""
        self.draining = True
        return [Send(GoingAway(reason=reason, timeout=timeout))]

    def close(self) -> None:
        """The connection is gone: nothing more is received, and the source is over.

        No actions: stopping the work still running is the shell's own
        business, and it must stop more than the protocol knows of (a
        replaced source still draining, an answer past its last delta whose
        ``answer.done`` waits for room in the outbox, threads), so it stops
        everything it runs, rather than what a list from here would name.
        """
        self.state = State.CLOSED
        if self.source is not None and self.source.live:
            self.source.move(SourceState.ENDED)
