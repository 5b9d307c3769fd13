"""Protocol v1 messages and the one place that touches the wire format.

A message is a map with a ``type``. It travels as msgpack in a binary
WebSocket frame or as JSON in a text frame (browsers); the server answers in
the encoding of the client's most recent message. In JSON, byte fields are
base64 strings. See ``docs/protocol.md`` for the full description.

Decoding validates everything a client sends and raises the typed errors of
:mod:`streamchat.errors`; nothing else in the server parses client input.
A message is parsed only once its structure is known to be small (see
:data:`MAX_VALUES`), so what parsing one costs is bounded by its size alone.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, TypeVar

import msgpack

from .errors import BadMessage, InvalidField, UnknownType

__all__ = [
    "PROTOCOL_VERSION",
    "AnswerDelta",
    "AnswerDone",
    "Ask",
    "Cancel",
    "ClientMessage",
    "Error",
    "Generation",
    "GoingAway",
    "Hello",
    "Image",
    "MAX_DEPTH",
    "MAX_VALUES",
    "PEEK_CHARS",
    "Ready",
    "ServerMessage",
    "VideoChunk",
    "VideoEnd",
    "VideoStatus",
    "VideoUrl",
    "decode_client",
    "encode_server",
    "peek_id",
]

PROTOCOL_VERSION = 1

CONTAINER_FORMATS = frozenset({"webm", "matroska", "mp4", "mpegts", "avi"})
MAX_ID_CHARS = 128
MAX_TOKEN_CHARS = 512
MAX_TEMPERATURE = 2.0
MIN_TEMPERATURE = 0.01
"""The lowest temperature but 0 (greedy): vLLM raises lower ones to it, with a warning each time."""
MAX_SEED = (1 << 63) - 1

MAX_VALUES = 256
"""Most values one message may hold, map keys included (a ``hello`` with every field holds 23).

Decoding builds a Python object per value: a 4 MiB message of empty arrays is
millions of them, seconds of the event loop and hundreds of MiB. The bound is
checked before anything is built, by walking the message's structure
(:func:`_check_msgpack`, :func:`_check_json`). Unknown fields are ignored,
so later versions can add some: ten times what version 1 uses is room enough.
"""
MAX_DEPTH = 4
"""Deepest nesting of maps and arrays, the message itself counting one (version 1 uses 2)."""
PEEK_CHARS = 64 * 1024
"""How much of a message that is not parsed is read for the id of the ask it may be."""


# --- client -> server ------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Generation:
    """Generation parameters; ``None`` means "the session's default"."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    type: ClassVar[str] = "hello"
    fps: float | None = None
    window_frames: int | None = None
    max_pixels: int | None = None
    generation: Generation = field(default_factory=Generation)
    keyframes_only: bool | None = None
    """Decode keyframes only: many times faster, about one frame per keyframe interval."""
    token: str | None = field(default=None, repr=False)
    """An API key, for clients that can give it neither as a header nor a subprotocol."""


@dataclass(frozen=True, slots=True, kw_only=True)
class VideoChunk:
    type: ClassVar[str] = "video.chunk"
    data: bytes
    format: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class VideoUrl:
    type: ClassVar[str] = "video.url"
    url: str
    format: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class VideoEnd:
    type: ClassVar[str] = "video.end"


@dataclass(frozen=True, slots=True, kw_only=True)
class Image:
    type: ClassVar[str] = "image"
    data: bytes
    pts: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Ask:
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
    type: ClassVar[str] = "cancel"
    id: str


ClientMessage = Hello | VideoChunk | VideoUrl | VideoEnd | Image | Ask | Cancel


# --- server -> client ------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Ready:
    type: ClassVar[str] = "ready"
    session: str
    model: str
    protocol: int
    limits: dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class VideoStatus:
    type: ClassVar[str] = "video.status"
    source: int
    state: str
    """``decoding``, ``ended`` or ``failed``."""
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
    type: ClassVar[str] = "answer.delta"
    id: str
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AnswerDone:
    type: ClassVar[str] = "answer.done"
    id: str
    finish_reason: str
    usage: dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class Error:
    type: ClassVar[str] = "error"
    code: str
    message: str
    id: str | None = None
    fatal: bool = False


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
        _check_shape(data)
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
    if _nesting(value) > MAX_DEPTH:
        raise BadMessage(
            f"maps and arrays nest at most {MAX_DEPTH} deep in a message", id=peek_id(data)
        )
    if not isinstance(value, dict):
        raise BadMessage("a message must be a map with a 'type'")
    return value


# --- structure bounds ------------------------------------------------------
# Both checks read a message without building anything from it and stop as soon
# as it is over MAX_VALUES: their cost is one pass over the bytes in C plus at
# most MAX_VALUES steps in Python, whatever the message holds. A message they
# cannot follow (truncated, not msgpack or JSON) is left to the decoder, which
# then refuses it having built no more values than were counted before the fault.


def _too_many() -> BadMessage:
    return BadMessage(f"a message holds at most {MAX_VALUES} values, map keys included")


def _check_shape(data: bytes | str) -> None:
    """Raise ``BadMessage`` if decoding ``data`` would build more than :data:`MAX_VALUES`."""
    if isinstance(data, str):
        _check_json(data)
    else:
        _check_msgpack(data)


_VALUE, _ARRAY, _MAP, _NEVER = range(4)


def _msgpack_head(byte: int) -> tuple[int, int, int]:
    """What a msgpack value whose type byte is ``byte`` is: ``(kind, fixed, width)``.

    ``width`` is the size of the length that follows the type byte (str, bin,
    ext, array and map 16/32); ``fixed`` is the rest of a value's size beyond
    that length (a fixstr's length, a number's bytes, an ext's type byte), or
    the count of a fixarray or fixmap.
    """
    if byte <= 0x7F or byte >= 0xE0 or byte in (0xC0, 0xC2, 0xC3):
        return _VALUE, 0, 0  # fixint, nil, bool
    if byte <= 0x8F:
        return _MAP, byte & 0x0F, 0
    if byte <= 0x9F:
        return _ARRAY, byte & 0x0F, 0
    if byte <= 0xBF:
        return _VALUE, byte & 0x1F, 0  # fixstr
    if byte == 0xC1:
        return _NEVER, 0, 0
    if byte <= 0xC6:
        return _VALUE, 0, 1 << (byte - 0xC4)  # bin 8/16/32
    if byte <= 0xC9:
        return _VALUE, 1, 1 << (byte - 0xC7)  # ext 8/16/32
    if byte <= 0xCB:
        return _VALUE, 4 << (byte - 0xCA), 0  # float 32/64
    if byte <= 0xCF:
        return _VALUE, 1 << (byte - 0xCC), 0  # uint 8..64
    if byte <= 0xD3:
        return _VALUE, 1 << (byte - 0xD0), 0  # int 8..64
    if byte <= 0xD8:
        return _VALUE, 1 + (1 << (byte - 0xD4)), 0  # fixext 1..16
    if byte <= 0xDB:
        return _VALUE, 0, 1 << (byte - 0xD9)  # str 8/16/32
    if byte <= 0xDD:
        return _ARRAY, 0, 2 << (byte - 0xDC)  # array 16/32
    return _MAP, 0, 2 << (byte - 0xDE)  # map 16/32


_MSGPACK_HEADS = tuple(_msgpack_head(byte) for byte in range(256))


def _check_msgpack(data: bytes) -> None:
    """Count a msgpack message's values from their headers, skipping strings and bytes.

    Maps and arrays declare their sizes up front: a message declaring more than
    :data:`MAX_VALUES` values is refused as soon as the declaration is read, so
    the walk takes at most that many steps.
    """
    pending = [1]  # values still to come in each open container, the message itself first
    declared = 1
    at = 0
    while pending:
        if not pending[-1]:
            pending.pop()
            continue
        pending[-1] -= 1
        if at >= len(data):
            return
        kind, fixed, width = _MSGPACK_HEADS[data[at]]
        length = int.from_bytes(data[at + 1 : at + 1 + width], "big")
        at += 1 + width
        if kind == _VALUE:
            at += fixed + length
        elif kind == _NEVER:
            return
        else:
            count = (fixed + length) * (2 if kind == _MAP else 1)
            declared += count
            if declared > MAX_VALUES:
                raise _too_many()
            pending.append(count)


_MARKS = "[{,:"
"""Every JSON value but the outermost follows one of these, keys included.

So a text holds at most one value more than it has marks outside strings (an
empty array or map is counted one too many, which no message needs anyway).
"""
_JSON = json.JSONDecoder()


def _count_marks(text: str, start: int, end: int, limit: int) -> int:
    """Marks in ``text[start:end]``, counted no further than past ``limit``.

    ``str.find`` of one character is a ``memchr``: one fast pass per mark,
    plus one Python step per mark found.
    """
    count = 0
    for mark in _MARKS:
        at = text.find(mark, start, end)
        while at >= 0:
            count += 1
            if count > limit:
                return count
            at = text.find(mark, at + 1, end)
    return count


def _check_json(text: str) -> None:
    """Count a JSON message's values from its marks (``[ { , :``) outside strings.

    Counting marks inside strings too is enough for almost every message (a
    video chunk's base64 has none); only when that count is over the bound
    are strings skipped, with the JSON decoder's own C string scanner, one
    Python step per string: a question may hold many commas.
    """
    if _count_marks(text, 0, len(text), MAX_VALUES - 1) < MAX_VALUES:
        return
    values = 1
    strings = at = 0
    while True:
        quote = text.find('"', at)
        end = len(text) if quote < 0 else quote
        values += _count_marks(text, at, end, MAX_VALUES - values)
        if values > MAX_VALUES:
            raise _too_many()
        if quote < 0:
            return
        strings += 1
        if strings > values:
            return  # a string that no mark introduced: not JSON
        try:
            at = _JSON.raw_decode(text, quote)[1]
        except ValueError:
            return  # a string that does not end, or is not JSON


def _nesting(value: object) -> int:
    """How deep maps and arrays nest in ``value`` (decoded: at most MAX_VALUES of them)."""
    if isinstance(value, dict):
        inner: Iterator[object] = iter(value.values())
    elif isinstance(value, list):
        inner = iter(value)
    else:
        return 0
    return 1 + max(map(_nesting, inner), default=0)


# --- the id of a message that is not parsed ---------------------------------

_PEEKED = frozenset({"type", "id"})
_SPACE = re.compile(r"[ \t\n\r]*")


def peek_id(data: bytes | str) -> str | None:
    """The id of an ``ask`` that is not parsed (too large, too complex), if its head names one.

    Only the first :data:`PEEK_CHARS` are read, and only the message's first
    top-level fields up to the first map or array (at most half of
    :data:`MAX_VALUES` of them), so the cost is bounded whatever the message
    holds: a string or a number is skipped in C, a map or array is not
    walked. Clients write ``type`` and ``id`` first (the bundled client and
    browsers' ``JSON.stringify`` of ``{type, id, text}`` do); an id found
    nowhere before that is not named.
    """
    fields: dict[str, object] = {}
    try:
        head = data[:PEEK_CHARS]
        pairs = _msgpack_pairs(head) if isinstance(head, bytes) else _json_pairs(head)
        for key, value in pairs:
            fields[key] = value
            if len(fields) == len(_PEEKED):
                break
    except (ValueError, TypeError, IndexError, RecursionError, msgpack.UnpackException):
        pass  # the head ends, or is not a map: what was found so far stands
    id = fields.get("id")
    if fields.get("type") != "ask" or not isinstance(id, str):
        return None
    return id if 0 < len(id) <= MAX_ID_CHARS else None


def _msgpack_pairs(head: bytes) -> Iterator[tuple[str, object]]:
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(head) or 1)
    unpacker.feed(head)
    for _ in range(min(unpacker.read_map_header(), MAX_VALUES // 2)):
        if _MSGPACK_HEADS[head[unpacker.tell()]][0] != _VALUE:
            return
        key = unpacker.unpack()
        if _MSGPACK_HEADS[head[unpacker.tell()]][0] != _VALUE:
            return
        if isinstance(key, str) and key in _PEEKED:
            yield key, unpacker.unpack()
        else:
            unpacker.skip()


def _json_pairs(head: str) -> Iterator[tuple[str, object]]:
    at = _skip_space(head, 0)
    if head[at : at + 1] != "{":
        return
    for _ in range(MAX_VALUES // 2):
        at = _skip_space(head, at + 1)
        if head[at : at + 1] != '"':
            return
        key, at = _JSON.raw_decode(head, at)
        at = _skip_space(head, at)
        if head[at : at + 1] != ":":
            return
        at = _skip_space(head, at + 1)
        if head[at : at + 1] in ("[", "{"):
            return
        value, at = _JSON.raw_decode(head, at)
        if key in _PEEKED:
            yield key, value
        at = _skip_space(head, at)
        if head[at : at + 1] != ",":
            return


def _skip_space(text: str, at: int) -> int:
    match = _SPACE.match(text, at)
    return match.end() if match else at


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
    )


def _hello(f: _Fields) -> Hello:
    return Hello(
        fps=f.number("fps", low=0.01, high=120.0),
        window_frames=f.integer("window_frames", low=1, high=1 << 20),
        max_pixels=f.integer("max_pixels", low=1, high=1 << 40),
        generation=f.nested("generation", _generation, Generation()),
        keyframes_only=f.boolean("keyframes_only"),
        token=f.string("token", max_chars=MAX_TOKEN_CHARS),
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
        url=f.string("url", required=True, max_chars=8192),
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
