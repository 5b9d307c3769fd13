"""The engine seam: what a session needs from a text generator with video input.

Two implementations stand behind it as equals: :mod:`streamchat.engine.vllm`
(vLLM's ``AsyncLLMEngine``) and :mod:`streamchat.engine.fake` (a scripted fake
for fast protocol tests). Sessions only see this module's types.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from ..budget import VisionCosts
from ..window import Frame

__all__ = [
    "ChatRequest",
    "ChatTurn",
    "ContextKind",
    "Delta",
    "Engine",
    "EngineError",
    "GenerationRequest",
    "Image",
    "Message",
    "Part",
    "Request",
    "SamplingOptions",
    "TimelineContext",
    "Usage",
    "Video",
]

FinishReason = Literal["stop", "length", "cancelled", "error"]
ContextKind = Literal["window", "timeline"]
"""How a live session's asks reach the engine: the window as one new prompt per ask, or
appended to the session's timeline (see :class:`TimelineContext`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingOptions:
    """Generation parameters a client may set per session or per question."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    """Strings that end the answer where they appear (not included in it)."""
    choices: tuple[str, ...] = ()
    """When given, the answer is exactly one of these strings (a fixed-choice structured
    output, decoded under a grammar): a yes/no evaluation ends in a token or two."""


@dataclass(frozen=True, slots=True)
class ChatTurn:
    """One earlier exchange of the session, replayed as chat history."""

    question: str
    answer: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TimelineContext:
    """Ask on the session's timeline (:mod:`streamchat.engine.timeline`), not one new video.

    The engine keeps the session's context between asks, so each ask costs
    what is new since the last one; :meth:`Engine.end_session` drops it.
    """

    session: str
    max_frames: int
    """Frames the timeline may hold (the window and its slack) before it is rebased."""
    keep_turns: int
    """Turns a rebase keeps (the newest), as the window context replays at most."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    """Everything the engine needs for one answer.

    ``frames`` are the window snapshot (oldest first) the question is about;
    ``history`` holds earlier turns, oldest first. The engine adapter turns
    them into the model's own prompt with :mod:`streamchat.engine.prompt`.
    """

    request_id: str
    question: str
    frames: Sequence[Frame]
    history: Sequence[ChatTurn] = ()
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    fps: float = 2.0
    """The rate the frames were sampled at (Qwen2.5-VL/Qwen3-VL need it)."""
    timeline: TimelineContext | None = None
    """Set: ``frames`` are the whole window and the engine appends what is new to the
    session's timeline (``history`` is then the engine's own record); None: the
    frames and history go as one new prompt."""


@dataclass(frozen=True, slots=True)
class Video:
    """One video of a prompt: frames oldest first, with their stream times (``Frame.pts``)."""

    frames: Sequence[Frame]
    fps: float
    """The rate the frames were sampled at (what a single frame's clip is told)."""
    measured: bool = True
    """Tell the model the rate measured from the frames' times (a window's clip, whose
    frames may have been thinned) rather than ``fps`` (a timeline's segment: a few
    frames' jitter must not change what the model is told, nor the segment's id)."""


@dataclass(frozen=True, slots=True)
class Image:
    """One picture of a prompt."""

    frame: Frame


Part = str | Video | Image
"""A piece of a message's content: text, a video or an image, in the order the model reads them."""


@dataclass(frozen=True, slots=True)
class Message:
    """One message of a conversation, in the shape every chat template takes."""

    role: Literal["system", "user", "assistant"]
    content: Sequence[Part]


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatRequest:
    """A whole conversation with its media, as OpenAI's chat API carries one.

    Unlike a :class:`GenerationRequest`, nothing in it may be dropped to fit
    the context: a conversation that does not fit is ``ContextTooLong``.
    """

    request_id: str
    messages: Sequence[Message]
    sampling: SamplingOptions = field(default_factory=SamplingOptions)


Request = GenerationRequest | ChatRequest
"""What an engine answers: a live session's question, or a whole conversation."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """What the engine counted for one answer.

    Not the wire's :class:`streamchat.messages.Usage`, which the protocol
    builds from this and the time to the first delta that the session
    measures: the engine layer never sees the wire.
    """

    prompt_tokens: int
    completion_tokens: int
    video_tokens: int
    frames: int
    cached_tokens: int = 0
    """Of ``prompt_tokens``, those the engine did not compute because its prefix
    cache held them (vLLM's ``RequestOutput.num_cached_tokens``): what a client
    and the benchmarks read to see a repeated window's reuse. At most
    ``prompt_tokens``; 0 for an engine without such a cache."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Delta:
    """A piece of an answer. The last delta of a request has ``finish_reason``
    and ``usage`` set; earlier ones have both ``None``."""

    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


class EngineError(Exception):
    """The engine failed to produce an answer (not the client's fault)."""


@runtime_checkable
class Engine(Protocol):
    """A shared generator serving every session of a server."""

    @property
    def model_name(self) -> str: ...

    @property
    def frame_factor(self) -> int | None:
        """Frame sides the model wants as multiples of this (patch x merge), if known."""
        ...

    @property
    def vision_costs(self) -> VisionCosts | None:
        """What video costs in the model's context, if known (the app plans the window by it)."""
        ...

    @property
    def default_context(self) -> ContextKind:
        """The context a session gets unless it chooses: what is truest to the model."""
        ...

    def generate(self, request: Request) -> AsyncGenerator[Delta, None]:
        """Stream the answer to ``request`` as deltas.

        Closing the iterator early (or cancelling its consumer) must abort the
        request in the engine: a session relies on that for ``cancel`` and on
        disconnects.
        """
        ...

    async def abort(self, request_id: str) -> None:
        """Abort a request if it is still running; unknown ids are ignored."""
        ...

    def prefill(self, context: TimelineContext, frames: Sequence[Frame]) -> None:
        """The frames an ask on ``context``'s timeline would carry now, between asks.

        An engine holding the session's timeline may compute the new frames
        ahead of the next question (in the background: this never blocks), so
        that question costs little more than itself; others ignore the call.
        """
        ...

    def end_session(self, session: str) -> None:
        """Forget ``session``'s timeline (if any) and stop work done ahead for it."""
        ...

    def running(self) -> frozenset[str]:
        """Ids of requests the engine is working on now (for health and tests)."""
        ...

    def healthy(self) -> bool:
        """False once the engine has failed for good (``/health`` then answers 503)."""
        ...

    async def aclose(self) -> None: ...
