"""The PyAV worker: container bytes in, sampled and resized frames out.

:func:`decode_stream` blocks and runs in a worker thread, never on the event
loop (PyAV releases the GIL while decoding, so worker threads scale). It reads
a live, non-seekable byte stream (a :class:`~streamchat.ingest.feed.ByteFeed`, or any
object with ``read(n)``), demuxes the first video stream, keeps frames at
``fps`` by presentation time (:class:`FrameSampler`), and converts only the
kept frames, already resized to the model's pixel budget (:func:`target_size`),
in one swscale call each. A caller that wants only a few frames spread over a
whole video (``DecoderOptions.spread``) of declared length (an MP4) gets them
from the groups of pictures that hold them, the others never decoded
(:mod:`.gops`).

Timestamps: an emitted frame's ``pts`` is in seconds from the first decoded
frame, so every source starts at 0 whatever its container's start time. It
never goes backwards: when the source clock jumps back by more than half a
second or forward by more than an hour (a restarted encoder, concatenated
recordings), the timeline continues one frame interval after the last frame
instead; smaller backward jitter is clamped. Frames without a timestamp are
placed one nominal frame interval after the previous one.

Failures surface as :mod:`streamchat.errors` video errors with messages meant
for the client; :func:`decode_image` does the same for single JPEG/PNG/WebP images.

Orientation: a frame's display matrix (rotation and mirroring, as phones
write portrait video) is applied before sizing, so the model gets the
picture as players show it (:func:`~streamchat.media.sampling.orientation`).

Hostile media: FFmpeg only ever reads the bytes it is given, through a
demuxer from :data:`DEMUXERS` (WebM/Matroska, MP4/MOV, MPEG-TS, AVI), whether the
client named the container or it was probed: playlists (HLS), concat lists,
image sequences and every other demuxer are refused before their header is
read, and no protocol (``file:``, ``http:``, ...) may be opened from inside
the media (an empty ``protocol_whitelist``). Frame size (``max_pixels``),
video time and frame count per source are bounded; an MP4 header's declared
sample counts and durations are checked before FFmpeg indexes them, and so
are the sample counts of every fragment that follows (``Mp4Walker``), before
FFmpeg reads them. A probed stream that does not start like an MP4 is kept
from the MP4 demuxer, so no MP4 escapes those checks. Those checks also bound
the entries FFmpeg's MP4 index may hold (``max_index_samples``), which cost
memory whether or not they are decoded. A JPEG of more scans than
:data:`MAX_IMAGE_SCANS` is refused before decoding. Whatever ends a decode,
the codec context, and with it FFmpeg's threads, is freed before it returns.

Measured pitfalls this module works around, each pinned by a test in
``tests/unit/test_decoder.py`` (read boundaries, ``max_decode_pixels``, owned arrays):

* PyAV sets its I/O buffer's ``max_packet_size`` to the buffer size, so FFmpeg
  keeps nothing to seek back into once it refills the buffer; the MP4 demuxer
  seeks back within each video sample entry, and an MP4 header split by a
  short read then fails to parse. MP4 headers are therefore collected whole
  (up to the end of ``moov``) and handed to FFmpeg in a single read.
* FFmpeg's ``max_pixels`` given to ``av.open`` only reaches the probing
  decoders; the decoder that produces our frames gets it as a codec option.
* Arrays from ``to_ndarray`` are views of a PyAV frame; frames are copied once
  into arrays that own their memory.
"""

from __future__ import annotations

import ctypes
import io
import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import av
import av.error
import numpy as np
import numpy.typing as npt
from av.container import InputContainer
from av.packet import Packet
from av.sidedata.sidedata import Type as SideDataType
from av.video.format import VideoFormat
from av.video.frame import VideoFrame
from av.video.reformatter import Interpolation
from av.video.stream import VideoStream

from ..config import (
    DEFAULT_DECODER_THREADS,
    DEFAULT_FPS,
    DEFAULT_MAX_DECODE_PIXELS,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_INDEX_SAMPLES,
    DEFAULT_MAX_SOURCE_FRAMES,
    DEFAULT_MAX_SOURCE_SECONDS,
    Settings,
)
from ..errors import (
    StreamchatError,
    VideoDecodeError,
    VideoTooLarge,
    VideoTooLong,
    VideoUnsupported,
)
from ..window import Frame
from .gops import GopPlan, Picks, spread_times
from .reader import Mp4Declared, Mp4Walker, SafeReader, Source, mp4_declared, mp4_header
from .sampling import (
    DEFAULT_FACTOR,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    UPRIGHT,
    FrameSampler,
    Orientation,
    Timeline,
    check_budget,
    orientation,
    target_size,
)

__all__ = [
    "DEMUXERS",
    "MAX_IMAGE_SCANS",
    "DecodeReport",
    "DecoderOptions",
    "MemoryNeed",
    "decode_image",
    "decode_stream",
    "map_large_blocks",
]

logger = logging.getLogger("streamchat.decoder")


_CONTAINERS = {
    "webm": "webm",
    "matroska": "matroska",
    "mp4": "mp4",
    "mpegts": "mpegts",
    "avi": "avi",
}
DEMUXERS = "matroska,webm,mov,mp4,mpegts,avi"
"""FFmpeg's ``format_whitelist``: the only demuxers it may use, probed or hinted.

A demuxer's name lists its aliases (``"matroska,webm"``, ``"mov,mp4,m4a,..."``);
one alias on this list admits it.
"""
# Probed inputs that do not start like an MP4 (`mp4_header`) must not reach
# the MP4 demuxer, whose prober also accepts a stream that starts with any box:
# their header and fragments would go unchecked.
_NOT_MP4 = "matroska,webm,mpegts,avi"
# Options every input is opened with. An empty protocol whitelist: the bytes
# come from our reader, and nothing inside them may make FFmpeg open a file or
# a URL (HLS segments, concat entries, MP4 data references).
_SANDBOX = {"format_whitelist": DEMUXERS, "protocol_whitelist": ""}
# A declared MP4 index may hold this many samples per allowed frame, over all
# tracks (audio packets outnumber video frames; 48 kHz AAC: 47 per second).
_INDEX_SAMPLES_PER_FRAME = 4
# AREA is as fast as bilinear in swscale and averages when shrinking. Without
# full chroma interpolation swscale upsamples 4:2:0 chroma by repeating it,
# which smears colour edges (a mean error of 2.6 levels against the official
# Qwen preprocessing on 720p, 1.4 with the flags); see docs/benchmarks.md for
# their cost.
_INTERPOLATION = Interpolation.AREA | Interpolation.FULL_CHR_H_INT | Interpolation.ACCURATE_RND
_MAX_LEADING_SKIPS = 300  # non-key packets dropped while waiting for a first keyframe
# A group of pictures held compressed while its decoding is decided: beyond
# this it is decoded as it comes (a stream with few keyframes).
_MAX_GROUP_BYTES = 16 * 1024 * 1024


_M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter

MemoryNeed = Callable[[int, int, float], None]
"""Called by the decoder (in its thread) with a frame size and its format's bytes per pixel
before it decodes frames of that size: hold room for them, blocking, or raise
(:meth:`streamchat.media.admission.Hold.need`)."""


def map_large_blocks(threshold: int = 128 * 1024) -> bool:
    """Have glibc's malloc map every block of ``threshold`` bytes or more on its own.

    Such a block goes back to the kernel as soon as it is freed. By default
    glibc raises this threshold each time a mapped block is freed (up to 32
    MiB), and from then on the large tables FFmpeg allocates for a source
    (an MP4's index, tens of MiB) come from the heaps of the decoder threads'
    arenas, which keep what is freed. Measured on a server process, 8
    sessions each holding an MP4 of 500,000 samples, three rounds: RSS after
    they closed stayed 86, 122, then 156 MiB above where it started, and a
    round held 50 to 61 MiB a session as the heaps fragmented; with the
    threshold fixed, 15-25 MiB after and 22 MiB a session, every round. Costs a ``mmap`` per
    large block (a few a second per session). For the server's process, once,
    before it serves; returns whether it took effect (not on other C libraries).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))


# -- options and report ------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DecoderOptions:
    """How :func:`decode_stream` decodes one source.

    * ``fps``: frames kept per second of video (:class:`FrameSampler`).
    * ``factor``, ``min_pixels``, ``max_pixels``: the model's resize rule
      (:func:`target_size`).
    * ``container``: demuxer hint, ``"webm"``, ``"matroska"``, ``"mp4"`` or
      ``"mpegts"``, ``"avi"``, or ``None`` to probe. A hint saves probing and turns
      garbage into a clear "not a valid ... stream" error.
    * ``max_decode_pixels``: the largest source frame (width x height) decoded
      at all. FFmpeg enforces it inside the decoder, so a resolution bomb costs
      no memory; a larger frame is ``VideoTooLarge``.
    * ``max_source_seconds``, ``max_source_frames``: the longest source, in
      video time since its first frame and in decoded frames; beyond either
      the decode ends with ``VideoTooLong`` (frames already emitted stay). An
      MP4 header declaring more (duration, or samples: see
      :class:`~streamchat.media.reader.Mp4Declared`) is refused before opening, a
      fragment whose samples take the total beyond it before FFmpeg reads it.
    * ``max_index_samples``: the most entries FFmpeg's MP4 demuxer may hold in
      its index, over all tracks and fragments (``VideoTooLong`` beyond, checked
      like the frames). It allocates them for the declared count, decoded or
      not: about 70 bytes each at peak, 33-46 once opened (measured), so this is
      what an MP4 costs a session at most, whatever its header declares.
    * ``threads``: FFmpeg threads decoding (``thread_type="AUTO"``). Each frame
      thread holds frames of its own: decoding a 4096x2304 H.264 stream with
      16 reference frames peaked at 270 MiB with 1 thread, 300 with 2, 710
      with 16, FFmpeg's automatic count on a 16-core machine. A fixed count makes
      the memory a session can cost the same everywhere.
    * ``keyframes_only``: drop non-key packets before the decoder: many times
      faster, about one frame per keyframe interval.
    * ``spread``: the caller keeps at most this many frames spread over the
      whole source (``None``: a live stream, every frame at ``fps``). When
      the source declares its length (an MP4's index), only those frames are
      decoded, at most ``fps`` a second, each the last at or before its even
      share of the video (:mod:`.gops`); otherwise frames come at ``fps`` as
      for a live stream.
    * ``probesize`` (bytes), ``analyzeduration`` (microseconds): how much FFmpeg
      reads before the first frame; small values cut start-up latency on a
      live stream. ``analyzeduration`` must be positive: FFmpeg reads 0 as
      "default" (5 s), which held back the first frame of live H.264 in
      MPEG-TS or fragmented MP4 until 5 s of media had arrived.
    * ``max_decode_errors``: consecutive undecodable packets skipped before
      the decode fails.
    * ``max_header_bytes``: limit on an MP4 header, which is read whole before
      opening; its index grows with the sample count, a cheap memory bomb.
    """

    fps: float = DEFAULT_FPS
    factor: int = DEFAULT_FACTOR
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    container: str | None = None
    max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS
    max_source_seconds: float = DEFAULT_MAX_SOURCE_SECONDS
    max_source_frames: int = DEFAULT_MAX_SOURCE_FRAMES
    max_index_samples: int = DEFAULT_MAX_INDEX_SAMPLES
    threads: int = DEFAULT_DECODER_THREADS
    keyframes_only: bool = False
    spread: int | None = None
    probesize: int = 32_768
    analyzeduration: int = 100_000
    max_decode_errors: int = 30
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        fps: float,
        min_pixels: int,
        max_pixels: int,
        factor: int | None = None,
        container: str | None = None,
        keyframes_only: bool = False,
        spread: int | None = None,
    ) -> DecoderOptions:
        """What a source chose (rate, pixel budget, container), within the server's bounds.

        The bounds (decode size, source time, frames and index, threads) come
        from ``settings``; ``factor`` too unless given.
        """
        return cls(
            fps=fps,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            factor=settings.factor if factor is None else factor,
            container=container,
            max_decode_pixels=settings.max_decode_pixels,
            max_source_seconds=settings.max_source_seconds,
            max_source_frames=settings.max_source_frames,
            max_index_samples=settings.max_index_samples,
            threads=settings.decoder_threads,
            keyframes_only=keyframes_only,
            spread=spread,
        )

    def __post_init__(self) -> None:
        if self.container is not None and self.container not in _CONTAINERS:
            raise ValueError(f"unknown container hint {self.container!r}")
        if not self.fps > 0:
            raise ValueError("fps must be positive")
        if (
            self.max_decode_pixels < 1
            or self.analyzeduration < 1
            or self.max_source_frames < 1
            or self.max_index_samples < 1
            or self.threads < 1
            or not self.max_source_seconds > 0
            or self.max_decode_errors < 0
            or (self.spread is not None and self.spread < 1)
        ):
            raise ValueError(
                "max_decode_pixels, analyzeduration, max_source_frames, max_index_samples, "
                "threads, max_source_seconds and spread must be positive, max_decode_errors "
                "not negative"
            )
        check_budget(factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)


@dataclass(kw_only=True)
class DecodeReport:
    """What one :func:`decode_stream` call did.

    ``width``/``height`` are the source's last frame size (its declared size if
    no frame was decoded); ``codec`` and ``container`` are FFmpeg's names.
    ``stopped`` is true when the stop event ended the decode early.
    """

    frames_decoded: int = 0
    frames_emitted: int = 0
    packets: int = 0
    errors_skipped: int = 0
    width: int = 0
    height: int = 0
    codec: str = ""
    container: str = ""
    stopped: bool = False


# -- streams -------------------------------------------------------------------------


def decode_stream(
    source: Source,
    options: DecoderOptions,
    emit: Callable[[Frame], None],
    stop: threading.Event,
    *,
    memory: MemoryNeed | None = None,
) -> DecodeReport:
    """Decode ``source`` until it ends or ``stop`` is set, calling ``emit`` for kept frames.

    Blocking: run it in a worker thread. ``emit`` is called in that thread with
    frames of increasing ``pts`` (seconds from the first decoded frame) whose
    images own their memory and are sized by :func:`target_size` from the
    current source size (recomputed when the resolution changes mid-stream).

    ``stop`` is checked between packets and between reads; a reader blocked in
    a ``ByteFeed`` is released by aborting the feed, which this function then
    reports as a normal stop. A stopped decode returns its report; otherwise:

    * ``VideoUnsupported``: unrecognised container (when probing), no video
      stream, or a codec FFmpeg cannot decode; a non-streamable MP4 (index at
      the end) or an MP4 fragment without its header.
    * ``VideoDecodeError``: data that is not a valid stream of the hinted
      container, a broken header, more than ``max_decode_errors`` undecodable
      packets in a row, or a stream that ends before any frame decodes.
    * ``VideoUnsupported`` also for a probed container that is not one of
      :data:`DEMUXERS` (an HLS playlist, an ffconcat list, a GIF, ...).
    * ``VideoTooLarge``: a declared or decoded frame size above
      ``max_decode_pixels``, or an MP4 header above ``max_header_bytes``.
    * ``VideoTooLong``: more than ``max_source_seconds`` of video or
      ``max_source_frames`` frames, decoded or declared by an MP4 header or,
      in all fragments so far, by a fragmented MP4.
    * Errors raised by ``source.read`` (e.g. ``VideoTimeout`` from a stalled
      ``ByteFeed``) are re-raised as they are if they are ``StreamchatError``
      instances, and wrapped in ``VideoDecodeError`` otherwise.

    ``memory``: told the stream's frame size once it is known (the declared
    size when the container is open; ``max_decode_pixels`` if none is
    declared), before the first packet is decoded, and again when a decoded
    frame shows a new size (the decoder has then made that one frame at it; a
    new size is only known from it). What it raises ends the decode
    (``DecoderBusy``).

    Whatever the outcome, the container is closed and the codec context freed
    (its FFmpeg threads joined) before this returns or raises (:func:`_release`).
    """
    reader = SafeReader(source, stop)
    try:
        report = _decode_stream(reader, options, emit, stop, memory)
    except BaseException as exc:
        _release(exc, reader.failure())
        raise
    _release(reader.failure())
    return report


def _release(*errors: BaseException | None) -> None:
    """Clear the finished frames that ``errors`` (and their causes and contexts) keep alive.

    A traceback keeps every frame it passed through, and each of those its
    caller (``f_back``), and so their locals: the demuxed stream and its codec
    context, whose FFmpeg frame threads (two or three per H.264 decoder) then
    outlived the decode for as long as the exception did. The source's error
    is one: raised by ``ByteFeed.read`` inside FFmpeg's read callback, its
    frames lead back to the demux loop, and the feed and the reader keep it
    (a stopped session's decoders all left their threads running this way).
    Cleared, a traceback still prints its lines; the codec context is freed
    here, in the decoder's thread. A frame still running (this one, and its
    callers) cannot be cleared and ends the walk up its chain.
    """
    pending = [e for e in errors if e is not None]
    seen: set[int] = set()
    while pending:
        error = pending.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        entry = error.__traceback__
        while entry is not None:
            frame: FrameType | None = entry.tb_frame
            while frame is not None:
                try:
                    frame.clear()
                except RuntimeError:  # still running
                    break
                frame = frame.f_back
            entry = entry.tb_next
        pending += [e for e in (error.__cause__, error.__context__) if e is not None]


def _decode_stream(
    reader: SafeReader,
    options: DecoderOptions,
    emit: Callable[[Frame], None],
    stop: threading.Event,
    memory: MemoryNeed | None,
) -> DecodeReport:
    report = DecodeReport()
    try:
        with _open(reader, options) as container:
            _decode_container(container, options, emit, stop, report, memory)
    except (av.error.FFmpegError, StreamchatError) as exc:
        if stop.is_set():
            return _stopped(report)
        # The source's own failure (a timeout, an abort) is the root cause of
        # whatever FFmpeg made of the early end of its input.
        failure = reader.failure()
        if failure is not None:
            raise failure from failure.__cause__  # FFmpeg's view of it is noise
        if isinstance(exc, StreamchatError):
            raise
        raise _ffmpeg_failure(exc, options, opened=bool(report.container)) from exc
    if stop.is_set():
        return _stopped(report)
    failure = reader.failure()
    if failure is not None:
        raise failure
    if report.frames_decoded == 0:
        raise VideoDecodeError("the video ended before any frame could be decoded")
    logger.info(
        "video ended: %d frames decoded, %d kept, %d packets, %d skipped",
        report.frames_decoded,
        report.frames_emitted,
        report.packets,
        report.errors_skipped,
    )
    return report


def _stopped(report: DecodeReport) -> DecodeReport:
    report.stopped = True
    logger.info("video decode stopped after %d frames", report.frames_decoded)
    return report


def _open(reader: SafeReader, options: DecoderOptions) -> InputContainer:
    """Open the container on ``reader``; MP4 headers are first collected whole."""
    hint = _CONTAINERS.get(options.container or "")
    buffer_size = 32_768
    head = reader.read_exactly(8)
    if not head:
        raise VideoDecodeError("the video stream ended before any data arrived")
    reader.unread(head)
    sandbox = _SANDBOX
    if hint in (None, "mp4"):
        header = mp4_header(reader, options.max_header_bytes, required=hint == "mp4")
        if header is None:
            sandbox = {**_SANDBOX, "format_whitelist": _NOT_MP4}
        else:
            hint = "mp4"
            buffer_size = max(buffer_size, len(header))
            declared = mp4_declared(header)
            _check_declared(declared, options)
            walker = Mp4Walker(declared, lambda counts: _check_declared(counts, options))
            reader.watch(walker.feed)
    limits = {
        **sandbox,
        "probesize": str(max(32, options.probesize)),
        "analyzeduration": str(options.analyzeduration),
        "max_pixels": str(options.max_decode_pixels),
    }
    try:
        return av.open(reader, "r", format=hint, options=limits, buffer_size=buffer_size)
    except av.error.ArgumentError as exc:
        # A probed demuxer that is not on the format whitelist; a hinted one always is.
        if hint is None and reader.failure() is None:
            raise VideoUnsupported(
                "unsupported container: send WebM, Matroska, MP4, MPEG-TS or AVI"
            ) from exc
        raise


def _check_declared(declared: Mp4Declared, options: DecoderOptions) -> None:
    """Refuse an MP4 that declares more samples or time than a source may have.

    The index check matters most: FFmpeg allocates an entry per declared
    sample as it reads the count, so it is what bounds an MP4's memory.
    """
    if declared.seconds > options.max_source_seconds:
        raise VideoTooLong(
            f"the video declares {declared.seconds:.0f} s, more than the limit of "
            f"{options.max_source_seconds:g} s per source"
        )
    if (
        declared.video_samples > options.max_source_frames
        or declared.total_samples > options.max_source_frames * _INDEX_SAMPLES_PER_FRAME
    ):
        raise VideoTooLong(
            f"the video declares {declared.video_samples} frames "
            f"({declared.total_samples} samples in all tracks), more than the limit of "
            f"{options.max_source_frames} frames per source"
        )
    if declared.total_samples > options.max_index_samples:
        raise VideoTooLong(
            f"the video's index declares {declared.total_samples} samples in all tracks, more "
            f"than the limit of {options.max_index_samples} per source"
        )


def _decode_container(
    container: InputContainer,
    options: DecoderOptions,
    emit: Callable[[Frame], None],
    stop: threading.Event,
    report: DecodeReport,
    memory: MemoryNeed | None,
) -> None:
    stream = _video_stream(container, options)
    report.container = container.format.name
    report.codec = stream.codec_context.name
    report.width, report.height = stream.width, stream.height
    logger.info(
        "video opened: %s %s %dx%d", report.container, report.codec, stream.width, stream.height
    )
    if memory is not None:
        width, height = stream.width, stream.height
        if width * height <= 0:  # not declared: the largest it may be
            width, height = options.max_decode_pixels, 1
        memory(width, height, bytes_per_pixel(stream.codec_context.format))
    rate = stream.average_rate or stream.guessed_rate
    frames = _Frames(stream, options, report, 1.0 / float(rate) if rate else 1.0 / 30, memory)
    times = _spread_times(container, stream, options)
    if times is None:
        _decode_sampled(container, frames, options, emit, stop)
    else:
        logger.info("decoding only the groups of pictures of %d frames", len(times))
        _decode_planned(container, frames, times, emit, stop)


def _decode_sampled(
    container: InputContainer,
    frames: _Frames,
    options: DecoderOptions,
    emit: Callable[[Frame], None],
    stop: threading.Event,
) -> None:
    """Every frame decoded (key frames only, if so chosen), kept at ``options.fps``."""
    sampler = FrameSampler(options.fps)
    gate = _PacketGate(options.keyframes_only)
    for packet in container.demux(frames.stream):
        if stop.is_set():
            return
        if packet.size:
            frames.report.packets += 1
        if not gate.admit(packet):
            continue
        for frame in frames.decode(packet):
            pts = frames.place(frame)
            if sampler.take(pts):
                emit(frames.convert(frame, pts))


def _decode_planned(
    container: InputContainer,
    frames: _Frames,
    times: list[float],
    emit: Callable[[Frame], None],
    stop: threading.Event,
) -> None:
    """Only the groups of pictures that hold the frames at ``times`` decoded (:mod:`.gops`).

    A group is held (compressed, at most ``_MAX_GROUP_BYTES``: a larger one
    is decoded as it comes) until the next keyframe shows where it ends.
    Before a group that follows a gap, the decoder is drained and flushed,
    so each decoded run starts clean at its keyframe. Only picked frames are
    converted.
    """
    # Only rounding: a frame stored in milliseconds (a 1000 Hz MP4 time scale at
    # 30 fps) is off by up to a 67th of an interval.
    tolerance = frames.interval / 50
    plan = GopPlan(times, tolerance)
    picks = Picks(times, tolerance)
    stream = frames.stream
    base = float(stream.time_base) if stream.time_base else 0.0
    gate = _PacketGate(False)
    group: list[Packet[VideoStream]] = []
    group_times: list[float | None] = []
    group_bytes = 0
    streaming = False  # the current group is being decoded as it comes
    gap = False  # the decoder missed packets since it was last fed
    previous: tuple[VideoFrame, float] | None = None
    kept = False  # ``previous`` was emitted

    def shown(frame: VideoFrame) -> None:
        nonlocal previous, kept
        pts = frames.place(frame)
        time = frames.time(frame)
        for_previous, for_this = picks.offer(pts + times[0] if time is None else time)
        if for_previous and previous is not None and not kept:
            emit(frames.convert(*previous))
        previous, kept = (frame, pts), False
        if for_this:
            emit(frames.convert(frame, pts))
            kept = True

    def feed(packets: list[Packet[VideoStream]] | None) -> None:
        for frame in frames.decode(packets):
            shown(frame)

    def close_group(next_key: float | None, *, end: bool = False) -> None:
        nonlocal gap, streaming, group_bytes
        count = plan.finish(group_times) if end else plan.take(group_times, next_key)
        if streaming:
            streaming = False
        elif count == 0:
            gap = gap or bool(group)
        else:
            if gap:
                feed(None)  # drain what the decoder holds, then start clean
                stream.codec_context.flush_buffers()
            feed(group[:count])
            gap = count < len(group)
        group.clear()
        group_times.clear()
        group_bytes = 0

    for packet in container.demux(stream):
        if stop.is_set():
            return
        if not packet.size:
            break  # the end: what is held is decided below
        frames.report.packets += 1
        if not gate.admit(packet):
            continue
        time = None if packet.pts is None else packet.pts * base
        if packet.is_keyframe and group_times:
            close_group(time)
        group_times.append(time)
        if streaming:
            feed([packet])
            continue
        group.append(packet)
        group_bytes += packet.size
        if group_bytes > _MAX_GROUP_BYTES:
            logger.debug("a group of pictures over %d bytes: decoded as it comes", group_bytes)
            if gap:
                feed(None)
                stream.codec_context.flush_buffers()
                gap = False
            feed(group)
            group.clear()
            streaming = True
    close_group(None, end=True)
    feed(None)
    if picks.finish() and previous is not None and not kept:
        emit(frames.convert(*previous))


class _Frames:
    """One stream's decoding: packets to frames with their errors and bounds, frames placed
    on the session's timeline and converted."""

    def __init__(
        self,
        stream: VideoStream,
        options: DecoderOptions,
        report: DecodeReport,
        interval: float,
        memory: MemoryNeed | None = None,
    ) -> None:
        self.stream = stream
        self.report = report
        self.interval = interval
        self._options = options
        self._timeline = Timeline()
        self._sizes = _SizeCache(options)
        self._errors_in_row = 0
        self._memory = memory
        fmt = stream.codec_context.format
        self._shape = (stream.width, stream.height, fmt.name if fmt is not None else "")

    def decode(
        self, packets: Packet[VideoStream] | list[Packet[VideoStream]] | None
    ) -> list[VideoFrame]:
        """The frames ``packets`` complete (``None`` drains the decoder); bad packets skipped."""
        out: list[VideoFrame] = []
        batch = packets if isinstance(packets, list) else [packets]
        for packet in batch:
            try:
                out += self.stream.decode(packet)
            except av.error.FFmpegError as exc:
                _check_refusal(exc, self.stream, self._options.max_decode_pixels)
                self.report.errors_skipped += 1
                self._errors_in_row += 1
                logger.debug("skipped an undecodable packet: %s", exc)
                if self._errors_in_row > self._options.max_decode_errors:
                    raise VideoDecodeError(
                        f"the video is corrupt: {self._errors_in_row} packets in a row "
                        "failed to decode"
                    ) from exc
                continue
            self._errors_in_row = 0
        return out

    def time(self, frame: VideoFrame) -> float | None:
        """The frame's source time: its timestamp in the stream's time base.

        Not ``frame.time``: frames drained from the decoder at the end carry no
        time base in PyAV, and their ``time`` is NaN.
        """
        base = self.stream.time_base
        return None if frame.pts is None or base is None else float(frame.pts * base)

    def place(self, frame: VideoFrame) -> float:
        """The frame's time in seconds from the first, once counted against the bounds."""
        report, options = self.report, self._options
        if report.frames_decoded >= options.max_source_frames:
            raise VideoTooLong(
                f"the video has more than {options.max_source_frames} frames, the limit per source"
            )
        report.frames_decoded += 1
        report.width, report.height = frame.width, frame.height
        if self._memory is not None:
            shape = (frame.width, frame.height, frame.format.name)
            if shape != self._shape:  # a new size or format: more memory, maybe
                self._shape = shape
                self._memory(frame.width, frame.height, bytes_per_pixel(frame.format))
        pts = self._timeline.place(self.time(frame), self.interval)
        if pts > options.max_source_seconds:
            raise VideoTooLong(
                f"the video is longer than {options.max_source_seconds:g} s, the limit per source"
            )
        return pts

    def convert(self, frame: VideoFrame, pts: float) -> Frame:
        """The frame as the model gets it: upright, resized, owning its memory."""
        turn, size = self._sizes.shape(frame)
        self.report.frames_emitted += 1
        return Frame(pts=pts, image=_to_image(frame, size, turn))


def _spread_times(
    container: InputContainer, stream: VideoStream, options: DecoderOptions
) -> list[float] | None:
    """The source times of the frames to keep, when only a spread is wanted and its length
    is declared: an MP4's index gives its first frame, duration and frame count."""
    if options.spread is None or not {"mov", "mp4"} & set(container.format.name.split(",")):
        return None
    if not (
        stream.time_base and stream.start_time is not None and stream.duration and stream.frames
    ):
        return None
    base = float(stream.time_base)
    first = stream.start_time * base
    duration = stream.duration * base
    last = first + duration - duration / stream.frames
    return spread_times(first, last, options.spread, options.fps)


class _PacketGate:
    """Which packets reach the decoder.

    Non-key packets before the first keyframe are dropped (up to a bound, for
    streams that never flag one): a decoder joined mid-GOP fails (VP8/VP9) or
    shows garbage until a keyframe. With ``keyframes_only``, all non-key
    packets are dropped. Empty packets (the end-of-stream flush) always pass.
    """

    def __init__(self, keyframes_only: bool) -> None:
        self._keyframes_only = keyframes_only
        self._skips_left = _MAX_LEADING_SKIPS

    def admit(self, packet: Packet[VideoStream]) -> bool:
        if packet.is_keyframe or not packet.size:
            self._skips_left = 0
            return True
        if self._keyframes_only:
            return False
        if self._skips_left > 0:
            self._skips_left -= 1
            return False
        return True


def _video_stream(container: InputContainer, options: DecoderOptions) -> VideoStream:
    """The first video stream, prepared for decoding; unsupported or too large ones refused."""
    if not container.streams.video:
        raise VideoUnsupported("the container has no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise VideoUnsupported(f"no decoder for the video codec {stream.codec.name!r}")
    _check_pixels(stream.width, stream.height, options.max_decode_pixels)
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = options.threads
    # The decoder itself enforces the limit, also after a mid-stream size change.
    stream.codec_context.options = {"max_pixels": str(options.max_decode_pixels)}
    return stream


def bytes_per_pixel(fmt: VideoFormat | None) -> float:
    """Bytes a pixel of ``fmt`` takes in memory over all its planes (1.5 for 8-bit 4:2:0).

    Samples over 8 bits take 2 bytes; chroma planes count at their subsampled
    size. Unknown (no format yet): 8-bit 4:2:0, the common case.
    """
    if fmt is None:
        return 1.5
    chroma = fmt.chroma_width(64) * fmt.chroma_height(64) / (64 * 64)
    return sum((1 if c.bits <= 8 else 2) * (chroma if c.is_chroma else 1.0) for c in fmt.components)


def _check_refusal(exc: av.error.FFmpegError, stream: VideoStream, limit: int) -> None:
    """After a decode error: raise ``VideoTooLarge`` if the decoder refused a frame size.

    With ``max_pixels`` in force, H.264 fails with "invalid data" but shows
    the refused size in its context; VP8/VP9 fail with EINVAL (an
    ``ArgumentError``, which corrupt data never caused in our tests) and keep
    no size at all.
    """
    context = stream.codec_context
    _check_pixels(context.width, context.height, limit)
    if isinstance(exc, av.error.ArgumentError):
        raise VideoTooLarge(
            f"the decoder refused the video's frame size (limit: {limit} pixels per frame)"
        ) from exc


def _check_pixels(width: int, height: int, limit: int) -> None:
    if width * height > limit:
        raise VideoTooLarge(
            f"video frames of {width}x{height} exceed the limit of {limit} pixels per frame"
        )


class _SizeCache:
    """How each frame is shown and sized: recomputed only when the source changes.

    A frame's display matrix (a phone's portrait video is stored landscape
    with a -90 degree matrix) decides its orientation; the model's size is
    computed from the picture as shown, and the frame is resized to that
    size as stored, then turned upright by a view.
    """

    def __init__(self, options: DecoderOptions) -> None:
        self._options = options
        self._source: tuple[int, int, bytes | None] = (0, 0, None)
        self._shape: tuple[Orientation, tuple[int, int]] = (UPRIGHT, (0, 0))

    def shape(self, frame: VideoFrame) -> tuple[Orientation, tuple[int, int]]:
        """The frame's orientation and the ``(width, height)`` to resize it to, as stored."""
        matrix = frame.side_data.get(SideDataType.DISPLAYMATRIX)  # type: ignore[call-overload]
        source = (frame.width, frame.height, None if matrix is None else bytes(matrix))
        if source != self._source:
            _check_pixels(frame.width, frame.height, self._options.max_decode_pixels)
            turn = UPRIGHT
            if source[2] is not None and len(source[2]) == 36:
                turn = orientation(struct.unpack("<9i", source[2]))
            width, height = target_size(
                *turn.displayed(frame.width, frame.height),
                factor=self._options.factor,
                min_pixels=self._options.min_pixels,
                max_pixels=self._options.max_pixels,
            )
            if self._source[:2] != (0, 0) and self._source[:2] != source[:2]:
                logger.info(
                    "video size changed from %dx%d to %dx%d", *self._source[:2], *source[:2]
                )
            if turn != UPRIGHT:
                logger.info("video shown turned %s", turn)
            self._source = source
            self._shape = (turn, turn.stored(width, height))
        return self._shape


def _to_image(
    frame: VideoFrame, size: tuple[int, int], turn: Orientation = UPRIGHT
) -> npt.NDArray[np.uint8]:
    """RGB at ``size`` (as stored), resized inside swscale, upright, copied once.

    One thread: PyAV makes a scaler per frame, and swscale's automatic count
    started (and ended) a pool of threads for each, for a picture of at most
    ``max_pixels``.

    ``to_ndarray`` returns a view of PyAV's converted frame, with row padding
    unless ``width * 3`` is a multiple of the row alignment; turning it
    upright is another view: the one copy makes it contiguous and independent
    of any FFmpeg buffer.
    """
    width, height = size
    view: npt.NDArray[np.uint8] = frame.to_ndarray(  # type: ignore[assignment]  # rgb24
        format="rgb24", width=width, height=height, interpolation=_INTERPOLATION, threads=1
    )
    return np.array(turn.apply(view), order="C", copy=True)


def _ffmpeg_failure(
    exc: av.error.FFmpegError, options: DecoderOptions, *, opened: bool
) -> StreamchatError:
    """A client-facing error for an FFmpeg error raised while opening or demuxing.

    Once the container is open its format is known: invalid data from then on
    is corruption or truncation (a cut MP4 fragment), not an unknown format.
    """
    if isinstance(exc, av.error.EOFError):
        return VideoDecodeError("the video ended before a valid header was found")
    if opened:
        return VideoDecodeError(f"the video is corrupt or truncated: {exc.strerror}")
    if isinstance(exc, av.error.InvalidDataError) and options.container is None:
        return VideoUnsupported("unrecognised video format (or corrupt data)")
    if isinstance(exc, av.error.InvalidDataError):
        return VideoDecodeError(f"the data is not a valid {options.container} video stream")
    return VideoDecodeError(f"the video could not be read (corrupt or truncated): {exc.strerror}")


# -- images --------------------------------------------------------------------------

_IMAGE_FORMATS = {b"\x89PNG\r\n\x1a\n": "png_pipe", b"\xff\xd8\xff": "jpeg_pipe"}


def _image_demuxer(data: bytes) -> str | None:
    """The one demuxer an image may be read with, from its signature."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp_pipe"
    return next((f for magic, f in _IMAGE_FORMATS.items() if data.startswith(magic)), None)


MAX_IMAGE_SCANS = 256
"""The most JPEG scans (``SOS`` markers) an image may hold; :func:`decode_image` refuses more.

A progressive JPEG is decoded scan by scan, and every scan walks all of the
picture's blocks however few bytes it takes: a 4 MiB file of 20-byte scans
(about 200,000 of them) over 4096x2304 took a core 28 to 60 s. Photos have 1
(baseline) to about 10 (libjpeg's and mozjpeg's progressive scripts). The count
is of every ``FF DA`` byte pair in the message, an upper bound on the scans
FFmpeg can meet whatever the segments say (no parser to disagree with); it
also counts pairs in metadata and in data after the picture (a motion
photo's video holds one per 64 KiB on average, 64 in a 4 MiB message), hence
the room. At this limit a picture of the largest size decodes in about 0.3 s
of CPU (4 components, every scan walking every block).
"""


def decode_image(
    data: bytes,
    *,
    factor: int = DEFAULT_FACTOR,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS,
    max_scans: int = MAX_IMAGE_SCANS,
) -> npt.NDArray[np.uint8]:
    """A JPEG, PNG or WebP image as an owned ``(H, W, 3)`` uint8 RGB array, resized.

    Sized by :func:`target_size`. An animated WebP is not read (FFmpeg's decoder
    has no animation): ``VideoDecodeError``.

    Raises ``VideoUnsupported`` for anything else, ``VideoTooLarge`` for more
    than ``max_decode_pixels`` (FFmpeg refuses such a picture before
    allocating it; a PNG or JPEG is refused from its header first) or a JPEG
    of more than ``max_scans`` scans (refused before
    decoding: :data:`MAX_IMAGE_SCANS`), ``VideoDecodeError`` for corrupt data.
    A truncated JPEG may decode with its missing part grey, as browsers show
    it. EXIF orientation is not applied. One thread decodes, so an image
    costs at most one core; the codec context is freed before this returns.
    """
    fmt = _image_demuxer(data)
    if fmt is None:
        raise VideoUnsupported("the image is not a JPEG, PNG or WebP file")
    declared = _declared_image_size(data)
    if declared is not None:  # FFmpeg would refuse (or allocate) only once it decodes
        _check_pixels(*declared, max_decode_pixels)
    if fmt == "jpeg_pipe":
        _check_scans(data, max_scans)
    try:
        return _decode_image(
            data,
            fmt,
            factor=factor,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            max_decode_pixels=max_decode_pixels,
        )
    except BaseException as exc:
        _release(exc)
        raise


def _check_scans(data: bytes, limit: int) -> None:
    """Refuse a JPEG with more than ``limit`` scans, counted as its ``FF DA`` byte pairs."""
    scans = data.count(b"\xff\xda")
    if scans > limit:
        raise VideoTooLarge(
            f"the JPEG image has {scans} scans, more than the limit of {limit}: "
            "re-encode it (a photo has at most about 10)"
        )


def _decode_image(
    data: bytes,
    fmt: str,
    *,
    factor: int,
    min_pixels: int,
    max_pixels: int,
    max_decode_pixels: int,
) -> npt.NDArray[np.uint8]:
    limits = {"max_pixels": str(max_decode_pixels)}
    sandbox = {"format_whitelist": fmt, "protocol_whitelist": ""}
    try:
        with av.open(io.BytesIO(data), "r", format=fmt, options={**sandbox, **limits}) as container:
            if not container.streams.video:
                raise VideoDecodeError("the image could not be decoded")
            stream = container.streams.video[0]
            _check_pixels(stream.width, stream.height, max_decode_pixels)
            stream.codec_context.options = limits
            stream.codec_context.thread_count = 1
            for frame in container.decode(stream):
                _check_pixels(frame.width, frame.height, max_decode_pixels)
                size = target_size(
                    frame.width,
                    frame.height,
                    factor=factor,
                    min_pixels=min_pixels,
                    max_pixels=max_pixels,
                )
                return _to_image(frame, size)
    except av.error.ArgumentError as exc:  # EINVAL: the decoder refused the size
        raise VideoTooLarge(f"the image exceeds the limit of {max_decode_pixels} pixels") from exc
    except av.error.FFmpegError as exc:
        raise VideoDecodeError("the image is corrupt or truncated") from exc
    raise VideoDecodeError("the image contains no picture")


# JPEG frame headers: SOF0-SOF15 but DHT (C4), JPG (C8) and DAC (CC).
_JPEG_FRAME_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD9)}  # TEM, RSTn, SOI: no length follows


def _declared_image_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a PNG's IHDR or a JPEG's first frame header, if found."""
    if data.startswith(b"\x89PNG") and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack_from(">II", data, 16)
        return width, height
    offset = 2
    while offset + 4 <= len(data) and data[offset] == 0xFF:
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if marker in _JPEG_STANDALONE_MARKERS:
            offset += 2
            continue
        if marker in _JPEG_FRAME_MARKERS and offset + 9 <= len(data):
            height, width = struct.unpack_from(">HH", data, offset + 5)
            return width, height
        if marker == 0xDA:  # entropy-coded data follows: no frame header before it
            return None
        (length,) = struct.unpack_from(">H", data, offset + 2)
        offset += 2 + length
    return None
