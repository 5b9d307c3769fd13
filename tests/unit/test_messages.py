"""The wire format: msgpack and JSON decode to the same validated messages."""

from __future__ import annotations

import base64
import json
import random
import tracemalloc
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from streamchat.config import DEFAULT_MAX_MESSAGE_BYTES
from streamchat.errors import BadMessage, InvalidField, UnknownType
from streamchat.messages import (
    MAX_DEPTH,
    MAX_VALUES,
    AnswerDelta,
    Ask,
    Cancel,
    ClientMessage,
    Error,
    Hello,
    VideoChunk,
    VideoEnd,
    VideoUrl,
    _load,
    decode_client,
    encode_server,
    message_id,
    peek_id,
)


def both(payload: dict[str, Any]) -> list[bytes | str]:
    """The payload as a msgpack binary frame and as a JSON text frame."""
    as_json = {
        k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in payload.items()
    }
    return [msgpack.packb(payload, use_bin_type=True), json.dumps(as_json)]


@pytest.mark.parametrize(
    "data", both({"type": "video.chunk", "data": b"\x1aE\xdf\xa3", "format": "webm"})
)
def test_chunk_in_both_encodings(data: bytes | str) -> None:
    assert decode_client(data) == VideoChunk(data=b"\x1aE\xdf\xa3", format="webm")


def test_hello_with_generation_defaults() -> None:
    message = decode_client(
        json.dumps(
            {
                "type": "hello",
                "fps": 1,
                "window_frames": 8,
                "generation": {"max_tokens": 20, "temperature": 0.5},
            }
        )
    )
    assert isinstance(message, Hello)
    assert message.fps == 1.0 and message.window_frames == 8
    assert message.generation.max_tokens == 20 and message.generation.temperature == 0.5


def test_ask_cancel_url_end() -> None:
    ask = decode_client(json.dumps({"type": "ask", "id": "q1", "text": "hi", "last_seconds": 4}))
    assert ask == Ask(id="q1", text="hi", last_seconds=4.0)
    assert decode_client(json.dumps({"type": "cancel", "id": "q1"})) == Cancel(id="q1")
    assert decode_client(json.dumps({"type": "video.url", "url": "http://x/v.webm"})) == VideoUrl(
        url="http://x/v.webm"
    )
    assert decode_client(msgpack.packb({"type": "video.end"})) == VideoEnd()


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",  # never used in msgpack
        b"\x92\x01",  # truncated array
        "{not json",
        "[1, 2]",
        msgpack.packb([1, 2]),
        msgpack.packb(msgpack.ExtType(5, b"x")),
        msgpack.packb({"type": 3}),
        "{" * 100_000,
        json.dumps({"kind": "ask"}),
    ],
)
def test_malformed_is_bad_message(data: bytes | str) -> None:
    with pytest.raises(BadMessage):
        decode_client(data)


def test_unknown_type() -> None:
    with pytest.raises(UnknownType, match="'video.start'"):
        decode_client(json.dumps({"type": "video.start"}))


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"type": "ask", "text": "q"}, "'id'"),
        ({"type": "ask", "id": "a"}, "'text'"),
        ({"type": "ask", "id": "a", "text": 3}, "'text'"),
        ({"type": "ask", "id": "", "text": "q"}, "'id'"),
        ({"type": "ask", "id": "a", "text": "q", "max_frames": 0}, "'max_frames'"),
        ({"type": "ask", "id": "a", "text": "q", "generation": {"top_p": 2}}, "'top_p'"),
        ({"type": "ask", "id": "a", "text": "q", "generation": {"top_p": 0}}, "'top_p'"),
        ({"type": "ask", "id": "a", "text": "q", "generation": {"temperature": 3}}, "'temp"),
        ({"type": "hello", "generation": {"temperature": 2.001}}, "'temperature'"),
        ({"type": "hello", "generation": {"temperature": 0.001}}, "'temperature'"),
        ({"type": "hello", "generation": {"seed": -1}}, "'seed'"),
        ({"type": "hello", "generation": {"max_tokens": 0}}, "'max_tokens'"),
        ({"type": "ask", "id": "a", "text": "q", "generation": []}, "'generation'"),
        ({"type": "hello", "fps": True}, "'fps'"),
        ({"type": "hello", "fps": -1}, "'fps'"),
        ({"type": "video.chunk"}, "'data'"),
        ({"type": "video.chunk", "data": b"x", "format": "gif"}, "'format'"),
        ({"type": "video.url"}, "'url'"),
        ({"type": "cancel", "id": 5}, "'id'"),
    ],
)
def test_invalid_fields_name_the_field(payload: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidField, match=field):
        decode_client(msgpack.packb(payload, use_bin_type=True))


def test_invalid_field_error_carries_the_ask_id() -> None:
    with pytest.raises(InvalidField) as info:
        decode_client(json.dumps({"type": "ask", "id": "q7", "text": "x", "max_frames": "many"}))
    assert info.value.id == "q7"


@pytest.mark.parametrize(
    "literal", ["9" * 400, "-" + "9" * 400, "1" + "0" * 4000], ids=["huge", "-huge", "4001-digit"]
)
def test_json_integer_beyond_a_double_is_an_invalid_field(literal: str) -> None:
    """An integer only JSON can carry, too large for a float, is refused, not an OverflowError."""
    with pytest.raises(InvalidField, match="'fps' must be finite"):
        decode_client('{"type": "hello", "fps": ' + literal + "}")
    with pytest.raises(InvalidField, match="'start'") as info:
        decode_client('{"type": "ask", "id": "q", "text": "x", "start": ' + literal + "}")
    assert info.value.id == "q"


def test_json_bytes_must_be_base64() -> None:
    with pytest.raises(InvalidField, match="base64"):
        decode_client(json.dumps({"type": "video.chunk", "data": "not base64!"}))


def test_lone_surrogate_in_json_is_refused() -> None:
    with pytest.raises(InvalidField):
        decode_client('{"type": "ask", "id": "a", "text": "\\ud800"}')


def test_encode_server_both_ways() -> None:
    delta = AnswerDelta(id="a", text="hello")
    assert msgpack.unpackb(encode_server(delta, binary=True)) == {
        "type": "answer.delta",
        "id": "a",
        "text": "hello",
    }
    error = Error(code="no_frames", message="m", id="a")
    assert json.loads(encode_server(error, binary=False)) == {
        "type": "error",
        "code": "no_frames",
        "message": "m",
        "id": "a",
        "fatal": False,
    }


def test_keyframes_only_is_a_boolean() -> None:
    hello = decode_client(msgpack.packb({"type": "hello", "keyframes_only": True}))
    assert isinstance(hello, Hello) and hello.keyframes_only is True
    with pytest.raises(InvalidField, match="'keyframes_only' must be true or false"):
        decode_client('{"type": "hello", "keyframes_only": 1}')


def test_hello_context_is_window_timeline_or_absent() -> None:
    """hello.context decodes to its value or None; any other value, or a non-string, is a
    typed invalid_field naming it."""
    for context in ("window", "timeline"):
        hello = decode_client(json.dumps({"type": "hello", "context": context}))
        assert isinstance(hello, Hello) and hello.context == context
    assert decode_client(msgpack.packb({"type": "hello"})) == Hello()
    for wrong in ('"auto"', '"Timeline"', "1", "true"):
        with pytest.raises(InvalidField, match="hello: 'context' must be") as info:
            decode_client('{"type": "hello", "context": ' + wrong + "}")
        assert info.value.code == "invalid_field" and not info.value.fatal


# -- sampling values: what the engine accepts ---------------------------------


@pytest.mark.parametrize(
    ("generation", "field"),
    [
        ({"top_p": 0}, "'top_p' must be above 0"),
        ({"top_p": 0.0}, "'top_p' must be above 0"),
        ({"temperature": 3}, "'temperature' must be between 0.0 and 2.0"),
        ({"temperature": 0.005}, "'temperature' must be 0 .greedy. or at least 0.01"),
    ],
)
def test_sampling_values_vllm_refuses_are_invalid_fields_naming_the_ask(
    generation: dict[str, float], field: str
) -> None:
    """vLLM refuses these (or rewrites them with a warning): the protocol refuses them first."""
    for data in both({"type": "ask", "id": "q5", "text": "x", "generation": generation}):
        with pytest.raises(InvalidField, match=f"ask.generation: {field}") as info:
            decode_client(data)
        assert info.value.id == "q5"
    with pytest.raises(InvalidField, match=f"hello.generation: {field}"):
        decode_client(json.dumps({"type": "hello", "generation": generation}))


@pytest.mark.parametrize(
    ("choices", "why"),
    [
        (["yes"], "must be a list of 2 to 16 strings"),
        ([str(n) for n in range(17)], "must be a list of 2 to 16 strings"),
        ("yes,no", "must be a list of 2 to 16 strings"),
        (["yes", 1], "must hold strings of 1 to 100 characters"),
        (["yes", ""], "must hold strings of 1 to 100 characters"),
        (["yes", "n" * 101], "must hold strings of 1 to 100 characters"),
        (["yes", "yes"], "must hold distinct strings that are not blank"),
        (["yes", "  "], "must hold distinct strings that are not blank"),
    ],
)
def test_bad_choices_are_invalid_fields_naming_the_ask(choices: Any, why: str) -> None:
    """A fixed-choice list is bounded in count and length, distinct and not blank."""
    message = {"type": "ask", "id": "q6", "text": "x", "generation": {"choices": choices}}
    for data in both(message):
        with pytest.raises(InvalidField) as info:
            decode_client(data)
        assert str(info.value) == f"ask.generation: 'choices' {why}"
        assert info.value.id == "q6"


def test_choices_are_read_in_both_encodings() -> None:
    """Given in ``hello`` or an ``ask``, the choices keep their order."""
    for data in both({"type": "hello", "generation": {"choices": ["no", "yes", "ja"]}}):
        hello = decode_client(data)
        assert isinstance(hello, Hello) and hello.generation.choices == ("no", "yes", "ja")


def test_the_edges_of_the_engine_ranges_are_accepted() -> None:
    """Greedy, the lowest and highest temperatures and the smallest top_p vLLM takes all pass."""
    for generation in (
        {"temperature": 0, "top_p": 1},
        {"temperature": 0.01, "top_p": 1e-9},
        {"temperature": 2, "seed": (1 << 63) - 1, "max_tokens": 1},
    ):
        hello = decode_client(msgpack.packb({"type": "hello", "generation": generation}))
        assert isinstance(hello, Hello)
        assert hello.generation.temperature == generation.get("temperature")


# -- structure bounds: what parsing a message may cost -------------------------

SIZE = DEFAULT_MAX_MESSAGE_BYTES


def count_values(value: object) -> int:
    """Objects decoding built for ``value``: itself, and every key and value inside it."""
    if isinstance(value, dict):
        return 1 + sum(1 + count_values(v) for v in value.values())
    if isinstance(value, list):
        return 1 + sum(count_values(v) for v in value)
    return 1


def nesting(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(nesting, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(nesting, value), default=0)
    return 0


def empty_arrays_msgpack(size: int = SIZE) -> bytes:
    """The attack: a valid ``ask`` whose field ``x`` is an array of millions of empty arrays."""
    head: bytes = msgpack.packb({"type": "ask", "id": "q1", "text": "hi", "x": 0})[:-1]
    count = size - len(head) - 5
    return head + b"\xdd" + count.to_bytes(4, "big") + b"\x90" * count


def empty_arrays_json(size: int = SIZE) -> str:
    head = '{"type":"ask","id":"q1","text":"hi","x":['
    return head + "[]," * ((size - len(head)) // 3 - 2) + "[]]}"


def worst_allowed(binary: bool, size: int = SIZE) -> bytes | str:
    """A message of ``size`` bytes at the bounds: MAX_VALUES values, nested MAX_DEPTH deep.

    Its strings are the dearest to decode: four-byte UTF-8 characters in
    msgpack; in JSON, escaped quotes and backslashes with marks between them,
    so that the check must skip every string with the JSON scanner.
    """
    fields: dict[str, Any] = {"type": "ask", "id": "q1", "text": "hi"}
    fields["deep"] = {"a": {"b": [7]}}  # the message, then 3 levels: MAX_DEPTH
    strings = (MAX_VALUES - count_values(fields)) // 2
    piece = "\U0001f600" if binary else '\\",'
    each = (size - 4096) // strings // (4 if binary else len(json.dumps(piece)) - 2)
    for n in range(strings):
        fields[f"k{n}"] = piece * each
    assert count_values(fields) == MAX_VALUES and nesting(fields) == MAX_DEPTH
    if binary:
        return msgpack.packb(fields, use_bin_type=True)  # type: ignore[no-any-return]
    return json.dumps(fields, separators=(",", ":"))


BOMBS: dict[str, Callable[[], bytes | str]] = {
    "msgpack-arrays": empty_arrays_msgpack,
    "json-arrays": empty_arrays_json,
    "json-depth": lambda: "[" * SIZE,
    "msgpack-declared": lambda: b"\x82\xa4type\xa3ask\xa1x\xdf" + (1 << 31).to_bytes(4, "big"),
    "json-keys": lambda: '{"type":"ask",' + '"":0,' * (SIZE // 5 - 4) + '"":0}',
    "msgpack-keys": lambda: (
        b"\xdf" + (SIZE // 2).to_bytes(4, "big") + b"\xa0\x90" * (SIZE // 2 - 3)
    ),
}


@pytest.mark.parametrize("bomb", BOMBS)
def test_a_message_of_millions_of_values_is_refused_before_they_are_built(bomb: str) -> None:
    """The attack, 4 MiB of empty arrays (or keys), is bad_message having allocated next to nothing.

    Decoding it built one object per value: 4 million lists, over 200 MiB
    and seconds of the event loop; the bound is checked without building any.
    """
    data = BOMBS[bomb]()
    tracemalloc.start()
    try:
        with pytest.raises(BadMessage, match=f"at most {MAX_VALUES} values"):
            decode_client(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 512 * 1024, peak  # the head read for an id, and a few small objects


@pytest.mark.parametrize("binary", [True, False], ids=["msgpack", "json"])
def test_the_worst_allowed_message_builds_at_most_max_values(binary: bool) -> None:
    """A full-size message at both bounds decodes, into no more than MAX_VALUES objects."""
    data = worst_allowed(binary)
    assert SIZE - 64 * 1024 < len(data if isinstance(data, bytes) else data.encode()) <= SIZE
    raw = _load(data)
    assert count_values(raw) == MAX_VALUES and nesting(raw) == MAX_DEPTH


@pytest.mark.parametrize("binary", [True, False], ids=["msgpack", "json"])
def test_the_bounds_are_exact(binary: bool) -> None:
    """MAX_VALUES values and MAX_DEPTH levels pass; one more value or level is bad_message."""

    def encode(message: dict[str, Any]) -> bytes | str:
        return msgpack.packb(message) if binary else json.dumps(message)

    message: dict[str, Any] = {"type": "video.end", "x": [0] * (MAX_VALUES - 5)}
    assert count_values(message) == MAX_VALUES
    assert decode_client(encode(message)) == VideoEnd()
    message["x"].append(0)
    with pytest.raises(BadMessage, match="at most"):
        decode_client(encode(message))
    deep: Any = 0
    for _ in range(MAX_DEPTH - 1):
        deep = [deep]
    assert decode_client(encode({"type": "video.end", "x": deep})) == VideoEnd()
    with pytest.raises(BadMessage, match=f"nest at most {MAX_DEPTH} deep"):
        decode_client(encode({"type": "video.end", "x": [deep]}))


_PIECES = ["a", ",", ":", "[", "{", "]", '"', "\\", '\\"', "\n", "\u00e9", " ", "\U0001f600"]


def _random_value(rng: random.Random, level: int) -> Any:
    roll = rng.random()
    if level <= MAX_DEPTH + 1 and roll < 0.45:
        items = [_random_value(rng, level + 1) for _ in range(rng.randrange(0, 5))]
        if rng.random() < 0.5:
            return items
        return {_random_string(rng): item for item in items}
    if roll < 0.6:
        return rng.choice([None, True, rng.randrange(-(1 << 40), 1 << 40), rng.random() * 1e6])
    return _random_string(rng)


def _random_string(rng: random.Random) -> str:
    return "".join(rng.choice(_PIECES) for _ in range(rng.randrange(0, 12)))


def _empties(value: object) -> int:
    if isinstance(value, dict | list):
        inner = value.values() if isinstance(value, dict) else value
        return (not inner) + sum(map(_empties, inner))
    return 0


@pytest.mark.parametrize("binary", [True, False], ids=["msgpack", "json"])
def test_the_structure_check_agrees_with_the_decoder(binary: bool) -> None:
    """Random messages around the bounds, with marks, quotes and escapes in strings.

    None over the bounds is ever decoded; msgpack counts exactly, and JSON
    refuses within the bound only for empty arrays or maps, counted as two.
    """
    rng = random.Random(20_250_610)
    for _ in range(400):
        message: dict[str, Any] = {"type": "video.end", "inner": _random_value(rng, 2)}
        pad = (rng.randrange(MAX_VALUES - 12, MAX_VALUES + 12) - count_values(message)) // 2
        for n in range(max(pad, 0)):
            message[f"p{n}"] = _random_string(rng)
        values, depth = count_values(message), nesting(message)
        data = msgpack.packb(message) if binary else json.dumps(message)
        within = values <= MAX_VALUES and depth <= MAX_DEPTH
        try:
            decode_client(data)
        except BadMessage:
            assert not within or (not binary and values + _empties(message) > MAX_VALUES)
        else:
            assert within, (values, depth)


def test_json_strings_full_of_marks_are_not_counted_as_values() -> None:
    """A question may hold thousands of commas, quotes and brackets: it is one value."""
    text = 'a, "b", [c]: {d} \\' * 1000
    ask = decode_client(json.dumps({"type": "ask", "id": "q", "text": text}))
    assert isinstance(ask, Ask) and ask.text == text


# -- the id of a message that is not parsed -----------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["msgpack", "json"])
def test_a_refused_ask_is_named_when_its_head_shows_its_id(binary: bool) -> None:
    """The attack written as an ask, id first: its refusal names the id, at a bounded cost."""
    data = empty_arrays_msgpack() if binary else empty_arrays_json()
    with pytest.raises(BadMessage) as info:
        decode_client(data)
    assert info.value.id == "q1"
    assert peek_id(json.dumps({"type": "ask", "id": "q2", "text": "x" * SIZE}, indent=1)) == "q2"


@pytest.mark.parametrize(
    "data",
    [
        json.dumps({"type": "ask", "x": [1], "id": "q"}),  # past a map or array: not walked
        msgpack.packb({"type": "ask", "x": {}, "id": "q"}),
        json.dumps({"type": "cancel", "id": "q"}),
        json.dumps({"type": "ask", "id": "q" * 129}),
        '{"type":"ask",' + '"k":1,' * 200 + '"id":"q"}',  # past the first 128 fields
        b"\xdf" + (1 << 31).to_bytes(4, "big") + b"\xa0\xc0" * 200,
        "[1]",
        b"\xc1",
    ],
)
def test_peek_id_names_nothing_it_would_have_to_walk_far_for(data: bytes | str) -> None:
    """Only the first scalar fields of a map are read, up to 128 of them."""
    assert peek_id(data) is None


def test_message_id_is_the_id_of_asks_only() -> None:
    """A refusal names an ask's id; never a cancel's, which is that of an answer maybe running."""
    messages: list[ClientMessage] = [
        Ask(id="q", text="t"),
        Cancel(id="c"),
        Hello(),
        VideoChunk(data=b"x"),
    ]
    assert [message_id(m) for m in messages] == ["q", None, None, None]
