"""Protocol v1 messages and the one place that touches the wire format.

A message is a map with a ``type``. It travels as msgpack in a binary
WebSocket frame or as JSON in a text frame (browsers); the server answers in
the encoding of the client's most recent message. In JSON, byte fields are
base64 strings. See ``docs/protocol.md`` for the full description.

Decoding validates everything a client sends and raises the typed errors of
:mod:`streamchat.errors`; nothing else in the server parses client input.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable, Mapping
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
    "Ready",
    "ServerMessage",
    "VideoChunk",
    "VideoEnd",
    "VideoStatus",
    "VideoUrl",
    "decode_client",
    "encode_server",
]

PROTOCOL_VERSION = 1

CONTAINER_FORMATS = frozenset({"webm", "matroska", "mp4", "mpegts", "avi"})
MAX_ID_CHARS = 128
MAX_TOKEN_CHARS = 512


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
        if isinstance(data, str):
            value = json.loads(data)
        else:
            value = msgpack.unpackb(
                data, raw=False, strict_map_key=True, ext_hook=_reject_ext, use_list=True
            )
    except BadMessage:
        raise
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
        kind = "JSON" if isinstance(data, str) else "msgpack"
        raise BadMessage(f"not valid {kind}: {exc.__class__.__name__}") from None
    if not isinstance(value, dict):
        raise BadMessage("a message must be a map with a 'type'")
    return value


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
    return Generation(
        max_tokens=f.integer("max_tokens", low=1, high=1 << 20),
        temperature=f.number("temperature", low=0.0, high=10.0),
        top_p=f.number("top_p", low=0.0, high=1.0),
        seed=f.integer("seed", low=0, high=(1 << 63) - 1),
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
