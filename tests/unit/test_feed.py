"""ByteFeed: the bounded byte queue between the event loop and the decoder thread.

Cross-thread tests synchronise with events, joins and futures; the only timed
waits are the read timeouts under test and generous upper bounds that a
passing test never reaches.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from streamchat.errors import UrlFetchFailed, VideoBacklogFull, VideoTimeout
from streamchat.ingest.feed import ByteFeed, FeedClosed

LONG = 30.0  # a read timeout no passing test waits for


class _ReaderThread:
    """Calls ``fn`` in a thread; ``started`` is set just before, ``result``/``error`` after."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.started = threading.Event()
        self.result: object = None
        self.error: BaseException | None = None
        self.elapsed = 0.0
        self._fn = fn
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.started.set()
        start = time.monotonic()
        try:
            self.result = self._fn()
        except BaseException as exc:  # handed to the test
            self.error = exc
        self.elapsed = time.monotonic() - start

    def join(self) -> None:
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "reader thread still blocked"


async def _let_tasks_run() -> None:
    """Run one loop iteration: tasks already scheduled reach their next await.

    Deterministic (callbacks run in FIFO order), not a timed wait.
    """
    loop = asyncio.get_running_loop()
    turn = loop.create_future()
    loop.call_soon(turn.set_result, None)
    await turn


def _drain(feed: ByteFeed) -> bytes:
    out = bytearray()
    while piece := feed.read(1000):
        out += piece
    return bytes(out)


def test_bytes_come_out_in_order_across_chunk_boundaries() -> None:
    """Reads of any size return the queued bytes in order, splitting and joining chunks."""
    feed = ByteFeed(max_bytes=100, read_timeout=LONG)
    for chunk in (b"abc", b"defgh", b"i", b"jklmnop"):
        feed.put_nowait(chunk)
    assert feed.read(2) == b"ab"
    assert feed.read(4) == b"cdef"  # rest of one chunk plus the start of the next
    assert feed.read(100) == b"ghijklmnop"  # what is queued, without waiting for 100
    assert feed.bytes_received == 16
    assert feed.backlog_bytes == 0


def test_close_delivers_everything_then_end_of_stream_for_good() -> None:
    """After close(), queued data is still read; then b'' at once, on every read."""
    feed = ByteFeed(max_bytes=100, read_timeout=LONG)
    feed.put_nowait(b"tail")
    feed.close()
    assert feed.read(10) == b"tail"
    assert feed.read(10) == b""
    assert feed.read(10) == b""


def test_put_nowait_refuses_a_chunk_that_would_overflow_the_backlog() -> None:
    """The whole chunk is refused with VideoBacklogFull, and accepted once the reader drained."""
    feed = ByteFeed(max_bytes=10, read_timeout=LONG)
    feed.put_nowait(b"12345678")
    with pytest.raises(VideoBacklogFull):
        feed.put_nowait(b"abc")
    assert feed.backlog_bytes == 8
    assert feed.bytes_received == 8
    assert feed.read(4) == b"1234"
    feed.put_nowait(b"abc")
    assert feed.backlog_bytes == 7


def test_put_nowait_after_close_or_abort_discards_data() -> None:
    """Chunks racing the end of a source are dropped quietly, not queued or raised."""
    closed = ByteFeed(max_bytes=10, read_timeout=LONG)
    closed.close()
    closed.put_nowait(b"late")
    assert closed.bytes_received == 0
    aborted = ByteFeed(max_bytes=10, read_timeout=LONG)
    aborted.abort()
    aborted.put_nowait(b"late")
    assert aborted.bytes_received == 0


def test_read_blocks_until_data_arrives_from_another_thread() -> None:
    """A momentarily empty feed blocks the reader instead of returning b''."""
    feed = ByteFeed(max_bytes=100, read_timeout=LONG)
    reader = _ReaderThread(lambda: feed.read(10))
    reader.started.wait()
    feed.put_nowait(b"late")
    reader.join()
    assert reader.result == b"late"


def test_read_timeout_raises_video_timeout_and_stays_failed() -> None:
    """No data within read_timeout: VideoTimeout, and the same error on later reads."""
    feed = ByteFeed(max_bytes=100, read_timeout=0.05)
    with pytest.raises(VideoTimeout) as first:
        feed.read(10)
    feed.put_nowait(b"too late")
    with pytest.raises(VideoTimeout) as second:
        feed.read(10)
    assert second.value is first.value


def test_abort_unblocks_a_waiting_reader_at_once() -> None:
    """abort() wakes a reader blocked on an empty feed; it raises FeedClosed, not a timeout."""
    feed = ByteFeed(max_bytes=100, read_timeout=LONG)
    reader = _ReaderThread(lambda: feed.read(10))
    reader.started.wait()
    feed.abort()
    reader.join()
    assert isinstance(reader.error, FeedClosed)
    assert reader.elapsed < LONG / 2


def test_abort_with_an_error_hands_it_to_the_reader_and_drops_the_backlog() -> None:
    """The reader gets the abort's error even with data queued; the data is discarded."""
    feed = ByteFeed(max_bytes=100, read_timeout=LONG)
    feed.put_nowait(b"never read")
    error = UrlFetchFailed("gone")
    feed.abort(error)
    assert feed.backlog_bytes == 0
    for _ in range(2):
        with pytest.raises(UrlFetchFailed) as raised:
            feed.read(10)
        assert raised.value is error


def test_lag_is_the_age_of_the_oldest_unread_chunk() -> None:
    """lag measures how long the oldest unread byte has waited, 0 when nothing waits."""
    now = [100.0]
    feed = ByteFeed(max_bytes=100, read_timeout=LONG, clock=lambda: now[0])
    assert feed.lag == 0.0
    feed.put_nowait(b"aaaa")
    now[0] = 101.0
    feed.put_nowait(b"bbbb")
    now[0] = 103.5
    assert feed.lag == pytest.approx(3.5)
    feed.read(2)  # partly read: the first chunk still waits
    assert feed.lag == pytest.approx(3.5)
    feed.read(2)
    assert feed.lag == pytest.approx(2.5)
    feed.read(4)
    assert feed.lag == 0.0


def test_invalid_limits_are_refused() -> None:
    """A feed needs room for at least one byte and a positive timeout."""
    with pytest.raises(ValueError):
        ByteFeed(max_bytes=0, read_timeout=1)
    with pytest.raises(ValueError):
        ByteFeed(max_bytes=1, read_timeout=0)


async def test_put_waits_while_full_and_resumes_when_the_reader_drains() -> None:
    """Async put suspends (without blocking the loop) until a reader frees space."""
    feed = ByteFeed(max_bytes=100, read_timeout=LONG)
    await feed.put(b"a" * 100)
    putting = asyncio.create_task(feed.put(b"b" * 60))
    await _let_tasks_run()
    assert not putting.done()
    assert feed.backlog_bytes == 100
    assert await asyncio.to_thread(feed.read, 100) == b"a" * 100
    await asyncio.wait_for(putting, timeout=10)
    assert feed.read(100) == b"b" * 60


async def test_put_feeds_a_chunk_larger_than_the_backlog_in_pieces() -> None:
    """A chunk above max_bytes goes through in pieces as a concurrent reader drains it."""
    feed = ByteFeed(max_bytes=1000, read_timeout=LONG)
    data = bytes(range(256)) * 40  # 10 KB through a 1 KB feed
    reading = asyncio.create_task(asyncio.to_thread(_drain, feed))
    await feed.put(data)
    feed.close()
    assert await asyncio.wait_for(reading, timeout=10) == data


async def test_abort_releases_a_waiting_putter_with_feed_closed() -> None:
    """A fetcher waiting for space is released by abort() and told to stop."""
    feed = ByteFeed(max_bytes=10, read_timeout=LONG)
    await feed.put(b"x" * 10)
    putting = asyncio.create_task(feed.put(b"y"))
    await _let_tasks_run()
    assert not putting.done()
    feed.abort()
    with pytest.raises(FeedClosed):
        await asyncio.wait_for(putting, timeout=10)


async def test_put_after_close_raises_feed_closed() -> None:
    """A producer that keeps putting after close() is told the feed is closed."""
    feed = ByteFeed(max_bytes=10, read_timeout=LONG)
    feed.close()
    with pytest.raises(FeedClosed):
        await feed.put(b"late")


async def test_cancelled_put_leaves_no_waiter_behind() -> None:
    """Cancelling a waiting put forgets its waiter; later puts and reads still work."""
    feed = ByteFeed(max_bytes=10, read_timeout=LONG)
    await feed.put(b"x" * 10)
    putting = asyncio.create_task(feed.put(b"y"))
    await _let_tasks_run()
    putting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await putting
    assert feed.read(10) == b"x" * 10
    await feed.put(b"z")
    assert feed.read(10) == b"z"
