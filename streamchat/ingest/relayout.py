"""An MP4 whose index follows its media, streamed in the order a decoder needs.

FFmpeg's MP4 demuxer needs the index (``moov``) before the media when it reads
a stream, but cameras, phones and the ``ffmpeg`` tool write it after. Given a
file that can be read by offset (range requests over HTTP, seeks in a local
file: :class:`RandomAccess`), :func:`stream_faststart` finds the index after
the media, rewrites it (:func:`streamchat.ingest.faststart.rewrite`, what
``-movflags +faststart`` does) and streams ``ftyp``, the moved index and then
the media into the decoder's feed. :func:`stream_head` decides from the first
bytes whether that is needed at all, putting any other stream through as it
arrives.

Bounded: the index is refused beyond its limit from its declared size, at
most :data:`MAX_BOXES_AFTER_MEDIA` boxes are looked at after the media, and
the media streams through the feed's backpressure, never held.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import BinaryIO

from ..errors import VideoDecodeError
from .faststart import IndexAtEnd, Layout, check_index_size, read_box_header, rewrite, sniff
from .feed import ByteFeed

__all__ = [
    "CHUNK_BYTES",
    "MAX_BOXES_AFTER_MEDIA",
    "Cursor",
    "LocalFile",
    "MemoryFile",
    "RandomAccess",
    "stream_faststart",
    "stream_head",
]

CHUNK_BYTES = 256 * 1024
"""Bytes read at a time, from a server or a file."""
MAX_BOXES_AFTER_MEDIA = 64
"""Top-level boxes looked at between the media and the index before giving up:
cameras write one ``mdat``, some a few, then ``moov``."""


async def stream_head(
    chunks: AsyncIterator[bytes], feed: ByteFeed, limit: int
) -> tuple[bytes, IndexAtEnd] | None:
    """Put ``chunks`` into ``feed``, unless they start an MP4 with its index after its media.

    The first chunks are held until :func:`~streamchat.ingest.faststart.sniff` can
    tell (the first chunk tells for any stream but an MP4 whose header-like
    boxes fill it; at most ``limit`` bytes are held). For an index at the end
    this returns the bytes read so far and the layout, with nothing put;
    otherwise every byte went into ``feed``, in order, and it returns ``None``.
    """
    head = bytearray()
    deciding = True
    async for chunk in chunks:
        if not deciding:
            await feed.put(chunk)  # backpressure from the decoder: not the server's time
            continue
        head += chunk
        layout = sniff(head, limit)
        if isinstance(layout, IndexAtEnd):
            return bytes(head), layout
        if layout is Layout.STREAMABLE:
            deciding = False
            await feed.put(bytes(head))
            head.clear()
    if head:
        await feed.put(bytes(head))
    return None


class Cursor:
    """Reads one byte range of a file in order; ``position`` is the next byte's offset."""

    def __init__(self, chunks: AsyncIterator[bytes], position: int) -> None:
        self.position = position
        self._chunks = chunks
        self._pending = memoryview(b"")

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes, at least one unless the range has ended."""
        if not self._pending:
            self._pending = memoryview(await anext(self._chunks, b""))
        data = bytes(self._pending[:n])
        self._pending = self._pending[n:]
        self.position += len(data)
        return data

    async def read_exactly(self, n: int) -> bytes:
        """``n`` bytes, or fewer only where the range ends."""
        pieces = []
        while n > 0 and (piece := await self.read(n)):
            pieces.append(piece)
            n -= len(piece)
        return b"".join(pieces)

    async def skip(self, n: int) -> int:
        """Pass over ``n`` bytes (fewer where the range ends); how many were passed."""
        skipped = 0
        while skipped < n and (piece := await self.read(min(n - skipped, CHUNK_BYTES))):
            skipped += len(piece)
        return skipped

    async def rest(self) -> AsyncGenerator[bytes, None]:
        """Everything left in the range, in the pieces it arrives in."""
        if self._pending:
            self.position += len(self._pending)
            yield bytes(self._pending)
            self._pending = memoryview(b"")
        async for chunk in self._chunks:
            self.position += len(chunk)
            yield chunk


class RandomAccess(abc.ABC):
    """A file read by offset: from the bytes read first (``head``), then from ``_remote``.

    ``size`` is the file's size when known. ``seeks`` is false once reading
    at an offset proves to mean reading everything before it (a server that
    ignores ranges): the index is then looked for by reading on.
    """

    def __init__(self) -> None:
        self.head = b""
        self.size: int | None = None
        self.seeks = True

    @contextlib.asynccontextmanager
    async def open(self, start: int, end: int | None) -> AsyncIterator[Cursor]:
        """A cursor over bytes ``[start, end)`` (to the end of the file if ``end`` is None)."""
        async with contextlib.aclosing(self._bytes(start, end)) as chunks:
            yield Cursor(chunks, start)

    async def _bytes(self, start: int, end: int | None) -> AsyncGenerator[bytes, None]:
        if start < len(self.head):
            yield self.head[start:end]
            if end is not None and end <= len(self.head):
                return
            start = len(self.head)
        if self.size is not None and start >= self.size:
            return
        async with contextlib.aclosing(self._remote(start, end)) as chunks:
            async for chunk in chunks:
                yield chunk

    @abc.abstractmethod
    def _remote(self, start: int, end: int | None) -> AsyncGenerator[bytes, None]:
        """Bytes ``[start, end)`` from the file itself (a range request, a seek)."""


class LocalFile(RandomAccess):
    """An open file, read by offset with seeks."""

    def __init__(self, handle: BinaryIO, size: int, count: Callable[[int], None]) -> None:
        super().__init__()
        self.size = size
        self._handle = handle
        self._count = count
        """Called with each chunk's size, before it is used (it may refuse by raising)."""

    async def _remote(self, start: int, end: int | None) -> AsyncGenerator[bytes, None]:
        await asyncio.to_thread(self._handle.seek, start)
        left = None if end is None else end - start
        while left is None or left > 0:
            want = CHUNK_BYTES if left is None else min(CHUNK_BYTES, left)
            chunk = await asyncio.to_thread(self._handle.read, want)
            if not chunk:
                return
            self._count(len(chunk))
            if left is not None:
                left -= len(chunk)
            yield chunk


class MemoryFile(RandomAccess):
    """Bytes already in memory (a ``data:`` URL's video), read by offset in chunks."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.size = len(data)
        self._data = memoryview(data)

    async def _remote(self, start: int, end: int | None) -> AsyncGenerator[bytes, None]:
        size = len(self._data)
        stop = size if end is None else min(end, size)
        for offset in range(start, stop, CHUNK_BYTES):
            yield bytes(self._data[offset : min(offset + CHUNK_BYTES, stop)])


async def stream_faststart(
    source: RandomAccess, layout: IndexAtEnd, feed: ByteFeed, *, limit: int
) -> None:
    """Feed ``source`` in its streamable form: ``ftyp``, the moved index, then the media.

    ``limit`` bounds ``ftyp`` and the index together (the decoder's header limit).
    """
    offset, index = await _find_index(source, layout, limit)
    plan = rewrite(layout.ftyp, index, moov_offset=offset, file_size=source.size, limit=limit)
    pieces = plan.pieces
    await feed.put(plan.header)
    del plan, index  # up to twice the header limit: not held while the media streams
    for start, end in pieces:
        async with source.open(start, end) as cursor, contextlib.aclosing(cursor.rest()) as rest:
            async for chunk in rest:
                await feed.put(chunk)
            if end is not None and cursor.position < end:
                raise VideoDecodeError("the video ended before the end of its media (truncated)")


async def _find_index(source: RandomAccess, layout: IndexAtEnd, limit: int) -> tuple[int, bytes]:
    """The offset and bytes of the ``moov`` after the media, read whole (at most ``limit``).

    Top-level boxes are followed from the end of the first media box; a large
    one is passed over with a new range request, a small one by reading on.
    """
    offset = layout.after_media
    boxes = 0
    while True:
        async with source.open(offset, None) as cursor:
            while True:
                boxes += 1
                if boxes > MAX_BOXES_AFTER_MEDIA:
                    raise VideoDecodeError(
                        f"no index (moov) among the first {MAX_BOXES_AFTER_MEDIA} boxes "
                        "after the MP4's media"
                    )
                head = await cursor.read_exactly(8)
                box = read_box_header(head)
                if len(head) == 8 and box is None:  # a 64-bit size follows
                    head += await cursor.read_exactly(8)
                    box = read_box_header(head)
                if box is None:
                    raise _no_index("before")
                if box.kind == b"moov":
                    return offset, await _read_index(cursor, head, box.size, source, layout, limit)
                if box.size is None:
                    raise _no_index("before")
                offset += box.size
                rest = box.size - len(head)
                if source.seeks and rest > CHUNK_BYTES:
                    break  # a new range request at the next box
                if await cursor.skip(rest) < rest:
                    raise _no_index("before")


async def _read_index(
    cursor: Cursor,
    head: bytes,
    size: int | None,
    source: RandomAccess,
    layout: IndexAtEnd,
    limit: int,
) -> bytes:
    """The rest of the ``moov`` whose header is ``head``: refused by its size before it is read."""
    if size is None and source.size is not None:  # runs to the end of the file
        size = source.size - (cursor.position - len(head))
    check_index_size(len(layout.ftyp), size, limit)
    want = limit - len(layout.ftyp) + 1 if size is None else size
    index = head + await cursor.read_exactly(want - len(head))
    if size is None:
        check_index_size(len(layout.ftyp), len(index), limit)
    elif len(index) < size:
        raise _no_index("inside")
    return index


def _no_index(where: str) -> VideoDecodeError:
    return VideoDecodeError(
        f"the MP4 ends {where} its index (moov): the file is truncated or was not finished"
    )
