"""Who gets a session and how long they keep it: keys, origins, capacity, rates, idleness.

Through Starlette's test client with the scripted engine; the same paths over
a real uvicorn server are in ``test_live_hardening.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from streamchat.access import KEY_SUBPROTOCOL_PREFIX, SUBPROTOCOL
from streamchat.app import SESSION_PATH, create_app
from streamchat.config import Settings
from streamchat.engine.fake import FakeEngine
from streamchat.errors import CloseCode
from streamchat.server import ServerState
from tests.support.media import chunks, encode_image, encode_video
from tests.support.testclient import SMALL as SETTINGS
from tests.support.testclient import Peer

KEY = "k-3f9a1c"
AUTH = dataclasses.replace(SETTINGS, api_keys=frozenset({KEY}))


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(model_name="fake-model")


def _client(settings: Settings, engine: FakeEngine) -> TestClient:
    return TestClient(create_app(settings, engine=engine))


def _hello(peer: Peer, **fields: Any) -> dict[str, Any]:
    peer.send({"type": "hello", **fields})
    return peer.recv()


def _closed_with(ws: Any) -> int:
    """Read until the server closes; the close code."""
    with pytest.raises(WebSocketDisconnect) as closed:
        while True:
            ws.receive_bytes()
    return closed.value.code


def _denied(client: TestClient, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    with pytest.raises(WebSocketDenialResponse) as denied:
        with client.websocket_connect(SESSION_PATH, **kwargs):
            pass
    return denied.value.status_code, denied.value.json()


# -- API keys ---------------------------------------------------------------


@pytest.mark.parametrize(
    "way",
    ["bearer", "subprotocol", "hello"],
)
def test_the_right_key_works_each_way(engine: FakeEngine, way: str) -> None:
    kwargs: dict[str, Any] = {}
    hello: dict[str, Any] = {}
    if way == "bearer":
        kwargs["headers"] = {"authorization": f"Bearer {KEY}"}
    elif way == "subprotocol":
        kwargs["subprotocols"] = [SUBPROTOCOL, KEY_SUBPROTOCOL_PREFIX + KEY]
    else:
        hello["token"] = KEY
    with _client(AUTH, engine) as client, client.websocket_connect(SESSION_PATH, **kwargs) as ws:
        if way == "subprotocol":
            assert ws.accepted_subprotocol == SUBPROTOCOL
        assert _hello(Peer(ws), **hello)["type"] == "ready"


def test_a_wrong_key_at_the_handshake_gets_401(engine: FakeEngine) -> None:
    with _client(AUTH, engine) as client:
        status, body = _denied(client, headers={"authorization": "Bearer nope"})
        assert (status, body["code"]) == (401, "unauthorized")
        status, body = _denied(client, subprotocols=[SUBPROTOCOL, KEY_SUBPROTOCOL_PREFIX + "x"])
        assert (status, body["code"]) == (401, "unauthorized")


@pytest.mark.parametrize("token", [None, "nope"])
def test_no_key_or_a_wrong_one_in_hello_closes_with_4401(
    engine: FakeEngine, token: str | None
) -> None:
    with _client(AUTH, engine) as client, client.websocket_connect(SESSION_PATH) as ws:
        error = _hello(Peer(ws), token=token)
        assert (error["type"], error["code"], error["fatal"]) == ("error", "unauthorized", True)
        assert _closed_with(ws) == CloseCode.UNAUTHORIZED
    assert engine.requests == []


def test_anything_before_an_authenticated_hello_closes_with_4401(engine: FakeEngine) -> None:
    with _client(AUTH, engine) as client, client.websocket_connect(SESSION_PATH) as ws:
        peer = Peer(ws)
        peer.send({"type": "ask", "id": "a", "text": "hi"})
        assert peer.recv()["code"] == "unauthorized"
        assert _closed_with(ws) == CloseCode.UNAUTHORIZED


def test_keys_from_a_file_are_revoked_without_restart(engine: FakeEngine, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("first\nsecond\n")
    settings = dataclasses.replace(SETTINGS, api_keys_file=keys)
    with _client(settings, engine) as client:
        with client.websocket_connect(SESSION_PATH, headers={"authorization": "Bearer first"}):
            pass
        keys.write_text("second\n# first was revoked\n")
        status, _ = _denied(client, headers={"authorization": "Bearer first"})
        assert status == 401
        with client.websocket_connect(SESSION_PATH, headers={"authorization": "Bearer second"}):
            pass


# -- origins ----------------------------------------------------------------


def test_a_page_from_another_origin_gets_403(engine: FakeEngine) -> None:
    """The server's own page on an IP address passes with auth off; another site's does not."""
    own = "ws://127.0.0.1:8000" + SESSION_PATH
    with _client(SETTINGS, engine) as client:
        status, body = _denied(client, headers={"origin": "http://evil.example"})
        assert (status, body["code"]) == (403, "origin_not_allowed")
        with client.websocket_connect(own, headers={"origin": "http://127.0.0.1:8000"}) as ws:
            assert _hello(Peer(ws))["type"] == "ready"


def test_with_auth_off_a_page_on_a_host_name_needs_its_origin_listed(engine: FakeEngine) -> None:
    """A page whose name could point here by DNS rebinding needs a key or --allow-origin."""
    own = {"origin": "http://testserver"}
    with _client(SETTINGS, engine) as client:
        status, body = _denied(client, headers=own)
        assert (status, body["code"]) == (403, "origin_not_allowed")
        assert "--allow-origin" in body["message"]
    with _client(AUTH, engine) as client:
        headers = {**own, "authorization": f"Bearer {KEY}"}
        with client.websocket_connect(SESSION_PATH, headers=headers) as ws:
            assert _hello(Peer(ws))["type"] == "ready"
    listed = dataclasses.replace(SETTINGS, allowed_origins=("http://testserver",))
    with _client(listed, engine) as client, client.websocket_connect(SESSION_PATH, headers=own):
        pass


def test_an_origin_allowlist(engine: FakeEngine) -> None:
    settings = dataclasses.replace(SETTINGS, allowed_origins=("https://app.example",))
    with _client(settings, engine) as client:
        status, _ = _denied(client, headers={"origin": "http://testserver"})
        assert status == 403
        with client.websocket_connect(SESSION_PATH, headers={"origin": "https://app.example"}):
            pass


def test_origin_and_key_are_both_needed(engine: FakeEngine) -> None:
    with _client(AUTH, engine) as client:
        headers = {"origin": "http://evil.example", "authorization": f"Bearer {KEY}"}
        status, _ = _denied(client, headers=headers)
        assert status == 403


# -- capacity ---------------------------------------------------------------


def test_sessions_over_the_server_limit_get_503_until_one_closes(engine: FakeEngine) -> None:
    """Sessions count once they said hello (auth off); a full server refuses at the handshake."""
    settings = dataclasses.replace(SETTINGS, max_sessions=2)
    with _client(settings, engine) as client:
        with client.websocket_connect(SESSION_PATH) as one, client.websocket_connect(SESSION_PATH):
            assert _hello(Peer(one))["type"] == "ready"
            with client.websocket_connect(SESSION_PATH) as three:  # no hello yet: waiting
                with client.websocket_connect(SESSION_PATH) as two:
                    assert _hello(Peer(two))["type"] == "ready"
                    error = _hello(Peer(three))
                    assert (error["code"], error["fatal"]) == ("server_busy", True)
                    assert _closed_with(three) == CloseCode.TRY_AGAIN_LATER
                    status, body = _denied(client)
                    assert (status, body["code"]) == (503, "server_busy")
        with client.websocket_connect(SESSION_PATH) as ws:
            assert _hello(Peer(ws))["type"] == "ready"


def test_connections_that_have_not_said_hello_hold_no_session_place(engine: FakeEngine) -> None:
    """Waiting connections have their own places: more than one address's share get 503."""
    settings = dataclasses.replace(SETTINGS, max_sessions=1, max_pending_per_address=2)
    with _client(settings, engine) as client:
        with client.websocket_connect(SESSION_PATH) as one, client.websocket_connect(SESSION_PATH):
            state: ServerState = client.app.state.streamchat
            assert state.waiting == 2 > settings.max_sessions
            status, body = _denied(client)
            assert (status, body["code"]) == (503, "server_busy")
            assert "wait to authenticate" in body["message"]
            assert _hello(Peer(one))["type"] == "ready"  # the session place was free all along
            assert state.waiting == 1


def test_sessions_per_client_are_counted_by_key(engine: FakeEngine) -> None:
    settings = dataclasses.replace(
        SETTINGS, api_keys=frozenset({"one", "two"}), max_sessions_per_client=1
    )
    one = {"headers": {"authorization": "Bearer one"}}
    two = {"headers": {"authorization": "Bearer two"}}
    with _client(settings, engine) as client:
        with client.websocket_connect(SESSION_PATH, **one):
            status, body = _denied(client, **one)
            assert (status, body["code"]) == (503, "server_busy")
            assert "per client" in body["message"]
            with client.websocket_connect(SESSION_PATH, **two):
                pass


# -- rates and idleness -----------------------------------------------------


def test_messages_over_the_rate_are_refused_and_flooding_closes_with_4429(
    engine: FakeEngine,
) -> None:
    settings = dataclasses.replace(SETTINGS, messages_per_second=0.001, message_burst=3)
    with _client(settings, engine) as client, client.websocket_connect(SESSION_PATH) as ws:
        peer = Peer(ws)
        assert _hello(peer)["type"] == "ready"
        codes = []
        for _ in range(2 + 3):  # the rest of the burst, then a burst's worth of refusals
            peer.send({"type": "cancel", "id": "x"})
            codes.append(peer.recv()["code"])
        assert codes == ["unknown_id"] * 2 + ["rate_limited"] * 3
        peer.send({"type": "cancel", "id": "x"})
        error = peer.recv()
        assert (error["code"], error["fatal"]) == ("rate_limited", True)
        assert _closed_with(ws) == CloseCode.RATE_LIMITED


def test_pushed_video_over_its_byte_rate_is_paced_and_kept(
    engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks beyond the rate are read later, never dropped: every byte reaches the source."""
    waits: list[float] = []
    sleep = asyncio.sleep

    async def recorded(delay: float) -> None:
        waits.append(delay)
        await sleep(0)

    monkeypatch.setattr("streamchat.endpoint.asyncio.sleep", recorded)
    data = encode_video(container="webm", codec="vp8", seconds=1.0)
    settings = dataclasses.replace(SETTINGS, video_bytes_per_second=1000, feed_bytes=len(data) // 2)
    with _client(settings, engine) as client, client.websocket_connect(SESSION_PATH) as ws:
        peer = Peer(ws)
        assert _hello(peer)["type"] == "ready"
        # Pieces of an eighth: the feed (half the clip) holds four while the decoder catches up.
        for piece in chunks(data, len(data) // 8 + 1):
            peer.send({"type": "video.chunk", "data": piece})
        peer.send({"type": "video.end"})
        while (status := peer.recv_type("video.status"))["state"] == "decoding":
            pass
    assert status["state"] == "ended" and status["bytes_received"] == len(data)
    assert status["frames"] > 0
    assert waits and all(w > 0 for w in waits)
    # No time passes in the recorded sleeps, so the last wait is the whole excess over the burst.
    assert waits[-1] == pytest.approx((len(data) - len(data) // 2) / 1000, rel=0.05)


def test_an_idle_session_is_closed_with_4408(engine: FakeEngine) -> None:
    settings = dataclasses.replace(SETTINGS, idle_timeout=0.2)
    with _client(settings, engine) as client, client.websocket_connect(SESSION_PATH) as ws:
        peer = Peer(ws)
        assert _hello(peer)["type"] == "ready"
        error = peer.recv()
        assert (error["code"], error["fatal"]) == ("idle_timeout", True)
        assert _closed_with(ws) == CloseCode.IDLE_TIMEOUT


def test_a_session_answering_is_not_idle(engine: FakeEngine) -> None:
    settings = dataclasses.replace(SETTINGS, idle_timeout=0.05)
    engine.gate.clear()
    with _client(settings, engine) as client, client.websocket_connect(SESSION_PATH) as ws:
        peer = Peer(ws)
        assert _hello(peer)["type"] == "ready"
        peer.send({"type": "image", "data": _tiny_png()})
        peer.recv_type("video.status")
        peer.send({"type": "ask", "id": "a", "text": "what is there?"})
        first = peer.recv_type("answer.delta")
        client.portal.call(engine.wait_running, 1)
        # Many idle periods pass while the answer is held; the session stays.
        client.portal.call(_pause, 0.3)
        client.portal.call(engine.gate.set)
        text, done = peer.answer("a")
        assert done["finish_reason"] == "stop" and (first["text"] + text).startswith("I see")


async def _pause(seconds: float) -> None:
    """Let idle periods pass (the timer under test), not a synchronisation."""
    await asyncio.sleep(seconds)


def _tiny_png() -> bytes:
    return encode_image(width=64, height=48)


def test_no_log_ever_carries_the_key(engine: FakeEngine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="streamchat")
    with _client(AUTH, engine) as client:
        _denied(client, headers={"authorization": f"Bearer {KEY}x"})
        with client.websocket_connect(SESSION_PATH, headers={"authorization": f"Bearer {KEY}"}):
            pass
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "session" in logged and KEY not in logged


# -- faults -----------------------------------------------------------------


def test_a_failed_engine_makes_health_503_and_answers_typed_errors(engine: FakeEngine) -> None:
    with _client(SETTINGS, engine) as client, client.websocket_connect(SESSION_PATH) as ws:
        assert client.get("/health").status_code == 200
        peer = Peer(ws)
        assert _hello(peer)["type"] == "ready"
        peer.send({"type": "image", "data": _tiny_png()})
        peer.recv_type("video.status")
        engine.dead = True
        health = client.get("/health")
        assert (health.status_code, health.json()["status"]) == (503, "engine_failed")
        peer.send({"type": "ask", "id": "a", "text": "still there?"})
        error = peer.recv_type("error")
        assert (error["code"], error["id"], error["fatal"]) == ("engine_error", "a", False)
        done = peer.recv_type("answer.done")
        assert (done["id"], done["finish_reason"]) == ("a", "error")


def test_text_frames_are_measured_in_bytes(engine: FakeEngine) -> None:
    """60,000 four-byte characters are 240,000 bytes: over a 64 KiB limit."""
    with _client(SETTINGS, engine) as client, client.websocket_connect(SESSION_PATH) as ws:
        ws.send_text('{"type":"ask","id":"a","text":"' + "\U0001f600" * 60_000 + '"}')
        error = json.loads(ws.receive_text())
        assert (error["code"], error["fatal"]) == ("message_too_large", False)


def test_ready_tells_the_rates_to_keep_to(engine: FakeEngine) -> None:
    settings = dataclasses.replace(
        SETTINGS, messages_per_second=50.0, video_bytes_per_second=1 << 20, idle_timeout=90.0
    )
    with _client(settings, engine) as client, client.websocket_connect(SESSION_PATH) as ws:
        limits = _hello(Peer(ws))["limits"]
    assert limits["messages_per_second"] == 50.0
    assert limits["message_burst"] == settings.message_burst
    assert (limits["video_bytes_per_second"], limits["idle_timeout"]) == (1 << 20, 90.0)


def test_a_key_given_in_hello_counts_against_its_own_session_limit(engine: FakeEngine) -> None:
    settings = dataclasses.replace(SETTINGS, api_keys=frozenset({"one"}), max_sessions_per_client=1)
    with _client(settings, engine) as client, client.websocket_connect(SESSION_PATH) as first:
        assert _hello(Peer(first), token="one")["type"] == "ready"
        with client.websocket_connect(SESSION_PATH) as second:
            error = _hello(Peer(second), token="one")
            assert (error["code"], error["fatal"]) == ("server_busy", True)
            assert _closed_with(second) == CloseCode.TRY_AGAIN_LATER


def test_a_session_without_a_key_has_little_time_to_give_one(engine: FakeEngine) -> None:
    settings = dataclasses.replace(AUTH, hello_timeout=0.1)
    with _client(settings, engine) as client, client.websocket_connect(SESSION_PATH) as ws:
        error = Peer(ws).recv()
        assert (error["code"], error["fatal"]) == ("idle_timeout", True)
        assert _closed_with(ws) == CloseCode.IDLE_TIMEOUT


@pytest.mark.parametrize("settings", [AUTH, SETTINGS], ids=["keyless", "auth-off"])
def test_messages_before_a_valid_hello_do_not_extend_its_deadline(
    engine: FakeEngine, settings: Settings
) -> None:
    """Junk sent well within the deadline, again and again, still ends at the deadline."""
    settings = dataclasses.replace(settings, hello_timeout=0.5)
    with _client(settings, engine) as client, client.websocket_connect(SESSION_PATH) as ws:
        peer, sent = Peer(ws), 0
        while sent < 99:
            client.portal.call(_pause, settings.hello_timeout / 5)
            peer.send({"type": "nope"})
            sent += 1
            error = peer.recv()
            if error["code"] != "unknown_type":
                break
        assert (error["code"], error["fatal"]) == ("idle_timeout", True)
        assert 2 <= sent < 100  # junk answered before the deadline did not move it
        assert _closed_with(ws) == CloseCode.IDLE_TIMEOUT
    assert engine.requests == []
