"""How one source becomes frames: its bytes through a bounded feed to a decoder thread.

A producer (a fetch, or bytes already in memory) fills a
:class:`~streamchat.ingest.ByteFeed` while a thread of the cache's own
(:class:`Threads`) decodes from it (:class:`Pipe`), keeping ``max_frames``
frames spread over the whole video (:func:`video_frames`), or reading a
bounded image whole (:func:`image_frame`). A ``data:video/jpeg`` sequence is
decoded picture by picture, only those chosen (:func:`jpeg_frames`). None of
this runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..config import Settings
from ..errors import StreamchatError, UrlFetchFailed, VideoDecodeError, VideoTooLarge
from ..ingest import ByteFeed, FeedClosed, Fetched
from ..media import (
    DecodeMemory,
    DecoderOptions,
    FrameSpread,
    MemoryNeed,
    check_budget,
    decode_image,
    decode_stream,
    spread,
)
from ..window import Frame

__all__ = [
    "DecodedVideo",
    "Known",
    "Pipe",
    "Sampling",
    "Threads",
    "image_frame",
    "jpeg_frames",
    "picture",
    "video_frames",
]

logger = logging.getLogger("streamchat.videocache")

_READ_BYTES = 256 * 1024
_T = TypeVar("_T")


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How a request wants a video sampled; images use only the pixel budget.

    ``fps``: frames kept per second of video at most; ``max_frames``: at most
    this many, spread over the whole video; ``min_pixels``, ``max_pixels``,
    ``factor``: the model's resize rule (``target_size`` of :mod:`streamchat.media`).
    """

    fps: float
    max_frames: int
    min_pixels: int
    max_pixels: int
    factor: int

    def __post_init__(self) -> None:
        if not (self.fps > 0 and math.isfinite(self.fps)) or self.max_frames < 1:
            raise ValueError("fps must be positive and finite, max_frames at least 1")
        check_budget(factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)


@dataclass(frozen=True, eq=False)
class DecodedVideo:
    """A video's frames as sampled: times in seconds from its first frame, and what they cost."""

    frames: tuple[Frame, ...]
    fps: float
    """The rate the frames stand for: their count less one over their span (``Sampling.fps``
    for a single frame)."""
    nbytes: int


class Known(Exception):
    """The producer stopped before its first byte: the cache holds what it would bring."""


class Threads:
    """The threads decoding runs in: at most ``limit`` at once, the rest wait their turn."""

    def __init__(self, limit: int) -> None:
        self._pool = ThreadPoolExecutor(limit, "media-decoder")

    def run(self, work: Callable[[], _T]) -> asyncio.Future[_T]:
        """``work()`` in one of the threads, in this context (so its log lines are tagged)."""
        context = contextvars.copy_context()
        return asyncio.get_running_loop().run_in_executor(self._pool, context.run, work)

    def close(self) -> None:
        """Start no more work; what runs ends by itself (a stopped decoder at its next read)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class Pipe(Generic[_T]):
    """One source's bytes on their way through a bounded feed to ``work`` in a thread.

    The producer calls :meth:`start` before its first byte, so no thread
    starts for a ``304``. A decoder that ends first (refused or failed the
    source) aborts the feed, releasing the producer; a producer that fails
    aborts it with its error, which the decoder then raises; whoever leaves
    early stops both. ``work`` gets the feed, the stop event and where its
    decoder holds room in ``memory`` (the server's decoding memory; none: no account).
    """

    def __init__(
        self,
        settings: Settings,
        threads: Threads,
        work: Callable[[ByteFeed, threading.Event, MemoryNeed | None], _T],
        memory: DecodeMemory | None = None,
    ) -> None:
        self.feed = ByteFeed(
            max_bytes=settings.feed_bytes, read_timeout=settings.video_read_timeout
        )
        self.stop = threading.Event()
        self._memory = memory
        self._hold = None if memory is None else memory.hold(self.stop, "video-cache")
        self.fetched: Fetched | None = None
        self._threads = threads
        self._work = work
        self._job: asyncio.Future[_T] | None = None

    def start(self, fetched: Fetched | None) -> None:
        """Start the decoder thread: the producer's first byte is coming."""
        self.fetched = fetched
        memory, hold = self._memory, self._hold
        if memory is None or hold is None:
            self._job = self._threads.run(lambda: self._work(self.feed, self.stop, None))
        else:
            self._job = self._threads.run(
                lambda: memory.holding(hold, lambda: self._work(self.feed, self.stop, hold.need))
            )
        self._job.add_done_callback(lambda job: _settle(job, self.feed))

    async def run(self, produce: Awaitable[Fetched | None]) -> tuple[Fetched | None, _T | None]:
        """Await ``produce``, then the decoder: what was fetched, and the decoder's result.

        No result if the decoder never started (a ``304``); what was fetched is
        what the producer told :meth:`start`, else what it returned. An
        unexpected error of the producer is ``url_fetch_failed``, its class
        logged (a URL with a token may be in its message).
        """
        done = False
        try:
            try:
                result = await produce
            except FeedClosed:
                result = None  # the decoder ended first: its outcome says how
            except StreamchatError as exc:
                self.feed.abort(exc)
                raise
            except Known:
                raise
            except Exception as exc:
                logger.warning("fetch failed unexpectedly: %s", exc.__class__.__name__)
                raise UrlFetchFailed("could not fetch the URL") from None
            if self._job is None:
                assert result is not None
                done = True
                return result, None
            value = await self._job
            done = True
            return self.fetched, value
        finally:
            if not done:
                self.stop.set()
                self.feed.abort()
                if self._hold is not None:
                    self._hold.cancel()


def _settle(job: asyncio.Future[Any], feed: ByteFeed) -> None:
    """A decoder ended: nobody reads the feed any more, so its producer must not wait."""
    feed.abort()
    if not job.cancelled():
        job.exception()  # its waiter has it, or nobody wants it any more


# -- the work, in a thread ------------------------------------------------------------


def video_frames(
    feed: ByteFeed,
    stop: threading.Event,
    settings: Settings,
    sampling: Sampling,
    memory: MemoryNeed | None = None,
) -> DecodedVideo:
    """Decode the video in ``feed`` at ``sampling.fps``, keeping ``max_frames`` spread over it
    (holding room in the decoding memory through ``memory``)."""
    options = DecoderOptions.from_settings(
        settings,
        fps=sampling.fps,
        min_pixels=sampling.min_pixels,
        max_pixels=sampling.max_pixels,
        factor=sampling.factor,
        spread=sampling.max_frames,
    )
    chosen = FrameSpread(sampling.max_frames)
    decode_stream(feed, options, chosen.add, stop, memory=memory)
    frames = chosen.result()
    if not frames:  # only when stopped: a decode that ends with none raises
        raise VideoDecodeError("the video ended before any frame")
    return _video(frames, sampling.fps)


def jpeg_frames(
    payloads: tuple[bytes, ...], settings: Settings, sampling: Sampling
) -> DecodedVideo:
    """A ``data:video/jpeg`` URL's frames, the ``i``-th at ``i / fps``: only those chosen."""
    times = [_At(i / sampling.fps, i) for i in range(len(payloads))]
    chosen = spread(times, sampling.max_frames)
    return _video(
        [picture(payloads[at.index], settings, sampling, at.pts) for at in chosen], sampling.fps
    )


def image_frame(feed: ByteFeed, settings: Settings, sampling: Sampling) -> Frame:
    """The image in ``feed``, read whole (at most ``max_image_bytes``), as one frame at 0."""
    limit = settings.max_image_bytes
    data = bytearray()
    while chunk := feed.read(_READ_BYTES):
        data += chunk
        if len(data) > limit:
            raise VideoTooLarge(f"the image is larger than {limit} bytes")
    return picture(bytes(data), settings, sampling)


def picture(data: bytes, settings: Settings, sampling: Sampling, pts: float = 0.0) -> Frame:
    """One image file decoded and resized: a frame at ``pts``."""
    if len(data) > settings.max_image_bytes:
        raise VideoTooLarge(f"the image is larger than {settings.max_image_bytes} bytes")
    image = decode_image(
        data,
        factor=sampling.factor,
        min_pixels=sampling.min_pixels,
        max_pixels=sampling.max_pixels,
        max_decode_pixels=settings.max_decode_pixels,
    )
    return Frame(pts, image)


@dataclass(frozen=True)
class _At:
    """A frame of a ``data:video/jpeg`` URL before it is decoded."""

    pts: float
    index: int


def _video(frames: list[Frame], fps: float) -> DecodedVideo:
    span = frames[-1].pts - frames[0].pts
    rate = (len(frames) - 1) / span if span > 0 else fps
    return DecodedVideo(tuple(frames), rate, sum(frame.nbytes for frame in frames))
