"""What FFmpeg reads: a live byte source made safe for a demuxer.

:class:`SafeReader` stores source errors instead of letting them cross FFmpeg,
ends the stream on a stop event, and can push bytes back. :func:`mp4_header`
collects an MP4 stream's header whole, because PyAV's I/O buffer keeps
nothing to seek back into and the MP4 demuxer seeks back within its header;
:func:`mp4_declared` reads what that header promises (sample counts,
durations) before FFmpeg builds an index from it.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Protocol

from .errors import StreamchatError, VideoDecodeError, VideoTooLarge, VideoUnsupported

__all__ = ["Mp4Declared", "SafeReader", "Source", "mp4_declared", "mp4_header"]


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


# -- what an MP4 header declares ------------------------------------------------------

_MP4_CONTAINER_BOXES = {b"trak", b"mdia", b"minf", b"stbl"}
_UNKNOWN_DURATIONS = {0, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF}  # 0 or all ones: not known


@dataclass(frozen=True)
class Mp4Declared:
    """What an MP4 header promises, before FFmpeg allocates anything for it.

    * ``video_samples``: the most samples (frames) declared by one video track.
    * ``total_samples``: samples declared by all tracks together: FFmpeg's MP4
      demuxer allocates an index entry (about 24 bytes) for each, so a header
      of a few bytes (a constant sample size and a huge count in ``stsz``)
      can cost gigabytes to open.
    * ``seconds``: the longest duration declared by the movie or a track, in
      seconds (0 when none is known, as in a fragmented MP4's empty ``moov``).
    """

    video_samples: int = 0
    total_samples: int = 0
    seconds: float = 0.0


def mp4_declared(header: bytes) -> Mp4Declared:
    """Read sample counts and durations from an MP4 header (as :func:`mp4_header` returns it).

    Only the boxes on the way to them are parsed (``moov`` > ``mvhd``,
    ``trak`` > ``mdia`` > ``mdhd``/``hdlr``/``minf`` > ``stbl`` > ``stsz``/``stz2``);
    malformed boxes are left for FFmpeg to report, so this never fails.
    """
    video = total = 0
    seconds = 0.0
    moov = next((body for kind, body in _boxes(memoryview(header)) if kind == b"moov"), None)
    if moov is None:
        return Mp4Declared()
    for kind, body in _boxes(moov):
        if kind == b"mvhd":
            seconds = max(seconds, _duration(body))
        elif kind == b"trak":
            track = _track(body)
            seconds = max(seconds, track.seconds)
            total += track.total_samples
            video = max(video, track.video_samples)
    return Mp4Declared(video_samples=video, total_samples=total, seconds=seconds)


def _track(trak: memoryview) -> Mp4Declared:
    """One ``trak``'s declared samples and duration (``video_samples`` only for video)."""
    samples = 0
    seconds = 0.0
    is_video = False
    stack = [trak]
    while stack:
        for kind, body in _boxes(stack.pop()):
            if kind in _MP4_CONTAINER_BOXES:
                stack.append(body)
            elif kind == b"mdhd":
                seconds = _duration(body)
            elif kind == b"hdlr" and len(body) >= 12:
                is_video = bytes(body[8:12]) == b"vide"
            elif kind in (b"stsz", b"stz2") and len(body) >= 12:
                samples += struct.unpack_from(">I", body, 8)[0]
    return Mp4Declared(
        video_samples=samples if is_video else 0, total_samples=samples, seconds=seconds
    )


def _duration(body: memoryview) -> float:
    """Seconds declared by an ``mvhd`` or ``mdhd`` body (version 0 or 1); 0 if unknown."""
    if body[0:1].tobytes() == b"\x01" and len(body) >= 32:
        timescale, duration = struct.unpack_from(">IQ", body, 20)
    elif len(body) >= 20:
        timescale, duration = struct.unpack_from(">II", body, 12)
    else:
        return 0.0
    if not timescale or duration in _UNKNOWN_DURATIONS:
        return 0.0
    return float(duration / timescale)


def _boxes(data: memoryview) -> list[tuple[bytes, memoryview]]:
    """The boxes directly inside ``data``, as ``(kind, body)``; stops at a malformed one."""
    boxes = []
    offset = 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, offset)
        head = 8
        if size == 1 and offset + 16 <= len(data):
            (size,) = struct.unpack_from(">Q", data, offset + 8)
            head = 16
        elif size == 0:  # to the end of the enclosing box
            size = len(data) - offset
        if size < head or offset + size > len(data):
            break
        boxes.append((kind, data[offset + head : offset + size]))
        offset += size
    return boxes
