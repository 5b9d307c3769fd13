"""Protocol v1 as the client sees it: building requests, parsing replies.

This is the only module of the client that touches the wire format (see
``docs/protocol.md``). Client messages are plain maps, each built by one
``*_message`` function here with only the fields given, so that the server's
defaults apply to the rest. Server messages are parsed (:data:`PARSERS`, by
``type``) into frozen dataclasses, so the rest of the client, and its users,
get attributes and types instead of dictionary look-ups. Fields a later
protocol version adds are ignored; a documented field that is missing or
mistyped is a :class:`~streamchat_client.errors.ProtocolViolation`.

The client is standalone, so these types are the server's
(``streamchat.messages``) written again; ``tests/contract`` fails when the
two disagree on a field. Where this side says ``X | None`` and the server
always sends an ``X``, it is for older servers that did not send the field.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgpack

from .errors import ProtocolViolation, ServerError

__all__ = [
    "PARSERS",
    "AnswerDelta",
    "Done",
    "Encoding",
    "GoingAway",
    "Limits",
    "Ready",
    "Usage",
    "VideoStatus",
    "ask_message",
    "cancel_message",
    "chunk_message",
    "decode",
    "encode",
    "end_message",
    "hello_message",
    "image_message",
    "parse_delta",
    "parse_done",
    "parse_error",
    "parse_going_away",
    "parse_ready",
    "parse_status",
    "url_message",
]

Encoding = Literal["msgpack", "json"]
"""``msgpack`` travels in binary frames, ``json`` in text frames (byte fields as base64)."""

ENCODINGS: frozenset[str] = frozenset({"msgpack", "json"})


def encode(message: Mapping[str, Any], encoding: Encoding) -> bytes | str:
    """One client message as a binary (msgpack) or text (JSON) frame payload."""
    if encoding == "msgpack":
        packed: bytes = msgpack.packb(dict(message), use_bin_type=True)
        return packed
    payload = {
        key: base64.b64encode(value).decode("ascii") if isinstance(value, bytes) else value
        for key, value in message.items()
    }
    return json.dumps(payload, separators=(",", ":"), allow_nan=False)


def decode(frame: bytes | str) -> dict[str, Any]:
    """A server frame as a map with a string ``type``, whichever encoding it came in."""
    try:
        if isinstance(frame, str):
            value = json.loads(frame)
        else:
            value = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolViolation(f"undecodable server message: {exc}") from None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ProtocolViolation("a server message must be a map with a string 'type'")
    return value


# --- client messages -------------------------------------------------------


def _given(message: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """``message`` with the ``fields`` that are not None."""
    message.update((name, value) for name, value in fields.items() if value is not None)
    return message


def hello_message(
    *,
    fps: float | None,
    window_frames: int | None,
    max_pixels: int | None,
    keyframes_only: bool,
    generation: Mapping[str, Any] | None,
    context: str | None = None,
) -> dict[str, Any]:
    """The ``hello`` map (the API key travels in the handshake's headers, not here)."""
    hello = _given(
        {"type": "hello"},
        fps=fps,
        window_frames=window_frames,
        max_pixels=max_pixels,
        context=context,
    )
    if keyframes_only:
        hello["keyframes_only"] = True
    if generation:
        hello["generation"] = dict(generation)
    return hello


def chunk_message(data: bytes, *, format: str | None = None) -> dict[str, Any]:
    """A ``video.chunk``; ``format`` (the demuxer hint) matters only on a source's first."""
    return _given({"type": "video.chunk", "data": data}, format=format)


def end_message() -> dict[str, Any]:
    return {"type": "video.end"}


def url_message(url: str, *, format: str | None = None) -> dict[str, Any]:
    return _given({"type": "video.url", "url": url}, format=format)


def image_message(data: bytes, *, pts: float | None = None) -> dict[str, Any]:
    return _given({"type": "image", "data": data}, pts=pts)


def ask_message(
    id: str,
    text: str,
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    choices: Sequence[str] | None = None,
    last_seconds: float | None = None,
    start: float | None = None,
    end: float | None = None,
    max_frames: int | None = None,
) -> dict[str, Any]:
    """An ``ask``: ``type`` and ``id`` first, so that a server refusing it unread can name it."""
    message: dict[str, Any] = {"type": "ask", "id": id, "text": text}
    generation = _given(
        {},
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        choices=None if choices is None else list(choices),
    )
    if generation:
        message["generation"] = generation
    return _given(message, last_seconds=last_seconds, start=start, end=end, max_frames=max_frames)


def cancel_message(id: str) -> dict[str, Any]:
    return {"type": "cancel", "id": id}


# --- typed server messages -------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """The session's effective limits, from ``ready``."""

    fps: float
    window_frames: int
    window_bytes: int
    min_pixels: int
    max_pixels: int
    frame_factor: int
    max_message_bytes: int
    """No message may be larger; the client cuts video chunks to fit."""
    video_buffer_bytes: int
    max_concurrent_asks: int
    max_question_chars: int
    max_tokens: int
    max_tokens_limit: int
    keyframes_only: bool = False
    """The server decodes keyframes only for this session (asked for in ``hello``)."""
    messages_per_second: float | None = None
    """Sustained message rate the server allows (``None``: not told, an older server)."""
    message_burst: int | None = None
    """Messages the server takes at once above that rate."""
    video_bytes_per_second: int | None = None
    idle_timeout: float | None = None
    """The server closes the session after this long with nothing to do."""
    tokens_per_frame: int | None = None
    """The most context tokens one frame costs the model: 0 when the server's engine cannot
    tell, ``None`` from an older server that does not say."""
    max_ask_frames: int | None = None
    """The most frames one answer sees (what fits the model's context; more in the asked range
    are thinned evenly): 0 or ``None`` as for :attr:`tokens_per_frame`."""
    context: str | None = None
    """How questions reach the model: ``window`` (the window as one new video each) or
    ``timeline`` (appended to the session's timeline, so a question costs what is new);
    ``None`` from an older server, which has only the window."""
    context_frames: int | None = None
    """The most frames a question may see: the window, or on a timeline the window plus
    the slack it holds before it is rebased (``None``: an older server)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Ready:
    """The server's answer to ``hello``."""

    session: str
    model: str
    protocol: int
    limits: Limits


@dataclass(frozen=True, slots=True, kw_only=True)
class VideoStatus:
    """Where decoding stands; sent while frames arrive and when a source ends."""

    source: int
    state: str
    """``decoding``, ``ended`` or ``failed``."""
    frames: int
    span: float
    first_pts: float | None
    last_pts: float | None
    decode_lag: float
    backlog_bytes: int
    """Bytes received by the server but not yet decoded."""
    frames_decoded: int
    frames_dropped: int
    bytes_received: int
    width: int | None = None
    """Width of the frames the model gets, upright and resized (``None``: an older server)."""
    height: int | None = None
    """Their height: ``height > width`` for portrait video."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    video_tokens: int
    """Tokens the frames took in the prompt."""
    frames: int
    """Frames the answer saw."""
    time_to_first_token: float | None
    """Seconds from the ``ask`` to the first delta, measured by the server."""
    cached_tokens: int | None = None
    """Of ``prompt_tokens``, those the server's engine took from its prefix cache;
    None from a server that does not tell."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Done:
    """How an answer ended: the ``answer.done`` message."""

    id: str
    """The answer's id, as the ``ask`` gave it."""
    finish_reason: str
    """``stop``, ``length``, ``cancelled``, ``error`` or ``shutdown``."""
    usage: Usage


@dataclass(frozen=True, slots=True, kw_only=True)
class AnswerDelta:
    """The next piece of an answer's text."""

    id: str
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GoingAway:
    """The server is stopping: answers in flight get ``timeout`` seconds, then the close."""

    reason: str
    timeout: float


class _Fields:
    """Checked access to a server map; a bad field names itself in the error."""

    def __init__(self, raw: Mapping[str, Any], context: str) -> None:
        self.raw = raw
        self.context = context

    def _bad(self, name: str, what: str) -> ProtocolViolation:
        return ProtocolViolation(f"{self.context}: '{name}' must be {what}")

    def text(self, name: str) -> str:
        value = self.raw.get(name)
        if not isinstance(value, str):
            raise self._bad(name, "a string")
        return value

    def opt_text(self, name: str) -> str | None:
        return None if self.raw.get(name) is None else self.text(name)

    def integer(self, name: str) -> int:
        value = self.raw.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(name, "an integer")
        return value

    def opt_integer(self, name: str) -> int | None:
        return None if self.raw.get(name) is None else self.integer(name)

    def number(self, name: str) -> float:
        value = self.raw.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(name, "a number")
        return float(value)

    def opt_number(self, name: str) -> float | None:
        return None if self.raw.get(name) is None else self.number(name)

    def flag(self, name: str) -> bool:
        value = self.raw.get(name, False)
        if not isinstance(value, bool):
            raise self._bad(name, "a boolean")
        return value

    def nested(self, name: str) -> _Fields:
        value = self.raw.get(name)
        if not isinstance(value, dict):
            raise self._bad(name, "a map")
        return _Fields(value, f"{self.context}.{name}")


def parse_ready(raw: Mapping[str, Any]) -> Ready:
    f = _Fields(raw, "ready")
    lim = f.nested("limits")
    limits = Limits(
        fps=lim.number("fps"),
        window_frames=lim.integer("window_frames"),
        window_bytes=lim.integer("window_bytes"),
        min_pixels=lim.integer("min_pixels"),
        max_pixels=lim.integer("max_pixels"),
        frame_factor=lim.integer("frame_factor"),
        max_message_bytes=lim.integer("max_message_bytes"),
        video_buffer_bytes=lim.integer("video_buffer_bytes"),
        max_concurrent_asks=lim.integer("max_concurrent_asks"),
        max_question_chars=lim.integer("max_question_chars"),
        max_tokens=lim.integer("max_tokens"),
        max_tokens_limit=lim.integer("max_tokens_limit"),
        keyframes_only=lim.flag("keyframes_only"),
        messages_per_second=lim.opt_number("messages_per_second"),
        message_burst=lim.opt_integer("message_burst"),
        video_bytes_per_second=lim.opt_integer("video_bytes_per_second"),
        idle_timeout=lim.opt_number("idle_timeout"),
        tokens_per_frame=lim.opt_integer("tokens_per_frame"),
        max_ask_frames=lim.opt_integer("max_ask_frames"),
        context=lim.opt_text("context"),
        context_frames=lim.opt_integer("context_frames"),
    )
    return Ready(
        session=f.text("session"),
        model=f.text("model"),
        protocol=f.integer("protocol"),
        limits=limits,
    )


def parse_status(raw: Mapping[str, Any]) -> VideoStatus:
    f = _Fields(raw, "video.status")
    return VideoStatus(
        source=f.integer("source"),
        state=f.text("state"),
        frames=f.integer("frames"),
        span=f.number("span"),
        first_pts=f.opt_number("first_pts"),
        last_pts=f.opt_number("last_pts"),
        decode_lag=f.number("decode_lag"),
        backlog_bytes=f.integer("backlog_bytes"),
        frames_decoded=f.integer("frames_decoded"),
        frames_dropped=f.integer("frames_dropped"),
        bytes_received=f.integer("bytes_received"),
        width=f.opt_integer("width"),
        height=f.opt_integer("height"),
    )


def parse_done(raw: Mapping[str, Any]) -> Done:
    f = _Fields(raw, "answer.done")
    u = f.nested("usage")
    usage = Usage(
        prompt_tokens=u.integer("prompt_tokens"),
        completion_tokens=u.integer("completion_tokens"),
        video_tokens=u.integer("video_tokens"),
        frames=u.integer("frames"),
        time_to_first_token=u.opt_number("time_to_first_token"),
        cached_tokens=u.opt_integer("cached_tokens"),
    )
    return Done(id=f.text("id"), finish_reason=f.text("finish_reason"), usage=usage)


def parse_delta(raw: Mapping[str, Any]) -> AnswerDelta:
    f = _Fields(raw, "answer.delta")
    return AnswerDelta(id=f.text("id"), text=f.text("text"))


def parse_going_away(raw: Mapping[str, Any]) -> GoingAway:
    f = _Fields(raw, "going_away")
    return GoingAway(reason=f.text("reason"), timeout=f.number("timeout"))


def parse_error(raw: Mapping[str, Any]) -> ServerError:
    f = _Fields(raw, "error")
    return ServerError(
        f.text("code"), f.text("message"), id=f.opt_text("id"), fatal=f.flag("fatal")
    )


PARSERS: dict[str, Callable[[Mapping[str, Any]], object]] = {
    "ready": parse_ready,
    "video.status": parse_status,
    "answer.delta": parse_delta,
    "answer.done": parse_done,
    "error": parse_error,
    "going_away": parse_going_away,
}
"""The parser of each server message ``type`` protocol v1 has; the client ignores any other."""
