"""Builders for hostile wire payloads, shared by the hypothesis strategies and the wire corpus.

Everything here is pure: values in, the bytes (msgpack) or text (JSON) of one
WebSocket message out. The builders write msgpack headers by hand where the
``msgpack`` packer would refuse to produce the attack: lengths declared far
beyond the body, invalid UTF-8 inside a ``str``, duplicate or unhashable map
keys, nesting deeper than any decoder's stack.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from collections.abc import Iterable
from typing import Any

import msgpack

from streamchat.errors import StreamchatError

SCALE = float(os.environ.get("STREAMCHAT_FUZZ_SCALE", "1"))
"""Multiplies every example and message count of the fuzz tests (``STREAMCHAT_FUZZ_SCALE=10``)."""


def scaled(count: int) -> int:
    return max(1, round(count * SCALE))


def _codes(cls: type[StreamchatError]) -> set[str]:
    found = {cls.code}
    for sub in cls.__subclasses__():
        found |= _codes(sub)
    return found


def _leaf_codes(cls: type[StreamchatError]) -> set[str]:
    subs = cls.__subclasses__()
    if not subs:
        return {cls.code}
    return set().union(*(_leaf_codes(sub) for sub in subs))


KNOWN_CODES = frozenset(_leaf_codes(StreamchatError))
"""Every wire code a client may legitimately see: the leaves of the error tree.

``internal_error`` (the root) means a bug, and the abstract branch codes
(``protocol_error``, ``video_error``, ...) are never raised, so neither counts.
"""

DECODE_CODES = frozenset({"bad_message", "unknown_type", "invalid_field"})
"""What :func:`streamchat.messages.decode_client` may raise."""

CLIENT_TYPES = ("hello", "video.chunk", "video.url", "video.end", "image", "ask", "cancel")
SERVER_TYPES = ("ready", "video.status", "answer.delta", "answer.done", "error", "going_away")
FIELD_NAMES = (
    "type",
    "id",
    "text",
    "data",
    "format",
    "url",
    "pts",
    "fps",
    "window_frames",
    "max_pixels",
    "generation",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "last_seconds",
    "start",
    "end",
    "max_frames",
    "token",
)

BOUNDARY_NUMBERS: tuple[Any, ...] = (
    0,
    -1,
    1,
    0.0,
    -0.0,
    0.0099,
    0.01,
    120,
    120.0001,
    128,
    1 << 20,
    (1 << 20) + 1,
    1 << 40,
    (1 << 40) + 1,
    (1 << 63) - 1,
    1 << 63,
    (1 << 64) - 1,
    -(1 << 63),
    1e308,
    -1e308,
    5e-324,
    float("nan"),
    float("inf"),
    float("-inf"),
    True,
    False,
)

HUGE_JSON_INTS = ("9" * 400, "-" + "9" * 400, "1" + "0" * 4000, "1e400", "-1e400", "1E-400")
"""Number literals only JSON can carry: beyond 64 bits, beyond a double, or denormal to zero."""


# --- msgpack by hand --------------------------------------------------------


def pack(value: Any) -> bytes:
    """msgpack; a lone surrogate in a ``str`` goes out as the invalid UTF-8 it would be."""
    packed: bytes = msgpack.packb(value, use_bin_type=True, unicode_errors="surrogatepass")
    return packed


def str_header(length: int) -> bytes:
    if length < 32:
        return bytes([0xA0 | length])
    if length < 1 << 8:
        return b"\xd9" + struct.pack(">B", length)
    if length < 1 << 16:
        return b"\xda" + struct.pack(">H", length)
    return b"\xdb" + struct.pack(">I", length)


def raw_str(body: bytes) -> bytes:
    """A msgpack ``str`` whose body is ``body`` verbatim (invalid UTF-8 allowed)."""
    return str_header(len(body)) + body


def raw_map(pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A msgpack map of already-packed keys and values (duplicates and odd keys allowed)."""
    items = list(pairs)
    count = len(items)
    head = bytes([0x80 | count]) if count < 16 else b"\xde" + struct.pack(">H", count)
    return head + b"".join(k + v for k, v in items)


def message_with(kind: str, field: str, raw_value: bytes) -> bytes:
    """A msgpack ``{type: kind, field: <raw_value>}``, the value given pre-packed."""
    return raw_map([(pack("type"), pack(kind)), (pack(field), raw_value)])


LENGTH_HEADERS: dict[str, tuple[bytes, str]] = {
    "str8": (b"\xd9", ">B"),
    "str16": (b"\xda", ">H"),
    "str32": (b"\xdb", ">I"),
    "bin8": (b"\xc4", ">B"),
    "bin16": (b"\xc5", ">H"),
    "bin32": (b"\xc6", ">I"),
    "array16": (b"\xdc", ">H"),
    "array32": (b"\xdd", ">I"),
    "map16": (b"\xde", ">H"),
    "map32": (b"\xdf", ">I"),
    "ext8": (b"\xc7", ">B"),
    "ext16": (b"\xc8", ">H"),
    "ext32": (b"\xc9", ">I"),
}


def declared_length(kind: str, declared: int, body: bytes) -> bytes:
    """A ``kind`` header announcing ``declared`` bytes/items, followed by a (short) body."""
    marker, fmt = LENGTH_HEADERS[kind]
    limit = (1 << (8 * struct.calcsize(fmt))) - 1
    header = marker + struct.pack(fmt, min(declared, limit))
    if kind.startswith("ext"):
        header += b"\x05"  # the extension type byte
    return header + body


def raw_ext(code: int, data: bytes) -> bytes:
    """A msgpack extension of any type code, reserved negative ones (-1: timestamp) included."""
    head = (
        b"\xc7" + struct.pack(">B", len(data))
        if len(data) < 256
        else b"\xc8" + struct.pack(">H", len(data))
    )
    return head + struct.pack(">b", code) + data


def nested_msgpack(depth: int, container: str = "array") -> bytes:
    """``depth`` levels of single-element arrays (or ``{"a": ...}`` maps) around nil."""
    level = b"\x91" if container == "array" else b"\x81\xa1a"
    return level * depth + b"\xc0"


def nested_json(depth: int, container: str = "array") -> str:
    if container == "array":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


# --- JSON -------------------------------------------------------------------


def to_json_value(value: Any) -> Any:
    """A JSON-encodable stand-in for a msgpack value (bytes become base64 strings)."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, msgpack.ExtType):
        return {"ext": value.code, "data": base64.b64encode(value.data).decode("ascii")}
    if isinstance(value, msgpack.Timestamp):
        return value.to_unix()
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, str) else k: to_json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_value(v) for v in value]
    return value


def json_text(value: Any, *, ensure_ascii: bool = True) -> str:
    """JSON as a lenient client would write it (NaN and Infinity included)."""
    return json.dumps(to_json_value(value), ensure_ascii=ensure_ascii, allow_nan=True)


def json_message_with(kind: str, field: str, literal: str) -> str:
    """``{"type": kind, field: <literal>}`` with the value written verbatim."""
    return "{" + f'"type":{json.dumps(kind)},{json.dumps(field)}:{literal}' + "}"


def json_duplicate_keys(pairs: Iterable[tuple[str, Any]]) -> str:
    return "{" + ",".join(f"{json.dumps(k)}:{json.dumps(to_json_value(v))}" for k, v in pairs) + "}"
