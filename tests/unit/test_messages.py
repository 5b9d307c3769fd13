"""The wire format: msgpack and JSON decode to the same validated messages."""

from __future__ import annotations

import base64
import json
from typing import Any

import msgpack
import pytest

from streamchat.errors import BadMessage, InvalidField, UnknownType
from streamchat.messages import (
    AnswerDelta,
    Ask,
    Cancel,
    Error,
    Hello,
    VideoChunk,
    VideoEnd,
    VideoUrl,
    decode_client,
    encode_server,
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
