"""What FFmpeg reads: a live byte source made safe for a demuxer.

:class:`SafeReader` stores source errors instead of letting them cross FFmpeg,
ends the stream on a stop event, and can push bytes back. :func:`mp4_header`
collects an MP4 stream's header whole, because PyAV's I/O buffer keeps
nothing to seek back into and the MP4 demuxer seeks back within its header;
:func:`mp4_declared` reads what that header promises (sample counts,
durations) before FFmpeg builds an index from it, and :class:`Mp4Walker`
follows the boxes of the rest of the stream as they pass, so that what each
fragment declares is checked before FFmpeg reads it.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..errors import StreamchatError, VideoDecodeError, VideoTooLarge, VideoUnsupported

__all__ = ["Mp4Declared", "Mp4Walker", "SafeReader", "Source", "mp4_declared", "mp4_header"]


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
    * A watcher (:meth:`watch`) sees every byte before it is returned; if it
      raises, the stream fails with its error and those bytes are never read.
    """

    def __init__(self, source: Source, stop: threading.Event) -> None:
        self._source = source
        self._stop = stop
        self._pending = b""
        self._error: BaseException | None = None
        self._watcher: Callable[[bytes], None] | None = None

    def read(self, n: int) -> bytes:
        data = self._next(n)
        if self._watcher is not None and data:
            try:
                self._watcher(data)
            except StreamchatError as exc:
                self._error = exc
                self._pending = b""
                self._watcher = None
                return b""
        return data

    def _next(self, n: int) -> bytes:
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

    def watch(self, watcher: Callable[[bytes], None]) -> None:
        """Pass every byte read from now on (pushed-back bytes first) to ``watcher``.

        ``watcher`` may raise a ``StreamchatError`` to end the stream with it.
        """
        self._watcher = watcher

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
        if kind == b"mdat":
            raise VideoUnsupported(
                "this MP4 has its index (moov) after the media, so it cannot be decoded as it "
                "arrives: send the file with streamchat-client (it remuxes files), or its URL "
                "in video.url, or remux it first (ffmpeg -i in.mp4 -c copy -movflags +faststart "
                "out.mp4)"
            )
        if kind == b"moof":
            raise VideoUnsupported(
                "this MP4 stream starts with a fragment (moof) without its header (moov): "
                "send a fragmented MP4 from its first byte"
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

_MP4_CONTAINER_BOXES = {b"trak", b"edts", b"mdia", b"minf", b"stbl"}
_UNKNOWN_DURATIONS = {0, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF}  # 0 or all ones: not known


@dataclass(frozen=True)
class Mp4Declared:
    """What an MP4 header promises, before FFmpeg allocates anything for it.

    * ``video_samples``: the most samples (frames) declared by one video track.
    * ``total_samples``: the index entries FFmpeg's MP4 demuxer builds for all
      tracks together: each track's samples, once per edit of its edit list
      (``elst``) that shows media (an edit replays the samples it covers, so
      a header of 20 samples and 20,000 edits indexed 400,000 entries), as
      the worst case. FFmpeg allocates an entry for each (about 70 bytes at
      peak with its timing tables), so a header of a few bytes (a constant
      sample size and a huge count in ``stsz``) can cost gigabytes to open.
    * ``seconds``: the longest duration declared by the movie or a track, in
      seconds (0 when none is known, as in a fragmented MP4's empty ``moov``).
    * ``video_tracks``: the track IDs (``tkhd``) of the video tracks, which
      fragments name in their ``tfhd``.
    """

    video_samples: int = 0
    total_samples: int = 0
    seconds: float = 0.0
    video_tracks: frozenset[int] = frozenset()


def mp4_declared(header: bytes) -> Mp4Declared:
    """Read sample counts and durations from an MP4 header (as :func:`mp4_header` returns it).

    Only the boxes on the way to them are parsed (``moov`` > ``mvhd``,
    ``trak`` > ``tkhd``/``mdia`` > ``mdhd``/``hdlr``/``minf`` > ``stbl`` > ``stsz``/``stz2``);
    malformed boxes are left for FFmpeg to report, so this never fails.
    The edit lists are read too (``trak`` > ``edts`` > ``elst``).
    """
    video = total = 0
    seconds = 0.0
    tracks: set[int] = set()
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
            tracks |= track.video_tracks
    return Mp4Declared(
        video_samples=video, total_samples=total, seconds=seconds, video_tracks=frozenset(tracks)
    )


def _track(trak: memoryview) -> Mp4Declared:
    """One ``trak``'s declared samples, duration and ID (``video_*`` only for video)."""
    samples = 0
    edits = 1
    seconds = 0.0
    is_video = False
    track_id: int | None = None
    stack = [trak]
    while stack:
        for kind, body in _boxes(stack.pop()):
            if kind in _MP4_CONTAINER_BOXES:
                stack.append(body)
            elif kind == b"tkhd" and len(body) >= 24:
                (track_id,) = struct.unpack_from(">I", body, 20 if body[0] == 1 else 12)
            elif kind == b"mdhd":
                seconds = _duration(body)
            elif kind == b"hdlr" and len(body) >= 12:
                is_video = bytes(body[8:12]) == b"vide"
            elif kind in (b"stsz", b"stz2") and len(body) >= 12:
                samples += struct.unpack_from(">I", body, 8)[0]
            elif kind == b"elst":
                edits = max(edits, _media_edits(body))
    return Mp4Declared(
        video_samples=samples if is_video else 0,
        total_samples=samples * edits,
        seconds=seconds,
        video_tracks=frozenset({track_id}) if is_video and track_id is not None else frozenset(),
    )


def _media_edits(elst: memoryview) -> int:
    """How many edits of an ``elst`` show media (empty edits, a media time of -1, show none).

    Counted as FFmpeg reads them: at most as many as the box holds, whatever
    its entry count says.
    """
    if len(elst) < 8:
        return 0
    version, count = elst[0], struct.unpack_from(">I", elst, 4)[0]
    layout = ">QqI" if version == 1 else ">IiI"  # duration, media time, rate
    size = struct.calcsize(layout)
    entries = elst[8 : 8 + min(count, (len(elst) - 8) // size) * size]
    return sum(1 for _, time, _ in struct.iter_unpack(layout, entries) if time != -1)


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


# -- what the rest of an MP4 stream declares, as it passes ------------------------------

_FOREVER = 1 << 64  # the end of a box that runs to the end of the stream
# Boxes FFmpeg's MP4 demuxer reads as lists of boxes. It picks a box's parser by
# its type alone, whatever the parent, so a `trun` inside any of these is read.
_WALKED_BOXES = frozenset(
    {
        b"moov", b"trak", b"mdia", b"minf", b"stbl", b"mvex", b"edts", b"dinf",
        b"udta", b"tref", b"ilst", b"sinf", b"schi", b"mfra", b"moof", b"traf",
    }
)  # fmt: skip
_MAX_DEPTH = 16  # FFmpeg itself refuses boxes nested more than 10 deep
_HEADER, _FIELD, _META = 0, 1, 2  # what Mp4Walker is collecting


class Mp4Walker:
    """Follows an MP4 stream's boxes as its bytes go by; checks the samples fragments declare.

    :meth:`feed` gets every byte FFmpeg will read, in order, from the first
    (:meth:`SafeReader.watch`). The walker follows the top-level boxes
    (``ftyp``, ``moov``, ``moof``, ``mdat``, ``sidx``, ``styp``, ``emsg``, ...)
    and descends only into boxes FFmpeg also parses as lists of boxes (``moof``
    > ``traf``, ``moov`` > ``trak`` > ..., ``meta`` from its ``hdlr`` on, as
    FFmpeg finds it); every other body is skipped unread, so an ``mdat`` of
    any declared size (even a 64-bit 2^62) costs nothing. Only box headers
    and the first 8 body bytes of ``tfhd`` and ``trun`` are copied.

    Each ``trun`` adds its ``sample_count`` to the samples declared so far (to
    the video count too if the last ``tfhd`` named a video track), starting
    from the header's own (:func:`mp4_declared`); ``check`` gets the running
    totals and raises to refuse the stream. The count matters because FFmpeg
    allocates index entries for all of it as soon as it reads it: a 20-byte
    ``trun`` declaring 20 million samples without per-sample fields took
    700 MB. Box layouts FFmpeg would read differently are refused with
    ``VideoDecodeError``: a top-level box smaller than its own header, a
    ``tfhd`` or ``trun`` too short to hold its count (FFmpeg would read it from
    the next box), nesting deeper than FFmpeg allows. A box smaller than its
    header inside another ends that box, as in FFmpeg.
    """

    def __init__(self, declared: Mp4Declared, check: Callable[[Mp4Declared], None]) -> None:
        self._check = check
        self._video_tracks = declared.video_tracks
        self._video = declared.video_samples
        self._total = declared.total_samples
        self._track: int | None = None  # named by the last `tfhd`
        self._pos = 0  # stream offset of the next byte fed
        self._skip_to = 0  # bytes before this offset are passed over
        self._ends: list[int] = []  # where the boxes walked into end, innermost last
        self._mode = _HEADER
        self._buf = bytearray()
        self._want = 8  # bytes to collect in `_buf` before the next step
        self._box = b""  # the `tfhd`/`trun` whose first body bytes are collected
        self._box_end = 0
        self._word = b""  # `meta`: the last 4-byte word scanned

    def feed(self, data: bytes) -> None:
        """Walk ``data``, the next bytes of the stream; raises as ``check`` does."""
        view = memoryview(data)
        i = 0
        while i < len(view):
            if self._pos < self._skip_to:
                step = min(len(view) - i, self._skip_to - self._pos)
                i += step
                self._pos += step
                continue
            if self._mode == _HEADER and not self._buf:
                while self._ends and self._pos >= self._ends[-1]:
                    self._ends.pop()
                if self._ends and self._ends[-1] - self._pos < 8:
                    self._skip_to = self._ends[-1]  # FFmpeg reads no box from a 7-byte tail
                    continue
            take = min(len(view) - i, self._want - len(self._buf))
            self._buf += view[i : i + take]
            i += take
            self._pos += take
            if len(self._buf) == self._want:
                self._step()

    def _step(self) -> None:
        if self._mode == _FIELD:
            self._read_field()
        elif self._mode == _META:
            self._scan_meta()
        else:
            self._read_header()

    def _read_header(self) -> None:
        size, kind = struct.unpack_from(">I4s", self._buf)
        parent_end = self._ends[-1] if self._ends else _FOREVER
        if size == 1 and len(self._buf) == 8 and parent_end - self._pos >= 8:
            self._want = 16  # a 64-bit size follows
            return
        if size == 1 and len(self._buf) == 16:
            (size,) = struct.unpack_from(">Q", self._buf, 8)
        head = len(self._buf)
        start = self._pos - head
        self._buf.clear()
        self._want = 8
        if size == 0:  # to the end of the parent, or of the stream
            end = parent_end
        elif size < head:
            if not self._ends:
                raise VideoDecodeError("the data is not a valid mp4 video stream")
            self._skip_to = parent_end  # FFmpeg stops reading the parent here
            return
        else:
            end = min(start + size, parent_end)
        if kind in _WALKED_BOXES:
            self._enter(end)
        elif kind in (b"tfhd", b"trun"):
            if end - self._pos < 8:
                raise VideoDecodeError(f"the mp4 stream has a malformed {kind.decode()} box")
            self._mode, self._box, self._box_end = _FIELD, kind, end
        elif kind == b"meta":
            self._mode, self._box_end, self._word = _META, end, kind
            self._scan_or_skip()
        else:
            self._skip_to = end

    def _enter(self, end: int) -> None:
        if len(self._ends) >= _MAX_DEPTH:
            raise VideoDecodeError("the mp4 stream nests its boxes too deeply")
        self._ends.append(end)

    def _read_field(self) -> None:
        """A ``tfhd``'s track ID or a ``trun``'s sample count (after version and flags)."""
        (value,) = struct.unpack_from(">I", self._buf, 4)
        if self._box == b"tfhd":
            self._track = value
        else:
            self._total += value
            if self._track in self._video_tracks:
                self._video += value
            self._check(Mp4Declared(video_samples=self._video, total_samples=self._total))
        self._mode = _HEADER
        self._buf.clear()
        self._want = 8
        self._skip_to = self._box_end

    def _scan_meta(self) -> None:
        """FFmpeg reads ``meta`` as boxes from its ``hdlr`` on, wherever a 4-byte scan finds it."""
        word = bytes(self._buf)
        self._buf.clear()
        if word == b"hdlr":  # the box starts with the word before
            self._mode = _HEADER
            self._enter(self._box_end)
            self._buf += self._word + word
            self._read_header()
            return
        self._word = word
        self._scan_or_skip()

    def _scan_or_skip(self) -> None:
        if self._box_end - self._pos > 8:
            self._want = 4
        else:
            self._mode = _HEADER
            self._want = 8
            self._skip_to = self._box_end
