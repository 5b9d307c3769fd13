"""What FFmpeg reads: a live byte source made safe for a demuxer.

:class:`SafeReader` stores source errors instead of letting them cross FFmpeg,
ends the stream on a stop event, and can push bytes back. :func:`mp4_header`
collects an MP4 stream's header whole, because PyAV's I/O buffer keeps
nothing to seek back into and the MP4 demuxer seeks back within its header.
"""

from __future__ import annotations

import struct
import threading
from typing import Protocol

from .errors import StreamchatError, VideoDecodeError, VideoTooLarge, VideoUnsupported

__all__ = ["SafeReader", "Source", "mp4_header"]


class Source(Protocol):
    """What the decoder reads: a ``ByteFeed``, an open file, ``BytesIO``."""

    def read(self, n: int = -1, /) -> bytes: ...


class SafeReader:
    """The file-like object FFmpeg reads: the source, made safe for FFmpeg.

    * Errors from the source are stored and end the stream (``b""``) instead
      of propagating through FFmpeg, which would log them as dropped and may
      read again; :meth:`failure` re-raises them after the demux loop.
    * A set stop event ends the stream at the next read.
    * Bytes read ahead (the MP4 header) are served first, in one piece.
    * A source that returns more than asked is cut to size: PyAV copies the
      result into a buffer of the requested size.
    """

    def __init__(self, source: Source, stop: threading.Event) -> None:
        self._source = source
        self._stop = stop
        self._pending = b""
        self._error: BaseException | None = None

    def read(self, n: int) -> bytes:
        if self._pending:
            data, self._pending = self._pending[:n], self._pending[n:]
            return data
        if self._error is not None or self._stop.is_set():
            return b""
        try:
            data = bytes(self._source.read(n))
        except Exception as exc:  # every source failure ends the stream
            self._error = exc
            return b""
        if len(data) > n:
            data, self._pending = data[:n], data[n:]
        return data

    def read_exactly(self, n: int) -> bytes:
        """``n`` bytes, or fewer only at the end of the stream."""
        pieces = []
        while n > 0:
            piece = self.read(n)
            if not piece:
                break
            pieces.append(piece)
            n -= len(piece)
        return b"".join(pieces)

    def unread(self, data: bytes) -> None:
        self._pending = data + self._pending

    def failure(self) -> StreamchatError | None:
        """The source's error, if it failed, as a client-facing error."""
        if self._error is None or isinstance(self._error, StreamchatError):
            return self._error
        error = VideoDecodeError("reading the video failed")
        error.__cause__ = self._error
        return error


# Top-level boxes that may precede ``moov`` in a streamable MP4.
_MP4_PREFIX_BOXES = {b"ftyp", b"styp", b"free", b"skip", b"wide", b"pdin", b"uuid", b"sidx"}
_MP4_MEDIA_BOXES = {b"mdat", b"moof"}


def mp4_header(reader: SafeReader, limit: int, *, required: bool) -> bytes | None:
    """Read an MP4 stream's top-level boxes up to the end of ``moov``, and push them back.

    Returns the header, or ``None`` (nothing consumed) if the stream does not
    start like an MP4, which is an error only when ``required``. Media before
    the index (a plain MP4 with ``moov`` at the end, or a fragment joined
    without its header) cannot be decoded from a stream: ``VideoUnsupported``.
    """
    head = reader.read_exactly(8)
    if len(head) < 8 or head[4:8] not in _MP4_PREFIX_BOXES | _MP4_MEDIA_BOXES | {b"moov"}:
        reader.unread(head)
        if required:
            raise VideoDecodeError("the data is not a valid mp4 video stream")
        return None
    header = bytearray()
    while True:
        size, kind = struct.unpack(">I4s", head)
        if size == 1:  # a 64-bit size follows
            head += _read_all(reader, 8)
            (size,) = struct.unpack(">Q", head[8:])
        if kind in _MP4_MEDIA_BOXES:
            raise VideoUnsupported(
                "this MP4 cannot be decoded as a stream: media comes before its index "
                "(send fragmented MP4 from its start, or a +faststart MP4)"
            )
        if kind not in _MP4_PREFIX_BOXES | {b"moov"} or size < len(head):
            raise VideoDecodeError("the data is not a valid mp4 video stream")
        if len(header) + size > limit:
            raise VideoTooLarge(f"the MP4 header exceeds the limit of {limit} bytes")
        header += head + _read_all(reader, size - len(head))
        if kind == b"moov":
            reader.unread(bytes(header))
            return bytes(header)
        head = _read_all(reader, 8)


def _read_all(reader: SafeReader, n: int) -> bytes:
    data = reader.read_exactly(n)
    if len(data) < n:
        raise VideoDecodeError("the video ended inside its MP4 header")
    return data
