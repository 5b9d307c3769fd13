"""What the client needs to know about a local video file before pushing it.

PyAV is imported lazily: only pacing (``realtime``) and flow control need a
file's duration, and a client that only asks questions should not pay for
loading FFmpeg.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["guess_format", "probe_duration"]

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
