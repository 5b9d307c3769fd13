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
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil  # type: ignore[import-untyped]  # no stubs in the test extras

__all__ = ["ResourceSampler", "StreamchatServer", "serve_files", "start_streamchat"]

_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 10.0


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def start_streamchat(log: Path, extra: Sequence[str] = ()) -> AsyncIterator[StreamchatServer]:
    """Start ``streamchat serve --engine fake`` on a free loopback port; stop it on exit.

    The server's output goes to ``log`` (its sessions log at INFO level).

    The port is picked by binding port 0 and releasing it, so another process
    could take it in between: the start is retried on a fresh port then.
    """
    for _attempt in range(3):
        port = _free_port()
        command = [
            sys.executable,
            "-m",
            "streamchat",
            "serve",
            "--engine",
            "fake",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            *extra,
        ]
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as output:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
            )
        try:
            if await _wait_healthy(process, port):
                break
        except BaseException:
            _stop(process)
            raise
        _stop(process)
    else:
        raise RuntimeError(f"the streamchat server did not start (see {log})")
    try:
        yield StreamchatServer(process, port)
    finally:
        _stop(process)


async def _wait_healthy(process: subprocess.Popen[bytes], port: int) -> bool:
    deadline = time.monotonic() + _START_TIMEOUT
    async with httpx.AsyncClient(trust_env=False) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            with contextlib.suppress(httpx.HTTPError):
                response = await client.get(f"http://127.0.0.1:{port}/health", timeout=2.0)
                if response.status_code == 200:
                    return True
            await asyncio.sleep(0.1)  # a server that is starting has nothing to wait on
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(_STOP_TIMEOUT)


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
