"""The MP4 box walker that checks what each fragment declares as the bytes pass.

Streams are generated fragmented MP4 (``tests/support/media.py``), fed whole, a byte at
a time, and in random slices; boxes the muxer never writes are built here.
"""

from __future__ import annotations

import io
import random
import struct
import threading

import pytest

from streamchat.errors import VideoDecodeError, VideoTooLong
from streamchat.media.reader import Mp4Declared, Mp4Walker, SafeReader, mp4_declared, mp4_header
from tests.support.media import chunks, encode_video, patch_fmp4_largesize, patch_fmp4_samples


class Recorder:
    """A ``check`` that records every running total and refuses beyond ``limit`` samples."""

    def __init__(self, limit: int = 1 << 40) -> None:
        self.limit = limit
        self.totals: list[Mp4Declared] = []

    def __call__(self, declared: Mp4Declared) -> None:
        self.totals.append(declared)
        if declared.total_samples > self.limit:
            raise VideoTooLong("too many samples")


def _box(kind: bytes, body: bytes = b"") -> bytes:
    return struct.pack(">I4s", 8 + len(body), kind) + body


def _full(kind: bytes, *fields: int, flags: int = 0) -> bytes:
    return _box(kind, struct.pack(">I", flags) + b"".join(struct.pack(">I", f) for f in fields))


def _walk(data: bytes, pieces: list[bytes] | None = None, **kwargs: int) -> Recorder:
    declared = mp4_declared(data)
    recorder = Recorder(**kwargs)
    walker = Mp4Walker(declared, recorder)
    for piece in pieces if pieces is not None else [data]:
        walker.feed(piece)
    return recorder


def test_the_walker_counts_every_fragments_samples_whatever_the_slices() -> None:
    """A real fragmented MP4's 40 frames are counted per fragment, as video, however it is cut."""
    data = encode_video(container="mp4", codec="h264", seconds=4, fps=10)
    assert mp4_declared(data).video_tracks == frozenset({1})
    whole = _walk(data)
    assert [d.total_samples for d in whole.totals] == [10, 20, 30, 40]
    assert [d.video_samples for d in whole.totals] == [10, 20, 30, 40]
    assert _walk(data, chunks(data, 1)).totals == whole.totals
    for seed in range(5):
        assert _walk(data, chunks(data, 700, seed=seed)).totals == whole.totals


def test_a_fragment_declaring_too_much_ends_the_stream_before_its_count_is_read() -> None:
    """Through ``SafeReader``, the bytes holding the lying count are never returned."""
    data = patch_fmp4_samples(encode_video(container="mp4", codec="h264", seconds=4), 20_000_000)
    reader = SafeReader(io.BytesIO(data), threading.Event())
    header = mp4_header(reader, 1 << 20, required=True)
    assert header is not None
    reader.watch(Mp4Walker(mp4_declared(header), Recorder(limit=1000)).feed)
    returned = bytearray()
    while piece := reader.read(1):
        returned += piece
    count = data.index(b"trun") + 8  # after the box type, version and flags
    assert bytes(returned) == data[: count + 3]  # all but the count's last byte

    failure = reader.failure()
    assert isinstance(failure, VideoTooLong)
    assert reader.read(1) == b""


def test_a_huge_64_bit_mdat_is_passed_over_without_reading_it() -> None:
    """After an ``mdat`` claiming 2^62 bytes, nothing more is parsed: not even a lying moof."""
    data = encode_video(container="mp4", codec="h264", seconds=2)
    big = patch_fmp4_largesize(data, 1 << 62)
    lie = _box(b"moof", _box(b"traf", _full(b"tfhd", 1) + _full(b"trun", 20_000_000)))
    recorder = _walk(big + lie, limit=100)
    assert [d.total_samples for d in recorder.totals] == [10]


def test_a_box_running_to_the_end_of_the_stream_hides_nothing() -> None:
    """A size-0 ``moof`` is walked into to the end; a size-0 ``mdat`` ends the walk."""
    moof = struct.pack(">I4s", 0, b"moof") + _box(b"traf", _full(b"trun", 500))
    assert [d.total_samples for d in _walk(moof).totals] == [500]
    mdat = struct.pack(">I4s", 0, b"mdat") + _box(b"moof", _box(b"traf", _full(b"trun", 500)))
    assert _walk(mdat).totals == []


def test_truns_are_found_where_ffmpeg_would_read_them() -> None:
    """In ``moof``/``traf``, at the top level, in ``moov``, and in ``meta`` after its ``hdlr``."""
    hdlr = _box(b"hdlr", b"\0" * 24)
    found = _walk(
        _box(b"moof", _box(b"traf", _full(b"tfhd", 7) + _full(b"trun", 1)))
        + _full(b"trun", 2)
        + _box(b"moov", _box(b"udta", _full(b"trun", 4)))
        + _box(b"meta", b"\0\0\0\0" + hdlr + _full(b"trun", 8))
        + _box(b"free", _full(b"trun", 16))  # a box FFmpeg does not descend into
    )
    assert [d.total_samples for d in found.totals] == [1, 3, 7, 15]
    assert [d.video_samples for d in found.totals] == [0, 0, 0, 0]  # track 7 is not video


def test_only_samples_of_video_tracks_count_as_video() -> None:
    """The ``tfhd`` before a ``trun`` names its track; the header says which tracks are video."""
    walker_check = Recorder()
    walker = Mp4Walker(Mp4Declared(video_tracks=frozenset({1})), walker_check)
    walker.feed(
        _box(b"moof", _box(b"traf", _full(b"tfhd", 1) + _full(b"trun", 30)))
        + _box(b"moof", _box(b"traf", _full(b"tfhd", 2) + _full(b"trun", 45)))
    )
    counts = [(d.video_samples, d.total_samples) for d in walker_check.totals]
    assert counts == [(30, 30), (30, 75)]


def test_a_child_smaller_than_its_header_ends_its_parent_as_in_ffmpeg() -> None:
    """The rest of that parent is skipped; the boxes after the parent are still walked."""
    broken = _box(b"moof", _box(b"traf", b"\0\0\0\x04junk" + _full(b"trun", 9)))
    found = _walk(broken + _box(b"moof", _box(b"traf", _full(b"trun", 5))))
    assert [d.total_samples for d in found.totals] == [5]


@pytest.mark.parametrize(
    "data",
    [
        b"\0\0\0\x04moof",  # a top-level box smaller than its header
        struct.pack(">I4sQ", 1, b"mdat", 8),  # a 64-bit size smaller than its header
        _box(b"moof", _box(b"traf", _box(b"trun", b"\0\0\0\0"))),  # no room for the count
    ],
)
def test_layouts_ffmpeg_would_read_differently_are_refused(data: bytes) -> None:
    """Malformed top-level boxes and a ``trun`` too short for its count are decode errors."""
    with pytest.raises(VideoDecodeError):
        _walk(data)


def test_boxes_nested_deeper_than_ffmpeg_allows_are_refused() -> None:
    """Sixteen levels of ``moof`` are walked; a seventeenth is a decode error."""
    inner = _full(b"trun", 3)
    for _ in range(16):
        inner = _box(b"moof", inner)
    assert [d.total_samples for d in _walk(inner).totals] == [3]
    with pytest.raises(VideoDecodeError):
        _walk(_box(b"moof", inner))


def _outcome(data: bytes, pieces: list[bytes] | None = None) -> object:
    try:
        return [d.total_samples for d in _walk(data, pieces).totals]
    except VideoDecodeError:
        return VideoDecodeError


def test_random_slices_of_random_boxes_never_crash_the_walker() -> None:
    """Junk, whole or fed in random slices, ends the same way: the same counts or a
    ``VideoDecodeError``, nothing else."""
    rng = random.Random(3)
    for _ in range(200):
        junk = rng.randbytes(rng.randint(0, 400))
        data = _box(b"moof", junk) + junk
        sliced = _outcome(data, chunks(data, 50, seed=rng.randint(0, 1000)))
        assert sliced == _outcome(data)
