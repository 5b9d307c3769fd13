"""The session state machine: client messages in, actions out. No I/O.

:class:`SessionProtocol` decides everything about a session that does not
need a socket, a thread or the engine: whether a message is allowed now, what
the effective options are, which frames a question sees, what the client is
told. The async shell (:mod:`streamchat.session`) feeds it messages and
events (a frame decoded, a source ended, an answer finished) and carries out
the actions it returns. Like ``websockets.protocol``, it can be tested
exhaustively without an event loop.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from .config import Settings
from .engine.base import ChatTurn, GenerationRequest, SamplingOptions, Usage
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
    AnswerDone,
    Ask,
    Cancel,
    ClientMessage,
    Error,
    Generation,
    GoingAway,
    Hello,
    Image,
    Ready,
    ServerMessage,
    VideoChunk,
    VideoEnd,
    VideoStatus,
    VideoUrl,
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
    "StartAnswer",
    "StartSource",
    "State",
    "StopSource",
    "message_id",
]


class State(enum.Enum):
    AWAITING_HELLO = "awaiting_hello"
    OPEN = "open"
    CLOSED = "closed"


class SourceKind(enum.Enum):
    PUSH = "push"
    URL = "url"


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
    | (CancelAnswer)
)


def message_id(message: ClientMessage) -> str | None:
    """The id an error refusing ``message`` names: an ``ask``'s, else none.

    Every refusal of an ``ask``, for whatever reason (a rate, a size, the
    state of the session), names it, so the client can end the answer it
    waits for. A refused ``cancel`` does not: its id is that of an answer
    which may still be running, and an error naming it would read as that
    answer's end (only ``unknown_id``, which says there is no such answer,
    names a cancel's id). The answer then ends by itself, with ``answer.done``.
    """
    if isinstance(message, Ask):
        return message.id
    return None


# --- state -----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionOptions:
    """The effective per-session options after ``hello``, within server limits."""

    fps: float
    window_frames: int
    max_pixels: int
    sampling: SamplingOptions
    keyframes_only: bool = False


@dataclass(slots=True)
class _Source:
    number: int
    kind: SourceKind
    active: bool = True
    """Decoding (or fetching) is still going on."""
    ending: bool = False
    """``video.end`` was received: the decoder drains what it has, then ends."""
    failed: bool = False
    frames_decoded: int = 0
    bytes_received: int = 0


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
        return [
            Send(
                Ready(
                    session=self.session_id,
                    model=self.model,
                    protocol=PROTOCOL_VERSION,
                    limits=self.limits(),
                )
            )
        ]

    def _options(self, hello: Hello) -> SessionOptions:
        s = self.settings
        return SessionOptions(
            fps=min(hello.fps or s.fps, s.max_fps),
            window_frames=min(hello.window_frames or s.window_frames, s.max_window_frames),
            max_pixels=max(min(hello.max_pixels or s.max_pixels, s.max_pixels), s.min_pixels),
            sampling=self._sampling(hello.generation, SamplingOptions(max_tokens=s.max_tokens)),
            keyframes_only=bool(hello.keyframes_only),
        )

    def _sampling(self, given: Generation, base: SamplingOptions) -> SamplingOptions:
        return SamplingOptions(
            max_tokens=min(given.max_tokens or base.max_tokens, self.settings.max_tokens_limit),
            temperature=base.temperature if given.temperature is None else given.temperature,
            top_p=base.top_p if given.top_p is None else given.top_p,
            seed=base.seed if given.seed is None else given.seed,
        )

    def limits(self) -> dict[str, int | float | bool]:
        """Effective limits, told to the client in ``ready``."""
        s, o = self.settings, self.options
        return {
            "fps": o.fps,
            "window_frames": o.window_frames,
            "window_bytes": s.window_bytes,
            "min_pixels": s.min_pixels,
            "max_pixels": o.max_pixels,
            "frame_factor": s.factor,
            "max_message_bytes": s.max_message_bytes,
            "video_buffer_bytes": s.feed_bytes,
            "max_concurrent_asks": s.max_concurrent_asks,
            "max_question_chars": s.max_question_chars,
            "max_tokens": o.sampling.max_tokens,
            "max_tokens_limit": s.max_tokens_limit,
            "tokens_per_frame": s.tokens_per_frame or 0,
            "max_ask_frames": s.max_ask_frames or 0,
            "keyframes_only": o.keyframes_only,
            "messages_per_second": s.messages_per_second,
            "message_burst": s.message_burst,
            "video_bytes_per_second": s.video_bytes_per_second,
            "idle_timeout": s.idle_timeout,
        }

    def _new_source(self, kind: SourceKind, container: str | None, url: str | None) -> list[Action]:
        actions: list[Action] = []
        if self.source is not None and self.source.active:
            actions.append(StopSource(self.source.number))
        self._sources += 1
        self.source = _Source(self._sources, kind)
        self.window.clear()
        actions.append(StartSource(self._sources, kind, container, url))
        return actions

    def _chunk(self, chunk: VideoChunk) -> list[Action]:
        actions: list[Action] = []
        source = self.source
        if source is None or not source.active or source.ending:
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
        if source is None or not source.active or source.ending:
            return []
        source.ending = True
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
        frames = self.window.select(
            start=ask.start,
            end=ask.end,
            last_seconds=ask.last_seconds,
            max_frames=min(
                ask.max_frames or self.options.window_frames,
                s.max_window_frames,
                s.max_ask_frames or s.max_window_frames,
            ),
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
        )
        self.answers[ask.id] = _Answer(ask.text)
        return [StartAnswer(ask.id, request)]

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
        """Source ``number`` finished: cleanly, or with ``error``. Frames stay."""
        source = self.source
        if source is None or source.number != number:
            return []
        source.active = False
        source.failed = error is not None
        actions: list[Action] = []
        if error is not None:
            actions.append(self.error(error))
        self._level = level
        actions.append(Send(self.status()))
        return actions

    def answer_finished(
        self, id: str, text: str, finish_reason: str, usage: Usage | None, ttft: float | None
    ) -> list[Action]:
        """An answer ended; completed answers join the history."""
        answer = self.answers.pop(id, None)
        if answer is None:
            return []
        if answer.cancelled:
            finish_reason = "cancelled"
        if finish_reason in ("stop", "length"):
            self.history.append(ChatTurn(answer.question, text))
        fields: dict[str, int | float | None] = {
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "completion_tokens": usage.completion_tokens if usage else 0,
            "video_tokens": usage.video_tokens if usage else 0,
            "frames": usage.frames if usage else 0,
            "time_to_first_token": ttft,
        }
        return [Send(AnswerDone(id=id, finish_reason=finish_reason, usage=fields))]

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
        source = self.source
        width, height = self.window.newest_size
        state = "ended"
        if source is not None:
            state = "failed" if source.failed else ("decoding" if source.active else "ended")
        return VideoStatus(
            source=source.number if source else 0,
            state=state,
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

    def close(self) -> list[Action]:
        """The connection is gone: stop everything that still runs."""
        self.state = State.CLOSED
        actions: list[Action] = [CancelAnswer(id) for id in self.answers]
        if self.source is not None and self.source.active:
            self.source.active = False
            actions.append(StopSource(self.source.number))
        return actions
