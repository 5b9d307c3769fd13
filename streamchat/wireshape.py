"""A message's shape on the wire, read without parsing it: what decoding it would cost.

:mod:`streamchat.messages` parses a client's message only once this module
has shown that parsing it is cheap, and names the ``ask`` a message it will
not parse may be. Both readings walk the raw msgpack or JSON without building
anything from it, stop as soon as they know enough, and cost at most one pass
over the bytes in C plus :data:`MAX_VALUES` steps in Python, whatever the
message holds. Nothing here knows what a message means: it counts values,
measures nesting, and lists a map's first scalar fields.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterator

import msgpack

from .errors import BadMessage

__all__ = ["MAX_DEPTH", "MAX_VALUES", "PEEK_CHARS", "check_size", "head_fields", "nesting"]

MAX_VALUES = 256
"""Most values one message may hold, map keys included (a ``hello`` with every field holds 23).

Decoding builds a Python object per value: a 4 MiB message of empty arrays is
millions of them, seconds of the event loop and hundreds of MiB. The bound is
checked before anything is built, by walking the message's structure
(:func:`check_size`). Unknown fields are ignored, so later versions can add
some: ten times what version 1 uses is room enough.
"""
MAX_DEPTH = 4
"""Deepest nesting of maps and arrays, the message itself counting one (version 1 uses 2)."""
PEEK_CHARS = 64 * 1024
"""How much of a message that is not parsed is read for the fields at its head."""


# --- structure bounds ------------------------------------------------------
# A message these checks cannot follow (truncated, not msgpack or JSON) is left
# to the decoder, which then refuses it having built no more values than were
# counted before the fault.


def _too_many() -> BadMessage:
    return BadMessage(f"a message holds at most {MAX_VALUES} values, map keys included")


def check_size(data: bytes | str) -> None:
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


def nesting(value: object) -> int:
    """How deep maps and arrays nest in ``value`` (decoded: at most MAX_VALUES of them)."""
    if isinstance(value, dict):
        inner: Iterator[object] = iter(value.values())
    elif isinstance(value, list):
        inner = iter(value)
    else:
        return 0
    return 1 + max(map(nesting, inner), default=0)


# --- the head of a message that is not parsed --------------------------------

_SPACE = re.compile(r"[ \t\n\r]*")


def head_fields(data: bytes | str, names: Collection[str]) -> dict[str, object]:
    """The fields among ``names`` at the head of a message that will not be parsed.

    Only the first :data:`PEEK_CHARS` are read, and only the message's first
    top-level fields up to the first map or array (at most half of
    :data:`MAX_VALUES` of them), so the cost is bounded whatever the message
    holds: a string or a number is skipped in C, a map or array is not
    walked. The walk stops once every name is found; a head that ends, or is
    not a map, leaves what was found so far.
    """
    fields: dict[str, object] = {}
    try:
        head = data[:PEEK_CHARS]
        pairs = _msgpack_pairs(head, names) if isinstance(head, bytes) else _json_pairs(head, names)
        for key, value in pairs:
            fields[key] = value
            if len(fields) == len(names):
                break
    except (ValueError, TypeError, IndexError, RecursionError, msgpack.UnpackException):
        pass
    return fields


def _msgpack_pairs(head: bytes, names: Collection[str]) -> Iterator[tuple[str, object]]:
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(head) or 1)
    unpacker.feed(head)
    for _ in range(min(unpacker.read_map_header(), MAX_VALUES // 2)):
        if _MSGPACK_HEADS[head[unpacker.tell()]][0] != _VALUE:
            return
        key = unpacker.unpack()
        if _MSGPACK_HEADS[head[unpacker.tell()]][0] != _VALUE:
            return
        if isinstance(key, str) and key in names:
            yield key, unpacker.unpack()
        else:
            unpacker.skip()


def _json_pairs(head: str, names: Collection[str]) -> Iterator[tuple[str, object]]:
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
        if key in names:
            yield key, value
        at = _skip_space(head, at)
        if head[at : at + 1] != ",":
            return


def _skip_space(text: str, at: int) -> int:
    match = _SPACE.match(text, at)
    return match.end() if match else at
