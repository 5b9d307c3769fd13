"""A seeded corpus of hostile WebSocket messages for the over-the-wire fuzz test.

Hypothesis drives the pure layers (where it can shrink a failure to one
message); against a live server, tens of thousands of messages must be
produced in seconds, so this generator draws them from ``random.Random(seed)``
with the same builders (:mod:`tests.fuzz.payloads`). The same seed gives the
same corpus, message for message.
"""

from __future__ import annotations

import base64
import json
import random
import string
from typing import Any

import msgpack

from tests.fuzz import payloads as p

TEXT_POOL = string.printable + "é\u00a0\u2028\u202e\ufeff\U0001f600\x00\x7f\ud800\udfff"


def _text(rng: random.Random, size: int = 12) -> str:
    return "".join(rng.choice(TEXT_POOL) for _ in range(rng.randint(0, size)))


def _scalar(rng: random.Random) -> Any:
    match rng.randrange(10):
        case 0:
            return None
        case 1:
            return rng.choice([True, False])
        case 2:
            return rng.randint(-(1 << 63), (1 << 64) - 1)
        case 3:
            return rng.choice([rng.uniform(-1e6, 1e6), rng.random(), float("nan"), float("inf")])
        case 4 | 5:
            return rng.choice(p.BOUNDARY_NUMBERS)
        case 6 | 7:
            return _text(rng)
        case 8:
            return rng.randbytes(rng.randint(0, 40))
        case _:
            return msgpack.Timestamp(rng.randint(0, 1 << 33), rng.randint(0, 999_999_999))


def _value(rng: random.Random, depth: int = 0) -> Any:
    if depth < 3 and rng.random() < 0.2:
        if rng.random() < 0.5:
            return [_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
        return {_text(rng, 6): _value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    return _scalar(rng)


def _map(rng: random.Random) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    if rng.random() < 0.9:
        raw["type"] = rng.choice(
            [*p.CLIENT_TYPES, *p.CLIENT_TYPES, *p.SERVER_TYPES, _text(rng), _scalar(rng)]
        )
    for _ in range(rng.randint(0, 6)):
        name = rng.choice(p.FIELD_NAMES[1:]) if rng.random() < 0.8 else _text(rng, 8)
        raw[name] = _value(rng)
    return raw


def _valid(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(p.CLIENT_TYPES)
    raw: dict[str, Any] = {"type": kind}
    if kind in ("ask", "cancel"):
        raw["id"] = "".join(rng.choice(string.ascii_letters) for _ in range(rng.randint(1, 128)))
    if kind == "ask":
        raw["text"] = _text(rng, 40).replace("\ud800", "?").replace("\udfff", "?")
        if rng.random() < 0.5:
            raw["last_seconds"] = rng.uniform(0, 100)
    if kind in ("video.chunk", "image"):
        raw["data"] = rng.randbytes(rng.randint(0, 200))
    if kind == "video.url":
        raw["url"] = rng.choice(["http://127.0.0.1:9/x.mp4", "ftp://x/y", "file:///etc/passwd"])
    if kind == "hello" and rng.random() < 0.5:
        raw["fps"] = rng.uniform(0.01, 120)
    return raw


def encode(rng: random.Random, raw: dict[str, Any]) -> bytes | str:
    """msgpack or JSON; always something a WebSocket client can send as it is."""
    if rng.random() < 0.5:
        try:
            packed: bytes = msgpack.packb(raw, use_bin_type=rng.random() < 0.8)
            return packed
        except (UnicodeEncodeError, OverflowError, ValueError, TypeError):
            pass
    return p.json_text(raw, ensure_ascii=True)


def _structural(rng: random.Random) -> bytes | str:
    kind = rng.choice(p.CLIENT_TYPES)
    field = rng.choice(p.FIELD_NAMES)
    match rng.randrange(14):
        case 0:
            which = rng.choice(sorted(p.LENGTH_HEADERS))
            declared = rng.choice([255, 65_535, 1 << 31, (1 << 32) - 1])
            return p.declared_length(which, declared, rng.randbytes(rng.randint(0, 16)))
        case 1:
            header = p.declared_length(rng.choice(sorted(p.LENGTH_HEADERS)), (1 << 32) - 1, b"x")
            return p.message_with(kind, field, header)
        case 2:
            depth = rng.choice([1025, 10_000, 50_000])  # 50k arrays: 50 KB
            return p.nested_msgpack(depth, rng.choice(["array", "map"]))
        case 3:
            depth = rng.choice([1000, 10_000, 40_000])  # 40k maps: just under the transport limit
            return p.json_message_with(
                kind, field, p.nested_json(depth, rng.choice(["array", "map"]))
            )
        case 4:
            body = rng.choice([b"\xff", b"\xed\xa0\x80", b"\xc3", b"\xf4\x90\x80\x80"])
            return p.message_with(kind, field, p.raw_str(body))
        case 5:
            return p.raw_map([(p.pack("type"), p.raw_str(rng.choice([b"\xff", b"\xed\xb0\x80"])))])
        case 6:
            ext = p.raw_ext(rng.randint(-128, 127), rng.randbytes(rng.randint(0, 16)))
            return p.message_with(kind, field, ext) if rng.random() < 0.7 else ext
        case 7:
            return p.raw_map(
                [
                    (p.pack("type"), p.pack(kind)),
                    (p.pack("type"), p.pack(rng.choice(p.CLIENT_TYPES))),
                    (p.pack(field), p.pack(_scalar(rng))),
                    (p.pack(field), p.pack(_scalar(rng))),
                ]
            )
        case 8:
            key = rng.choice([p.pack(1), p.pack(None), p.pack(b"type"), p.pack([1]), p.pack(2.5)])
            return p.raw_map([(key, p.pack(kind)), (p.pack("type"), p.pack(kind))])
        case 9:
            return p.json_message_with(kind, field, rng.choice(p.HUGE_JSON_INTS))
        case 10:
            escape = rng.choice(["\\ud800", "\\udfff", "\\udc00\\ud800"])
            return p.json_message_with(kind, field, f'"x{escape}"')
        case 11:
            data = rng.choice(["=", "YQ", "Y Q==", "\\u00e9", "-_-_", "\\ud800"])
            return p.json_message_with(
                rng.choice(["video.chunk", "image"]), "data", '"' + data + '"'
            )
        case 12:
            valid = encode(rng, _valid(rng))
            return valid[: rng.randint(0, max(len(valid) - 1, 0))]
        case _:
            valid = encode(rng, _valid(rng))
            if isinstance(valid, str):
                return valid + rng.choice(["{", "}", "]", " x", json.dumps(_valid(rng)["type"])])
            flipped = bytearray(valid)
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            return bytes(flipped)


def message(rng: random.Random) -> bytes | str:
    """One hostile (or, one time in eight, well-formed) client message."""
    match rng.randrange(8):
        case 0:
            return rng.randbytes(rng.randint(0, 300))
        case 1:
            return "".join(
                rng.choice(string.printable + '{}[]":,') for _ in range(rng.randint(0, 80))
            )
        case 2 | 3 | 4:
            return _structural(rng)
        case 5 | 6:
            return encode(rng, _map(rng))
        case _:
            return encode(rng, _valid(rng))


def invalid_utf8_text(rng: random.Random) -> bytes:
    """Bytes to send in a *text* frame: JSON with a UTF-8 error the WebSocket layer must catch."""
    bad = rng.choice([b"\xff", b"\xed\xa0\x80", b"\xc3(", b"\xf8\x88\x80\x80\x80", b"\x80"])
    return b'{"type":"ask","id":"a","text":"' + bad + b'"}'


def base64_text(size: int) -> str:
    """A JSON ``video.chunk`` whose text is about ``size`` characters long."""
    data = base64.b64encode(b"\x00" * (size * 3 // 4)).decode()
    return p.json_message_with("video.chunk", "data", '"' + data + '"')
