"""The WebSocket endpoint through Starlette's test client, with the scripted engine."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import msgpack
import pytest
from starlette.testclient import TestClient

from streamchat.app import SESSION_PATH, create_app
from streamchat.engine.fake import FakeEngine
from tests.support.media import corrupt_payloads, encode_image, encode_video
from tests.support.testclient import SMALL as SETTINGS
from tests.support.testclient import Peer, push_video, until_source_ends, with_image


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(model_name="fake-model")


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(SETTINGS, engine=engine)) as client:
        yield client


@pytest.fixture
def peer(client: TestClient) -> Iterator[Peer]:
    with client.websocket_connect(SESSION_PATH) as ws:
        peer = Peer(ws)
        peer.send({"type": "hello", "fps": 2})
        ready = peer.recv()
        assert ready["type"] == "ready" and ready["model"] == "fake-model"
        yield peer


def test_health(client: TestClient) -> None:
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["model"] == "fake-model"


def test_ready_reports_limits(client: TestClient) -> None:
    with client.websocket_connect(SESSION_PATH) as ws:
        peer = Peer(ws)
        peer.send_json({"type": "hello", "window_frames": 5})
        ready = peer.recv()  # JSON in, JSON out
        assert ready["limits"]["window_frames"] == 5
        assert ready["limits"]["max_message_bytes"] == SETTINGS.max_message_bytes
        # 128 random bits: the id names the session as a video for the OpenAI-compatible door.
        assert ready["protocol"] == 1 and len(ready["session"]) == 32
        assert int(ready["session"], 16) >= 0


def test_message_before_hello(client: TestClient) -> None:
    with client.websocket_connect(SESSION_PATH) as ws:
        peer = Peer(ws)
        peer.send({"type": "ask", "id": "a", "text": "q"})
        assert peer.recv()["code"] == "hello_required"
        peer.send({"type": "hello"})
        assert peer.recv()["type"] == "ready"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"\xc1\xc1", "bad_message"),
        ("{oops", "bad_message"),
        (msgpack.packb({"type": "teleport"}), "unknown_type"),
        (msgpack.packb({"type": "ask", "id": "q"}), "invalid_field"),
        (msgpack.packb({"type": "cancel", "id": "nope"}), "unknown_id"),
        (msgpack.packb({"type": "ask", "id": "q", "text": "hi"}), "no_frames"),
        (b"\x00" * (SETTINGS.max_message_bytes + 1), "message_too_large"),
        (msgpack.packb({"type": "image", "data": b"not an image"}), "video_unsupported"),
    ],
)
def test_bad_input_gets_a_typed_error_and_the_session_goes_on(
    peer: Peer, raw: bytes | str, code: str
) -> None:
    """Each bad message is answered by its error code; then a question still works."""
    if isinstance(raw, bytes):
        peer.ws.send_bytes(raw)
    else:
        peer.ws.send_text(raw)
    error = peer.recv_type("error")
    assert error["code"] == code and error["fatal"] is False
    with_image(peer)
    peer.send({"type": "ask", "id": "after", "text": "still there?"})
    text, done = peer.answer("after")
    assert "you asked: still there?" in text and done["finish_reason"] == "stop"


def test_images_make_a_window_to_ask_about(peer: Peer, engine: FakeEngine) -> None:
    for t in range(3):
        with_image(peer, float(t))
    peer.send({"type": "ask", "id": "a", "text": "what?", "generation": {"max_tokens": 50}})
    text, done = peer.answer("a")
    assert text.startswith("I see 3 frames (0.0-2.0s)")
    assert done["usage"]["frames"] == 3 and done["usage"]["time_to_first_token"] >= 0
    [request] = engine.requests
    assert request.frames[0].image.shape == (56, 56, 3)  # resized to the pixel budget


def test_history_follows_the_session(peer: Peer) -> None:
    with_image(peer)
    for id in ("a", "b"):
        peer.send({"type": "ask", "id": id, "text": "q"})
        peer.answer(id)
    peer.send({"type": "ask", "id": "c", "text": "q"})
    text, _ = peer.answer("c")
    assert "after 2 turns" in text


def test_cancel_ends_the_answer_and_the_engine_request(peer: Peer, engine: FakeEngine) -> None:
    """A held answer is cancelled: done says so and the engine runs nothing."""
    engine.gate.clear()
    with_image(peer)
    peer.send({"type": "ask", "id": "a", "text": "long answer please"})
    first = peer.recv_type("answer.delta")
    assert first["id"] == "a"
    peer.send({"type": "cancel", "id": "a"})
    done = peer.recv_type("answer.done")
    assert done["finish_reason"] == "cancelled"
    assert engine.running() == frozenset() and len(engine.aborted) == 1


def test_engine_failure_is_typed_and_the_session_goes_on(peer: Peer, engine: FakeEngine) -> None:
    engine.fail_with = "out of memory"
    with_image(peer)
    peer.send({"type": "ask", "id": "a", "text": "q"})
    assert peer.recv_type("answer.delta")["text"] == "I"  # the fake fails after one word
    error = peer.recv_type("error")
    assert (error["code"], error["id"]) == ("engine_error", "a")
    assert peer.recv_type("answer.done")["finish_reason"] == "error"
    engine.fail_with = None
    peer.send({"type": "ask", "id": "b", "text": "q"})
    assert peer.answer("b")[1]["finish_reason"] == "stop"


def test_json_bytes_are_base64(peer: Peer) -> None:
    peer.send_json(
        {
            "type": "image",
            "data": base64.b64encode(encode_image("jpeg", width=32, height=32)).decode(),
        }
    )
    peer.send_json({"type": "ask", "id": "j", "text": "q"})
    text = ""
    while (message := peer.recv())["type"] != "answer.done":
        if message["type"] == "answer.delta":
            text += message["text"]
    assert text.startswith("I see 1 frames")


def test_pushed_video_is_decoded_into_the_window(peer: Peer, engine: FakeEngine) -> None:
    """Chunks cut at random boundaries decode to frames at the session's fps."""
    push_video(peer, encode_video(container="webm", codec="vp8", fps=10, seconds=2.0), fmt="webm")
    peer.send({"type": "video.end"})
    status = until_source_ends(peer)
    assert status["state"] == "ended" and status["frames"] == 4  # 2 s at 2 fps
    assert status["first_pts"] == 0.0 and status["span"] == pytest.approx(1.5, abs=0.11)
    peer.send({"type": "ask", "id": "a", "text": "q", "last_seconds": 0.6})
    text, done = peer.answer("a")
    assert done["usage"]["frames"] == 2
    assert engine.requests[0].frames[-1].image.shape[2] == 3


def test_corrupt_video_keeps_earlier_frames(peer: Peer) -> None:
    """A stream whose packets turn to junk ends with a typed error; decoded frames stay."""
    good = encode_video(container="webm", codec="vp8", fps=10, seconds=6.0, gop=5)
    push_video(peer, corrupt_payloads(good, first=12))
    peer.send({"type": "video.end"})
    error = peer.recv_type("error")
    assert error["code"] == "video_decode_failed" and error["fatal"] is False
    status = until_source_ends(peer)
    assert status["state"] == "failed" and status["frames"] >= 1
    peer.send({"type": "ask", "id": "a", "text": "q"})
    assert peer.answer("a")[1]["finish_reason"] == "stop"


def test_random_bytes_are_unsupported_and_a_new_source_works(peer: Peer) -> None:
    peer.send({"type": "video.chunk", "data": bytes(range(256)) * 64})
    peer.send({"type": "video.end"})
    error = peer.recv_type("error")
    assert error["code"] in ("video_unsupported", "video_decode_failed")
    until_source_ends(peer)
    push_video(peer, encode_video(container="matroska", codec="h264", seconds=1.0))
    peer.send({"type": "video.end"})
    status = until_source_ends(peer)
    assert (status["source"], status["state"], status["frames"]) == (2, "ended", 2)
