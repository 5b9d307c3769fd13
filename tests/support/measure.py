"""What the attack tests measure: time against a baseline, a server's memory, a bystander.

An attack test on a shared 2-core machine cannot assert absolute times. It
measures a bystander's step (another client's question, a ``/health`` poll)
first on its own (the :func:`slowest` of a few runs: the baseline), then
under attack (:func:`timed`), and bounds the ratio. Memory is the kernel's
view of the server process, from ``/proc``: its RSS now, its peak
(``VmHWM``), which :func:`reset_peak` starts anew, or every few milliseconds
with :class:`RssSampler`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import psutil

from streamchat_client import Session, connect
from tests.support.media import encode_image

__all__ = [
    "RssSampler",
    "high_water_mark",
    "proc_status",
    "reset_peak",
    "slowest",
    "timed",
    "viewer",
]


async def timed(step: Callable[[], Awaitable[object]]) -> float:
    """Seconds ``step()`` took."""
    start = time.perf_counter()
    await step()
    return time.perf_counter() - start


async def slowest(step: Callable[[], Awaitable[object]], runs: int = 10) -> float:
    """The slowest of ``runs`` after a warm-up: the bounds are multiples of it."""
    await step()
    return max([await timed(step) for _ in range(runs)])


@contextlib.asynccontextmanager
async def viewer(url: str, *, timeout: float = 120.0) -> AsyncIterator[Session]:
    """Another client's session, with a frame to ask about: the bystander of an attack."""
    async with connect(url) as session:
        await session.send_image(encode_image())
        await session.wait_frames(1, timeout=timeout)
        yield session


def proc_status(pid: int, field: str) -> int:
    """A memory field of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``, ...), in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB$", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) * 1024


def high_water_mark(pid: int) -> int:
    """The kernel's record of the process's peak RSS (``VmHWM``), in bytes."""
    return proc_status(pid, "VmHWM")


def reset_peak(pid: int) -> int:
    """Reset the kernel's peak RSS of ``pid`` (``VmHWM``) to its RSS now; return that."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return proc_status(pid, "VmRSS")


class RssSampler:
    """Samples a process's RSS every few milliseconds on the event loop; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self._process = psutil.Process(pid)
        self._interval = interval
        self.peak = 0
        self.samples = 0
        self._task = asyncio.create_task(self._run())

    def now(self) -> int:
        rss = int(self._process.memory_info().rss)
        self.peak = max(self.peak, rss)
        self.samples += 1
        return rss

    async def _run(self) -> None:
        while True:
            self.now()
            await asyncio.sleep(self._interval)  # periodic sampling, not synchronisation

    async def stop(self) -> int:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return self.peak
