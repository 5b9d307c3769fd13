"""Hardening over a real uvicorn server: slow readers, graceful drain, refusals, leaks.

The server runs in the test's loop with the scripted engine, so the test can
read the server's own state (its sessions, the engine's running requests,
the tasks and threads of the process) and wait on it without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import psutil
import pytest
from starlette.applications import Starlette
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from streamchat.app import create_app
from streamchat.config import Settings
from streamchat.engine.fake import FakeEngine
from streamchat.errors import CloseCode
from streamchat.server import ServerState
from streamchat_client import ConnectError
from streamchat_client import connect as client_connect
from tests.media import encode_image
from tests.servers import serve, ws_url

SETTINGS = Settings(
    min_pixels=28 * 28,
    max_pixels=56 * 56,
    messages_per_second=1e6,
    message_burst=1_000_000,
)
IMAGE = encode_image(width=64, height=48)
OWN_TASKS = ("reader-", "writer-", "answer-", "decode-", "fetch-")


@contextlib.asynccontextmanager
async def running(
    settings: Settings = SETTINGS, **serve_options: Any
) -> AsyncIterator[tuple[str, Starlette, FakeEngine]]:
    engine = FakeEngine()
    app = create_app(settings, engine=engine)
    try:
        async with serve(app, **serve_options) as base:
            yield ws_url(base), app, engine
    finally:
        engine.gate.set()


def state_of(app: Starlette) -> ServerState:
    state: ServerState = app.state.streamchat
    return state


async def send(ws: ClientConnection, **message: Any) -> None:
    await ws.send(msgpack.packb(message, use_bin_type=True))


async def recv(ws: ClientConnection, *types: str) -> dict[str, Any]:
    """The next message of one of ``types``, skipping status updates and deltas."""
    while True:
        message = dict(msgpack.unpackb(await ws.recv()))
        if not types or message["type"] in types:
            return message
        assert message["type"] in ("video.status", "answer.delta"), message


async def open_session(url: str, **options: Any) -> ClientConnection:
    ws = await connect(url, compression=None, **options)
    await send(ws, type="hello", generation={"max_tokens": 4096})
    assert (await recv(ws))["type"] == "ready"
    await send(ws, type="image", data=IMAGE)
    await recv(ws, "video.status")
    return ws


async def closed_code(ws: ClientConnection) -> int | None:
    with contextlib.suppress(ConnectionClosed):
        while True:
            await ws.recv()
    return ws.close_code


# -- slow consumers -----------------------------------------------------------


async def test_a_client_that_stops_reading_is_disconnected_and_its_answers_aborted() -> None:
    settings = dataclasses.replace(
        SETTINGS, send_timeout=0.5, max_tokens_limit=4096, max_question_chars=20_000
    )
    async with running(settings, send_buffer=4096) as (url, app, engine):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", int(url.split(":")[2].split("/")[0])))
        ws = await open_session(url, sock=sock, max_queue=1)
        question = "word " * 3000  # ~3000 deltas per answer: far more than the buffers hold
        for n in range(settings.max_concurrent_asks):
            await send(ws, type="ask", id=f"a{n}", text=question)
        # The client now reads nothing. The server must give up on it by itself.
        state = state_of(app)
        async with asyncio.timeout(30):
            await engine.wait_running(1)
            await state.wait_sessions(0)
        assert engine.running() == frozenset()
        assert engine.aborted, "answers in flight were aborted, not left to finish"
        ws.transport.abort()


async def test_a_peer_that_vanished_without_closing_is_found_by_pings() -> None:
    """A raw TCP client completes the handshake, then never reads nor answers a ping."""
    settings = dataclasses.replace(SETTINGS, idle_timeout=3600.0)
    async with running(settings, ping_interval=0.2, ping_timeout=0.2) as (url, app, engine):
        ws = await open_session(url)  # the app has started: its state exists
        state = state_of(app)
        await ws.close()
        port = int(url.split(":")[2].split("/")[0])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /v1/session HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        async with asyncio.timeout(30):
            await state.wait_sessions(1)
            await state.wait_sessions(0)  # closed by the server, the peer did nothing
        writer.close()


# -- graceful shutdown --------------------------------------------------------


async def test_drain_lets_answers_finish_and_closes_with_going_away() -> None:
    async with running() as (url, app, engine):
        engine.gate.clear()
        ws = await open_session(url)
        await send(ws, type="ask", id="a", text="what is there?")
        first = await recv(ws, "answer.delta")
        drain = asyncio.create_task(state_of(app).drain(timeout=30.0))
        going = await recv(ws, "going_away")
        assert going["timeout"] == 30.0 and "shutting down" in going["reason"]
        # New sessions are refused while draining; new questions too.
        with pytest.raises(ConnectError) as refused:
            await client_connect(url)
        assert (refused.value.status, refused.value.code) == (503, "server_busy")
        await send(ws, type="ask", id="b", text="and now?")
        error = await recv(ws, "error")
        assert (error["code"], error["id"], error["fatal"]) == ("server_shutdown", "b", False)
        engine.gate.set()
        text = first["text"]
        while (message := await recv(ws, "answer.delta", "answer.done"))["type"] == "answer.delta":
            text += message["text"]
        assert message["finish_reason"] == "stop" and text.endswith("what is there?")
        assert await closed_code(ws) == CloseCode.GOING_AWAY
        async with asyncio.timeout(10):
            await drain
        assert state_of(app).sessions == set()


async def test_drain_ends_answers_that_outlast_the_timeout_with_a_reason() -> None:
    async with running() as (url, app, engine):
        engine.gate.clear()
        sessions = [await open_session(url) for _ in range(3)]
        for ws in sessions:
            await send(ws, type="ask", id="a", text="describe it")
            await recv(ws, "answer.delta")
        drain = asyncio.create_task(state_of(app).drain(timeout=0.2))
        for ws in sessions:
            assert (await recv(ws, "going_away"))["timeout"] == 0.2
            done = await recv(ws, "answer.done")
            assert (done["id"], done["finish_reason"]) == ("a", "shutdown")
            assert await closed_code(ws) == CloseCode.GOING_AWAY
        async with asyncio.timeout(10):
            await drain
        assert engine.running() == frozenset()
        assert len(engine.aborted) == 3


# -- refusals seen by the bundled client --------------------------------------


async def test_the_client_reports_why_a_handshake_was_refused() -> None:
    settings = dataclasses.replace(SETTINGS, api_keys=frozenset({"right"}), max_sessions=1)
    async with running(settings) as (url, app, engine):
        with pytest.raises(ConnectError) as refused:
            await client_connect(url, api_key="wrong")
        assert (refused.value.status, refused.value.code) == (401, "unauthorized")
        async with client_connect(url, api_key="right") as session:
            assert session.ready.model == "fake"
            with pytest.raises(ConnectError) as busy:
                await client_connect(url, api_key="right")
            assert (busy.value.status, busy.value.code) == (503, "server_busy")


# -- leaks --------------------------------------------------------------------


def _own_tasks() -> list[str]:
    names = [t.get_name() for t in asyncio.all_tasks()]
    return [n for n in names if n.startswith(OWN_TASKS)]


async def test_a_thousand_connect_ask_disconnect_cycles_leak_nothing() -> None:
    """Half the cycles read their answer to the end, half hang up while it streams."""
    process = psutil.Process()
    async with running() as (url, app, engine):
        warm = await open_session(url)
        state = state_of(app)  # set by the app's startup, done once a session opened
        await warm.close()
        async with asyncio.timeout(10):
            await state.wait_sessions(0)
        fds, threads = process.num_fds(), threading.active_count()
        tasks = len(asyncio.all_tasks())
        for cycle in range(1000):
            ws = await open_session(url)
            await send(ws, type="ask", id="a", text="what now?")
            if cycle % 2:
                assert (await recv(ws, "answer.done"))["finish_reason"] == "stop"
            else:
                await recv(ws, "answer.delta")
            await ws.close()
        async with asyncio.timeout(30):
            await state.wait_sessions(0)
        assert len(engine.requests) == 1000
        assert engine.running() == frozenset()
        assert _own_tasks() == []
        assert not [t.name for t in threading.enumerate() if t.name.startswith("decoder-")]
        # Loose bounds: uvicorn may still be closing the last few sockets; a leak would
        # show as hundreds.
        assert process.num_fds() <= fds + 10
        assert threading.active_count() <= threads + 4
        assert len(asyncio.all_tasks()) <= tasks + 10
