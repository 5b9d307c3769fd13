"""The server's decoding memory through the endpoint: real PyAV decoders, two sessions.

The memory is set to hold one decoder of the test clip's size and not two, so
the second session's source must wait for the first, and fail typed when the
wait runs out; the first session's stream is left open (no ``video.end``), so
its decoder holds its room until the test ends it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any

from starlette.testclient import TestClient

from streamchat.app import SESSION_PATH, create_app
from streamchat.engine.fake import FakeEngine
from streamchat.media.memory import decoder_bytes
from streamchat.server import ServerState
from tests.support.live import live_server
from tests.support.media import encode_video
from tests.support.testclient import SMALL, Peer, push_video, until_source_ends, with_image
from tests.support.wsclient import open_ws, recv, send

CLIP = encode_video(seconds=2.0)  # 160x120 VP8 in WebM, one message
ONE = decoder_bytes(160, 120, threads=SMALL.decoder_threads)


def _app(wait: float) -> Any:
    settings = dataclasses.replace(SMALL, decode_memory_bytes=ONE * 3 // 2, decode_memory_wait=wait)
    return create_app(settings, engine=FakeEngine())


def _hello(peer: Peer) -> None:
    peer.send({"type": "hello"})
    assert peer.recv()["type"] == "ready"


def _decoding(peer: Peer) -> None:
    """Push the clip without ending it, and return once a frame of it was decoded."""
    push_video(peer, CLIP, size=len(CLIP))
    while (status := peer.recv_type("video.status"))["frames"] == 0:
        assert status["state"] == "decoding", status


def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Return once ``condition()`` holds (polled from the test's thread), or fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


def test_a_second_source_fails_busy_while_the_first_decodes_and_gets_in_after_it() -> None:
    """With room for one decoder, a second session's source waits, fails ``decoder_busy``
    (not fatal: that session answers questions), and decodes once the first source ended."""
    with TestClient(_app(wait=0.2)) as client:
        state: ServerState = client.app.state.streamchat  # type: ignore[attr-defined]
        with (
            client.websocket_connect(SESSION_PATH) as ws_a,
            client.websocket_connect(SESSION_PATH) as ws_b,
        ):
            a, b = Peer(ws_a), Peer(ws_b)
            _hello(a)
            _hello(b)
            _decoding(a)
            assert state.memory.budget.reserved == ONE

            push_video(b, CLIP, size=len(CLIP))
            error = b.recv_type("error")
            assert (error["code"], error["fatal"]) == ("decoder_busy", False)
            assert until_source_ends(b)["state"] == "failed"
            with_image(b)
            b.send({"type": "ask", "id": "q", "text": "what is there?"})
            text, done = b.answer("q")
            assert text and done["finish_reason"] == "stop"

            a.send({"type": "video.end"})
            ended = until_source_ends(a)
            assert ended["state"] == "ended" and ended["frames"] > 0
            assert state.memory.budget.reserved == 0  # released before the status was sent

            push_video(b, CLIP, size=len(CLIP))
            b.send({"type": "video.end"})
            status = until_source_ends(b)
            assert status["state"] == "ended" and status["frames"] > 0


async def test_closing_sessions_mid_decode_and_mid_wait_gives_their_memory_back() -> None:
    """On a served app, a session closed while its decoder waits leaves the queue, and one
    closed while its decoder decodes gives its room back: the account ends empty."""
    settings = dataclasses.replace(SMALL, decode_memory_bytes=ONE * 3 // 2, decode_memory_wait=30.0)
    async with live_server(settings) as live:
        a = await _session(live.url)
        budget = live.state.memory.budget  # the lifespan has run once a session is open
        await send(a, type="video.chunk", data=CLIP)
        while (await recv(a, "video.status"))["frames"] == 0:
            pass
        assert budget.reserved == ONE
        b = await _session(live.url)
        await send(b, type="video.chunk", data=CLIP)
        await _until_async(lambda: budget.waiting == 1)
        await b.close()
        await _until_async(lambda: len(live.state.sessions) == 1)
        assert (budget.waiting, budget.reserved) == (0, ONE)
        await a.close()
        await live.state.wait_sessions(0)
        assert (budget.waiting, budget.reserved) == (0, 0)


async def _session(url: str) -> Any:
    ws = await open_ws(url)
    await send(ws, type="hello")
    assert (await recv(ws))["type"] == "ready"
    return ws


async def _until_async(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Return once ``condition()`` holds (polled on the loop), or fail after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)
