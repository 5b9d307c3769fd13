"""The PyAV decoder: resize rule, sampling, and real decoding of generated media.

Videos are generated with PyAV (``tests/support/media.py``); each frame shows its own
frame number, so a test can check which source frame a decoded image is.
Pushed streams go through a real ``ByteFeed`` in arbitrary-boundary chunks
from the event loop while ``decode_stream`` runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import io
import math
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest

import streamchat.media.decoder
from streamchat.errors import (
    VideoDecodeError,
    VideoTimeout,
    VideoTooLarge,
    VideoTooLong,
    VideoUnsupported,
)
from streamchat.ingest.feed import ByteFeed, FeedClosed
from streamchat.media.decoder import (
    MAX_IMAGE_SCANS,
    DecodeReport,
    DecoderOptions,
    decode_image,
    decode_stream,
)
from streamchat.media.sampling import FrameSampler, target_size
from streamchat.window import Frame
from tests.support.hostile import mp4_with_edits, scan_bomb_jpeg
from tests.support.media import (
    chunks,
    corrupt_payloads,
    encode_image,
    encode_video,
    frame_index,
    patch_h264_size,
    patch_jpeg_size,
    patch_mp4_header,
    patch_png_size,
)

SRC_FPS = 10
ImageFormat = Literal["png", "jpeg"]


@functools.cache
def _video(**kwargs: Any) -> bytes:
    """Encoded once per distinct set of arguments for the whole test session."""
    kwargs.setdefault("fps", SRC_FPS)
    data: bytes = encode_video(**kwargs)
    return data


def _decode_bytes(data: bytes, **options: Any) -> tuple[DecodeReport, list[Frame]]:
    """Decode a whole file-like source in this thread."""
    frames: list[Frame] = []
    report = decode_stream(io.BytesIO(data), DecoderOptions(**options), frames.append, _never())
    return report, frames


def _never() -> threading.Event:
    return threading.Event()


async def _decode_pushed(
    data: bytes,
    options: DecoderOptions,
    *,
    chunk: int = 997,
    seed: int | None = 1,
    max_bytes: int = 4096,
) -> tuple[DecodeReport, list[Frame]]:
    """Push ``data`` in odd chunks through a small ByteFeed into a decoder thread.

    The small feed makes the producer wait for the decoder (backpressure) many
    times per stream. If the decoder fails, the feed is aborted so the
    producer stops, and the decoder's error is raised.
    """
    feed = ByteFeed(max_bytes=max_bytes, read_timeout=10)
    frames: list[Frame] = []
    decoding = asyncio.ensure_future(
        asyncio.to_thread(decode_stream, feed, options, frames.append, _never())
    )
    decoding.add_done_callback(lambda _: feed.abort())
    try:
        for piece in chunks(data, chunk, seed=seed):
            await feed.put(piece)
        feed.close()
    except FeedClosed:
        pass  # the decoder finished early; its outcome follows
    report = await asyncio.wait_for(decoding, timeout=20)
    return report, frames


def _qwen_smart_resize(
    height: int, width: int, factor: int, min_p: int, max_p: int
) -> tuple[int, int]:
    """The reference (Qwen2-VL ``smart_resize``), returning ``(height, width)``."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_p:
        beta = math.sqrt((height * width) / max_p)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_p:
        beta = math.sqrt(min_p / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# -- target_size ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height"),
    [(1920, 1080), (1280, 720), (640, 480), (160, 120), (3840, 2160), (720, 1280), (100, 60)],
)
@pytest.mark.parametrize(("min_p", "max_p"), [(3136, 200704), (128 * 784, 768 * 784)])
def test_target_size_matches_the_qwen_reference(
    width: int, height: int, min_p: int, max_p: int
) -> None:
    """For ordinary shapes the result is exactly Qwen2-VL's smart_resize (as width, height)."""
    h, w = _qwen_smart_resize(height, width, 28, min_p, max_p)
    assert target_size(width, height, factor=28, min_pixels=min_p, max_pixels=max_p) == (w, h)


def test_target_size_known_value() -> None:
    """1080p fits a 448x448 budget as 588x336 (scale exactly 448/1440, so 336 = 12 x 28)."""
    assert target_size(1920, 1080, factor=28, min_pixels=3136, max_pixels=448 * 448) == (588, 336)


def test_target_size_properties_hold_for_any_shape() -> None:
    """Multiples of factor, never above max_pixels, at least min_pixels with room, aspect kept."""
    rng = random.Random(7)
    for _ in range(3000):
        factor = rng.choice([14, 28, 32])
        max_p = rng.randint(factor * factor, 2_000_000)
        min_p = rng.randint(1, max_p)
        width = rng.choice([rng.randint(1, 64), rng.randint(1, 8000)])
        height = rng.choice([rng.randint(1, 64), rng.randint(1, 8000)])
        w, h = target_size(width, height, factor=factor, min_pixels=min_p, max_pixels=max_p)
        assert w % factor == 0 and h % factor == 0 and w >= factor and h >= factor
        assert w * h <= max_p
        aspect = max(width, height) / min(width, height)
        if max_p >= 4 * min_p and aspect <= 50:
            assert w * h >= min_p
        if min(w, h) >= 8 * factor:  # rounding error is at most factor/2 per side
            assert abs(math.log((w / h) / (width / height))) < 0.15


def test_target_size_refuses_impossible_budgets() -> None:
    """Empty pictures and budgets that cannot hold one factor x factor block are errors."""
    for args in [(0, 10, 28, 1, 10**6), (10, 10, 28, 1, 27 * 27), (10, 10, 28, 5000, 4000)]:
        width, height, factor, min_p, max_p = args
        with pytest.raises(ValueError):
            target_size(width, height, factor=factor, min_pixels=min_p, max_pixels=max_p)


# -- FrameSampler --------------------------------------------------------------------


def _kept(sampler: FrameSampler, times: list[float]) -> list[float]:
    return [t for t in times if sampler.take(t)]


def test_sampler_keeps_every_nth_frame_from_a_non_zero_start() -> None:
    """30 fps sampled at 2 fps keeps one frame per half second, from the first frame on."""
    times = [1000.0 + i / 30 for i in range(90)]
    assert _kept(FrameSampler(2), times) == pytest.approx([1000.0 + k / 2 for k in range(6)])


def test_sampler_keeps_the_exact_average_rate_for_a_non_multiple_source() -> None:
    """25 fps sampled at 3 fps gives 3 fps on average (no drift), spacing within a source frame."""
    kept = _kept(FrameSampler(3), [i / 25 for i in range(250)])
    assert len(kept) == 30
    assert min(np.diff(kept)) >= 1 / 3 - 1 / 25 - 1e-9


def test_sampler_restarts_after_a_gap() -> None:
    """After a gap the next frame is kept, and the following ones are spaced a full interval."""
    times = [i / 30 for i in range(30)] + [10.27 + i / 30 for i in range(60)]
    kept = _kept(FrameSampler(2), times)
    assert kept[2] == pytest.approx(10.27)
    assert min(np.diff(kept[2:])) >= 0.5 - 1e-9
    assert len(kept) == 2 + 4


def test_sampler_tolerates_jitter() -> None:
    """Timestamps jittering by a few ms still yield the target rate and spacing."""
    rng = random.Random(3)
    times = sorted(i / 30 + rng.uniform(-0.004, 0.004) for i in range(300))
    kept = _kept(FrameSampler(2), times)
    assert len(kept) in (19, 20, 21)
    assert min(np.diff(kept)) >= 0.5 - 1 / 30 - 0.008


def test_sampler_keeps_every_frame_of_a_slow_source_once() -> None:
    """A source slower than fps keeps all its frames; a repeated timestamp is kept once."""
    assert _kept(FrameSampler(2), [0.0, 1.0, 1.0, 2.0, 3.0]) == [0.0, 1.0, 2.0, 3.0]


def test_sampler_refuses_a_non_positive_rate() -> None:
    """fps must be positive."""
    with pytest.raises(ValueError):
        FrameSampler(0)


# -- decoding pushed streams ------------------------------------------------------------

PAIRS = [
    ("webm", "vp8", "webm"),
    ("webm", "vp9", "webm"),
    ("matroska", "h264", "matroska"),
    ("mp4", "h264", "mp4"),
    ("mp4-faststart", "h264", None),
    ("mpegts", "h264", "mpegts"),
]


@pytest.mark.parametrize(("container", "codec", "hint"), PAIRS)
async def test_pushed_stream_decodes_to_sampled_resized_owned_frames(
    container: str, codec: str, hint: str | None
) -> None:
    """Odd-sized chunks through a ByteFeed give fps*seconds frames of the right picture and size."""
    data = _video(container=container, codec=codec, width=320, height=240, seconds=3)
    options = DecoderOptions(fps=2, container=hint, max_pixels=200_704)
    report, frames = await _decode_pushed(data, options)
    assert len(frames) == 6
    assert [f.pts for f in frames] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    expected = target_size(320, 240, factor=28, min_pixels=options.min_pixels, max_pixels=200_704)
    for frame in frames:
        assert frame.size == expected
        assert frame_index(frame.image) == round(frame.pts * SRC_FPS)
        assert frame.image.dtype == np.uint8 and frame.image.flags.c_contiguous
        assert frame.image.flags.owndata and frame.image.base is None
    assert (report.frames_decoded, report.frames_emitted) == (30, 6)
    assert (report.width, report.height, report.codec) == (320, 240, codec)
    assert report.packets == 30 and report.errors_skipped == 0 and not report.stopped


async def test_timestamps_start_at_zero_whatever_the_source_start() -> None:
    """A stream whose clock starts at 5 s yields frames from pts 0."""
    data = _video(container="webm", codec="vp8", start_pts=5.0, first_index=50)
    _, frames = await _decode_pushed(data, DecoderOptions(fps=2, container="webm"))
    assert frames[0].pts == 0.0
    assert [frame_index(f.image) for f in frames] == [50, 55, 60, 65]


@pytest.mark.parametrize(("container", "codec"), [("webm", "vp9"), ("mpegts", "h264")])
def test_keyframes_only_decodes_just_the_keyframes(container: str, codec: str) -> None:
    """With keyframes_only, only keyframes (every 5th frame here) are decoded and kept."""
    data = _video(container=container, codec=codec, seconds=3, gop=5)
    report, frames = _decode_bytes(data, fps=10, keyframes_only=True)
    assert report.frames_decoded == 6
    assert [frame_index(f.image) for f in frames] == [0, 5, 10, 15, 20, 25]
    assert [f.pts for f in frames] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])


async def test_resolution_change_mid_stream_resizes_to_the_new_target() -> None:
    """Two MPEG-TS segments of different sizes: target size follows, pts run on."""
    small = _video(container="mpegts", codec="h264", width=160, height=120, seconds=2)
    large = _video(
        container="mpegts", codec="h264", width=640, height=360, seconds=2, start_pts=2.0,
        first_index=20,
    )  # fmt: skip
    report, frames = await _decode_pushed(small + large, DecoderOptions(fps=2, container="mpegts"))
    sizes = [f.size for f in frames]
    opts = DecoderOptions()
    budget = {"factor": 28, "min_pixels": opts.min_pixels, "max_pixels": opts.max_pixels}
    assert sizes == [target_size(160, 120, **budget)] * 4 + [target_size(640, 360, **budget)] * 4
    assert [frame_index(f.image) for f in frames] == [0, 5, 10, 15, 20, 25, 30, 35]
    assert [f.pts for f in frames] == pytest.approx([0.5 * k for k in range(8)])
    assert (report.width, report.height) == (640, 360)


def test_a_clock_reset_continues_the_timeline() -> None:
    """Concatenated recordings that both start at 0 give increasing pts, not a jump back."""
    first = _video(container="mpegts", codec="h264", seconds=2)
    second = _video(container="mpegts", codec="h264", seconds=2, first_index=20)
    _, frames = _decode_bytes(first + second, fps=2)
    assert [frame_index(f.image) for f in frames] == [0, 5, 10, 15, 20, 25, 30, 35]
    assert [f.pts for f in frames] == pytest.approx([0.5 * k for k in range(8)])


# -- MP4 read granularity ------------------------------------------------------------------


class _Trickle:
    """A source that returns at most ``step`` bytes per read, and a short read at ``cut``."""

    def __init__(self, data: bytes, *, step: int = 1 << 30, cut: int = -1) -> None:
        self._data = data
        self._pos = 0
        self._step = step
        self._cut = cut

    def read(self, n: int = -1) -> bytes:
        end = self._pos + min(n, self._step)
        if self._pos < self._cut < end:
            end = self._cut
        data = self._data[self._pos : end]
        self._pos += len(data)
        return data


@pytest.mark.parametrize("container", ["mp4", "mp4-faststart"])
def test_mp4_decodes_whatever_the_read_boundaries(container: str) -> None:
    """MP4 survives 1-byte reads and a read boundary inside its video sample entry.

    Regression: FFmpeg seeks back within the sample entry, which a non-seekable
    PyAV reader cannot serve across a buffer refill.
    """
    data = _video(container=container, codec="h264", seconds=1)
    inside_sample_entry = data.index(b"avc1") + 40
    for source in (_Trickle(data, step=1), _Trickle(data, cut=inside_sample_entry)):
        report = decode_stream(source, DecoderOptions(), lambda _: None, _never())
        assert report.frames_decoded == 10


def test_mp4_with_its_index_at_the_end_is_unsupported() -> None:
    """A plain MP4 (moov after mdat) cannot be streamed: a clear VideoUnsupported."""
    data = _video(container="mp4-plain", codec="h264", seconds=1)
    with pytest.raises(VideoUnsupported, match="index"):
        _decode_bytes(data)


def test_mp4_fragment_without_its_header_is_unsupported() -> None:
    """Joining fragmented MP4 at a fragment (no moov) is refused clearly."""
    data = _video(container="mp4", codec="h264", seconds=2)
    with pytest.raises(VideoUnsupported):
        _decode_bytes(data[data.index(b"moof") - 4 :], container="mp4")


def test_an_oversized_mp4_header_is_refused_before_parsing() -> None:
    """An MP4 index larger than max_header_bytes is VideoTooLarge (a cheap memory bomb)."""
    data = _video(container="mp4-faststart", codec="h264", seconds=2)
    with pytest.raises(VideoTooLarge):
        _decode_bytes(data, max_header_bytes=200)


# -- hostile and broken input --------------------------------------------------------------


@pytest.mark.parametrize(
    ("hint", "error"),
    [
        (None, VideoUnsupported),
        ("webm", VideoDecodeError),
        ("matroska", VideoDecodeError),
        ("mp4", VideoDecodeError),
        ("mpegts", VideoDecodeError),
    ],
)
def test_random_bytes_fail_fast_with_a_typed_error(hint: str | None, error: type) -> None:
    """Garbage is unrecognised when probing, and invalid data under a container hint."""
    junk = random.Random(0).randbytes(100_000)
    start = time.monotonic()
    with pytest.raises(error):
        _decode_bytes(junk, container=hint)
    assert time.monotonic() - start < 2


def test_empty_stream_is_a_decode_error() -> None:
    """A source that ends before any byte says so."""
    with pytest.raises(VideoDecodeError, match="before any data"):
        _decode_bytes(b"")


@pytest.mark.parametrize(("container", "codec", "hint"), PAIRS)
def test_truncated_header_is_a_decode_error(container: str, codec: str, hint: str | None) -> None:
    """A stream cut inside its header fails with VideoDecodeError, not an FFmpeg error."""
    data = _video(container=container, codec=codec, seconds=1)
    with pytest.raises(VideoDecodeError):
        _decode_bytes(data[:100], container=hint)


def test_truncated_stream_keeps_the_frames_before_the_cut() -> None:
    """Cut mid-stream, the decode ends normally with the frames that arrived."""
    data = _video(container="matroska", codec="h264", seconds=3)
    report, frames = _decode_bytes(data[: len(data) // 2], fps=10)
    assert 5 <= report.frames_decoded < 30
    assert [frame_index(f.image) for f in frames] == list(range(len(frames)))


@pytest.mark.parametrize(
    ("container", "codec"), [("webm", "vp8"), ("webm", "vp9"), ("matroska", "h264")]
)
def test_undecodable_packets_are_skipped_up_to_a_bound(container: str, codec: str) -> None:
    """Packets the decoder rejects are skipped and counted; too many in a row fail the decode."""
    data = corrupt_payloads(_video(container=container, codec=codec, seconds=3), first=5)
    report, _ = _decode_bytes(data, max_decode_errors=100)
    assert report.frames_decoded == 5 and report.errors_skipped > 0
    start = time.monotonic()
    with pytest.raises(VideoDecodeError, match="corrupt"):
        _decode_bytes(data, max_decode_errors=10)
    assert time.monotonic() - start < 2


@pytest.mark.parametrize(
    ("container", "codec"), [("mpegts", "h264"), ("webm", "vp9"), ("webm", "vp8")]
)
def test_frames_above_max_decode_pixels_are_too_large(container: str, codec: str) -> None:
    """A declared size above the limit is VideoTooLarge before anything is decoded."""
    data = _video(container=container, codec=codec, width=640, height=480, seconds=1)
    frames: list[Frame] = []
    with pytest.raises(VideoTooLarge):
        decode_stream(
            io.BytesIO(data), DecoderOptions(max_decode_pixels=100_000), frames.append, _never()
        )
    assert frames == []


async def test_a_switch_above_max_decode_pixels_mid_stream_is_too_large() -> None:
    """A stream growing beyond the limit mid-way: VideoTooLarge, after its good frames."""
    small = _video(container="mpegts", codec="h264", width=160, height=120, seconds=2)
    large = _video(
        container="mpegts", codec="h264", width=640, height=480, seconds=2, start_pts=2.0
    )
    options = DecoderOptions(fps=2, container="mpegts", max_decode_pixels=100_000)
    frames: list[Frame] = []
    with pytest.raises(VideoTooLarge):
        decode_stream(io.BytesIO(small + large), options, frames.append, _never())
    assert len(frames) == 4


# -- stopping and failing sources ------------------------------------------------------------


def test_stop_event_ends_the_decode_with_a_stopped_report() -> None:
    """Setting stop (here from emit) ends the decode between packets; no error is raised."""
    stop = threading.Event()
    frames: list[Frame] = []

    def emit(frame: Frame) -> None:
        frames.append(frame)
        stop.set()

    data = _video(container="webm", codec="vp8", seconds=3)
    report = decode_stream(io.BytesIO(data), DecoderOptions(fps=10), emit, stop)
    assert report.stopped and len(frames) == 1 and report.frames_decoded < 30


@pytest.mark.parametrize(("container", "codec"), [("mpegts", "h264"), ("mp4", "h264")])
async def test_first_frame_comes_before_the_stream_ends(container: str, codec: str) -> None:
    """On a live feed the first frame is emitted while the stream is still open.

    Regression: with analyzeduration 0 (FFmpeg's "default", 5 s), H.264 in
    MPEG-TS or fragmented MP4 waited for 5 s of media before the first frame.
    """
    data = _video(container=container, codec=codec, seconds=3)
    feed = ByteFeed(max_bytes=1 << 20, read_timeout=30)
    stop = threading.Event()
    first_frame = threading.Event()
    feed.put_nowait(data[: len(data) // 2])  # and then nothing: a live client mid-stream
    decoding = asyncio.ensure_future(
        asyncio.to_thread(decode_stream, feed, DecoderOptions(), lambda _: first_frame.set(), stop)
    )
    try:
        assert await asyncio.to_thread(first_frame.wait, 10)
    finally:
        stop.set()
        feed.abort()
        await asyncio.wait_for(decoding, timeout=10)


async def test_stop_and_abort_release_a_decoder_waiting_on_a_live_feed() -> None:
    """A decoder blocked on a live feed returns a stopped report once stopped and aborted."""
    data = _video(container="webm", codec="vp9", seconds=3)
    feed = ByteFeed(max_bytes=1 << 20, read_timeout=30)
    stop = threading.Event()
    first_frame = threading.Event()
    feed.put_nowait(data[: len(data) // 2])  # and then nothing: a stalled live client
    decoding = asyncio.ensure_future(
        asyncio.to_thread(decode_stream, feed, DecoderOptions(), lambda _: first_frame.set(), stop)
    )
    try:
        assert await asyncio.to_thread(first_frame.wait, 10)
    finally:
        stop.set()
        feed.abort()
        report = await asyncio.wait_for(decoding, timeout=10)
    assert report.stopped


async def test_a_stalled_feed_ends_the_decode_with_video_timeout() -> None:
    """No bytes within the read timeout: decode_stream raises VideoTimeout."""
    data = _video(container="webm", codec="vp8", seconds=3)
    feed = ByteFeed(max_bytes=1 << 20, read_timeout=0.2)
    feed.put_nowait(data[: len(data) // 2])
    frames: list[Frame] = []
    with pytest.raises(VideoTimeout):
        await asyncio.to_thread(decode_stream, feed, DecoderOptions(), frames.append, _never())
    assert frames


def test_a_failing_source_becomes_a_decode_error() -> None:
    """An OSError from the source is reported as VideoDecodeError, caused by the OSError."""

    class Broken:
        def read(self, n: int = -1) -> bytes:
            raise OSError("disk on fire")

    with pytest.raises(VideoDecodeError) as raised:
        decode_stream(Broken(), DecoderOptions(), lambda _: None, _never())
    assert isinstance(raised.value.__cause__, OSError)


def test_options_refuse_unknown_containers_and_bad_budgets() -> None:
    """DecoderOptions validates its container hint and resize budget up front."""
    with pytest.raises(ValueError):
        DecoderOptions(container="gif")
    with pytest.raises(ValueError):
        DecoderOptions(min_pixels=10_000, max_pixels=5_000)


# -- images ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_decode_image_resizes_to_the_budget_in_an_owned_array(fmt: ImageFormat) -> None:
    """JPEG and PNG decode to the target size, the right picture, in memory of their own."""
    image = decode_image(
        encode_image(fmt, width=320, height=240, index=77),
        factor=28,
        min_pixels=3136,
        max_pixels=200_704,
    )
    assert image.shape == (252, 308, 3) and image.dtype == np.uint8
    assert image.flags.owndata and image.flags.c_contiguous
    assert frame_index(image) == 77


@pytest.mark.parametrize("data", [b"", b"hello world" * 10, b"GIF89a" + bytes(100)])
def test_decode_image_refuses_other_formats(data: bytes) -> None:
    """Anything but JPEG/PNG is VideoUnsupported."""
    with pytest.raises(VideoUnsupported):
        decode_image(data)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_decode_image_reports_corrupt_data(fmt: ImageFormat) -> None:
    """A JPEG/PNG signature followed by garbage is VideoDecodeError."""
    data = encode_image(fmt)
    with pytest.raises(VideoDecodeError):
        decode_image(data[:8] + random.Random(1).randbytes(500))


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_decode_image_refuses_pictures_above_the_limit(fmt: ImageFormat) -> None:
    """An image larger than max_decode_pixels is VideoTooLarge."""
    with pytest.raises(VideoTooLarge):
        decode_image(encode_image(fmt, width=320, height=240), max_decode_pixels=10_000)


# -- per-source limits and the demuxer sandbox -------------------------------------------------


def test_a_source_with_more_frames_than_allowed_is_too_long_after_its_frames() -> None:
    """max_source_frames: the frames up to the limit are emitted, the next one ends the decode."""
    frames: list[Frame] = []
    data = _video(container="webm", codec="vp8", seconds=3)
    options = DecoderOptions(fps=10, max_source_frames=12)
    with pytest.raises(VideoTooLong, match="12 frames"):
        decode_stream(io.BytesIO(data), options, frames.append, _never())
    assert [frame_index(f.image) for f in frames] == list(range(12))


def test_a_source_longer_than_allowed_is_too_long_counting_gaps_but_not_clock_resets() -> None:
    """max_source_seconds counts video time from the first frame: a 20-minute gap counts,
    a jump of more than an hour (a new clock) does not."""
    first = _video(container="mpegts", codec="h264", seconds=2)
    gap = _video(container="mpegts", codec="h264", seconds=2, start_pts=1200.0)
    reset = _video(container="mpegts", codec="h264", seconds=2, start_pts=7200.0)
    frames: list[Frame] = []
    options = DecoderOptions(fps=2, container="mpegts", max_source_seconds=600)
    with pytest.raises(VideoTooLong):
        decode_stream(io.BytesIO(first + gap), options, frames.append, _never())
    assert len(frames) == 4
    report, _ = _decode_bytes(first + reset, fps=2, container="mpegts", max_source_seconds=600)
    assert report.frames_decoded == 40


@pytest.mark.parametrize(
    ("patch", "limits"),
    [
        ({"samples": 50_000_000}, {}),
        ({"samples": 100}, {"max_source_frames": 99}),
        ({"seconds": 36_000}, {}),
        ({"seconds": 61}, {"max_source_seconds": 60}),
    ],
)
def test_an_mp4_header_declaring_too_much_is_refused_before_opening(
    patch: dict[str, Any], limits: dict[str, Any]
) -> None:
    """Declared sample counts and durations above the limits are VideoTooLong, no frame decoded."""
    data = patch_mp4_header(_video(container="mp4-faststart", codec="h264", seconds=2), **patch)
    with pytest.raises(VideoTooLong, match="declares"):
        _decode_bytes(data, **limits)


def test_an_mp4_header_within_the_limits_decodes() -> None:
    """The declared values of an ordinary MP4 pass limits just above them."""
    data = _video(container="mp4-faststart", codec="h264", seconds=2)
    report, _ = _decode_bytes(data, max_source_frames=20, max_source_seconds=2.5)
    assert report.frames_decoded == 20


@pytest.mark.parametrize(
    "text",
    [
        "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{path}\n#EXT-X-ENDLIST\n",
        "ffconcat version 1.0\nfile {name}\n",
    ],
)
def test_playlists_are_unsupported(
    text: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HLS and ffconcat are not on the demuxer whitelist, even naming a valid local file.

    (That their entries are never opened is shown by the hostile-media test, with a FIFO.)"""
    clip = tmp_path / "clip.ts"
    clip.write_bytes(_video(container="mpegts", codec="h264", seconds=1))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(VideoUnsupported, match="unsupported container|unrecognised"):
        _decode_bytes(text.format(path=clip, name=clip.name).encode())


def test_options_refuse_non_positive_source_limits() -> None:
    """max_source_frames and max_source_seconds must be positive."""
    with pytest.raises(ValueError):
        DecoderOptions(max_source_frames=0)
    with pytest.raises(ValueError):
        DecoderOptions(max_source_seconds=0)


@pytest.mark.parametrize(
    "data",
    [
        patch_png_size(encode_image("png"), 65535, 65535),
        patch_png_size(encode_image("png"), 5000, 5000),
        patch_jpeg_size(encode_image("jpeg"), 65500, 65500),
    ],
)
def test_image_bombs_are_refused_by_their_declared_size(data: bytes) -> None:
    """A PNG or JPEG header declaring more than max_decode_pixels is VideoTooLarge."""
    # The header check's own words: FFmpeg's refusal (after it read the image) says otherwise.
    with pytest.raises(VideoTooLarge, match=r"video frames of \d+x\d+ exceed"):
        decode_image(data, max_decode_pixels=4096 * 2304)


# -- resource bounds: scans, index entries, threads -------------------------------------


def test_a_jpeg_of_more_scans_than_the_limit_is_refused_before_ffmpeg_opens_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A scan bomb is VideoTooLarge from its count of scans alone, at no decoding cost."""

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("FFmpeg opened the image")

    monkeypatch.setattr(streamchat.media.decoder.av, "open", never)
    with pytest.raises(VideoTooLarge, match=f"has {MAX_IMAGE_SCANS + 1} scans"):
        decode_image(scan_bomb_jpeg(MAX_IMAGE_SCANS + 1))


def test_a_jpeg_at_the_scan_limit_decodes() -> None:
    """The limit refuses only what is over it: MAX_IMAGE_SCANS scans decode."""
    image = decode_image(scan_bomb_jpeg(MAX_IMAGE_SCANS, 1280, 720))
    assert image.shape[2] == 3 and image.size > 0


def test_a_progressive_jpeg_with_random_data_after_it_decodes() -> None:
    """Bytes after the picture (a motion photo's video) hold FF DA pairs too; 3.5 MiB pass."""
    tail = random.Random(3).randbytes(3_500_000)
    assert tail.count(b"\xff\xda") > 20  # about one per 64 KiB
    image = decode_image(scan_bomb_jpeg(10, 640, 480) + tail)
    assert image.shape[2] == 3


def test_an_mp4_declaring_more_index_entries_than_allowed_is_refused_before_opening() -> None:
    """max_index_samples bounds the entries FFmpeg would allocate, whatever max_source_frames."""
    data = patch_mp4_header(_video(container="mp4-faststart", codec="h264", seconds=2), samples=101)
    with pytest.raises(VideoTooLong, match="index declares 101 samples"):
        _decode_bytes(data, max_index_samples=100)


def test_edits_replaying_an_mp4s_samples_count_against_the_index_limit() -> None:
    """20 samples shown by 6 edits are 120 index entries: over 100; 5 edits (100) decode."""
    clip = _video(container="mp4-faststart", codec="h264", seconds=2)
    with pytest.raises(VideoTooLong, match="index declares 120 samples"):
        _decode_bytes(mp4_with_edits(clip, 6), max_index_samples=100)
    report, _ = _decode_bytes(mp4_with_edits(clip, 5), max_index_samples=100)
    assert report.frames_decoded == 100  # FFmpeg plays the clip once per edit


def test_options_refuse_non_positive_index_limits_and_threads() -> None:
    """max_index_samples and threads must be positive."""
    with pytest.raises(ValueError):
        DecoderOptions(max_index_samples=0)
    with pytest.raises(ValueError):
        DecoderOptions(threads=0)


def _ffmpeg_threads() -> int:
    """Threads of this process that FFmpeg named (``av:h264:df0``, ...)."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            count += Path(f"/proc/self/task/{task}/comm").read_text().startswith("av:")
        except OSError:  # the thread ended meanwhile
            pass
    return count


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Only reference counts free memory: nothing is left to the cyclic garbage collector."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


@pytest.mark.parametrize("ending", ["ended", "failed", "stopped"])
async def test_no_ffmpeg_thread_outlives_a_decode_however_it_ends(ending: str, no_gc: None) -> None:
    """When decode_stream returns or raises, its codec context and frame threads are gone.

    Even while the caller keeps the feed (which keeps the error that stopped
    the reader) and the decode's error, as a session does: their tracebacks
    reached the demux loop's frame, and with it the codec context.
    """
    clip = _video(container="mpegts", codec="h264", seconds=2)
    later = _video(container="mpegts", codec="h264", seconds=2, start_pts=2.0)
    data = {
        "ended": clip,
        "failed": clip + patch_h264_size(later, 8192, 8192),
        "stopped": clip[: len(clip) // 2],
    }[ending]
    feed = ByteFeed(max_bytes=len(data) + 1, read_timeout=10)
    stop = threading.Event()
    frames: list[Frame] = []
    first = asyncio.Event()
    loop = asyncio.get_running_loop()

    def emit(frame: Frame) -> None:
        frames.append(frame)
        loop.call_soon_threadsafe(first.set)

    decoding = asyncio.ensure_future(
        asyncio.to_thread(decode_stream, feed, DecoderOptions(container="mpegts"), emit, stop)
    )
    feed.put_nowait(data)
    if ending == "stopped":
        await asyncio.wait_for(first.wait(), 10)
        assert _ffmpeg_threads() > 0  # the decoder waits for bytes, its threads alive
        stop.set()
        feed.abort()
    else:
        feed.close()
    outcome: list[BaseException | DecodeReport] = []
    try:
        outcome.append(await asyncio.wait_for(decoding, 20))
    except VideoTooLarge as exc:
        outcome.append(exc)
    assert (
        type(outcome[0]).__name__
        == {
            "ended": "DecodeReport",
            "failed": "VideoTooLarge",
            "stopped": "DecodeReport",
        }[ending]
    )
    assert frames
    assert _ffmpeg_threads() == 0
