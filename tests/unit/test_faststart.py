"""The faststart rewrite: an MP4 whose index follows its media, made streamable without I/O.

Real files are written by the ``ffmpeg`` command-line tool with its default
layout (``ftyp free mdat moov``, or ``ftyp wide mdat moov`` for MOV) and the
rewrite is checked byte for byte against FFmpeg's own ``qt-faststart``, then
decoded as a stream. Indexes FFmpeg never writes (offsets near 4 GiB, a chunk
after the index, broken sizes) are built here box by box.
"""

from __future__ import annotations

import io
import struct
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from streamchat.errors import VideoDecodeError, VideoTooLarge, VideoUnsupported
from streamchat.ingest.faststart import (
    BoxHeader,
    Faststart,
    IndexAtEnd,
    Layout,
    check_index_size,
    read_box_header,
    rewrite,
    sniff,
)
from streamchat.media.decoder import DecoderOptions, decode_stream
from streamchat.window import Frame

LIMIT = 8 << 20  # the decoder's header limit (DecoderOptions.max_header_bytes)
U32 = 0xFFFF_FFFF


# -- boxes, built by hand -------------------------------------------------------------


def box(kind: bytes, *children: bytes) -> bytes:
    body = b"".join(children)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def table(offsets: list[int], *, wide: bool = False) -> bytes:
    """A ``stco`` (or ``co64``) box holding ``offsets``."""
    fmt = ">Q" if wide else ">I"
    entries = b"".join(struct.pack(fmt, o) for o in offsets)
    return box(b"co64" if wide else b"stco", struct.pack(">II", 0, len(offsets)), entries)


def track(offsets_box: bytes) -> bytes:
    """A ``trak`` whose sample table holds ``offsets_box`` beside a sample-size table."""
    stsz = box(b"stsz", struct.pack(">III", 0, 100, 1))
    return box(b"trak", box(b"mdia", box(b"minf", box(b"stbl", stsz, offsets_box))))


def offsets_in(index: bytes) -> list[tuple[bytes, list[int]]]:
    """``(kind, offsets)`` of every chunk offset table in ``index``, in file order."""
    found = []
    at = 0
    while (at := min(_find(index, b"stco", at), _find(index, b"co64", at))) < len(index):
        kind = index[at : at + 4]
        (count,) = struct.unpack_from(">I", index, at + 8)
        fmt = ">Q" if kind == b"co64" else ">I"
        width = struct.calcsize(fmt)
        found.append(
            (kind, [struct.unpack_from(fmt, index, at + 12 + i * width)[0] for i in range(count)])
        )
        at += 4
    return found


def _find(data: bytes, kind: bytes, start: int) -> int:
    at = data.find(kind, start)
    return len(data) if at < 0 else at


FTYP = box(b"ftyp", b"isom", struct.pack(">I", 512), b"isomiso2avc1mp41")
FREE = box(b"free")


# -- what the first bytes tell ----------------------------------------------------------


def test_sniff_finds_media_before_the_index() -> None:
    """``ftyp free mdat``: media first, with the offsets of the media and of what follows it."""
    mdat_header = struct.pack(">I4s", 1000, b"mdat")
    head = FTYP + FREE + mdat_header
    media = len(FTYP) + len(FREE)
    assert sniff(head, LIMIT) == IndexAtEnd(FTYP, media, media + 1000)
    assert sniff(head + b"\0" * 500, LIMIT) == IndexAtEnd(FTYP, media, media + 1000)


def test_sniff_reads_64_bit_sizes_and_files_without_ftyp() -> None:
    """An old QuickTime file (``wide mdat``, no ``ftyp``) with a 64-bit mdat size is found too."""
    wide = box(b"wide")
    head = wide + struct.pack(">I4sQ", 1, b"mdat", 5 << 32)
    assert sniff(head, LIMIT) == IndexAtEnd(b"", 8, 8 + (5 << 32))
    assert sniff(head[:-4], LIMIT) is Layout.MORE


@pytest.mark.parametrize(
    ("head", "layout"),
    [
        (FTYP + box(b"moov", box(b"mvhd")) + box(b"mdat"), Layout.STREAMABLE),  # faststart
        (FTYP + box(b"moov") + box(b"moof"), Layout.STREAMABLE),  # fragmented
        (box(b"moof") + box(b"mdat"), Layout.STREAMABLE),  # a fragment: the decoder says so
        (b"\x1a\x45\xdf\xa3" + b"\x9f" * 60, Layout.STREAMABLE),  # WebM
        (b"G" + b"\xff" * 187, Layout.STREAMABLE),  # MPEG-TS
        (FTYP + struct.pack(">I4s", 3, b"free") + box(b"mdat"), Layout.STREAMABLE),  # size < 8
        (FTYP[:20], Layout.MORE),
        (b"", Layout.MORE),
    ],
)
def test_sniff_leaves_everything_else_to_the_decoder(head: bytes, layout: Layout) -> None:
    """Streams that are not an index at the end are streamable (or need more bytes to tell)."""
    assert sniff(head, LIMIT) is layout


def test_sniff_gives_up_on_a_prefix_beyond_the_limit() -> None:
    """Header-like boxes reaching past the limit: no index at the end is looked for."""
    head = FTYP + box(b"free", b"\0" * 1000) + box(b"mdat")
    assert isinstance(sniff(head, 2000), IndexAtEnd)
    assert sniff(head, 1000) is Layout.STREAMABLE
    assert sniff(head[: len(FTYP) + 8], 1000) is Layout.STREAMABLE  # told by the size alone
    assert sniff(head[: len(FTYP) + 4], 1000) is Layout.MORE


def test_sniff_refuses_media_that_runs_to_the_end() -> None:
    """An ``mdat`` of size 0 leaves no room for an index: an unfinished recording."""
    with pytest.raises(VideoDecodeError, match="no index"):
        sniff(FTYP + struct.pack(">I4s", 0, b"mdat"), LIMIT)


def test_read_box_header() -> None:
    """Box headers give 32-bit, 64-bit and to-the-end sizes, None when cut, and refuse sizes
    below the header."""
    assert read_box_header(box(b"free", b"1234")) == BoxHeader(b"free", 12, 8)
    assert read_box_header(struct.pack(">I4sQ", 1, b"mdat", 1 << 40)) == BoxHeader(
        b"mdat", 1 << 40, 16
    )
    assert read_box_header(struct.pack(">I4s", 0, b"moov")) == BoxHeader(b"moov", None, 8)
    assert read_box_header(struct.pack(">I4s", 1, b"mdat")) is None
    assert read_box_header(b"\0\0\0\x10fr") is None
    for bad in (struct.pack(">I4s", 7, b"free"), struct.pack(">I4sQ", 1, b"mdat", 15)):
        with pytest.raises(VideoDecodeError, match="malformed box"):
            read_box_header(bad)


# -- the rewrite, on indexes built here ---------------------------------------------------


def stream_of(plan: Faststart, file: bytes) -> bytes:
    """The streamable file: the header, then the pieces of ``file``."""
    pieces = [file[start : len(file) if end is None else end] for start, end in plan.pieces]
    return plan.header + b"".join(pieces)


def test_offsets_move_by_the_size_of_the_index() -> None:
    """Every chunk offset of every track moves by the index's size; the media follows it."""
    media = box(b"mdat", b"A" * 100, b"B" * 100)
    first = len(FTYP) + 8
    moov = box(
        b"moov",
        box(b"mvhd"),
        track(table([first, first + 100])),
        track(table([first + 50], wide=True)),
    )
    file = FTYP + media + moov
    plan = rewrite(FTYP, moov, moov_offset=len(FTYP) + len(media), file_size=len(file), limit=LIMIT)
    out = stream_of(plan, file)
    shift = len(moov)
    assert offsets_in(plan.header) == [
        (b"stco", [first + shift, first + 100 + shift]),
        (b"co64", [first + 50 + shift]),
    ]
    assert len(out) == len(file)
    assert out[first + shift : first + shift + 100] == b"A" * 100
    assert out[first + 100 + shift : first + 200 + shift] == b"B" * 100
    assert plan.pieces == ((len(FTYP), len(FTYP) + len(media)),)


def test_a_32_bit_table_that_would_overflow_becomes_64_bit() -> None:
    """An offset that passes 4 GiB once moved turns its ``stco`` into a ``co64``, 4 bytes an entry
    larger, and the move accounts for that growth."""
    offsets = [U32 - 40, 1000]
    moov = box(b"moov", track(table(offsets)))
    moov_offset = 5 << 32
    plan = rewrite(FTYP, moov, moov_offset=moov_offset, file_size=None, limit=LIMIT)
    grown = len(moov) + 4 * len(offsets)
    assert len(plan.header) == len(FTYP) + grown
    assert offsets_in(plan.header) == [(b"co64", [o + grown for o in offsets])]
    assert plan.pieces == ((len(FTYP), moov_offset),)


def test_widening_one_table_widens_those_it_pushes_over() -> None:
    """A table that fits only until another one grows is widened too (the growth cascades)."""

    def index(near: int) -> bytes:
        return box(b"moov", track(table([U32 - 10])), track(table([near])), track(table([7])))

    size = len(index(0))
    near = U32 - size - 2  # fits only while nothing grows
    moov = index(near)
    plan = rewrite(FTYP, moov, moov_offset=5 << 32, file_size=None, limit=LIMIT)
    grown = size + 8
    assert offsets_in(plan.header) == [
        (b"co64", [U32 - 10 + grown]),
        (b"co64", [near + grown]),
        (b"stco", [7 + grown]),
    ]


def test_chunks_after_the_index_are_kept_and_moved() -> None:
    """A chunk stored after the old index: the bytes after it are sent too, moved by the growth."""
    media = box(b"mdat", b"A" * 64)
    moov_offset = len(FTYP) + len(media)
    tail_chunk = moov_offset + 1000 + 8  # in a second mdat after the index
    moov = box(
        b"moov",
        box(b"free", b"\0" * (1000 - 8 - 8 - len(track(table([0, 0]))))),
        track(table([len(FTYP) + 8, tail_chunk])),
    )
    assert len(moov) == 1000
    tail = box(b"mdat", b"Z" * 32)
    file = FTYP + media + moov + tail
    plan = rewrite(FTYP, moov, moov_offset=moov_offset, file_size=len(file), limit=LIMIT)
    assert plan.pieces == ((len(FTYP), moov_offset), (moov_offset + 1000, len(file)))
    out = stream_of(plan, file)
    [(kind, moved)] = offsets_in(plan.header)
    assert kind == b"stco" and out[moved[0] : moved[0] + 64] == b"A" * 64
    assert out[moved[1] : moved[1] + 32] == b"Z" * 32
    no_tail = rewrite(
        FTYP, box(b"moov", track(table([len(FTYP) + 8]))), moov_offset=moov_offset,
        file_size=len(file), limit=LIMIT,
    )  # fmt: skip
    assert no_tail.pieces == ((len(FTYP), moov_offset),)  # nothing after the index is needed


def test_an_index_running_to_the_end_gets_its_size() -> None:
    """A ``moov`` of size 0 (to the end of the file) is written with its real size."""
    moov = box(b"moov", track(table([40])))
    open_ended = struct.pack(">I4s", 0, b"moov") + moov[8:]
    plan = rewrite(FTYP, open_ended, moov_offset=4096, file_size=4096 + len(moov), limit=LIMIT)
    assert plan.header[len(FTYP) :] == box(b"moov", track(table([40 + len(moov)])))


def _nested(depth: int) -> bytes:
    inner = table([0])
    for _ in range(depth):
        inner = box(b"trak", inner)
    return inner


@pytest.mark.parametrize(
    ("moov", "error", "words"),
    [
        (box(b"moov", struct.pack(">I4s", 64, b"trak")), VideoDecodeError, "larger than the box"),
        (box(b"moov", track(box(b"stco", struct.pack(">II", 0, 3), b"\0" * 8))), VideoDecodeError,
         "do not fit"),
        (box(b"moov", track(box(b"co64", b"\0\0"))), VideoDecodeError, "malformed co64"),
        (box(b"moov", track(table([1 << 63], wide=True))), VideoDecodeError, "beyond any file"),
        (box(b"moov", struct.pack(">I4s", 4, b"trak")), VideoDecodeError, "malformed box"),
        (box(b"moov", struct.pack(">I4s", 1, b"trak")), VideoDecodeError, "inside a box header"),
        (box(b"moov", _nested(12)), VideoDecodeError, "too deeply"),
        (box(b"moov", box(b"cmov", b"zlib")), VideoUnsupported, "compressed"),
    ],
)  # fmt: skip
def test_malformed_indexes_are_refused(moov: bytes, error: type[Exception], words: str) -> None:
    """Sizes that do not fit, tables too short for their entries, nesting, compression: typed."""
    with pytest.raises(error, match=words):
        rewrite(FTYP, moov, moov_offset=1000, file_size=None, limit=LIMIT)


def test_an_index_over_the_limit_is_refused() -> None:
    """The header limit holds before the rewrite, from the size alone, and after any growth."""
    moov = box(b"moov", track(table([U32 - 5] * 20)))
    with pytest.raises(VideoTooLarge, match="over the limit"):
        check_index_size(len(FTYP), 9 << 20, LIMIT)
    check_index_size(len(FTYP), None, LIMIT)  # not known yet: read on, bounded by the caller
    with pytest.raises(VideoTooLarge):
        rewrite(FTYP, moov, moov_offset=1 << 32, file_size=None, limit=len(FTYP) + len(moov) - 1)
    with pytest.raises(VideoTooLarge):  # fits as it is, not once its table is 64-bit
        rewrite(FTYP, moov, moov_offset=1 << 32, file_size=None, limit=len(FTYP) + len(moov) + 4)


# -- real files, as the FFmpeg tool writes them ----------------------------------------------


def _ffmpeg(*args: str) -> None:
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args],
        check=True,
        capture_output=True,
        timeout=120,
    )


def _frame_count(path: Path) -> int:
    done = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_frames",
         "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", str(path)],
        check=True, capture_output=True, timeout=120, text=True,
    )  # fmt: skip
    return int(done.stdout.strip())


@pytest.fixture(scope="module")
def camera_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """An MP4 (H.264 and AAC) and a MOV as ``ffmpeg`` writes them by default: index last."""
    directory = tmp_path_factory.mktemp("faststart")
    sources = ["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=30", "-f", "lavfi", "-i", "sine"]
    codecs = ["-t", "2", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    files = [directory / "camera.mp4", directory / "camera.mov"]
    for path in files:
        _ffmpeg(*sources, *codecs, "-c:a", "aac", str(path))
    return files


def _top_level(data: bytes) -> list[tuple[bytes, int, int]]:
    """``(kind, offset, size)`` of each top-level box."""
    boxes = []
    offset = 0
    while offset < len(data):
        header = read_box_header(data, offset)
        assert header is not None and header.size is not None
        boxes.append((header.kind, offset, header.size))
        offset += header.size
    return boxes


def test_the_rewrite_is_what_qt_faststart_writes(camera_files: list[Path], tmp_path: Path) -> None:
    """For FFmpeg's MP4 and MOV, header plus pieces are byte for byte FFmpeg's qt-faststart output,
    found from the first bytes and the index alone."""
    for path in camera_files:
        data = path.read_bytes()
        kinds = [kind for kind, _, _ in _top_level(data)]
        assert kinds.index(b"mdat") < kinds.index(b"moov"), kinds
        layout = sniff(data[:4096], LIMIT)
        assert isinstance(layout, IndexAtEnd)
        header = read_box_header(data, layout.after_media)
        assert header is not None and header.kind == b"moov" and header.size is not None
        moov = data[layout.after_media : layout.after_media + header.size]
        plan = rewrite(
            layout.ftyp, moov, moov_offset=layout.after_media, file_size=len(data), limit=LIMIT
        )
        reference = tmp_path / f"reference-{path.name}"
        subprocess.run(["qt-faststart", str(path), str(reference)], check=True, capture_output=True)
        assert stream_of(plan, data) == reference.read_bytes()
        assert [k for k, _, _ in _top_level(stream_of(plan, data))][:2] == [b"ftyp", b"moov"]


def test_the_rewritten_stream_decodes_every_frame(camera_files: list[Path]) -> None:
    """Read as a stream (no seeking), the rewrite gives every frame ffprobe counts in the
    original, each the frame the original shows at that time."""
    for path in camera_files:
        data = path.read_bytes()
        layout = sniff(data, LIMIT)
        assert isinstance(layout, IndexAtEnd)
        moov = data[layout.after_media :]
        plan = rewrite(
            layout.ftyp, moov, moov_offset=layout.after_media, file_size=len(data), limit=LIMIT
        )
        frames: list[Frame] = []
        options = DecoderOptions(fps=1000.0, max_pixels=320 * 240)
        report = decode_stream(
            _Stream(stream_of(plan, data)), options, frames.append, threading.Event()
        )
        assert report.frames_decoded == _frame_count(path) == len(frames) == 60
        assert np.allclose([f.pts for f in frames], np.arange(60) / 30)


class _Stream:
    """A byte source that cannot seek: only ``read``, as the decoder's feed."""

    def __init__(self, data: bytes) -> None:
        self._file = io.BytesIO(data)

    def read(self, n: int = -1, /) -> bytes:
        return self._file.read(n)
