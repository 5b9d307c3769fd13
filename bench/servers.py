"""Servers for the end-to-end benchmarks, on loopback addresses only.

The streamchat server runs as ``python -m streamchat serve --engine fake`` in a
subprocess: its RSS and CPU time are then its own, not mixed with the client's
(which pushes the video from the benchmark process), and it is what an
operator runs. The fake engine answers from a script, so only ingest costs.
A static HTTP server for URL sources runs in a thread of the benchmark
process: serving a file from the page cache costs little next to decoding it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]  # no stubs in the test extras

from streamchat.config import Settings

__all__ = [
    "ResourceSampler",
    "StreamchatServer",
    "free_port",
    "serve_app",
    "serve_files",
    "start_server",
    "start_streamchat",
    "stop_process",
]

_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 30.0  # an engine's shutdown takes several seconds


@dataclass(eq=False)
class StreamchatServer:
    """A running server subprocess: where to connect and how to measure it."""

    process: subprocess.Popen[bytes]
    port: int

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/session"

    @property
    def ps(self) -> psutil.Process:
        return psutil.Process(self.process.pid)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


UNLIMITED = (
    "--max-sessions",
    "1024",
    "--max-sessions-per-client",
    "1024",
    "--video-bytes-per-second",
    str(1 << 40),
    "--messages-per-second",
    "1000000",
    "--message-burst",
    "1000000",
)
"""Admission and rate limits lifted: every benchmark client connects from 127.0.0.1,
and the figures are about the pipeline, not the policy (by default 8 sessions per
client, 200 messages and 32 MiB of pushed video per second per session)."""


@contextlib.asynccontextmanager
async def start_streamchat(
    log: Path,
    extra: Sequence[str] = (),
    *,
    engine: str = "fake",
    timeout: float = _START_TIMEOUT,
) -> AsyncIterator[StreamchatServer]:
    """Start ``streamchat serve --engine ENGINE`` on a free loopback port; stop it on exit.

    The server's output goes to ``log`` (its sessions log at INFO level).
    With ``engine="vllm"``, ``extra`` holds the model and engine flags, and
    ``timeout`` must allow for the engine's start (15-60 s here).
    """

    def command(port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "streamchat",
            "serve",
            *UNLIMITED,
            "--engine",
            engine,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            *extra,
        ]

    async with start_server(command, log, timeout=timeout) as (process, port):
        yield StreamchatServer(process, port)


@contextlib.asynccontextmanager
async def start_server(
    command: Callable[[int], list[str]],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = _START_TIMEOUT,
) -> AsyncIterator[tuple[subprocess.Popen[bytes], int]]:
    """Run ``command(port)`` until ``GET /health`` answers 200; yield the process and port.

    The port is picked by binding port 0 and releasing it, so another process
    could take it in between: the start is retried on a fresh port then. The
    server runs in its own process group, which is stopped as a whole on exit
    (an engine's worker processes with it).
    """
    for _attempt in range(3):
        port = free_port()
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as output:
            process = subprocess.Popen(
                command(port),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=None if env is None else dict(env),
                start_new_session=True,
            )
        try:
            if await _wait_healthy(process, port, timeout):
                break
        except BaseException:
            stop_process(process)
            raise
        stop_process(process)
    else:
        raise RuntimeError(f"the server did not start (see {log})")
    try:
        yield process, port
    finally:
        stop_process(process)


async def _wait_healthy(process: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(trust_env=False) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            with contextlib.suppress(httpx.HTTPError):
                response = await client.get(f"http://127.0.0.1:{port}/health", timeout=2.0)
                if response.status_code == 200:
                    return True
            await asyncio.sleep(0.2)  # a server that is starting has nothing to wait on
    return False


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process's group, then SIGKILL it if it has not exited in time."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(_STOP_TIMEOUT)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # workers left behind by the leader


@contextlib.asynccontextmanager
async def serve_app(app: Any, settings: Settings) -> AsyncIterator[str]:
    """Serve an ASGI ``app`` in this event loop as ``streamchat serve`` would; yield its base URL.

    For the engine benchmarks: the app shares the benchmark's vLLM engine,
    which is bound to this loop. The socket listens before uvicorn starts, so
    clients may connect at once.
    """
    from streamchat.serving import listening_socket, serve_in_loop

    with listening_socket() as sock:
        async with serve_in_loop(app, settings, sock, log_level="warning", lifespan="on"):
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve_files(root: Path) -> Iterator[str]:
    """Serve ``root`` over HTTP on 127.0.0.1 from a thread; yield the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="bench-files", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(_STOP_TIMEOUT)


@dataclass(eq=False)
class ResourceSampler:
    """Samples a process's RSS every ``interval`` seconds from an asyncio task."""

    server: StreamchatServer
    interval: float = 0.5
    samples: list[tuple[float, int]] = field(default_factory=list)
    """(seconds since start, RSS bytes)."""
    _task: asyncio.Task[None] | None = None
    _started: float = field(default_factory=time.monotonic)
    """Sample times count from the sampler's creation."""

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rss-sampler")

    def now(self) -> float:
        return time.monotonic() - self._started

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()

    def sample(self) -> tuple[float, int]:
        """Take a sample now; return it as (seconds since start, RSS bytes)."""
        sample = (self.now(), self.server.rss())
        self.samples.append(sample)
        return sample

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)  # sampling is periodic by nature
