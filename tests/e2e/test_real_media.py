"""End to end with real-world files: what the ``ffmpeg`` tool writes, as cameras and phones do.

Every item of the corpus (``tests/support/ffmpeg.py``) goes through the bundled
client against a live uvicorn server three ways: as a file
(``Session.send_file``), as a URL the server fetches from a local HTTP server
that honours range requests, and pushed as raw bytes in odd-sized pieces. The
frames the server keeps must be the file's own: as many as its duration
implies at the session rate, at the times the file gives them (``ffprobe``'s
timestamps, gaps included), showing the source frame of that time (each
frame's number is drawn in it), upright (a marker drawn in the upright
picture's top-left corner before it was turned on its side), and the
``video.status`` must say the size of the frames the model gets.

The frames are the point, so the server answers with the scripted
:class:`FakeEngine`, whose requests carry the frames of each question; one
test asks the real engine (tiny model) about the portrait file.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from http import HTTPStatus

import pytest

from streamchat.config import Settings
from streamchat.engine.fake import FakeEngine
from streamchat.window import Frame
from streamchat_client import ServerError, Session, VideoStatus, connect
from tests.support.ffmpeg import CORPUS, INDEX_AT_END, Corpus, Media, marker_corner
from tests.support.httpfiles import FileServer
from tests.support.live import Live, live_server
from tests.support.media import frame_index

FPS = 4.0
"""The session's sampling rate: several frames per second, so timestamps are checked closely."""
CHUNK_BYTES = 7919
"""A prime: pushed pieces never line up with boxes, clusters, packets or TS packets."""
TIMEOUT = 60.0
CHUNK_BYTES_FETCHED = 256 * 1024
"""What the server's fetch reads at once (``streamchat.ingest.fetch.CHUNK_BYTES`` today): a file
that fits needs no range request, so the range test uses a file at least twice as large."""

SETTINGS = Settings(fetch_allow_private=True)  # URL sources come from a loopback file server

NAMES = list(CORPUS)
STREAMABLE = [name for name in NAMES if name not in INDEX_AT_END]


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[Live[FakeEngine]]:
    """One live server with the fake engine for the module; every test opens its own session.

    The engine's ``requests`` hold the frames of every question, as the model would get them.
    """
    async with live_server(SETTINGS) as server:
        yield server


@pytest.fixture(scope="module")
def range_files(ffmpeg_corpus: Corpus) -> Iterator[FileServer]:
    """The corpus directory on a local HTTP server that honours ``Range`` requests."""
    with FileServer(ffmpeg_corpus.directory) as files:
        yield files


async def asked_frames(
    server: Live[FakeEngine], session: Session, question: str
) -> Sequence[Frame]:
    """The frames a question on the whole window is answered on (as the engine receives them)."""
    answer = await session.ask(question, max_tokens=2).result()
    assert answer.done is not None and answer.done.usage.frames >= 1
    return next(r for r in reversed(server.engine.requests) if r.question == question).frames


def check_frames(media: Media, frames: Sequence[Frame], status: VideoStatus) -> None:
    """Assert that ``frames`` are ``media``'s own: upright, at its times, as ``status`` says."""
    sizes = [frame.size for frame in frames]
    width, height = sizes[-1]
    assert (width < height) == (media.width < media.height), (
        f"frames are {width}x{height}, but {media.path.name} shows {media.width}x{media.height}"
    )
    assert abs(width / height - media.width / media.height) < 0.15, sizes
    if media.marker:
        corners = [marker_corner(frame.image) for frame in frames]
        assert corners == ["top-left"] * len(frames), f"the marker is at {corners}"

    times = [round(frame.pts, 3) for frame in frames]
    expected = [round(t, 3) for t in media.expected_times(FPS)]
    assert len(frames) == len(expected), f"{len(frames)} frames at {times}, expected {expected}"
    for time, want in zip(times, expected, strict=True):
        assert abs(time - want) <= media.frame_interval + 1e-3, f"frames at {times}, not {expected}"
    shown = [frame_index(frame.image) for frame in frames]
    assert shown == [media.index_at(frame.pts) for frame in frames], (
        f"frames at {times} show source frames {shown}"
    )

    assert (status.state, status.frames) == ("ended", len(expected))
    assert abs(status.span - (expected[-1] - expected[0])) <= media.frame_interval + 1e-3
    assert (status.width, status.height) == (width, height), status


@pytest.mark.parametrize("name", NAMES)
async def test_file(server: Live[FakeEngine], ffmpeg_corpus: Corpus, name: str) -> None:
    """A file as cameras and phones write it, sent by the client as a file, gives its own frames."""
    media = ffmpeg_corpus[name]
    async with connect(server.url, fps=FPS) as session:
        await session.send_file(media.path)
        status = await session.wait_ended(timeout=TIMEOUT)
        frames = await asked_frames(server, session, f"file {name}?")
    check_frames(media, frames, status)


@pytest.mark.parametrize("name", NAMES)
async def test_url(
    server: Live[FakeEngine], range_files: FileServer, ffmpeg_corpus: Corpus, name: str
) -> None:
    """Fetched by the server from a URL that honours ranges, a file gives its own frames."""
    media = ffmpeg_corpus[name]
    async with connect(server.url, fps=FPS) as session:
        await session.send_url(range_files.url(media.path.name))
        status = await session.wait_ended(timeout=TIMEOUT)
        frames = await asked_frames(server, session, f"url {name}?")
    check_frames(media, frames, status)


async def test_url_index_at_end_is_read_by_ranges(
    server: Live[FakeEngine], range_files: FileServer, ffmpeg_corpus: Corpus
) -> None:
    """A camera's MOV larger than one fetch read, index at the end, is read with range requests."""
    media = ffmpeg_corpus["mov"]
    size = media.path.stat().st_size
    assert not media.streamable and size > 2 * CHUNK_BYTES_FETCHED, size
    async with connect(server.url, fps=FPS) as session:
        await session.send_url(range_files.url(media.path.name))
        status = await session.wait_ended(timeout=TIMEOUT)
    await asyncio.to_thread(range_files.wait_idle)
    served = [s for s in range_files.log if s.path == f"/{media.path.name}"]
    assert HTTPStatus.PARTIAL_CONTENT in [s.status for s in served], served
    assert status.frames == media.expected_frames(FPS)


@pytest.mark.parametrize("name", STREAMABLE)
async def test_pushed_in_odd_chunks(
    server: Live[FakeEngine], ffmpeg_corpus: Corpus, name: str
) -> None:
    """A streamable file's raw bytes pushed in 7919-byte pieces give its own frames."""
    media = ffmpeg_corpus[name]
    async with connect(server.url, fps=FPS) as session:
        await session.send_bytes(
            media.path.read_bytes(), format=media.format, chunk_bytes=CHUNK_BYTES
        )
        await session.end_video()
        status = await session.wait_ended(timeout=TIMEOUT)
        frames = await asked_frames(server, session, f"push {name}?")
    check_frames(media, frames, status)


@pytest.mark.parametrize("name", sorted(INDEX_AT_END))
async def test_pushed_index_at_end_is_refused_with_the_remedy(
    server: Live[FakeEngine], ffmpeg_corpus: Corpus, name: str
) -> None:
    """Raw bytes of an MP4/MOV whose index is at the end get video_unsupported saying what to do."""
    media = ffmpeg_corpus[name]
    async with connect(server.url, fps=FPS) as session:
        with pytest.raises(ServerError):
            await session.send_bytes(
                media.path.read_bytes(), format=media.format, chunk_bytes=CHUNK_BYTES
            )
            await session.end_video()
            await session.wait_ended(timeout=TIMEOUT)
        first = session.errors[0]
    assert first.code == "video_unsupported" and not first.fatal, first
    assert re.search(r"faststart|fragmented|as a file|send_file|remux", first.message, re.I), (
        first.message
    )


@pytest.mark.engine
async def test_real_engine_answers_on_the_upright_portrait(
    live: Live, ffmpeg_corpus: Corpus
) -> None:
    """The real engine answers on the phone's portrait file, whose window holds upright frames."""
    media = ffmpeg_corpus["portrait"]
    fps = live.state.settings.fps
    async with connect(live.url, fps=fps) as session:
        await session.send_file(media.path)
        status = await session.wait_ended(timeout=TIMEOUT)
        (held,) = [s for s in live.state.sessions if s.id == session.session_id]
        frames = held.protocol.window.select()
        answer = await session.ask("Which way up is it?", max_tokens=8).result()
    corners = [marker_corner(frame.image) for frame in frames]
    assert all(w < h for w, h in (frame.size for frame in frames)), [f.size for f in frames]
    assert corners == ["top-left"] * len(frames), f"the marker is at {corners}"
    assert status.frames == len(frames) == media.expected_frames(fps)
    assert (status.width, status.height) == frames[-1].size
    assert answer.done is not None and answer.done.finish_reason in ("stop", "length")
    assert answer.done.usage.frames == len(frames) and answer.done.usage.video_tokens > 0
