"""A bounded byte queue from the event loop to the decoder thread.

The event loop (one producer) puts the chunks of a live container stream; the
decoder thread reads them back through :meth:`ByteFeed.read`, which is what
PyAV calls as the ``read`` method of a file-like object. The feed bounds the
bytes that have arrived but are not yet read by the decoder, so a client that
pushes faster than the server decodes is refused (:meth:`ByteFeed.put_nowait`
raises :class:`~streamchat.errors.VideoBacklogFull`) or slowed down
(:meth:`ByteFeed.put` waits, which gives a URL fetcher natural backpressure),
and memory stays bounded either way.

The reader side follows what FFmpeg needs from a live input:

* ``read()`` returns ``b""`` only at the real end of the stream (after
  :meth:`ByteFeed.close` and once everything queued is read): FFmpeg treats
  ``b""`` as the end for good, so a momentarily empty queue blocks instead.
* A stalled producer ends the read with :class:`~streamchat.errors.VideoTimeout`
  after ``read_timeout`` seconds: FFmpeg's own timeouts cannot interrupt a
  Python ``read()``.
* Failures are sticky: FFmpeg may call ``read()`` again after it raised, and
  must get the same error again rather than a confusing later state.

Waiting putters are woken without polling: the reader resolves their futures
through ``loop.call_soon_threadsafe`` when the backlog falls to the low-water
mark (half of ``max_bytes``), so a waiting producer resumes in large steps
rather than byte by byte.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from ..errors import VideoBacklogFull, VideoTimeout

__all__ = ["ByteFeed", "FeedClosed"]

logger = logging.getLogger("streamchat.decoder")


class FeedClosed(Exception):
    """The feed no longer takes data, or was aborted under a reading decoder.

    Raised by :meth:`ByteFeed.put` after :meth:`ByteFeed.close` or
    :meth:`ByteFeed.abort` (so a fetcher stops fetching), and by
    :meth:`ByteFeed.read` after an :meth:`ByteFeed.abort` given no error of
    its own. Not a client-facing error.
    """


class ByteFeed:
    """Bounded FIFO of byte chunks: event-loop producer, one blocking reader thread.

    ``max_bytes`` bounds the queued, unread bytes; ``read_timeout`` is how long
    :meth:`read` waits for data before failing with ``VideoTimeout``.
    ``clock`` stamps arriving chunks for :attr:`lag` (injectable for tests).

    There must be a single producer at a time (chunks of one byte stream must
    stay in order): either the session pushing client chunks with
    :meth:`put_nowait`, or a URL fetcher awaiting :meth:`put`.
    """

    def __init__(
        self,
        *,
        max_bytes: int,
        read_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        if read_timeout <= 0:
            raise ValueError("read_timeout must be positive")
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout
        self._clock = clock
        self._low_water = max_bytes // 2
        self._lock = threading.Lock()
        self._readable = threading.Condition(self._lock)
        # (clock time of arrival, chunk); the head may be partly read.
        self._chunks: deque[tuple[float, bytes]] = deque()
        self._head_offset = 0
        self._backlog = 0
        self._received = 0
        self._closed = False
        self._aborted = False
        self._error: BaseException | None = None
        self._space_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    # -- producer side (event loop) -------------------------------------------

    def put_nowait(self, data: bytes) -> None:
        """Queue ``data`` at once, or refuse the whole chunk.

        Raises ``VideoBacklogFull`` when the unread bytes would exceed
        ``max_bytes`` (the chunk is dropped: the caller reports it, and the
        decoder will likely report the damaged stream as well). After
        :meth:`close` or :meth:`abort`, ``data`` is silently discarded: chunks
        racing a stop are normal (the client cannot know yet) and have nowhere
        to go; how the source ended is the decoder's to report.
        """
        with self._lock:
            if self._closed:
                logger.debug("discarded %d bytes pushed after the video feed ended", len(data))
                return
            if self._backlog + len(data) > self.max_bytes:
                raise VideoBacklogFull(
                    f"video backlog full: {self._backlog} bytes not yet decoded, "
                    f"a chunk of {len(data)} would exceed the limit of {self.max_bytes}"
                )
            self._append(data)

    async def put(self, data: bytes) -> None:
        """Queue ``data``, waiting (without blocking the loop) while the backlog is full.

        What fits is queued at once; the rest waits until the reader has
        drained the backlog to half of ``max_bytes``, so a chunk larger than
        ``max_bytes`` is accepted in pieces. Raises ``FeedClosed`` if the feed
        is or becomes closed or aborted; on cancellation, a part of ``data``
        may already be queued.
        """
        rest = data
        while True:
            with self._lock:
                self._check_open()
                room = self.max_bytes - self._backlog
                if room >= len(rest):
                    self._append(rest)  # no copy unless the chunk was split
                    return
                if room > 0:
                    self._append(rest[:room])
                    rest = rest[room:]
                loop = asyncio.get_running_loop()
                waiter: asyncio.Future[None] = loop.create_future()
                self._space_waiters.append((loop, waiter))
            try:
                await waiter
            finally:
                with self._lock:
                    if (loop, waiter) in self._space_waiters:
                        self._space_waiters.remove((loop, waiter))

    def close(self) -> None:
        """Mark the end of the stream: the reader gets ``b""`` once it has read everything."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._readable.notify_all()
            self._wake_putters()

    def abort(self, error: BaseException | None = None) -> None:
        """Stop now: drop queued data, fail the reader and release waiting putters.

        The reader (blocked or not) raises ``error``, or ``FeedClosed`` if none
        is given, from then on; waiting and later putters raise ``FeedClosed``.
        Safe from any thread; a second abort keeps the first error.
        """
        with self._lock:
            self._closed = True
            self._aborted = True
            if self._error is None:
                self._error = error if error is not None else FeedClosed("video feed aborted")
            self._chunks.clear()
            self._head_offset = 0
            self._backlog = 0
            self._readable.notify_all()
            self._wake_putters()

    # -- reader side (decoder thread) -----------------------------------------

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all queued bytes if ``n < 0``), blocking until some arrive.

        Returns what is queued without waiting for ``n`` bytes (latency comes
        first), and ``b""`` only at the end of the stream (or for ``n == 0``).
        Raises ``VideoTimeout`` if nothing arrives within ``read_timeout``
        seconds, or the error given to :meth:`abort`; either error is sticky.
        A timeout does not close the feed: whoever handles the decoder's
        failure aborts it.
        """
        if n == 0:
            return b""
        with self._readable:
            deadline = time.monotonic() + self.read_timeout
            while self._error is not None or not self._chunks:
                if self._error is not None:
                    raise self._error
                if self._closed:
                    return b""
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._error = VideoTimeout(
                        f"no video data received for {self.read_timeout:g} seconds"
                    )
                    logger.info("video feed timed out after %.1f s", self.read_timeout)
                    raise self._error
                self._readable.wait(remaining)
            data = self._take(n if n >= 0 else self._backlog)
            if self._space_waiters and self._backlog <= self._low_water:
                self._wake_putters()
            return data

    # -- status (any thread) ----------------------------------------------------

    @property
    def bytes_received(self) -> int:
        """Bytes accepted since creation."""
        return self._received

    @property
    def backlog_bytes(self) -> int:
        """Bytes queued and not yet read by the decoder."""
        return self._backlog

    @property
    def lag(self) -> float:
        """Seconds since the oldest unread chunk arrived (0 when none waits).

        How far the decoder is behind the producer, in wall-clock time.
        """
        with self._lock:
            if not self._chunks:
                return 0.0
            return max(0.0, self._clock() - self._chunks[0][0])

    @property
    def closed(self) -> bool:
        """True after :meth:`close` or :meth:`abort`: no more data is taken."""
        return self._closed

    # -- internals (lock held) ----------------------------------------------------

    def _check_open(self) -> None:
        if self._aborted:
            raise FeedClosed("video feed aborted")
        if self._closed:
            raise FeedClosed("video feed closed: no more data expected")

    def _append(self, data: bytes) -> None:
        if not data:
            return
        self._chunks.append((self._clock(), data))
        self._backlog += len(data)
        self._received += len(data)
        self._readable.notify()

    def _take(self, n: int) -> bytes:
        """Pop up to ``n`` bytes, copying only when a chunk is split."""
        pieces = []
        wanted = n
        while wanted > 0 and self._chunks:
            _, chunk = self._chunks[0]
            start = self._head_offset
            available = len(chunk) - start
            if available <= wanted:
                pieces.append(chunk if start == 0 else chunk[start:])
                self._chunks.popleft()
                self._head_offset = 0
                wanted -= available
            else:
                pieces.append(chunk[start : start + wanted])
                self._head_offset += wanted
                wanted = 0
        taken = n - wanted
        self._backlog -= taken
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _wake_putters(self) -> None:
        waiters, self._space_waiters = self._space_waiters, []
        for loop, waiter in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, waiter)
            except RuntimeError:  # the putter's loop is closed: nobody left to wake
                pass


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
