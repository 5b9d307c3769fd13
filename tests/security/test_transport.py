"""The transport under hostile clients: pings never read, request heads too large,
too slow or half-open, and keys put in query strings.

The attacks run against ``streamchat serve --engine fake`` with its default
settings, in a process of its own whose memory is read from ``/proc``. The
tests of a client that stops reading, and of the log, serve in-process with
the same configuration (there a small kernel send buffer, or uvicorn's loggers
to capture). Clients speak raw TCP (``tests.support.rawws``): an attacker does
not use a WebSocket library.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import statistics
import time

import httpx
import msgpack
import pytest

from streamchat.config import Settings
from streamchat.redact import REDACTED
from streamchat.transport import HEAD_TIMEOUT, MAX_PENDING_HEADS
from streamchat_client import connect
from tests.support.live import live_server
from tests.support.measure import high_water_mark, reset_peak, slowest, timed, viewer
from tests.support.media import encode_image
from tests.support.process import server_process
from tests.support.rawws import client_frame, upgrade_request

MIB = 1024 * 1024
FLOOD_BYTES = 128 * MIB
"""Bytes a flooder sends at most; the server must cut it off well before."""
FLOODERS = 16
"""Flooders, one after the other, while another session asks."""
FLOOD_RSS_BOUND = 32 * MIB
"""What a ping flood (and the other session's asks meanwhile) may add to the server's RSS.

The pongs of one read are a few hundred KiB and the write buffer 64 KiB: a
server that queued every pong would hold most of ``FLOOD_BYTES``."""
HEAD_FLOOD_BYTES = 64 * MIB
"""One header line an attacker sends at most; the server must refuse it well before."""
HEAD_RSS_BOUND = 16 * MIB
"""What one oversized head may add to the server's RSS (the bound is 16 KiB and a read)."""
LIVENESS = 120.0
"""Seconds an attack may run before the test gives up on the server cutting it off."""
SLOWER = 50
"""How many times its own baseline (the slowest of ten) another session's slowest ask may
take under attack: each flooder costs the server one read of pings to parse (~256 KiB)."""
ALLOWANCE = 1.0
"""Seconds added to that bound: on 2 shared cores any one request can stall for a few hundred
ms whatever the server does; before the fix asks took 2.4 s median under the flood, and the
median is checked against the plain multiple."""
DRIP_PACE = 1.0
"""Seconds between the bytes of a dripped request head (the attack's pace, not a wait)."""

# -- raw clients ----------------------------------------------------------------


async def _tcp(port: int, *, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if rcvbuf is not None:  # a client that reads nothing: its window closes at once
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def _send(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)


async def _until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or resets it)."""
    loop, received = asyncio.get_running_loop(), b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await loop.sock_recv(sock, 65536):
            received += chunk
    return received


def _packed(**message: object) -> bytes:
    return client_frame(0x2, msgpack.packb(message, use_bin_type=True))


PINGS = b"".join(client_frame(0x9, bytes(125)) for _ in range(512))
"""64 KiB of pings; each asks the server for a 127-byte pong."""
PONGS = b"".join(client_frame(0xA, bytes(125)) for _ in range(512))
"""64 KiB of unsolicited pongs: the server answers nothing to them."""


async def _websocket(
    port: int, path: str = "/v1/session", protocol: str | None = None, **hello: object
) -> socket.socket:
    """A WebSocket past its handshake and ``hello``, whose client need not read."""
    sock = await _tcp(port, rcvbuf=4096)
    await _send(sock, upgrade_request(path, protocol))
    head, loop = b"", asyncio.get_running_loop()
    while b"\r\n\r\n" not in head:
        chunk = await loop.sock_recv(sock, 1)  # the head only: what follows is frames
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    await _send(sock, _packed(type="hello", **hello))
    return sock


async def _exactly(sock: socket.socket, size: int) -> bytes:
    data, loop = b"", asyncio.get_running_loop()
    while len(data) < size:
        chunk = await loop.sock_recv(sock, size - len(data))
        assert chunk, "closed by the server"
        data += chunk
    return data


async def _message(sock: socket.socket) -> dict[str, object]:
    """The next message the server sends (msgpack: the client spoke msgpack)."""
    while True:
        first, second = await _exactly(sock, 2)
        size = second & 0x7F
        if size >= 126:
            size = int.from_bytes(await _exactly(sock, 2 if size == 126 else 8), "big")
        payload = await _exactly(sock, size)
        if first & 0x0F == 0x2:
            message: dict[str, object] = msgpack.unpackb(payload)
            return message


async def _flood(
    sock: socket.socket, frames: bytes = PINGS, started: asyncio.Event | None = None
) -> tuple[bool, int]:
    """Send ``frames`` over and over, read nothing; return (cut by the server, bytes sent)."""
    sent = 0
    try:
        while sent < FLOOD_BYTES:
            await _send(sock, frames)
            sent += len(frames)
            if started is not None and sent >= 8 * MIB:
                started.set()
    except (ConnectionResetError, BrokenPipeError):
        return True, sent
    finally:
        if started is not None:
            started.set()
    return False, sent


# -- the server process ---------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, f"{record.name} {record.getMessage()}"))


# -- a ping flood ---------------------------------------------------------------


async def test_a_ping_flood_that_reads_nothing_is_bounded_and_cut_off() -> None:
    """Clients sending pings and reading nothing cost bounded memory, are closed, slow no one."""
    async with server_process("--engine", "fake") as server, viewer(server.url) as bystander:

        async def ask() -> None:
            assert (await bystander.ask("what is there?", max_tokens=8).result()).text

        async def attack() -> list[tuple[bool, int]]:
            floods: list[tuple[bool, int]] = []
            while len(floods) < FLOODERS and all(cut for cut, _ in floods):
                floods.append(await _flood(await _websocket(server.port)))
            return floods

        baseline = await slowest(ask)
        rss = reset_peak(server.process.pid)
        attacking = asyncio.create_task(attack())
        under_attack: list[float] = []
        async with asyncio.timeout(LIVENESS):
            while not attacking.done():
                under_attack.append(await timed(ask))
            floods = await attacking
        growth = high_water_mark(server.process.pid) - rss
        assert not bystander.closed
        await ask()

    sent = sum(sent for _, sent in floods)
    report = (
        f"{len(floods)} flooders sent {sent / MIB:.0f} MiB of pings; server RSS "
        f"+{growth / MIB:.1f} MiB at peak; asks: baseline (slowest) {baseline * 1e3:.1f} ms, "
        f"under attack: {len(under_attack)}, median {statistics.median(under_attack) * 1e3:.1f} "
        f"ms, slowest {max(under_attack) * 1e3:.1f} ms"
    )
    print(report)
    assert all(cut for cut, _ in floods), f"the server never closed a flooder: {report}"
    assert growth < FLOOD_RSS_BOUND, report
    assert statistics.median(under_attack) < SLOWER * baseline, report
    assert max(under_attack) < SLOWER * baseline + ALLOWANCE, report


async def _stalled_client(port: int) -> socket.socket:
    """A session with four long answers on their way, whose client reads nothing more."""
    sock = await _websocket(port, generation={"max_tokens": 2048})
    await _send(sock, _packed(type="image", data=encode_image()))
    async with asyncio.timeout(LIVENESS):
        while True:
            message = await _message(sock)
            if message["type"] == "video.status" and message.get("frames"):
                break
    question = "w " * 1999  # an answer of ~2,000 deltas: more than the buffers hold
    for n in range(4):
        await _send(sock, _packed(type="ask", id=f"a{n}", text=question))
    return sock


SMALL_SEND_BUFFER = 4096
"""The kernel send buffer of the in-process server's connections.

On loopback the kernel takes megabytes before uvicorn's write buffer holds
anything; a small send buffer (as a slow link would give) gets there at once."""


async def test_a_client_that_stops_reading_mid_answer_is_aborted() -> None:
    """A client that reads nothing while answers wait is cut off, though it keeps sending."""
    async with live_server(send_buffer=SMALL_SEND_BUFFER, log_level="info") as live:
        sock = await _stalled_client(live.port)
        # The client sends pongs (the server answers nothing to them), and reads nothing.
        async with asyncio.timeout(LIVENESS):
            cut, sent = await _flood(sock, PONGS)
        sock.close()
    print(f"sent {sent / MIB:.1f} MiB of pongs before the cut")
    assert cut, "the connection was left open"


async def test_stopping_does_not_wait_on_a_client_that_reads_nothing() -> None:
    """uvicorn's shutdown with a client that stopped reading mid-answer: cut, nothing times out.

    The path a second SIGTERM takes (``should_exit``); the first one's drain
    is the app's (it waits on sessions, not connections).
    """
    records = _Records()
    uvicorn_logger = logging.getLogger("uvicorn")
    async with live_server(send_buffer=SMALL_SEND_BUFFER, log_level="info") as live:
        uvicorn_logger.addHandler(records)
        try:
            sock = await _stalled_client(live.port)
            flood = asyncio.create_task(_flood(sock, PONGS))
            begun = time.perf_counter()
            async with asyncio.timeout(LIVENESS):
                await live.stop()
                took = time.perf_counter() - begun
                cut, _ = await flood
        finally:
            uvicorn_logger.removeHandler(records)
        sock.close()
    print(f"stopped in {took:.1f} s")
    assert cut
    # uvicorn logs an ERROR when it gives up waiting for a connection to close.
    assert [line for level, line in records.lines if level >= logging.ERROR] == []


# -- request heads --------------------------------------------------------------


async def test_an_oversized_request_head_is_refused_at_its_bound() -> None:
    """A header line that never ends is refused (431, or cut) and costs bounded memory."""
    async with server_process("--engine", "fake") as server:
        rss = reset_peak(server.process.pid)
        sock = await _tcp(server.port)
        reply = asyncio.create_task(_until_closed(sock))
        sent = 0
        line = b"a" * 65536
        async with asyncio.timeout(LIVENESS):
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                await _send(sock, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
                while sent < HEAD_FLOOD_BYTES and not reply.done():
                    await _send(sock, line)
                    sent += len(line)
            answer = await reply
        growth = high_water_mark(server.process.pid) - rss
        sock.close()
        async with httpx.AsyncClient() as client:
            health = await client.get(f"http://127.0.0.1:{server.port}/health")

    report = f"sent {sent / MIB:.2f} MiB of header; server RSS +{growth / MIB:.1f} MiB at peak"
    print(report, answer[:40])
    assert sent < HEAD_FLOOD_BYTES, f"the server read the whole head: {report}"
    assert answer.startswith(b"HTTP/1.1 431") or answer == b"", answer[:200]
    assert growth < HEAD_RSS_BOUND, report
    assert health.status_code == 200


async def test_a_request_head_dripped_byte_by_byte_is_cut_off() -> None:
    """A head sent one byte at a time, each in time to dodge an idle timeout, is closed."""
    async with server_process("--engine", "fake") as server:
        sock = await _tcp(server.port)
        closed = asyncio.create_task(_until_closed(sock))
        await _send(sock, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        drip = b"X-Drip: " + b"d" * 1000
        began = time.perf_counter()
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            for byte in range(int(4 * HEAD_TIMEOUT / DRIP_PACE)):  # well past the head timeout
                await _send(sock, drip[byte : byte + 1])
                await asyncio.wait({closed}, timeout=DRIP_PACE)  # the attack's pace
                if closed.done():
                    break
        async with asyncio.timeout(LIVENESS):
            answer = await closed
        took = time.perf_counter() - began
        sock.close()
    print(f"cut off after {took:.1f} s of drip")
    assert answer == b"", answer[:200]  # closed, with nothing served


async def test_half_open_handshakes_do_not_keep_a_client_out() -> None:
    """Twice the pending-head bound in half-open heads: the oldest are closed, a client gets in."""
    async with server_process("--engine", "fake") as server:

        async def visit() -> None:
            async with viewer(server.url) as bystander:
                assert (await bystander.ask("what is there?", max_tokens=8).result()).text

        baseline = await slowest(visit, runs=5)
        half_open: list[socket.socket] = []
        partial = b"GET /v1/session HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        for _ in range(2 * MAX_PENDING_HEADS):
            sock = await _tcp(server.port)
            await _send(sock, partial)
            half_open.append(sock)
        took = await timed(visit)  # accepted after every half-open one: they were all seen

        def closed(sock: socket.socket) -> bool:
            try:
                return sock.recv(1, socket.MSG_PEEK) == b""
            except BlockingIOError:
                return False
            except ConnectionResetError:
                return True

        evicted = sum(closed(sock) for sock in half_open)
        report = (
            f"{len(half_open)} half-open, {evicted} closed as the oldest; a new session and "
            f"ask took {took * 1e3:.0f} ms (baseline {baseline * 1e3:.0f} ms)"
        )
        print(report)
        assert evicted >= len(half_open) - MAX_PENDING_HEADS, report
        assert took < SLOWER * baseline + ALLOWANCE, report
        # Those still pending are closed by the head timeout.
        async with asyncio.timeout(LIVENESS):
            await asyncio.gather(*(_until_closed(sock) for sock in half_open))
        for sock in half_open:
            sock.close()


# -- keys in the log --------------------------------------------------------------


@pytest.mark.parametrize("level", ["info", "trace"])
async def test_keys_never_reach_the_log(level: str) -> None:
    """A key in a query string, a bearer header, a subprotocol or hello is never logged."""
    key, wrong = "s3cr3t-key-1234567890", "wr0ng-key-0987654321"
    settings = Settings(api_keys=frozenset({key}))
    records = _Records()
    # The server's loggers (not the root: the test's own client logs its headers at DEBUG).
    loggers = [logging.getLogger(name) for name in ("streamchat", "uvicorn", "uvicorn.access")]
    own_level = loggers[0].level
    async with live_server(settings, log_level=level) as live:
        base, port = live.base, live.port
        for logger in loggers:
            logger.addHandler(records)
        loggers[0].setLevel(logging.DEBUG)
        try:
            async with httpx.AsyncClient() as client:
                for name in ("key", "token", "api_key"):
                    await client.get(f"{base}/health?{name}={wrong}")
                    await client.get(f"{base}/?{name}={key}")
            for query in (f"key={key}", f"token={wrong}&api_key={key}"):
                sock = await _websocket(port, f"/v1/session?{query}")
                sock.close()
            async with connect(live.url, api_key=key) as session:
                await session.send_image(encode_image())
                await session.wait_frames(1, timeout=LIVENESS)
                await session.ask("what is there?", max_tokens=4).result()
            # The key as a subprotocol, and in hello.
            sock = await _websocket(port, protocol=f"streamchat.key.{key}", token=key)
            assert (await _message(sock))["type"] == "ready"
            await _send(sock, client_frame(0x8, b"\x03\xe8"))  # close, 1000
            await _until_closed(sock)
            sock.close()
        finally:
            for logger in loggers:
                logger.removeHandler(records)
            loggers[0].setLevel(own_level)

    lines = "\n".join(line for _, line in records.lines)
    assert key not in lines and wrong not in lines, lines
    assert f"/health?{REDACTED}" in lines, lines  # the access log was captured
    assert f"/v1/session?{REDACTED}" in lines, lines
