"""Local files as people have them: which go as they are, which are remuxed, and what survives.

The files are written by the ``ffmpeg`` command-line tool as cameras and
phones write them (``tests/support/ffmpeg.py``): MP4 and MOV with the index at
the end, HEVC, MJPEG in AVI, fragmented MP4, MPEG-TS, Matroska, WebM, a
phone's portrait video. Each frame shows its source frame number, so a frame
the server keeps can be checked against the time it is said to be at.

The remux itself is checked without a server, by reading back what the
client would send with PyAV, the way the server reads a push: from a stream
that cannot seek. The rest runs against a live server with the scripted
:class:`FakeEngine`, whose requests carry the frames of each question.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import av
import pytest

import streamchat_client.media
from streamchat.window import Frame
from streamchat_client import PushStats, ServerError, Session, SourceError, VideoStatus, connect
from streamchat_client.media import mp4_layout, plan_file
from streamchat_client.sources import ChunkSink, push_file, push_live
from tests.support.ffmpeg import CORPUS, INDEX_AT_END, Corpus, Media, marker_corner
from tests.support.live import Live
from tests.support.media import encode_video, frame_index, pattern_frame

TIMEOUT = 30.0
"""Upper bound for anything a test awaits, so a bug fails the test instead of hanging it."""
FPS = 4.0
"""The session's sampling rate: several frames per second, so timestamps are checked closely."""
REMUXED = INDEX_AT_END | {"avi-mjpeg"}
"""Corpus items the server cannot read as a stream: an index at the end, or AVI."""


# --- what is sent -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CORPUS))
def test_plan_sends_streams_as_they_are_and_remuxes_the_rest(
    ffmpeg_corpus: Corpus, name: str
) -> None:
    """Matroska, WebM, MPEG-TS and fragmented MP4 go as they are (with their demuxer hint);
    an MP4/MOV with its index at the end and AVI are remuxed."""
    media = ffmpeg_corpus[name]
    plan = plan_file(media.path)
    assert plan.remux is (name in REMUXED), plan
    assert plan.container == (None if plan.remux else media.format)
    assert plan.codec == media.codec


@pytest.mark.parametrize(
    ("container", "layout"),
    [("mp4", "fragmented"), ("mp4-faststart", "faststart"), ("mp4-plain", "index_at_end")],
)
def test_mp4_layout_finds_where_the_index_is(tmp_path: Path, container: Any, layout: str) -> None:
    """The box walk tells a fragmented MP4, one with its index first and one with it last."""
    path = encode_video(tmp_path / "clip.mp4", container=container, codec="h264")
    with path.open("rb") as file:
        found, index_bytes = mp4_layout(file)
    assert found == layout
    assert (index_bytes > 0) == (layout != "index_at_end")
    assert plan_file(path).remux is (layout == "index_at_end")


def test_an_index_too_large_to_stream_is_remuxed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An MP4 whose index comes first but is larger than a server reads whole is remuxed."""
    path = encode_video(tmp_path / "clip.mp4", container="mp4-faststart", codec="h264")
    assert plan_file(path).remux is False
    with path.open("rb") as file:
        _, index_bytes = mp4_layout(file)
    monkeypatch.setattr(streamchat_client.media, "MAX_STREAMED_INDEX_BYTES", index_bytes - 1)
    plan = plan_file(path)
    assert plan.remux is True
    assert str(index_bytes) in plan.why


def test_files_pyav_cannot_use_are_source_errors(tmp_path: Path) -> None:
    """Garbage and a file without video are refused here, with the reason, before any push."""
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00not a video" * 500)
    with pytest.raises(SourceError, match="cannot open") as info:
        plan_file(garbage)
    assert info.value.code is None  # not the server's verdict
    audio = tmp_path / "audio.mkv"
    _ffmpeg("-f", "lavfi", "-i", "sine=duration=0.5", str(audio))
    with pytest.raises(SourceError, match="no video stream"):
        plan_file(audio)


# --- what the remux keeps (no server) -------------------------------------------------


class _Recorder:
    """A sink that keeps every chunk: what a session would have sent."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.formats: set[str | None] = set()

    async def send(self, data: bytes, format: str | None) -> bool:
        self.chunks.append(data)
        self.formats.add(format)
        return True

    async def wait_decoded(self, sent: int) -> None:
        return None

    def sink(self) -> ChunkSink:
        return ChunkSink(
            send=self.send, wait_decoded=self.wait_decoded, chunk_bytes=7919, buffer_bytes=1 << 24
        )


class _Unseekable:
    """Bytes read as the server reads a push: forward only, in short reads."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._offset = 0

    def read(self, size: int) -> bytes:
        piece = bytes(self._data[self._offset : self._offset + min(size, 4096)])
        self._offset += len(piece)
        return piece


def _display(source: Any, format: str | None = None) -> tuple[tuple[int, ...] | None, list[float]]:
    """The first frame's display matrix (9 ints, or ``None``) and every frame's time from the
    first, as PyAV decodes ``source``."""
    matrix: tuple[int, ...] | None = None
    times: list[float] = []
    with av.open(source, "r", format=format) as container:
        for frame in container.decode(video=0):
            if not times:
                for side in frame.side_data:
                    if side.type.name == "DISPLAYMATRIX":
                        matrix = struct.unpack("<9i", bytes(side))
            times.append(float(frame.time))
    return matrix, [round(t - times[0], 6) for t in sorted(times)]


def _mirrored(media: Media, dest: Path) -> Path:
    """A copy of an ffmpeg-written MP4 whose track header says "show it mirrored" (as a front
    camera's video can be): FFmpeg 5.1 writes no such matrix, so it is patched in."""
    data = bytearray(media.path.read_bytes())
    tkhd = data.index(b"tkhd")  # one track; its box starts 4 bytes before the type
    version = data[tkhd + 4]
    matrix = tkhd + 8 + (32 if version == 1 else 20) + 16
    struct.pack_into(">9i", data, matrix, -65536, 0, 0, 0, 65536, 0, 0, 0, 1 << 30)
    dest.write_bytes(bytes(data))
    return dest


@pytest.mark.parametrize("how", ["file", "live"])
@pytest.mark.parametrize("kind", ["portrait", "mirrored"])
async def test_remux_keeps_the_display_matrix_and_every_timestamp(
    ffmpeg_corpus: Corpus, tmp_path: Path, kind: str, how: str
) -> None:
    """A phone's portrait file (-90 degrees) and a mirrored one, remuxed as a file or played as
    a live source, reach the wire with the source's display matrix and its exact frame times,
    read back from a stream that cannot seek."""
    media = ffmpeg_corpus["portrait" if kind == "portrait" else "mp4-h264"]
    path = media.path if kind == "portrait" else _mirrored(media, tmp_path / "mirrored.mp4")
    source_matrix, source_times = _display(str(path))
    assert source_matrix is not None
    recorder = _Recorder()
    if how == "file":
        stats = await push_file(recorder.sink(), path)
    else:
        stats = await push_live(recorder.sink(), str(path), pace=False)
    assert (stats.container, stats.remuxed, stats.reencoded) == ("mp4", True, False)
    assert recorder.formats == {"mp4"}
    sent = b"".join(recorder.chunks)
    assert stats.bytes_sent == len(sent)
    matrix, times = _display(_Unseekable(sent), "mp4")
    assert matrix == source_matrix
    if kind == "portrait":
        with av.open(_Unseekable(sent), "r", format="mp4") as container:
            assert next(container.decode(video=0)).rotation == media.rotation == -90
    assert times == source_times == list(media.frame_times)


async def test_a_stream_mp4_cannot_carry_goes_in_matroska(clip: Path) -> None:
    """VP8 (a browser's WebM) fits no MP4: it is copied into Matroska, still not re-encoded."""
    recorder = _Recorder()
    stats = await push_file(recorder.sink(), clip, remux=True)
    assert (stats.container, stats.codec, stats.reencoded) == ("matroska", "vp8", False)
    with av.open(_Unseekable(b"".join(recorder.chunks)), "r", format="matroska") as container:
        assert len(list(container.decode(video=0))) == 20


# --- through a live server ------------------------------------------------------------


async def _asked_frames(server: Live, session: Session, question: str) -> Sequence[Frame]:
    """The frames a question on the whole window is answered on, as the engine gets them."""
    answer = await session.ask(question, max_tokens=1).result()
    assert answer.done is not None and answer.done.usage.frames >= 1
    request = next(r for r in reversed(server.engine.requests) if r.question == question)
    return request.frames


def _check_own_frames(media: Media, frames: Sequence[Frame], status: VideoStatus) -> None:
    """As many frames as the duration implies, each at its time and showing that source frame."""
    expected = media.expected_times(FPS)
    assert (status.state, status.frames, len(frames)) == ("ended", len(expected), len(expected))
    for frame, want in zip(frames, expected, strict=True):
        assert abs(frame.pts - want) <= media.frame_interval + 1e-3, [f.pts for f in frames]
    shown = [frame_index(frame.image) for frame in frames]
    assert shown == [media.index_at(frame.pts) for frame in frames]


@pytest.mark.parametrize("name", list(CORPUS))
async def test_every_common_file_reaches_the_server_as_its_own_frames(
    server: Live, ffmpeg_corpus: Corpus, name: str
) -> None:
    """``send_file`` on each file gives the server its frames: all of them, at their times."""
    media = ffmpeg_corpus[name]
    progress: list[PushStats] = []
    async with connect(server.url, fps=FPS) as session:
        sent = await session.send_file(media.path, on_progress=progress.append)
        status = await session.wait_ended(timeout=TIMEOUT)
        frames = await _asked_frames(server, session, f"{name}?")
        assert session.errors == []
    assert progress[-1].remuxed is (name in REMUXED)
    assert progress[-1].reencoded is False
    assert status.bytes_received == sent
    if name not in REMUXED:
        assert sent == media.path.stat().st_size
    _check_own_frames(media, frames, status)


@pytest.mark.parametrize("how", ["file", "live"])
async def test_portrait_file_arrives_upright(server: Live, ffmpeg_corpus: Corpus, how: str) -> None:
    """A phone's portrait file, sent as a file or played as a live source, gives the model
    portrait frames with the marker top-left, and ``video.status`` says their size (the
    client keeps the display matrix; the server applies it)."""
    media = ffmpeg_corpus["portrait"]
    async with connect(server.url, fps=FPS) as session:
        if how == "file":
            await session.send_file(media.path)
        else:
            await session.stream_live(str(media.path), pace=False)
        status = await session.wait_ended(timeout=TIMEOUT)
        frames = await _asked_frames(server, session, "upright?")
    assert [marker_corner(frame.image) for frame in frames] == ["top-left"] * len(frames)
    width, height = frames[-1].size
    assert width < height
    assert (status.width, status.height) == (width, height)


def _ffmpeg(*args: str, stdin: bytes | None = None) -> None:
    tool = shutil.which("ffmpeg")
    assert tool, "the FFmpeg command-line tool is needed: apt-get install ffmpeg"
    command = [tool, "-hide_banner", "-loglevel", "error", "-y", *args]
    subprocess.run(command, input=stdin, check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def avi_h264_bframes(tmp_path_factory: pytest.TempPathFactory) -> Media:
    """H.264 with B-frames in AVI, written by the ffmpeg tool: AVI stores no presentation
    timestamps, so the frames' own come out of display order."""
    path = tmp_path_factory.mktemp("avi") / "bframes.avi"
    fps, count, width, height = 25, 50, 320, 240
    raw = b"".join(pattern_frame(i, width, height).tobytes() for i in range(count))
    _ffmpeg(
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-video_size", f"{width}x{height}",
        "-framerate", str(fps), "-i", "-",
        "-c:v", "libx264", "-preset", "veryfast", "-bf", "3", "-x264-params", "b-adapt=0",
        "-pix_fmt", "yuv420p", str(path),
        stdin=raw,
    )  # fmt: skip
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.has_b_frames
        stamps = [f.pts or 0 for f in container.decode(stream)]
    assert stamps != sorted(stamps), "PyAV should see this file's frames out of order"
    return Media(
        name="avi-h264", path=path, format=None, codec="h264", fps=fps,
        frame_times=tuple(i / fps for i in range(count)), width=width, height=height,
    )  # fmt: skip


async def test_avi_h264_with_b_frames_is_restamped_in_display_order(
    server: Live, avi_h264_bframes: Media
) -> None:
    """H.264 in AVI with B-frames, whose timestamps are guesses in decode order, is re-encoded
    with its frames stamped in display order: the server sees each at its own time."""
    progress: list[PushStats] = []
    async with connect(server.url, fps=FPS) as session:
        await session.send_file(avi_h264_bframes.path, on_progress=progress.append)
        status = await session.wait_ended(timeout=TIMEOUT)
        frames = await _asked_frames(server, session, "in order?")
    assert (progress[-1].container, progress[-1].reencoded) == ("mp4", True)
    _check_own_frames(avi_h264_bframes, frames, status)


async def test_remux_false_sends_the_files_own_bytes(server: Live, ffmpeg_corpus: Corpus) -> None:
    """``remux=False`` sends an MP4 with its index at the end unchanged: the server cannot
    read it as a stream, and says so (to the push, or to the wait if the push was over)."""
    media = ffmpeg_corpus["mp4-h264"]
    async with connect(server.url, fps=FPS) as session:
        with pytest.raises((SourceError, ServerError)) as info:
            await session.send_file(media.path, remux=False, format="mp4")
            await session.wait_ended(timeout=TIMEOUT)
        assert [e.code for e in session.errors] == ["video_unsupported"]
    assert getattr(info.value, "code", None) == "video_unsupported"
