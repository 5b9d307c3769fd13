"""Hypothesis strategies for adversarial client messages (msgpack bytes or JSON text)."""

from __future__ import annotations

import base64
from typing import Any

import msgpack
from hypothesis import strategies as st

from tests.fuzz import payloads as p

Payload = bytes | str

# Text with lone surrogates mixed in: what a JSON "\ud800" escape decodes to.
TEXT_CHARS = st.characters() | st.characters(categories=["Cs"])
texts = st.text(TEXT_CHARS, max_size=40)
huge_texts = st.builds(
    lambda c, n: c * n,
    st.sampled_from(["a", " ", "é", "\U0001f600", "\ud800"]),
    st.sampled_from([129, 4_001, 8_193, 70_000, 300_000]),
)

timestamps = st.builds(
    msgpack.Timestamp, st.integers(-(1 << 63), (1 << 63) - 1), st.integers(0, 999_999_999)
) | st.builds(msgpack.Timestamp, st.integers(0, (1 << 34) - 1), st.just(0))
ext_types = st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=20))
raw_exts = st.builds(p.raw_ext, st.integers(-128, 127), st.binary(max_size=20))
"""Packed extensions of any code, the reserved negative ones included."""

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 63), (1 << 64) - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(p.BOUNDARY_NUMBERS),
    texts,
    st.binary(max_size=40),
    timestamps,
    ext_types,
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=8,
)
field_values = st.one_of(values, huge_texts, st.sampled_from(p.BOUNDARY_NUMBERS))
type_values = st.one_of(
    st.sampled_from(p.CLIENT_TYPES),
    st.sampled_from(p.SERVER_TYPES),
    st.sampled_from(["", "HELLO", "hello ", "video", "video.chunk\x00", "__class__", "ask\ud800"]),
    texts,
    scalars,
)


@st.composite
def message_maps(draw: st.DrawFn) -> dict[str, Any]:
    """A map with a (possibly wrong) ``type`` and known or unknown fields of any type."""
    raw: dict[str, Any] = {}
    if draw(st.integers(0, 9)):  # now and then, no type at all
        raw["type"] = draw(type_values)
    names = st.sampled_from(p.FIELD_NAMES[1:]) | texts
    raw.update(draw(st.dictionaries(names, field_values, max_size=8)))
    return raw


def _generation() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {},
        optional={
            "max_tokens": st.integers(1, 1 << 20),
            # The ranges the engine accepts (messages.py checks them).
            "temperature": st.one_of(st.just(0.0), st.floats(0.01, 2.0)),
            "top_p": st.floats(0.0, 1.0, exclude_min=True),
            "seed": st.integers(0, (1 << 63) - 1),
        },
    )


ids = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=128)
formats = st.sampled_from(["webm", "matroska", "mp4", "mpegts"])

valid_maps: st.SearchStrategy[dict[str, Any]] = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("hello")},
        optional={
            "fps": st.floats(0.01, 120.0),
            "window_frames": st.integers(1, 1 << 20),
            "max_pixels": st.integers(1, 1 << 40),
            "generation": _generation(),
        },
    ),
    st.fixed_dictionaries(
        {"type": st.just("video.chunk"), "data": st.binary(max_size=64)},
        optional={"format": formats},
    ),
    st.fixed_dictionaries(
        {"type": st.just("video.url"), "url": st.text(max_size=60)}, optional={"format": formats}
    ),
    st.just({"type": "video.end"}),
    st.fixed_dictionaries(
        {"type": st.just("image"), "data": st.binary(max_size=64)},
        optional={"pts": st.floats(-1e6, 1e6)},
    ),
    st.fixed_dictionaries(
        {"type": st.just("ask"), "id": ids, "text": st.text(max_size=60)},
        optional={
            "generation": _generation(),
            "last_seconds": st.floats(0.0, 1e6),
            "start": st.floats(-1e6, 1e6),
            "end": st.floats(-1e6, 1e6),
            "max_frames": st.integers(1, 1 << 20),
        },
    ),
    st.fixed_dictionaries({"type": st.just("cancel"), "id": ids}),
)
"""Messages the server must accept (bar state: hello twice, cancel of nothing, ...)."""


@st.composite
def encoded(draw: st.DrawFn, maps: st.SearchStrategy[dict[str, Any]]) -> Payload:
    """A map as msgpack (bytes as bin, or as raw str) or as JSON (ASCII-escaped or not)."""
    raw = draw(maps)
    how = draw(st.sampled_from(["msgpack", "msgpack-raw", "json", "json-utf8"]))
    if how.startswith("msgpack"):
        try:
            packed: bytes = msgpack.packb(raw, use_bin_type=how == "msgpack")
            return packed
        except (UnicodeEncodeError, OverflowError, ValueError, TypeError):
            how = "json"  # surrogates and the like: JSON can say them
    return p.json_text(raw, ensure_ascii=how == "json")


@st.composite
def structural(draw: st.DrawFn) -> Payload:
    """Attacks on the decoders themselves rather than on the fields."""
    kind = draw(
        st.sampled_from(
            [
                "declared",
                "declared-in-field",
                "nested",
                "nested-in-field",
                "json-nested",
                "json-nested-in-field",
                "invalid-utf8",
                "ext",
                "timestamp",
                "duplicate-keys",
                "json-duplicate-keys",
                "odd-keys",
                "json-number",
                "json-surrogate",
                "truncated",
                "bitflip",
                "concatenated",
                "base64",
            ]
        )
    )
    msg_type = draw(st.sampled_from(p.CLIENT_TYPES))
    field = draw(st.sampled_from(p.FIELD_NAMES))
    if kind == "declared":
        return p.declared_length(
            draw(st.sampled_from(sorted(p.LENGTH_HEADERS))),
            draw(st.sampled_from([1 << 8, 1 << 16, 1 << 31, (1 << 32) - 1]) | st.integers(0, 300)),
            draw(st.binary(max_size=16)),
        )
    if kind == "declared-in-field":
        header = p.declared_length(
            draw(st.sampled_from(sorted(p.LENGTH_HEADERS))), (1 << 32) - 1, b"abc"
        )
        return p.message_with(msg_type, field, header)
    depth = draw(st.sampled_from([2, 100, 1000, 1025, 5000, 10_000, 100_000]))
    container = draw(st.sampled_from(["array", "map"]))
    if kind == "nested":
        return p.nested_msgpack(depth, container)
    if kind == "nested-in-field":
        return p.message_with(msg_type, field, p.nested_msgpack(depth, container))
    if kind == "json-nested":
        return p.nested_json(depth, container)
    if kind == "json-nested-in-field":
        return p.json_message_with(msg_type, field, p.nested_json(depth, container))
    if kind == "invalid-utf8":
        body = draw(
            st.sampled_from([b"\xff", b"\xed\xa0\x80", b"\xc3", b"\xf4\x90\x80\x80", b"a\x80"])
        )
        where = draw(st.sampled_from(["type", "key", "value"]))
        if where == "type":
            return p.raw_map([(p.pack("type"), p.raw_str(body))])
        if where == "key":
            return p.raw_map([(p.pack("type"), p.pack(msg_type)), (p.raw_str(body), p.pack(1))])
        return p.message_with(msg_type, field, p.raw_str(body))
    if kind == "ext":
        ext = draw(raw_exts)
        return p.message_with(msg_type, field, ext) if draw(st.booleans()) else ext
    if kind == "timestamp":
        stamp = draw(timestamps)
        if draw(st.booleans()):  # a malformed timestamp: ext -1 of the wrong size
            return p.message_with(msg_type, field, p.raw_ext(-1, draw(st.binary(max_size=20))))
        return p.message_with(msg_type, field, p.pack(stamp))
    if kind == "duplicate-keys":
        other = draw(st.sampled_from(p.CLIENT_TYPES))
        return p.raw_map(
            [
                (p.pack("type"), p.pack(msg_type)),
                (p.pack(field), p.pack(draw(scalars))),
                (p.pack("type"), p.pack(other)),
                (p.pack(field), p.pack(draw(scalars))),
            ]
        )
    if kind == "json-duplicate-keys":
        return p.json_duplicate_keys(
            [("type", msg_type), (field, draw(values)), ("type", draw(type_values))]
        )
    if kind == "odd-keys":
        key = draw(
            st.sampled_from(
                [p.pack(1), p.pack(None), p.pack(1.5), p.pack(b"type"), p.pack([1]), p.pack({})]
            )
            | raw_exts
        )
        return p.raw_map([(key, p.pack(msg_type)), (p.pack("type"), p.pack(msg_type))])
    if kind == "json-number":
        return p.json_message_with(msg_type, field, draw(st.sampled_from(p.HUGE_JSON_INTS)))
    if kind == "json-surrogate":
        escape = draw(st.sampled_from(["\\ud800", "\\udfff", "\\ud83d", "\\udc00\\ud800"]))
        return p.json_message_with(msg_type, field, f'"a{escape}"')
    valid = draw(encoded(valid_maps))
    if kind == "truncated":
        return valid[: draw(st.integers(0, max(len(valid) - 1, 0)))]
    if kind == "bitflip":
        as_text = isinstance(valid, str)
        flipped = bytearray(valid.encode() if isinstance(valid, str) else valid)
        index = draw(st.integers(0, len(flipped) - 1))
        flipped[index] ^= 1 << draw(st.integers(0, 6 if as_text else 7))
        return flipped.decode("utf-8", "replace") if as_text else bytes(flipped)
    if kind == "concatenated":
        second = draw(encoded(valid_maps))
        if isinstance(valid, str):
            return valid + (second if isinstance(second, str) else "{}")
        return valid + (second if isinstance(second, bytes) else b"\x80")
    # base64: JSON byte fields in every wrong shape
    data = draw(
        st.sampled_from(["", "=", "====", "YQ", "YQ=", "YQ==\n", "Y Q==", "É", "\ud800", "-_-_"])
        | st.builds(lambda b: base64.urlsafe_b64encode(b).decode(), st.binary(min_size=1))
    )
    return p.json_text({"type": draw(st.sampled_from(["video.chunk", "image"])), "data": data})


raw_frames: st.SearchStrategy[Payload] = st.binary(max_size=300) | st.text(TEXT_CHARS, max_size=300)
adversarial: st.SearchStrategy[Payload] = st.one_of(
    raw_frames, structural(), encoded(message_maps()), encoded(valid_maps)
)
"""Any client message at all, hostile or not."""
