"""The protocol's vocabulary, and the one place that turns it into bytes and back.

A session as the wire sees it (``docs/protocol.md`` has every field)::

    client                                  server
    hello ──────────────────────────────▶   options capped by the server's limits
          ◀──────────────────────────────   ready: session id, model, protocol, Limits
    video.chunk… video.end | video.url  ─▶  a source: decoded in the background
    image ──────────────────────────────▶   one frame
          ◀──────────────────────────────   video.status: throttled, and when a source ends
    ask {id} ───────────────────────────▶   about the frames in the window now
          ◀──────────────────────────────   answer.delta {id}…, then one answer.done {id, Usage}
    cancel {id} ────────────────────────▶   that answer.done says "cancelled"
          ◀──────────────────────────────   error {code, id, fatal}: anything refused, any time
          ◀──────────────────────────────   going_away: the server is stopping; then the close

**Two families of frozen dataclasses**, each message tagged by its ``type``.
Client to server (:data:`ClientMessage`) are only ever *decoded*, by
:func:`decode_client`, which validates every field and raises the typed errors
of :mod:`streamchat.errors`: nothing else in the server parses client input.
Server to client (:data:`ServerMessage`, with the nested :class:`Limits` and
:class:`Usage`) are only ever *built* by :mod:`streamchat.protocol` and
*encoded* by :func:`encode_server`: every field is always sent (``None`` as
null), so what a client receives is exactly the dataclass. The bundled client
mirrors that family in ``streamchat_client.messages``; ``tests/contract``
fails when the two disagree on a field.

**Two encodings**: msgpack in a binary WebSocket frame, JSON in a text frame
(browsers; byte fields are base64 there). The server answers in the encoding
of the client's most recent message.

**Bounded decoding**: the endpoint refuses a frame over ``max_message_bytes``
unread; below that, a message is parsed only once its structure is known to
be small (:mod:`streamchat.wireshape`: :data:`MAX_VALUES` values, nesting
:data:`MAX_DEPTH` deep, counted without building anything), so what parsing
one costs is bounded by its size alone. Field values are bounded too (ids,
tokens, URLs, sampling values the engine accepts). Unknown fields are
ignored, so later versions can add some; an unknown ``type`` is refused.

**Who calls what**: the endpoint decodes each frame and hands the message to
the session; the session feeds it to the pure protocol, which decides and
returns actions; among them ``Send(message)``, which the endpoint encodes.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal, TypeVar, cast, get_args

import msgpack

from .errors import BadMessage, InvalidField, UnknownType
from .wireshape import MAX_DEPTH, MAX_VALUES, PEEK_CHARS, check_size, head_fields, nesting

__all__ = [
    "PROTOCOL_VERSION",
    "AnswerDelta",
    "AnswerDone",
    "Ask",
    "CONTEXTS",
    "Cancel",
    "ClientMessage",
    "ContextKind",
    "Error",
    "Generation",
    "GoingAway",
    "Hello",
    "Image",
    "Limits",
    "MAX_DEPTH",
    "MAX_VALUES",
    "PEEK_CHARS",
    "Ready",
    "ServerMessage",
    "SourceStatus",
    "Usage",
    "VideoChunk",
    "VideoEnd",
    "VideoStatus",
    "VideoUrl",
    "decode_client",
    "encode_server",
    "message_id",
    "parse_choices",
    "peek_id",
]

PROTOCOL_VERSION = 1

CONTAINER_FORMATS = frozenset({"webm", "matroska", "mp4", "mpegts", "avi"})
MAX_ID_CHARS = 128
MAX_TOKEN_CHARS = 512
MAX_URL_CHARS = 8192
MAX_TEMPERATURE = 2.0
MIN_TEMPERATURE = 0.01
"""The lowest temperature but 0 (greedy): vLLM raises lower ones to it, with a warning each time."""
MAX_SEED = (1 << 63) - 1
MAX_CHOICES = 16
"""Strings a fixed-choice answer may choose among (``generation.choices``)."""
MAX_CHOICE_CHARS = 100

ContextKind = Literal["window", "timeline"]
"""A session's context as the wire names it (the engine seam's ``ContextKind``, which the
wire does not import: the engine layer and the wire stay apart)."""
CONTEXTS: frozenset[str] = frozenset(get_args(ContextKind))


# --- client -> server ------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Generation:
    """Generation parameters; ``None`` means "the session's default"."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    choices: tuple[str, ...] | None = None
    """The answer is exactly one of these (a fixed-choice structured output): a yes/no
    evaluation costs a token or two and needs no parsing."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """Opens the session (the first message); every option is capped by the server."""

    type: ClassVar[str] = "hello"
    fps: float | None = None
    window_frames: int | None = None
    max_pixels: int | None = None
    generation: Generation = field(default_factory=Generation)
    keyframes_only: bool | None = None
    """Decode keyframes only: many times faster, about one frame per keyframe interval."""
    token: str | None = field(default=None, repr=False)
    """An API key, for clients that can give it neither as a header nor a subprotocol."""
    context: ContextKind | None = None
    """How asks reach the model: ``window`` (the window as one new video per ask) or
    ``timeline`` (appended to the session's timeline, costing what is new); None: the
    server's default. ``ready.limits.context`` tells what the session got."""


@dataclass(frozen=True, slots=True, kw_only=True)
class VideoChunk:
    """The next bytes of the pushed source, cut anywhere; the first starts a new source."""

    type: ClassVar[str] = "video.chunk"
    data: bytes
    format: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class VideoUrl:
    """A video for the server to fetch and decode: a new source, replacing the current one."""

    type: ClassVar[str] = "video.url"
    url: str
    format: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class VideoEnd:
    """No more bytes for the pushed source: decode what is buffered, then end it."""

    type: ClassVar[str] = "video.end"


@dataclass(frozen=True, slots=True, kw_only=True)
class Image:
    """A still image, one frame of the window."""

    type: ClassVar[str] = "image"
    data: bytes
    pts: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Ask:
    """A question about the frames in the window now; its answer streams back under ``id``."""

    type: ClassVar[str] = "ask"
    id: str
    text: str
    generation: Generation = field(default_factory=Generation)
    last_seconds: float | None = None
    start: float | None = None
    end: float | None = None
    max_frames: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel:
    """Stop the answer ``id``: it still ends, with ``answer.done`` saying ``cancelled``."""

    type: ClassVar[str] = "cancel"
    id: str


ClientMessage = Hello | VideoChunk | VideoUrl | VideoEnd | Image | Ask | Cancel


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


# --- server -> client ------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """What the server holds this session to, told once in ``ready``.

    The options ``hello`` asked for, as capped, and the server's own bounds,
    so that a client can stay within them instead of learning them from
    refusals. Field order is wire order.
    """

    fps: float
    window_frames: int
    window_bytes: int
    min_pixels: int
    max_pixels: int
    frame_factor: int
    """Frame sides are multiples of this (the model's patch times its merge)."""
    max_message_bytes: int
    video_buffer_bytes: int
    """Undecoded bytes a source may hold; more is refused (``video_backlog_full``)."""
    max_concurrent_asks: int
    max_question_chars: int
    max_tokens: int
    """The session's default answer length."""
    max_tokens_limit: int
    tokens_per_frame: int
    """The most context tokens one frame costs; 0 when the engine cannot tell."""
    max_ask_frames: int
    """The most frames one question carries (what fits the context); 0 when not known."""
    keyframes_only: bool
    messages_per_second: float
    message_burst: int
    video_bytes_per_second: int
    idle_timeout: float
    context: ContextKind
    """How asks reach the model (``hello.context``, else the server's default). Fields
    added after protocol 1 go last: older clients ignore them."""
    context_frames: int
    """The most frames an ask may see: the window for ``window``; for ``timeline`` the
    window plus the slack the timeline holds before it is rebased (an ask sees at least
    the window, at most this)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Ready:
    """The answer to ``hello``: the session is open."""

    type: ClassVar[str] = "ready"
    session: str
    model: str
    protocol: int
    limits: Limits


SourceStatus = Literal["decoding", "ended", "failed"]
"""A source's state as the client is told it (``protocol.SourceState`` has the finer one)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class VideoStatus:
    """Where decoding and the window stand."""

    type: ClassVar[str] = "video.status"
    source: int
    """The source's number in the session (1, 2, ...); 0 before any."""
    state: SourceStatus
    frames: int
    span: float
    first_pts: float | None
    last_pts: float | None
    decode_lag: float
    backlog_bytes: int
    frames_decoded: int
    frames_dropped: int
    bytes_received: int
    width: int = 0
    """Width of the newest frame as the model gets it (upright, resized); 0 before any."""
    height: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class AnswerDelta:
    """The next piece of answer ``id``'s text."""

    type: ClassVar[str] = "answer.delta"
    id: str
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """What an answer cost, in ``answer.done``: zeros when the engine counted nothing.

    The engine's own count (:class:`streamchat.engine.base.Usage`) is a type
    of its own: this one adds what only the session measures, and the engine
    layer never sees the wire.
    """

    prompt_tokens: int
    completion_tokens: int
    video_tokens: int
    """Tokens the frames took in the prompt."""
    frames: int
    """Frames the answer saw."""
    time_to_first_token: float | None
    """Seconds from the ``ask`` to the first delta, measured by the server; None if none came."""
    cached_tokens: int
    """Of ``prompt_tokens``, those served from the engine's prefix cache, not computed again: an
    ask whose prompt starts as an earlier one's did (same frames, same history) costs the rest.
    Last, as fields added after protocol 1 are: older clients ignore it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AnswerDone:
    """The end of answer ``id``: every accepted ``ask`` gets exactly one."""

    type: ClassVar[str] = "answer.done"
    id: str
    finish_reason: str
    """``stop``, ``length``, ``cancelled``, ``error`` or ``shutdown``."""
    usage: Usage


@dataclass(frozen=True, slots=True, kw_only=True)
class Error:
    """Something was refused or failed; ``id`` names the ``ask`` concerned (:func:`message_id`)."""

    type: ClassVar[str] = "error"
    code: str
    message: str
    id: str | None = None
    fatal: bool = False
    """The server closes the session after this error."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GoingAway:
    """The server is stopping: no new questions; answers in flight get ``timeout`` seconds."""

    type: ClassVar[str] = "going_away"
    reason: str
    timeout: float


ServerMessage = Ready | VideoStatus | AnswerDelta | AnswerDone | Error | GoingAway


def encode_server(message: ServerMessage, *, binary: bool) -> bytes | str:
    """msgpack bytes for a binary frame, or JSON text for a text frame."""
    payload = {"type": message.type, **asdict(message)}
    if binary:
        packed: bytes = msgpack.packb(payload, use_bin_type=True)
        return packed
    return json.dumps(payload, separators=(",", ":"), allow_nan=False)


# --- decoding --------------------------------------------------------------


def _reject_ext(code: int, data: bytes) -> object:
    raise BadMessage(f"msgpack extension types are not accepted (got type {code})")


def _load(data: bytes | str) -> Mapping[str, Any]:
    try:
        check_size(data)
    except BadMessage as exc:
        raise BadMessage(exc.message, id=peek_id(data)) from None
    try:
        if isinstance(data, str):
            value = json.loads(data)
        else:
            value = msgpack.unpackb(
                data,
                raw=False,
                strict_map_key=True,
                ext_hook=_reject_ext,
                use_list=True,
                max_array_len=MAX_VALUES,
                max_map_len=MAX_VALUES,
            )
    except BadMessage:
        raise
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
        kind = "JSON" if isinstance(data, str) else "msgpack"
        raise BadMessage(f"not valid {kind}: {exc.__class__.__name__}") from None
    if nesting(value) > MAX_DEPTH:
        raise BadMessage(
            f"maps and arrays nest at most {MAX_DEPTH} deep in a message", id=peek_id(data)
        )
    if not isinstance(value, dict):
        raise BadMessage("a message must be a map with a 'type'")
    return value


_PEEKED = ("type", "id")


def peek_id(data: bytes | str) -> str | None:
    """The id of an ``ask`` that is not parsed (too large, too complex), if its head names one.

    The head is read at a bounded cost (:func:`~streamchat.wireshape.head_fields`).
    Clients write ``type`` and ``id`` first (the bundled client and browsers'
    ``JSON.stringify`` of ``{type, id, text}`` do); an id found nowhere
    before the first map or array is not named, nor one the decoder would
    refuse.
    """
    fields = head_fields(data, _PEEKED)
    id = fields.get("id")
    if fields.get("type") != "ask" or not isinstance(id, str):
        return None
    return id if 0 < len(id) <= MAX_ID_CHARS else None


_T = TypeVar("_T")


class _Fields:
    """Typed access to one decoded map, raising ``invalid_field`` errors."""

    def __init__(self, raw: Mapping[str, Any], *, text: bool, context: str) -> None:
        self.raw = raw
        self.text = text
        self.context = context
        self.id: str | None = None

    def _fail(self, name: str, why: str) -> InvalidField:
        return InvalidField(f"{self.context}: '{name}' {why}", id=self.id)

    def _get(self, name: str, required: bool) -> Any:
        if name not in self.raw or self.raw[name] is None:
            if required:
                raise self._fail(name, "is required")
            return None
        return self.raw[name]

    def string(self, name: str, *, required: bool = False, max_chars: int | None = None) -> Any:
        value = self._get(name, required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self._fail(name, "must be a string")
        if max_chars is not None and len(value) > max_chars:
            raise self._fail(name, f"is longer than {max_chars} characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise self._fail(name, "is not valid Unicode text") from None
        return value

    def number(
        self, name: str, *, low: float | None = None, high: float | None = None
    ) -> float | None:
        value = self._get(name, False)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(name, "must be a number")
        try:
            value = float(value)
        except OverflowError:  # a JSON integer beyond any double
            raise self._fail(name, "must be finite") from None
        if not math.isfinite(value):
            raise self._fail(name, "must be finite")
        if (low is not None and value < low) or (high is not None and value > high):
            raise self._fail(name, f"must be between {low} and {high}")
        return value

    def integer(self, name: str, *, low: int, high: int) -> int | None:
        value = self._get(name, False)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(name, "must be an integer")
        if not low <= value <= high:
            raise self._fail(name, f"must be between {low} and {high}")
        return value

    def boolean(self, name: str) -> bool | None:
        value = self._get(name, False)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise self._fail(name, "must be true or false")
        return value

    def data(self, name: str) -> bytes:
        value = self._get(name, True)
        if self.text:
            if not isinstance(value, str):
                raise self._fail(name, "must be a base64 string in JSON")
            try:
                return base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise self._fail(name, "is not valid base64") from None
        if not isinstance(value, bytes):
            raise self._fail(name, "must be msgpack binary")
        return value

    def choices(self, name: str) -> tuple[str, ...] | None:
        value = self._get(name, False)
        if value is None:
            return None
        try:
            return parse_choices(value)
        except ValueError as exc:
            raise self._fail(name, str(exc)) from None

    def choice(self, name: str, options: frozenset[str]) -> str | None:
        value = self.string(name)
        if value is not None and value not in options:
            raise self._fail(name, f"must be one of {', '.join(sorted(options))}")
        return value  # type: ignore[no-any-return]

    def nested(self, name: str, parse: Callable[[_Fields], _T], default: _T) -> _T:
        value = self._get(name, False)
        if value is None:
            return default
        if not isinstance(value, dict):
            raise self._fail(name, "must be a map")
        inner = _Fields(value, text=self.text, context=f"{self.context}.{name}")
        inner.id = self.id
        return parse(inner)


def parse_choices(value: object) -> tuple[str, ...]:
    """The strings of a fixed-choice answer, bounded (the grammar built from them is too).

    Raises ValueError saying why (without the field's name) for anything else
    than 2 to :data:`MAX_CHOICES` distinct, non-blank strings of at most
    :data:`MAX_CHOICE_CHARS` characters each.
    """
    if not isinstance(value, list | tuple) or not 2 <= len(value) <= MAX_CHOICES:
        raise ValueError(f"must be a list of 2 to {MAX_CHOICES} strings")
    for item in value:
        if not isinstance(item, str) or not 1 <= len(item) <= MAX_CHOICE_CHARS:
            raise ValueError(f"must hold strings of 1 to {MAX_CHOICE_CHARS} characters")
    items = tuple(value)
    try:
        "".join(items).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode text") from None
    if not all(item.strip() for item in items) or len(set(items)) != len(items):
        raise ValueError("must hold distinct strings that are not blank")
    return items


def _generation(f: _Fields) -> Generation:
    """Sampling values within what the engine accepts, so none becomes an engine error.

    vLLM's ``SamplingParams`` refuses a temperature above 2 and a ``top_p``
    of 0 (it must be in (0, 1]), and raises a temperature between 0 and 0.01
    to 0.01 with a warning in the log per request: those are refused here,
    naming the field, before a question reaches the engine.
    """
    temperature = f.number("temperature", low=0.0, high=MAX_TEMPERATURE)
    if temperature is not None and 0.0 < temperature < MIN_TEMPERATURE:
        raise f._fail("temperature", f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
    top_p = f.number("top_p", low=0.0, high=1.0)
    if top_p == 0.0:
        raise f._fail("top_p", "must be above 0 and at most 1")
    return Generation(
        max_tokens=f.integer("max_tokens", low=1, high=1 << 20),
        temperature=temperature,
        top_p=top_p,
        seed=f.integer("seed", low=0, high=MAX_SEED),
        choices=f.choices("choices"),
    )


def _hello(f: _Fields) -> Hello:
    return Hello(
        fps=f.number("fps", low=0.01, high=120.0),
        window_frames=f.integer("window_frames", low=1, high=1 << 20),
        max_pixels=f.integer("max_pixels", low=1, high=1 << 40),
        generation=f.nested("generation", _generation, Generation()),
        keyframes_only=f.boolean("keyframes_only"),
        token=f.string("token", max_chars=MAX_TOKEN_CHARS),
        context=cast("ContextKind | None", f.choice("context", CONTEXTS)),
    )


def _ask(f: _Fields) -> Ask:
    return Ask(
        id=f.id or "",
        text=f.string("text", required=True),
        generation=f.nested("generation", _generation, Generation()),
        last_seconds=f.number("last_seconds", low=0.0),
        start=f.number("start"),
        end=f.number("end"),
        max_frames=f.integer("max_frames", low=1, high=1 << 20),
    )


_PARSERS: dict[str, Callable[[_Fields], ClientMessage]] = {
    "hello": _hello,
    "video.chunk": lambda f: VideoChunk(
        data=f.data("data"), format=f.choice("format", CONTAINER_FORMATS)
    ),
    "video.url": lambda f: VideoUrl(
        url=f.string("url", required=True, max_chars=MAX_URL_CHARS),
        format=f.choice("format", CONTAINER_FORMATS),
    ),
    "video.end": lambda f: VideoEnd(),
    "image": lambda f: Image(data=f.data("data"), pts=f.number("pts")),
    "ask": _ask,
    "cancel": lambda f: Cancel(id=f.id or ""),
}

_NEEDS_ID = frozenset({"ask", "cancel"})


def decode_client(data: bytes | str) -> ClientMessage:
    """Parse and validate one client message (``str`` for JSON text frames)."""
    raw = _load(data)
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise BadMessage("a message must have a string 'type'")
    parse = _PARSERS.get(kind)
    if parse is None:
        shown = kind if len(kind) <= 40 else kind[:40] + "..."
        raise UnknownType(f"unknown message type {shown!r}")
    fields = _Fields(raw, text=isinstance(data, str), context=kind)
    if kind in _NEEDS_ID:
        fields.id = fields.string("id", required=True, max_chars=MAX_ID_CHARS)
        if not fields.id:
            raise InvalidField(f"{kind}: 'id' must not be empty")
    return parse(fields)
