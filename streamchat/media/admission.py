"""The server's decoding memory on its event loop: decoders wait for room here, bounded.

:class:`DecodeMemory` wraps the pure account (:class:`~.memory.DecodeBudget`)
for one server: it lives on the event loop, and every decoder thread holds a
:class:`Hold` of it. The decoder calls :meth:`Hold.need` (from its own thread)
once it knows its frame size, before it decodes a frame at that size; the
request is made on the loop and the thread blocks until it is granted, refused
(a :class:`~streamchat.errors.DecoderBusy` raised in the thread, which ends the
source and nothing else) or the source is stopped (:meth:`Hold.cancel`, called
by whoever sets the source's stop event). Waiting never blocks the loop, lasts
at most ``wait`` seconds, and at most ``max_waiters`` decoders wait at once.
The thread gives everything back when it ends, however it ends
(:func:`DecodeMemory.holding`), not when its caller stops waiting for it: a
decoder still unwinding still holds its frames.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..config import Settings
from ..errors import DecoderBusy
from ..metrics import Metrics
from .memory import Budgeted, DecodeBudget, Refusal, decoder_bytes, default_budget

__all__ = ["DecodeMemory", "Hold", "physical_memory"]

logger = logging.getLogger("streamchat.decoder")

_T = TypeVar("_T")
_CGROUP_LIMIT = Path("/sys/fs/cgroup/memory.max")


def physical_memory() -> int:
    """The memory this process may use: the machine's, or its cgroup's limit if lower."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError, ValueError):
        limit = _CGROUP_LIMIT.read_text().strip()
        if limit != "max":
            total = min(total, int(limit))
    return total


class Hold:
    """One decoder's share of the decoding memory; its methods are called from its thread."""

    def __init__(self, memory: DecodeMemory, stop: threading.Event, name: str) -> None:
        self.account = Budgeted(name)
        self._memory = memory
        self._stop = stop
        self._pending: concurrent.futures.Future[None] | None = None

    def need(self, width: int, height: int, bytes_per_pixel: float) -> None:
        """Hold room for a decoder of frames of ``width`` x ``height`` before decoding them.

        Blocks the calling (decoder) thread until granted. Raises
        ``DecoderBusy`` when refused, or when the source was stopped meanwhile
        (the decoder then reports a stop, whatever it raises).
        """
        memory = self._memory
        nbytes = decoder_bytes(
            width, height, bytes_per_pixel=bytes_per_pixel, threads=memory.threads
        )
        if nbytes <= self.account.held:
            return
        pending = asyncio.run_coroutine_threadsafe(
            memory.acquire(self.account, nbytes), memory.loop
        )
        self._pending = pending
        if self._stop.is_set():  # stopped before ``cancel`` could see ``_pending``
            pending.cancel()
        try:
            pending.result()
        except concurrent.futures.CancelledError:
            raise DecoderBusy(
                "the source was stopped while it waited for decoding memory"
            ) from None
        finally:
            self._pending = None

    def cancel(self) -> None:
        """The source is stopped: a wait in :meth:`need` ends now (any thread)."""
        pending = self._pending
        if pending is not None:
            pending.cancel()

    def close(self) -> None:
        """The decoder ended: give everything back (from its thread; again is harmless)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody counts any more
            self._memory.loop.call_soon_threadsafe(self._memory.release, self.account)


class DecodeMemory:
    """The decoding memory of one server, shared by every decoder (sessions' and the cache's).

    ``capacity`` bytes; a decoder waits at most ``wait`` seconds for room, at
    most ``max_waiters`` at once (beyond: refused at once). It serves the loop it
    is built on, or, built before any runs, the loop of its first decoder's
    share; ``threads`` is the FFmpeg thread count of each decoder.
    """

    def __init__(
        self,
        capacity: int,
        *,
        wait: float,
        max_waiters: int,
        threads: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.budget = DecodeBudget(capacity, max_waiters=max_waiters)
        self.wait = wait
        self.threads = threads
        self.metrics = metrics or Metrics()
        self._loop: asyncio.AbstractEventLoop | None = None
        with contextlib.suppress(RuntimeError):  # built on the loop it serves, as a server's is
            self._loop = asyncio.get_running_loop()
        self._granted: dict[Budgeted, asyncio.Future[None]] = {}
        self._count()

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None) -> DecodeMemory:
        """The server's: ``decode_memory_bytes``, else :func:`~.memory.default_budget` of this
        machine. Waiters: a session has one decoder, two while one replaces another; the
        video cache ``max_media_decodes``."""
        capacity = settings.decode_memory_bytes
        if capacity is None:
            largest = decoder_bytes(
                settings.max_decode_pixels, 1, bytes_per_pixel=3.0, threads=settings.decoder_threads
            )
            capacity = default_budget(physical_memory(), largest=largest)
        return cls(
            capacity,
            wait=settings.decode_memory_wait,
            max_waiters=2 * settings.max_sessions + settings.max_media_decodes,
            threads=settings.decoder_threads,
            metrics=metrics,
        )

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop it serves: the one it was built on, else (built before any loop ran, as a
        test's server state may be) the one running when the first decoder's share was made.
        Decoder threads call into it."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def hold(self, stop: threading.Event, name: str = "") -> Hold:
        """A new decoder's share (holding nothing yet); ``stop`` is its source's stop event.
        Made on the loop, which it binds for the decoder's thread if none is yet."""
        self._loop = self.loop
        return Hold(self, stop, name)

    def holding(self, hold: Hold, work: Callable[[], _T]) -> _T:
        """``work()`` (in the decoder's thread), then ``hold`` given back however it ended."""
        try:
            return work()
        finally:
            hold.close()

    async def acquire(self, account: Budgeted, nbytes: int) -> None:
        """Hold ``nbytes`` for ``account``, waiting up to ``wait`` for room (else
        ``DecoderBusy``)."""
        outcome = self.budget.request(account, nbytes)
        if isinstance(outcome, Refusal):
            raise DecoderBusy(outcome.reason)
        if outcome:
            self._count()
            return
        granted = self.loop.create_future()
        self._granted[account] = granted
        self._count()
        try:
            async with asyncio.timeout(self.wait):
                await granted
        except TimeoutError:
            raise DecoderBusy(
                f"the server's decoding memory stayed full for {self.wait:g} s (other videos "
                "are decoding): try again later"
            ) from None
        finally:
            self._granted.pop(account, None)
            if account.wanted:  # still waiting: its wait ran out, or it was stopped
                self._wake(self.budget.withdraw(account))

    def release(self, account: Budgeted) -> None:
        """``account``'s decoder ended: its bytes go to those waiting (on the loop)."""
        self._wake(self.budget.release(account))

    def _wake(self, granted: list[Budgeted]) -> None:
        for account in granted:
            future = self._granted.get(account)
            if future is not None and not future.done():
                future.set_result(None)
        self._count()

    def _count(self) -> None:
        b = self.budget
        self.metrics.decode_memory(reserved=b.reserved, waiting=b.waiting, capacity=b.capacity)
