"""An MP4 whose index follows its media, made streamable: the faststart rewrite, without I/O.

FFmpeg's default MP4 layout, and what most cameras and phones write, puts the
index (``moov``: every track's sample sizes, times and chunk offsets) after
the media (``mdat``), since a muxer knows it only at the end. The decoder
reads a live, non-seekable stream (:mod:`streamchat.media.reader`), so it needs the
index first. Given random access to such a file (HTTP range requests, a
seekable file: :mod:`streamchat.ingest.fetch` does the I/O), this module computes
what ``ffmpeg -movflags +faststart`` and ``qt-faststart`` write::

    ftyp | moov' | every byte between them and the old moov, in order

``moov'`` is the index with every chunk offset (the ``stco``/``co64`` table in
each track's sample table) moved by as many bytes as the media moved: the
index now comes before it. A 32-bit ``stco`` whose offsets would no longer
fit becomes a 64-bit ``co64`` (4 more bytes an entry, which moves the media
further). Nothing else in the index of plain (unfragmented, unencrypted)
media holds a file offset. Bytes after the old index (a trailing ``free`` or
``udta``) are left out, unless a chunk offset points into them.

:func:`sniff` tells such a file from its first bytes, :func:`read_box_header`
reads the top-level boxes on the way to its index, :func:`check_index_size`
refuses an index before it is read, and :func:`rewrite` makes the new index
and says which byte ranges of the file follow it. Everything is bounded by
the decoder's limit on an MP4 header (``DecoderOptions.max_header_bytes``):
``ftyp + moov'`` larger than it is ``VideoTooLarge``, as the decoder would
find it; malformed box sizes are ``VideoDecodeError``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

import numpy as np
import numpy.typing as npt

from ..errors import VideoDecodeError, VideoTooLarge, VideoUnsupported

__all__ = [
    "BoxHeader",
    "Faststart",
    "IndexAtEnd",
    "Layout",
    "check_index_size",
    "read_box_header",
    "rewrite",
    "sniff",
]

# Top-level boxes that may come before the media: the decoder's own list
# (`reader.mp4_header`) of what may precede an index.
_PREFIX_BOXES = frozenset({b"ftyp", b"styp", b"free", b"skip", b"wide", b"pdin", b"uuid", b"sidx"})
# The path to the chunk offset tables: moov > trak > mdia > minf > stbl > stco.
_CONTAINERS = frozenset({b"trak", b"mdia", b"minf", b"stbl"})
_TABLES = frozenset({b"stco", b"co64"})
_MAX_DEPTH = 8  # FFmpeg refuses boxes nested more than 10 deep; the tables sit at 5
_U32_MAX = 0xFFFF_FFFF
_MAX_OFFSET = 1 << 62  # no file is this large: a chunk offset beyond it is garbage


@dataclass(frozen=True, slots=True)
class BoxHeader:
    """A box's type and size (header included), and its header's own size (8 or 16).

    ``size`` is ``None`` for a box that runs to the end of the file (size 0).
    """

    kind: bytes
    size: int | None
    header_size: int


def read_box_header(data: bytes | bytearray | memoryview, offset: int = 0) -> BoxHeader | None:
    """The header of the box at ``offset`` in ``data``, or ``None`` if ``data`` ends within it.

    Raises ``VideoDecodeError`` for a box smaller than its own header.
    """
    if len(data) - offset < 8:
        return None
    size, kind = struct.unpack_from(">I4s", data, offset)
    header = 8
    if size == 1:  # a 64-bit size follows
        if len(data) - offset < 16:
            return None
        (size,) = struct.unpack_from(">Q", data, offset + 8)
        header = 16
    elif size == 0:
        return BoxHeader(kind, None, header)
    if size < header:
        raise VideoDecodeError(
            f"the MP4 has a malformed box: {size} bytes, less than its own header"
        )
    return BoxHeader(kind, size, header)


class Layout(Enum):
    """What :func:`sniff` tells when it finds no media before an index."""

    MORE = "more bytes are needed to tell"
    STREAMABLE = "decode it as it is"


@dataclass(frozen=True, slots=True)
class IndexAtEnd:
    """An MP4 whose media comes before its index, as :func:`sniff` found it.

    * ``ftyp``: the file's first box, if it is ``ftyp`` (else empty: old
      QuickTime files start with ``wide`` or ``mdat``); it stays first.
    * ``media_offset``: where the first media box (``mdat``) starts.
    * ``after_media``: where the box after it starts: the index is there or later.
    """

    ftyp: bytes
    media_offset: int
    after_media: int


def sniff(head: bytes | bytearray | memoryview, limit: int) -> Layout | IndexAtEnd:
    """Whether a stream starting with ``head`` is an MP4 with its media before its index.

    The top-level boxes are followed from the start: header-like boxes
    (``ftyp``, ``free``, ``wide``, ``uuid``, ...) then ``mdat`` make
    :class:`IndexAtEnd`. Anything else is :attr:`Layout.STREAMABLE`, left to
    the decoder as it is: another container, an MP4 with its index first, a
    fragment, a malformed box, or header-like boxes that reach past ``limit``
    (the most the decoder takes before an index). :attr:`Layout.MORE` asks for
    more bytes; the answer for ``head`` is the same whatever follows it.

    An ``mdat`` that runs to the end of the file leaves no room for an index
    after it (an unfinished recording): ``VideoDecodeError``.
    """
    offset = 0
    ftyp = b""
    while True:
        try:
            box = read_box_header(head, offset)
        except VideoDecodeError:
            return Layout.STREAMABLE
        if box is None:
            return Layout.MORE if len(head) < limit else Layout.STREAMABLE
        if box.kind == b"mdat":
            if box.size is None:
                raise VideoDecodeError(
                    "the MP4 has no index (moov): its media runs to the end of the file "
                    "(an unfinished recording?)"
                )
            return IndexAtEnd(ftyp, offset, offset + box.size)
        if box.kind not in _PREFIX_BOXES or box.size is None:
            return Layout.STREAMABLE
        if offset == 0 and box.kind == b"ftyp" and box.size < limit:
            if len(head) < box.size:
                return Layout.MORE
            ftyp = bytes(head[: box.size])
        offset += box.size
        if offset >= limit:
            return Layout.STREAMABLE


def check_index_size(prefix: int, index: int | None, limit: int) -> None:
    """Refuse an index of ``index`` bytes after ``prefix`` bytes of ``ftyp``, before reading it.

    The decoder reads the header (``ftyp`` and ``moov``) whole and refuses one
    over ``limit``: an index that cannot fit is not worth fetching.
    ``index`` is ``None`` when not known yet (a box that runs to the end).
    """
    if index is not None and prefix + index > limit:
        raise VideoTooLarge(
            f"the MP4 index (moov) is {index} bytes, over the limit of {limit} bytes "
            "for an MP4 header"
        )


@dataclass(frozen=True, slots=True)
class Faststart:
    """The streamable form of an MP4: ``header``, then the file's bytes in ``pieces``.

    ``header`` is ``ftyp`` and the rewritten ``moov``, what the decoder reads
    first; ``pieces`` are ``[start, end)`` byte ranges of the original file to
    send after it, in order (``end`` ``None``: to the end of the file).
    """

    header: bytes
    pieces: tuple[tuple[int, int | None], ...]


@dataclass(frozen=True, slots=True)
class _Table:
    """One ``stco``/``co64`` chunk offset table as found."""

    version_flags: bytes
    offsets: npt.NDArray[np.int64]
    wide: bool
    size: int  # bytes of the whole box as found

    def rendered_size(self, wide: bool) -> int:
        return 16 + len(self.offsets) * (8 if wide else 4)


def rewrite(
    ftyp: bytes, moov: bytes, *, moov_offset: int, file_size: int | None, limit: int
) -> Faststart:
    """Move ``moov`` (found at ``moov_offset``) before the media, right after ``ftyp``.

    ``ftyp`` is the file's first box (or empty, see :class:`IndexAtEnd`),
    ``moov`` the whole index box (one that ran to the end of the file, size 0,
    gets its size written). Chunk offsets into ``[len(ftyp), moov_offset)``
    move by the new index's size, offsets after the old index by the
    difference in size; a ``stco`` whose moved offsets would pass 4 GiB is
    written as ``co64``. ``file_size`` (if known) ends the last piece.

    Raises ``VideoTooLarge`` if ``ftyp`` and the new index exceed ``limit``,
    ``VideoDecodeError`` for a malformed index (a box that does not fit in
    its parent, a table that does not hold its entries, nesting too deep),
    ``VideoUnsupported`` for a compressed index (``cmov``).
    """
    box = read_box_header(moov)
    if box is None or box.kind != b"moov" or box.size not in (None, len(moov)):
        raise ValueError("moov must be one whole moov box")
    check_index_size(len(ftyp), len(moov), limit)
    body = memoryview(moov)[box.header_size :]
    tables = _collect(body, 0)
    start, end = len(ftyp), moov_offset + len(moov)

    def new_size(wide: list[bool]) -> int:
        return len(moov) + sum(
            t.rendered_size(w) - t.size for t, w in zip(tables, wide, strict=True)
        )

    def moved(table: _Table, size: int) -> npt.NDArray[np.int64]:
        offsets = table.offsets
        return np.where(offsets < end, offsets + size, offsets + (size - len(moov)))

    def overflows(table: _Table, size: int) -> bool:
        return bool(len(table.offsets)) and int(moved(table, size).max()) > _U32_MAX

    wide = [t.wide for t in tables]
    if any(not w and overflows(t, new_size(wide)) for t, w in zip(tables, wide, strict=True)):
        # Widening one table moves the media further, which may make another
        # overflow: decide with every table widened (the most it can move).
        most = new_size([True] * len(tables))
        wide = [w or overflows(t, most) for t, w in zip(tables, wide, strict=True)]
    size = new_size(wide)
    check_index_size(len(ftyp), size, limit)
    rendered = iter([_table_box(t, w, moved(t, size)) for t, w in zip(tables, wide, strict=True)])
    index = _box(b"moov", _render(body, rendered), box.header_size)
    assert len(index) == size
    pieces: list[tuple[int, int | None]] = []
    if start < moov_offset:
        pieces.append((start, moov_offset))
    if any(bool((t.offsets >= end).any()) for t in tables) and (
        file_size is None or end < file_size
    ):
        pieces.append((end, file_size))
    return Faststart(header=ftyp + index, pieces=tuple(pieces))


def _children(body: memoryview) -> Iterator[tuple[bytes, int, int, int]]:
    """``(kind, header size, start, end)`` of each box directly inside ``body``.

    A box that runs past its parent is ``VideoDecodeError``; up to 7 bytes
    left at the end are not a box (FFmpeg ignores them too).
    """
    offset = 0
    while len(body) - offset >= 8:
        box = read_box_header(body, offset)
        if box is None:
            raise VideoDecodeError("the MP4 index ends inside a box header")
        size = len(body) - offset if box.size is None else box.size
        if offset + size > len(body):
            raise VideoDecodeError("the MP4 index has a box larger than the box it is in")
        yield box.kind, box.header_size, offset, offset + size
        offset += size


def _collect(body: memoryview, depth: int) -> list[_Table]:
    """Every chunk offset table below ``body``, in the order :func:`_render` meets them."""
    if depth > _MAX_DEPTH:
        raise VideoDecodeError("the MP4 index nests its boxes too deeply")
    tables = []
    for kind, header, start, end in _children(body):
        if kind == b"cmov":
            raise VideoUnsupported("the MP4 index is compressed (cmov): remux the file first")
        if kind in _CONTAINERS:
            tables += _collect(body[start + header : end], depth + 1)
        elif kind in _TABLES:
            tables.append(_table(kind, body[start + header : end], end - start))
    return tables


def _table(kind: bytes, payload: memoryview, size: int) -> _Table:
    wide = kind == b"co64"
    if len(payload) < 8:
        raise VideoDecodeError(f"the MP4 index has a malformed {kind.decode()} box")
    (count,) = struct.unpack_from(">I", payload, 4)
    if 8 + count * (8 if wide else 4) > len(payload):
        raise VideoDecodeError(
            f"the MP4 index has a malformed {kind.decode()} box: "
            f"{count} chunk offsets do not fit in it"
        )
    offsets = np.frombuffer(payload, dtype=">u8" if wide else ">u4", count=count, offset=8)
    if count and int(offsets.max()) >= _MAX_OFFSET:
        raise VideoDecodeError("the MP4 index has a chunk offset beyond any file")
    return _Table(bytes(payload[:4]), offsets.astype(np.int64), wide, size)


def _render(body: memoryview, tables: Iterator[bytes]) -> bytearray:
    """``body`` with the next of ``tables`` in place of each table, containers resized."""
    out = bytearray()
    offset = 0
    for kind, header, start, end in _children(body):
        if kind in _CONTAINERS:
            out += _box(kind, _render(body[start + header : end], tables), header)
        elif kind in _TABLES:
            out += next(tables)
        else:
            out += body[start:end]
        offset = end
    out += body[offset:]
    return out


def _table_box(table: _Table, wide: bool, offsets: npt.NDArray[np.int64]) -> bytes:
    data = offsets.astype(">u8" if wide else ">u4").tobytes()
    payload = table.version_flags + struct.pack(">I", len(offsets)) + data
    return _box(b"co64" if wide else b"stco", payload, 8)


def _box(kind: bytes, payload: bytes | bytearray, header: int) -> bytes:
    """A box of ``payload``, with a header of the size it had (16: a 64-bit size)."""
    if header == 16:
        return struct.pack(">I4sQ", 1, kind, 16 + len(payload)) + payload
    return struct.pack(">I4s", 8 + len(payload), kind) + payload
