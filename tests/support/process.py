"""``streamchat serve`` as a process of its own, the way a user starts it.

For what an in-process server cannot show: the server's own memory (read from
``/proc``, not mixed with the test's), its command line, its signals and its
exit. Readiness is read from the server's log (uvicorn's "Uvicorn running
on"), never waited for by time; so are the sessions it has closed, in text or
in JSON (``--log-format json``). The whole log, stderr and stdout as one,
line by line, is kept for assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from tests.support.ports import free_port

__all__ = ["ServerProcess", "closes_session", "server_process"]

READY_TIMEOUT = 240.0
SESSION_CLOSED = re.compile(r"\bsession \S+: closed$")
"""The line a session's end is logged with (INFO), once it has fully stopped (decoders ended)."""


def closes_session(line: str) -> bool:
    """Whether ``line`` is :data:`SESSION_CLOSED`, or its JSON form (the session a field)."""
    if line.startswith("{"):
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            return bool(record.get("session")) and record.get("message") == "closed"
    return bool(SESSION_CLOSED.search(line))


class ServerProcess:
    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port
        self.url = f"ws://127.0.0.1:{port}/v1/session"
        self.base = f"http://127.0.0.1:{port}"
        """``/health``, ``/metrics`` and the OpenAI door."""
        self.log: list[str] = []
        self.sessions_closed = 0
        """Sessions the server has logged as closed so far."""
        self._ready = asyncio.Event()
        self._logged = asyncio.Condition()
        self._ended = False
        self._drain = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:  # stderr too
            line = raw.decode(errors="replace").rstrip()
            async with self._logged:
                self.log.append(line)
                self.sessions_closed += closes_session(line)
                self._logged.notify_all()
            if "Uvicorn running on" in line:
                self._ready.set()
        self._ready.set()  # the process ended: let the waiters see it
        async with self._logged:
            self._ended = True
            self._logged.notify_all()

    async def ready(self) -> None:
        async with asyncio.timeout(READY_TIMEOUT):
            await self._ready.wait()
        if self.process.returncode is not None:
            raise AssertionError("server exited early:\n" + "\n".join(self.log))

    async def wait_sessions_closed(self, count: int) -> None:
        """Until the server has logged ``count`` sessions closed in all (or has exited).

        A process's counterpart of :meth:`ServerState.wait_sessions`: the line is
        logged once the session is forgotten, after its answers and decoders ended.
        """
        async with self._logged:
            await self._logged.wait_for(lambda: self.sessions_closed >= count or self._ended)
        assert self.sessions_closed >= count, "\n".join(self.log[-60:])

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
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
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
        await running._drain  # the log reader ends with the process's output
