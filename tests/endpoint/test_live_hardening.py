"""Hardening over a real uvicorn server: slow readers, graceful drain, refusals, leaks.

The server runs in the test's loop with the scripted engine, so the test can
read the server's own state (its sessions, the engine's running requests,
the tasks and threads of the process) and wait on it without sleeping.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading

import psutil
import pytest

from streamchat.config import Settings
from streamchat.errors import CloseCode
from streamchat_client import ConnectError
from streamchat_client import connect as client_connect
from tests.support.live import live_server
from tests.support.wsclient import closed_code, open_session, recv, send

SETTINGS = Settings(
    min_pixels=28 * 28,
    max_pixels=56 * 56,
    messages_per_second=1e6,
    message_burst=1_000_000,
)
OWN_TASKS = ("reader-", "writer-", "answer-", "decode-", "fetch-")


# -- slow consumers -----------------------------------------------------------


async def test_a_client_that_stops_reading_is_disconnected_and_its_answers_aborted() -> None:
    settings = dataclasses.replace(
        SETTINGS, send_timeout=0.5, max_tokens_limit=4096, max_question_chars=20_000
    )
    async with live_server(settings, send_buffer=4096) as live:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", live.port))
        ws = await open_session(live.url, sock=sock, max_queue=1)
        question = "word " * 3000  # ~3000 deltas per answer: far more than the buffers hold
        for n in range(settings.max_concurrent_asks):
            await send(ws, type="ask", id=f"a{n}", text=question)
        # The client now reads nothing. The server must give up on it by itself.
        state = live.state
        async with asyncio.timeout(30):
            await live.engine.wait_running(1)
            await state.wait_sessions(0)
        assert live.engine.running() == frozenset()
        assert live.engine.aborted, "answers in flight were aborted, not left to finish"
        ws.transport.abort()


async def test_a_peer_that_vanished_without_closing_is_found_by_pings() -> None:
    """A raw TCP client completes the handshake, then never reads nor answers a ping."""
    settings = dataclasses.replace(
        SETTINGS, idle_timeout=3600.0, ping_interval=0.2, ping_timeout=0.2
    )
    async with live_server(settings) as live:
        ws = await open_session(live.url)  # the app has started: its state exists
        state = live.state
        await ws.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
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
    async with live_server(SETTINGS) as live:
        live.engine.gate.clear()
        ws = await open_session(live.url)
        await send(ws, type="ask", id="a", text="what is there?")
        first = await recv(ws, "answer.delta")
        drain = asyncio.create_task(live.state.drain(timeout=30.0))
        going = await recv(ws, "going_away")
        assert going["timeout"] == 30.0 and "shutting down" in going["reason"]
        # New sessions are refused while draining; new questions too.
        with pytest.raises(ConnectError) as refused:
            await client_connect(live.url)
        assert (refused.value.status, refused.value.code) == (503, "server_busy")
        await send(ws, type="ask", id="b", text="and now?")
        error = await recv(ws, "error")
        assert (error["code"], error["id"], error["fatal"]) == ("server_shutdown", "b", False)
        live.engine.gate.set()
        text = first["text"]
        while (message := await recv(ws, "answer.delta", "answer.done"))["type"] == "answer.delta":
            text += message["text"]
        assert message["finish_reason"] == "stop" and text.endswith("what is there?")
        assert await closed_code(ws) == CloseCode.GOING_AWAY
        async with asyncio.timeout(10):
            await drain
        assert live.state.sessions == set()


async def test_drain_ends_answers_that_outlast_the_timeout_with_a_reason() -> None:
    async with live_server(SETTINGS) as live:
        live.engine.gate.clear()
        sessions = [await open_session(live.url) for _ in range(3)]
        for ws in sessions:
            await send(ws, type="ask", id="a", text="describe it")
            await recv(ws, "answer.delta")
        drain = asyncio.create_task(live.state.drain(timeout=0.2))
        for ws in sessions:
            assert (await recv(ws, "going_away"))["timeout"] == 0.2
            done = await recv(ws, "answer.done")
            assert (done["id"], done["finish_reason"]) == ("a", "shutdown")
            assert await closed_code(ws) == CloseCode.GOING_AWAY
        async with asyncio.timeout(10):
            await drain
        assert live.engine.running() == frozenset()
        assert len(live.engine.aborted) == 3


# -- refusals seen by the bundled client --------------------------------------


async def test_the_client_reports_why_a_handshake_was_refused() -> None:
    settings = dataclasses.replace(SETTINGS, api_keys=frozenset({"right"}), max_sessions=1)
    async with live_server(settings) as live:
        with pytest.raises(ConnectError) as refused:
            await client_connect(live.url, api_key="wrong")
        assert (refused.value.status, refused.value.code) == (401, "unauthorized")
        async with client_connect(live.url, api_key="right") as session:
            assert session.ready.model == "fake"
            with pytest.raises(ConnectError) as busy:
                await client_connect(live.url, api_key="right")
            assert (busy.value.status, busy.value.code) == (503, "server_busy")


# -- leaks --------------------------------------------------------------------


def _own_tasks() -> list[str]:
    names = [t.get_name() for t in asyncio.all_tasks()]
    return [n for n in names if n.startswith(OWN_TASKS)]


async def test_a_thousand_connect_ask_disconnect_cycles_leak_nothing() -> None:
    """Half the cycles read their answer to the end, half hang up while it streams."""
    process = psutil.Process()
    async with live_server(SETTINGS) as live:
        warm = await open_session(live.url)
        state = live.state  # set by the app's startup, done once a session opened
        await warm.close()
        async with asyncio.timeout(10):
            await state.wait_sessions(0)
        fds, threads = process.num_fds(), threading.active_count()
        tasks = len(asyncio.all_tasks())
        for cycle in range(1000):
            ws = await open_session(live.url)
            await send(ws, type="ask", id="a", text="what now?")
            if cycle % 2:
                assert (await recv(ws, "answer.done"))["finish_reason"] == "stop"
            else:
                await recv(ws, "answer.delta")
            await ws.close()
        async with asyncio.timeout(30):
            await state.wait_sessions(0)
        assert len(live.engine.requests) == 1000
        assert live.engine.running() == frozenset()
        assert _own_tasks() == []
        assert not [t.name for t in threading.enumerate() if t.name.startswith("decoder-")]
        # Loose bounds: uvicorn may still be closing the last few sockets; a leak would
        # show as hundreds.
        assert process.num_fds() <= fds + 10
        assert threading.active_count() <= threads + 4
        assert len(asyncio.all_tasks()) <= tasks + 10
