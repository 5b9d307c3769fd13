"""``streamchat serve`` as a process of its own, the way a user starts it.

Readiness is read from the server's log (uvicorn's "Uvicorn running on"),
never waited for by time; the whole log is kept for assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

__all__ = ["ServerProcess", "free_port", "server_process"]

READY_TIMEOUT = 240.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port
        self.url = f"ws://127.0.0.1:{port}/v1/session"
        self.log: list[str] = []
        self._ready = asyncio.Event()
        self._drain = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.log.append(line)
            if "Uvicorn running on" in line:
                self._ready.set()
        self._ready.set()  # the process ended: let the waiter see it

    async def ready(self) -> None:
        async with asyncio.timeout(READY_TIMEOUT):
            await self._ready.wait()
        if self.process.returncode is not None:
            raise AssertionError("server exited early:\n" + "\n".join(self.log))

    async def stop(self) -> None:
        """SIGTERM, and check that the server shut down gracefully (exit status 0)."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            code = await self.process.wait()
            await self._drain
        log = "\n".join(self.log[-60:])
        assert code == 0, log
        assert "Application shutdown complete" in log, log


@contextlib.asynccontextmanager
async def server_process(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> AsyncIterator[ServerProcess]:
    """``python -m streamchat serve --port P *args``, killed on exit if still running."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamchat",
        "serve",
        "--port",
        str(port),
        *args,
        cwd=cwd,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    running = ServerProcess(process, port)
    try:
        await running.ready()
        yield running
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await running._drain  # the log reader ends with the process's stderr
