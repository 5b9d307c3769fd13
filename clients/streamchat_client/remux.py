"""The PyAV side of a remuxed push: any input in, an in-memory container stream out.

Runs in a worker thread (:func:`run`) and talks to the event loop only
through a :class:`Bridge`, a bounded queue: it opens the source, copies its
video packets into a container the server reads as a stream, waits for each
packet's timestamp when pacing, and hands over the muxer's bytes as they are
written. What it hands over: one :class:`Opened`, then :class:`Piece` after
:class:`Piece`, then :data:`END` or a :class:`Failed`. See
:mod:`streamchat_client.sources` for the event loop side.

The container (measured with PyAV 18, FFmpeg 8; see ``clients/README.md``):

* **Fragmented MP4** first. The stream is copied with its codec parameters
  and coded side data (``add_stream_from_template``), so the display matrix
  of a portrait or mirrored phone video travels in the track header, and
  every timestamp arrives exactly as the source has it. A fragment is cut at
  each keyframe and every :data:`FRAGMENT_SECONDS`, which bounds both the
  latency of a live source and what the muxer holds.
* **Matroska** for codecs MP4 cannot carry (VP8, ProRes, MS-MPEG4, ...). It
  keeps the display matrix too, and costs less per cluster, but rounds
  timestamps to the millisecond.
* MPEG-TS, which the live push used before, loses the display matrix.

Only what neither container carries is re-encoded (raw frames; H.264 or
VP8, whichever encoder the FFmpeg build has), and H.264/HEVC with B-frames
from AVI, which stores no presentation timestamps: copied, their frames
would be out of order; re-encoded, they are stamped in display order at the
stream's frame rate. A re-encoded stream does not keep the display matrix.
Audio is never sent: the server ignores it.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from .errors import SourceError
from .media import main_video

__all__ = ["END", "Bridge", "Failed", "Opened", "Piece", "run"]

FRAGMENT_SECONDS = 0.2
"""The longest MP4 fragment or Matroska cluster: the muxer's bytes leave at least this often."""
_CARRIERS = ("mp4", "matroska")
"""Containers a stream is copied into, in order of preference (see the module docstring)."""
_MUX_OPTIONS = {
    # flush_packets: the muxer's bytes leave as they are written, not every 32 KiB.
    "mp4": {
        "movflags": "frag_keyframe+empty_moov+default_base_moof",
        "frag_duration": str(round(FRAGMENT_SECONDS * 1_000_000)),
        "flush_packets": "1",
    },
    # Matroska is written a cluster at a time: short clusters keep the latency down.
    "matroska": {
        "flush_packets": "1",
        "live": "1",
        "cluster_time_limit": str(round(FRAGMENT_SECONDS * 1000)),
    },
}
_REENCODED = frozenset({"rawvideo"})
"""Codecs re-encoded although a container could hold them: raw frames are 10-100 times the
bytes of any compressed stream."""
_NO_PTS = (frozenset({"avi"}), frozenset({"h264", "hevc"}))
"""Demuxers that store no presentation timestamps, and codecs whose B-frames then come out
of order (FFmpeg's MPEG-4 Part 2 parser recovers them; its H.264 and HEVC parsers do not)."""
_ENCODERS = (("libx264", "mp4"), ("libvpx", "matroska"))
"""Encoders for what is re-encoded, in order of preference."""


@dataclass(frozen=True, slots=True)
class Opened:
    container: str
    codec: str
    reencoded: bool


@dataclass(frozen=True, slots=True)
class Piece:
    data: bytes
    packets: int
    media_seconds: float


@dataclass(frozen=True, slots=True)
class Failed:
    error: SourceError


END = object()


class Bridge:
    """A bounded queue from the worker thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, maxsize: int) -> None:
        self._loop = loop
        self._queue: queue.Queue[object] = queue.Queue(maxsize)
        self._ready = asyncio.Event()
        self.stop = threading.Event()

    def put(self, item: object) -> bool:
        """Worker side: hand ``item`` over, waiting for room; ``False`` once stopped."""
        while not self.stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)  # wakes up to notice ``stop``
            except queue.Full:
                continue
            try:
                self._loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                self.stop.set()
                return False
            return True
        return False

    async def get(self) -> object:
        while True:
            try:
                return self._queue.get_nowait()
            except queue.Empty:
                self._ready.clear()
                if not self._queue.empty():
                    continue
                await self._ready.wait()

    def get_nowait(self) -> object | None:
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None


class _Collector:
    """The in-memory output file of the muxer: collects what it writes."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def run(
    bridge: Bridge,
    source: str,
    input_format: str | None,
    options: dict[str, str],
    duration: float | None,
    pace: bool,
    read_timeout: float,
) -> None:
    """The worker thread: open, remux (or re-encode), pace, hand over; always end the queue."""
    import av  # lazily: see media.py

    try:
        try:
            container = av.open(source, format=input_format, options=options, timeout=read_timeout)
        except Exception as exc:  # FFmpegError, OSError, ValueError for an unknown format
            raise SourceError(f"cannot open {source}: {exc}") from exc
        with container:
            stream = main_video(container)
            if stream is None:
                raise SourceError(f"{source} has no video stream")
            _remux(bridge, container, stream, duration, pace)
    except SourceError as exc:
        bridge.put(Failed(exc))
        return
    except (av.FFmpegError, OSError) as exc:
        error = SourceError(f"reading {source} failed: {exc}")
        error.__cause__ = exc
        bridge.put(Failed(error))
        return
    except Exception as exc:  # a bug must still end the push, not leave it waiting
        error = SourceError(f"reading {source} failed: {exc!r}")
        error.__cause__ = exc
        bridge.put(Failed(error))
        return
    bridge.put(END)


def _remux(bridge: Bridge, container: Any, stream: Any, duration: float | None, pace: bool) -> None:
    import av

    codec = stream.codec_context.name
    output_file = _Collector()
    restamp = _needs_restamp(container, stream)
    reencoder: _Encoder | None = None
    output, out_stream, target = None, None, ""
    if codec not in _REENCODED and not restamp:
        for target in _CARRIERS:
            output = av.open(output_file, "w", format=target, options=_MUX_OPTIONS[target])
            try:
                out_stream = output.add_stream_from_template(stream)
                break
            except ValueError:  # "'mp4' format does not support 'vp8' codec"
                output.close()
                output = None
                output_file.take()  # nothing was written, but keep no trace of it
            except BaseException:
                output.close()
                raise
    if output is None:
        encoder, target = _pick_encoder()
        output = av.open(output_file, "w", format=target, options=_MUX_OPTIONS[target])
        rate = (stream.average_rate or stream.guessed_rate) if restamp else None
        try:
            reencoder = _Encoder(output, encoder, stream, rate=rate)
        except BaseException:
            output.close()
            raise
    with output:
        if not bridge.put(Opened(target, codec, reencoder is not None)):
            return
        first: float | None = None
        media = 0.0
        unsent = 0  # packets muxed whose bytes the muxer still holds
        clock = time.monotonic()
        for packet in container.demux(stream):
            if bridge.stop.is_set():
                return
            stamp = packet.dts if packet.dts is not None else packet.pts
            if stamp is None or packet.time_base is None:
                continue  # a flush packet at the end, or a source with no timing
            seconds = float(stamp * packet.time_base)
            if first is None:
                first = seconds
            if duration is not None and seconds - first >= duration:
                break
            media = seconds - first
            if pace:
                delay = clock + media - time.monotonic()
                if delay > 0 and bridge.stop.wait(delay):  # pacing is the feature
                    return
            if reencoder is None:
                packet.stream = out_stream
                output.mux(packet)
            else:
                for frame in packet.decode():
                    output.mux(reencoder.encode(frame, media))
            unsent += 1
            data = output_file.take()
            if data:
                if not bridge.put(Piece(data, unsent, media)):
                    return
                unsent = 0
        if reencoder is not None:
            for frame in stream.codec_context.decode(None):  # frames the decoder still holds
                output.mux(reencoder.encode(frame, media))
            output.mux(reencoder.flush())
    # Closing the output writes the container's trailer, if it has one.
    tail = output_file.take()
    if tail:
        bridge.put(Piece(tail, unsent, media))


def _needs_restamp(container: Any, stream: Any) -> bool:
    """Whether the packets' presentation timestamps are guesses that put B-frames out of order."""
    demuxers, codecs = _NO_PTS
    return (
        bool(demuxers & set(container.format.name.split(",")))
        and stream.codec_context.name in codecs
        and bool(stream.codec_context.has_b_frames)
    )


def _pick_encoder() -> tuple[str, str]:
    import av

    for encoder, target in _ENCODERS:
        try:
            av.codec.Codec(encoder, "w")
        except (av.FFmpegError, ValueError):
            continue
        return encoder, target
    raise SourceError("no H.264 or VP8 encoder in this PyAV build to re-encode the video")


class _Encoder:
    """Re-encodes decoded frames for a codec no container of the server's takes as it is.

    Frames keep their own times; with ``rate`` they are stamped in the order
    the decoder gives them, one ``1 / rate`` apart, for sources whose
    timestamps are not in display order.
    """

    def __init__(self, output: Any, encoder: str, stream: Any, *, rate: Fraction | None) -> None:
        context = stream.codec_context
        options = (
            {"preset": "ultrafast", "tune": "zerolatency"}
            if encoder == "libx264"
            else {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
        )
        self.stream = output.add_stream(encoder, options=options)
        self.stream.width = max(2, context.width // 2 * 2)  # 4:2:0 needs even sizes
        self.stream.height = max(2, context.height // 2 * 2)
        self.stream.pix_fmt = "yuv420p"
        self.stream.codec_context.time_base = _ENCODE_TIME_BASE
        self._rate = rate
        self._count = 0
        self._first: float | None = None
        self._last_pts: int | None = None

    def encode(self, frame: Any, media: float) -> list[Any]:
        """Encode one decoded frame at its time since the source's first frame."""
        if self._rate:
            seconds = float(self._count / self._rate)
            self._count += 1
        else:
            seconds = float(frame.time) if frame.time is not None else media
        if self._first is None:
            self._first = seconds
        image = frame.reformat(width=self.stream.width, height=self.stream.height, format="yuv420p")
        image.pts = round((seconds - self._first) * 1000)
        image.time_base = _ENCODE_TIME_BASE
        if self._last_pts is not None and image.pts <= self._last_pts:
            return []  # encoders refuse timestamps that do not increase
        self._last_pts = image.pts
        packets: list[Any] = self.stream.encode(image)
        return packets

    def flush(self) -> list[Any]:
        packets: list[Any] = self.stream.encode(None)
        return packets


_ENCODE_TIME_BASE = Fraction(1, 1000)
