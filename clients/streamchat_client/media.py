"""What the client needs to know about a local video file before pushing it.

:func:`plan_file` decides whether a file's bytes can go to the server as
they are or must be remuxed first. The server reads pushed bytes as a
stream, never seeking back, through its demuxers for Matroska/WebM, MP4/MOV
and MPEG-TS. Matroska, WebM and MPEG-TS are streams by design; an MP4 is one
only when its index (``moov``) comes before the media (``+faststart``) or it
is fragmented. FFmpeg's default layout, and most cameras and phones, put the
index at the end: the server would have to hold the whole file to find it.
Such files, and containers the server does not read as a push (AVI, FLV,
...), are remuxed by :mod:`streamchat_client.remux`.

PyAV is imported lazily: a client that only asks questions should not pay
for loading FFmpeg.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .errors import SourceError

__all__ = [
    "MAX_STREAMED_INDEX_BYTES",
    "FilePlan",
    "guess_format",
    "main_video",
    "mp4_layout",
    "plan_file",
    "probe_duration",
]

MAX_STREAMED_INDEX_BYTES = 4 << 20
"""An MP4 whose index comes first is sent as it is only up to this index size: the server
reads an index whole before decoding, within a bound of its own (8 MiB by default).
Larger (hours of video) it is remuxed into fragments, whose indexes are small."""

_SUFFIX_FORMATS = {
    ".webm": "webm",
    ".mkv": "matroska",
    ".mka": "matroska",
    ".mp4": "mp4",
    ".m4v": "mp4",
    ".mov": "mp4",
    ".ts": "mpegts",
    ".m2ts": "mpegts",
    ".mts": "mpegts",
}


def guess_format(path: str | Path) -> str | None:
    """The server's demuxer hint for ``path``'s suffix, or ``None`` to let it probe.

    A hint matters for streams the server sees only a prefix of: MPEG-TS in
    particular is hard to probe from a few kilobytes.
    """
    return _SUFFIX_FORMATS.get(Path(path).suffix.lower())


def probe_duration(path: str | Path) -> float | None:
    """The media duration of ``path`` in seconds, or ``None`` if it has none.

    Blocking (it opens the file with FFmpeg): run it in a thread. Uses the
    container's duration when it is known; fragmented MP4 and some WebM files
    (as MediaRecorder writes them) have none in their header, so then the
    packets are demuxed, without decoding, to find the last timestamp.
    """
    import av  # lazily, see the module docstring

    try:
        container = av.open(str(path))
    except av.FFmpegError:
        return None
    with container:
        if container.duration is not None and container.duration > 0:
            return float(container.duration) / av.time_base
        if not container.streams.video:
            return None
        stream = container.streams.video[0]
        if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
            return float(stream.duration * stream.time_base)
        first: float | None = None
        last: float | None = None
        for packet in container.demux(stream):
            if packet.pts is None or packet.time_base is None:
                continue
            start = float(packet.pts * packet.time_base)
            end = start + float((packet.duration or 0) * packet.time_base)
            first = start if first is None else min(first, start)
            last = end if last is None else max(last, end)
        if first is None or last is None or last <= first:
            return None
        return last - first


@dataclass(frozen=True, slots=True)
class FilePlan:
    """How a local file travels: its own bytes, or remuxed (see :func:`plan_file`)."""

    remux: bool
    container: str | None
    """The demuxer hint for the file's own bytes (``None`` when it is remuxed)."""
    codec: str
    """The video codec (FFmpeg's name)."""
    why: str
    """The layout found, for people: ``"MP4 with its index at the end"``, ``"avi"``, ..."""


def plan_file(path: str | Path) -> FilePlan:
    """Whether the server can read ``path``'s bytes as a stream, or they must be remuxed.

    Blocking (it opens the file with FFmpeg and reads box headers): run it in
    a thread. Raises :class:`SourceError` if PyAV cannot open the file or it
    has no video. A file whose first video stream is a cover picture is
    remuxed too, since the server decodes the first video stream.
    """
    import av  # lazily, see the module docstring

    path = Path(path)
    try:
        container = av.open(str(path.resolve()))
    except (av.FFmpegError, OSError) as exc:
        raise SourceError(f"cannot open {path}: {exc}") from exc
    with container:
        main = main_video(container)
        if main is None:
            raise SourceError(f"{path} has no video stream")
        codec = main.codec_context.name
        demuxer = container.format.name
        names = set(demuxer.split(","))
        first = container.streams.video[0] is main
    if not first:
        return FilePlan(True, None, codec, "a cover picture before the video")
    if names & {"matroska", "webm"}:
        hint = guess_format(path)
        return FilePlan(False, hint if hint in ("webm", "matroska") else "matroska", codec, "")
    if "mpegts" in names:
        return FilePlan(False, "mpegts", codec, "")
    if names & {"mov", "mp4"}:
        with path.open("rb") as file:
            layout, index_bytes = mp4_layout(file)
        if layout == "fragmented" or (
            layout == "faststart" and index_bytes <= MAX_STREAMED_INDEX_BYTES
        ):
            return FilePlan(False, "mp4", codec, "")
        why = {
            "faststart": f"MP4 with an index of {index_bytes} bytes",
            "index_at_end": "MP4 with its index at the end",
        }.get(layout, "MP4 without an index")
        return FilePlan(True, None, codec, why)
    return FilePlan(True, None, codec, f"{demuxer.split(',')[0].upper()} file")


def main_video(container: Any) -> Any | None:
    """A PyAV container's first video stream that is not a cover picture, or ``None``.

    Cover art (album art in MP4, for one) is a one-frame video stream marked
    ``attached_pic``.
    """
    import av

    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    return None


def mp4_layout(file: BinaryIO) -> tuple[str, int]:
    """Where an MP4's index is: ``(layout, index bytes)``.

    ``layout`` is ``"fragmented"`` (the ``moov`` comes first and announces
    fragments), ``"faststart"`` (the ``moov`` comes first: a stream, once it
    is read whole), ``"index_at_end"`` (media data comes first) or
    ``"none"``. Reads only box headers, seeking over the media.
    """
    end = os.fstat(file.fileno()).st_size
    offset = 0
    while True:
        box = _box(file, offset, end)
        if box is None:
            return "none", 0
        kind, header, size = box
        if kind == b"moov":
            children = offset + header
            while (child := _box(file, children, offset + size)) is not None:
                if child[0] == b"mvex":
                    return "fragmented", size
                children += child[2]
            return "faststart", size
        if kind in (b"mdat", b"moof"):
            return "index_at_end", 0
        offset += size


def _box(file: BinaryIO, offset: int, end: int) -> tuple[bytes, int, int] | None:
    """``(type, header size, box size)`` of the box at ``offset``, or ``None`` past ``end``."""
    if offset + 8 > end:
        return None
    file.seek(offset)
    head = file.read(16)
    if len(head) < 8:
        return None
    size, kind = struct.unpack(">I4s", head[:8])
    header = 8
    if size == 1:
        if len(head) < 16:
            return None
        (size,) = struct.unpack(">Q", head[8:16])
        header = 16
    elif size == 0:  # to the end of the file
        size = end - offset
    if size < header or offset + size > end:
        return None
    return kind, header, size
