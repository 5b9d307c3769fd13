"""MP4 and MOV files with their index at the end, given as URLs: the index is fetched first.

The files are written by the ``ffmpeg`` command-line tool with its default
layout, as cameras and phones write them (``ftyp free mdat moov``, ``ftyp
wide mdat moov`` for MOV): H.264 with AAC, HEVC tagged ``hvc1``, MOV. Each is
given to a real server endpoint (Starlette's test client, real PyAV, the
scripted engine) as an ``http`` URL served by :class:`~tests.support.httpfiles.FileServer`
(which honours ranges and logs every byte it sends) and as a ``file:`` URL.
Sessions keep every frame (``fps`` 30, as the files), so what reaches the
engine is compared with the source frame by frame: the times ``ffprobe``
reads in the file, and the pictures the same session gets from FFmpeg's own
``qt-faststart`` rewrite of it. Bad servers and bad files (ranges ignored,
files cut short, an index over the bound) end in typed errors or the
documented read-through. The fetcher's own costs (requests, bytes, memory)
are measured on a larger file through :func:`streamchat.ingest.fetch.fetch_into`.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import subprocess
import threading
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from starlette.testclient import TestClient

from streamchat.app import SESSION_PATH, create_app
from streamchat.config import Settings
from streamchat.engine.fake import FakeEngine
from streamchat.ingest.faststart import read_box_header
from streamchat.ingest.feed import ByteFeed
from streamchat.ingest.fetch import CHUNK_BYTES, fetch_into
from streamchat.window import Frame
from tests.support.httpfiles import FileServer, Served
from tests.support.ssrf_net import PUBLIC, FakeDns, FakeInternet

FPS = 30
SECONDS = 4
INDEX_LIMIT = 8 << 20  # DecoderOptions.max_header_bytes, the bound on an MP4 header
HELLO = {"type": "hello", "fps": FPS, "window_frames": 128, "max_pixels": 112 * 112}

_SOURCES = ["-f", "lavfi", "-i", f"testsrc2=size=640x360:rate={FPS}"]
_SINE = ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"]
_X264 = ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-b:v", "3M"]
_X265 = ["-c:v", "libx265", "-preset", "ultrafast", "-x265-params", "log-level=error",
         "-tag:v", "hvc1", "-pix_fmt", "yuv420p", "-b:v", "1M"]  # fmt: skip
CLIPS = {
    "h264.mp4": [*_SOURCES, *_SINE, *_X264, "-c:a", "aac"],
    "hevc.mp4": [*_SOURCES, *_X265],
    "camera.mov": [*_SOURCES, *_SINE, *_X264, "-c:a", "aac"],
}


@dataclass(frozen=True)
class Clip:
    """A file written by ``ffmpeg``, where its boxes are, and its frames' times per ``ffprobe``."""

    path: Path
    boxes: dict[str, tuple[int, int]]  # kind -> (offset, size) of its first box
    times: list[float]  # seconds from the first frame
    reference: Path  # FFmpeg's qt-faststart rewrite of it

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    @property
    def index(self) -> tuple[int, int]:
        return self.boxes["moov"]


def _run(*args: str) -> str:
    done = subprocess.run(args, check=True, capture_output=True, text=True, timeout=300)
    return done.stdout


def _boxes(data: bytes) -> dict[str, tuple[int, int]]:
    boxes: dict[str, tuple[int, int]] = {}
    offset = 0
    while offset < len(data):
        header = read_box_header(data, offset)
        assert header is not None and header.size is not None
        boxes.setdefault(header.kind.decode(), (offset, header.size))
        offset += header.size
    return boxes


def _frame_times(path: Path) -> list[float]:
    out = _run("ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
               "frame=best_effort_timestamp_time", "-of", "csv=p=0", str(path))  # fmt: skip
    times = sorted(float(line.strip(",")) for line in out.split())
    return [t - times[0] for t in times]


def _clip(path: Path) -> Clip:
    boxes = _boxes(path.read_bytes())
    assert boxes["moov"][0] > boxes["mdat"][0], f"{path.name}: the index is not at the end"
    reference = path.with_name("faststart-" + path.name)
    _run("qt-faststart", str(path), str(reference))
    return Clip(path, boxes, _frame_times(path), reference)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Clip]:
    directory = tmp_path_factory.mktemp("media")
    clips = {}
    for name, args in CLIPS.items():
        path = directory / name
        _run("ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args, "-t", str(SECONDS),
             str(path))  # fmt: skip
        clips[name] = _clip(path)
    # Large enough that the first read ends in the media: the index needs a range request.
    assert all(clip.index[0] > CHUNK_BYTES for clip in clips.values())
    return clips


@pytest.fixture(scope="module")
def media_dir(media: dict[str, Clip]) -> Path:
    return next(iter(media.values())).path.parent


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture(scope="module")
def client(media_dir: Path, engine: FakeEngine) -> Iterator[TestClient]:
    # The files are served on loopback: private addresses allowed, as for a LAN camera.
    settings = Settings(
        allowed_file_dir=media_dir, fetch_allow_private=True, max_fps=FPS, fetch_timeout=60.0
    )
    with TestClient(create_app(settings, engine=engine)) as client:
        yield client


@pytest.fixture
def server(media_dir: Path) -> Iterator[FileServer]:
    with FileServer(media_dir) as server:
        yield server


@dataclass
class Played:
    """How a URL source ended and what the engine got for a question about it."""

    status: dict[str, Any]
    errors: list[dict[str, Any]]
    frames: list[Frame]


def play(client: TestClient, engine: FakeEngine, url: str) -> Played:
    """Open a session, play ``url`` to its end, and ask about every frame it left."""
    with client.websocket_connect(SESSION_PATH) as ws:
        ws.send_bytes(msgpack.packb(HELLO))
        assert msgpack.unpackb(ws.receive_bytes())["type"] == "ready"
        ws.send_bytes(msgpack.packb({"type": "video.url", "url": url}))
        errors = []
        while True:
            message: dict[str, Any] = msgpack.unpackb(ws.receive_bytes())
            if message["type"] == "error":
                errors.append(message)
            elif message.get("state") in ("ended", "failed"):
                break
        frames: list[Frame] = []
        if message["frames"]:
            ws.send_bytes(msgpack.packb({"type": "ask", "id": "q", "text": "what?"}))
            while msgpack.unpackb(ws.receive_bytes())["type"] != "answer.done":
                pass
            frames = list(engine.requests[-1].frames)
    return Played(message, errors, frames)


def _url(scheme: str, server: FileServer, path: Path) -> str:
    return server.url(path.name) if scheme == "http" else path.as_uri()


def _assert_fetched_once(log: list[Served], clip: Clip) -> None:
    """A plain GET left once the layout shows, the index by range, then the media from where
    the GET stopped: no byte of the file asked for twice."""
    offset, size = clip.index
    assert [(s.range, s.status) for s in log] == [
        (None, 200),
        (f"bytes={offset}-", 206),
        (f"bytes={CHUNK_BYTES}-{offset - 1}", 206),
    ]
    assert [(s.start, s.sent) for s in log[1:]] == [
        (offset, clip.size - offset),
        (CHUNK_BYTES, offset - CHUNK_BYTES),
    ]
    assert log[0].sent >= CHUNK_BYTES


# -- every frame, at its time ---------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "file"])
@pytest.mark.parametrize("name", list(CLIPS))
def test_an_index_at_the_end_decodes_every_frame_at_its_time(
    client: TestClient,
    engine: FakeEngine,
    server: FileServer,
    media: dict[str, Clip],
    name: str,
    scheme: str,
) -> None:
    """H.264, HEVC and MOV with the index last, by http and file URL: every frame ffprobe finds,
    at its time, the pictures FFmpeg's own faststart rewrite gives, each byte fetched once."""
    clip = media[name]
    played = play(client, engine, _url(scheme, server, clip.path))
    assert played.errors == []
    assert (played.status["state"], played.status["frames"]) == ("ended", len(clip.times))
    assert np.allclose([f.pts for f in played.frames], clip.times, atol=1e-3)
    if scheme == "http":
        server.wait_idle()
        _assert_fetched_once(server.log, clip)
    reference = play(client, engine, clip.reference.as_uri())
    assert [f.pts for f in played.frames] == [f.pts for f in reference.frames]
    for frame, same in zip(played.frames, reference.frames, strict=True):
        assert np.array_equal(frame.image, same.image)


def test_a_server_that_ignores_ranges_is_read_through(
    client: TestClient, engine: FakeEngine, server: FileServer, media: dict[str, Clip]
) -> None:
    """A server answering 200 to range requests: the fetch reads on to the bytes it wants, and
    every frame arrives at its time."""
    clip = media["h264.mp4"]
    server.ignore_ranges = True
    played = play(client, engine, server.url(clip.path.name))
    assert played.errors == []
    assert played.status["frames"] == len(clip.times)
    assert np.allclose([f.pts for f in played.frames], clip.times, atol=1e-3)
    server.wait_idle()
    offset, _ = clip.index
    assert [(s.range, s.status) for s in server.log] == [
        (None, 200),
        (f"bytes={offset}-", 200),
        (f"bytes={CHUNK_BYTES}-{offset - 1}", 200),
    ]
    assert server.log[1].complete  # read through to the index at the end


def test_a_server_that_sends_less_than_each_range_asked(
    client: TestClient, engine: FakeEngine, server: FileServer, media: dict[str, Clip]
) -> None:
    """A server capping each range response at 200 kB: the fetch asks again from where each one
    stopped, and every frame arrives at its time."""
    clip = media["h264.mp4"]
    server.max_range = 200_000
    played = play(client, engine, server.url(clip.path.name))
    assert played.errors == [] and played.status["frames"] == len(clip.times)
    assert np.allclose([f.pts for f in played.frames], clip.times, atol=1e-3)
    server.wait_idle()
    media_ranges = server.log[2:]
    offset, _ = clip.index
    assert len(media_ranges) == -(-(offset - CHUNK_BYTES) // 200_000)
    assert [s.start for s in media_ranges] == list(range(CHUNK_BYTES, offset, 200_000))
    assert all(s.status == 206 and s.complete for s in media_ranges)


def test_streamable_files_take_one_plain_request(
    client: TestClient, engine: FakeEngine, server: FileServer, media: dict[str, Clip]
) -> None:
    """A faststart MP4 and an MPEG-TS are fetched as before: one GET, no range, whole."""
    clip = media["h264.mp4"]
    ts = clip.path.with_name("remuxed.ts")
    if not ts.exists():
        _run("ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(clip.path), "-c", "copy",
             "-f", "mpegts", str(ts))  # fmt: skip
    for path in (clip.reference, ts):
        server.clear_log()
        played = play(client, engine, server.url(path.name))
        assert played.errors == [] and played.status["frames"] == len(clip.times)
        server.wait_idle()
        assert [(s.range, s.status, s.complete) for s in server.log] == [(None, 200, True)]


# -- bad files and bad servers -------------------------------------------------------------


def _cut(clip: Clip, name: str, at: int) -> Path:
    path = clip.path.with_name(name)
    path.write_bytes(clip.path.read_bytes()[:at])
    return path


@pytest.mark.parametrize("scheme", ["http", "file"])
def test_a_file_whose_index_never_arrives_is_a_decode_error(
    client: TestClient,
    engine: FakeEngine,
    server: FileServer,
    media: dict[str, Clip],
    scheme: str,
) -> None:
    """Cut in its media or in its index (a recording that never finished): video_decode_failed,
    saying so, with no frame and, when the size shows it, no range request."""
    clip = media["h264.mp4"]
    media_offset, media_size = clip.boxes["mdat"]
    cuts = {
        "cut-in-media.mp4": media_offset + media_size // 2,
        "cut-in-index.mp4": clip.index[0] + 100,
    }
    for name, at in cuts.items():
        server.clear_log()
        played = play(client, engine, _url(scheme, server, _cut(clip, name, at)))
        assert [(e["code"], "truncated" in e["message"]) for e in played.errors] == [
            ("video_decode_failed", True)
        ]
        assert played.status["frames"] == 0
        if scheme == "http":
            server.wait_idle()
            # In either order: the abandoned whole-file GET may be logged after the range request.
            ranges = sorted((s.range or "" for s in server.log), key=str)
            assert ranges == ([""] if at < clip.index[0] else ["", f"bytes={clip.index[0]}-"])


def test_a_server_that_cuts_the_file_or_the_connection(
    client: TestClient, engine: FakeEngine, server: FileServer, media: dict[str, Clip]
) -> None:
    """A server serving the file cut short is a decode error; one dropping the connection in the
    middle of the media is url_fetch_failed."""
    clip = media["h264.mp4"]
    server.truncate_to = clip.index[0] - 1000
    played = play(client, engine, server.url(clip.path.name))
    assert [e["code"] for e in played.errors] == ["video_decode_failed"]
    server.truncate_to = None
    server.drop_after = 2 * CHUNK_BYTES
    played = play(client, engine, server.url(clip.path.name))
    assert [e["code"] for e in played.errors] == ["url_fetch_failed"]


def _with_big_index(clip: Clip, extra: int) -> Path:
    """``clip`` with ``extra`` bytes of ``free`` inside its index: the same file, a larger moov."""
    data = clip.path.read_bytes()
    offset, size = clip.index
    assert offset + size == len(data)
    free = struct.pack(">I4s", 8 + extra, b"free") + bytes(extra)
    moov = struct.pack(">I4s", size + len(free), b"moov") + data[offset + 8 :] + free
    path = clip.path.with_name("big-index.mp4")
    path.write_bytes(data[:offset] + moov)
    return path


@pytest.mark.parametrize("scheme", ["http", "file"])
def test_an_index_over_the_bound_is_refused_unread(
    client: TestClient,
    engine: FakeEngine,
    server: FileServer,
    media: dict[str, Clip],
    scheme: str,
) -> None:
    """An index of 9 MiB (over the 8 MiB header bound) is video_too_large, refused from its
    size: its range response is abandoned after its first bytes."""
    clip = media["h264.mp4"]
    path = _with_big_index(clip, 9 << 20)
    played = play(client, engine, _url(scheme, server, path))
    assert [e["code"] for e in played.errors] == ["video_too_large"]
    assert "moov" in played.errors[0]["message"]
    if scheme == "http":
        server.wait_idle()
        first, index = server.log
        assert index.range == f"bytes={clip.index[0]}-" and not index.complete
        assert index.sent < index.length // 4


def test_pushed_chunks_of_an_index_at_the_end_say_what_to_do(
    client: TestClient, media: dict[str, Clip]
) -> None:
    """Pushed as chunks, such a file cannot be decoded: video_unsupported names the remedies."""
    data = media["h264.mp4"].path.read_bytes()
    with client.websocket_connect(SESSION_PATH) as ws:
        ws.send_bytes(msgpack.packb(HELLO))
        ws.receive_bytes()
        ws.send_bytes(msgpack.packb({"type": "video.chunk", "data": data[:65536]}))
        while (message := msgpack.unpackb(ws.receive_bytes()))["type"] != "error":
            pass
    assert message["code"] == "video_unsupported"
    assert "streamchat-client" in message["message"] and "+faststart" in message["message"]


# -- what the fetch costs -------------------------------------------------------------------


def _padded(clip: Clip, extra: int) -> Path:
    """``clip`` with ``extra`` zero bytes after its samples in ``mdat``: larger, same frames."""
    data = clip.path.read_bytes()
    offset, size = clip.boxes["mdat"]
    assert offset + size == clip.index[0]
    assert struct.unpack_from(">I", data, offset)[0] == size  # a 32-bit size, to grow
    header = struct.pack(">I4s", size + extra, b"mdat")
    path = clip.path.with_name("padded.mp4")
    path.write_bytes(data[:offset] + header + data[offset + 8 : offset + size] + bytes(extra)
                     + data[offset + size :])  # fmt: skip
    return path


def _fetch_measured(url: str, settings: Settings, **network: Any) -> tuple[str, int]:
    """Fetch ``url`` into a feed a thread drains: the SHA-256 of what the decoder would read,
    and the most memory Python held at once meanwhile, beyond what stays allocated after (the
    modules and caches the first fetch in a process loads)."""
    feed = ByteFeed(max_bytes=CHUNK_BYTES, read_timeout=30.0)
    digest = hashlib.sha256()

    def drain() -> None:
        while data := feed.read(65536):
            digest.update(data)

    reader = threading.Thread(target=drain)
    reader.start()
    tracemalloc.start()
    try:
        asyncio.run(fetch_into(url, feed, settings, **network))
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        feed.close()
        reader.join()
    return digest.hexdigest(), peak - current


@pytest.mark.parametrize("ignore_ranges", [False, True])
def test_a_large_file_is_fetched_once_and_never_held(
    media: dict[str, Clip], server: FileServer, ignore_ranges: bool
) -> None:
    """A 32 MiB MP4 with its index last: the decoder reads exactly qt-faststart's bytes, the
    fetcher holds a small part of the file at most, and only the abandoned first response sends
    bytes twice (all twice if the server ignores ranges)."""
    clip = media["h264.mp4"]
    path = _padded(clip, 32 << 20)
    reference = path.with_name("faststart-padded.mp4")
    _run("qt-faststart", str(path), str(reference))
    size = path.stat().st_size
    server.ignore_ranges = ignore_ranges
    settings = Settings(allowed_file_dir=path.parent, fetch_allow_private=True)
    expected = hashlib.sha256(reference.read_bytes()).hexdigest()
    for url in (server.url(path.name), path.as_uri()):
        digest, peak = _fetch_measured(url, settings)
        assert digest == expected
        assert peak < size // 8
    server.wait_idle()
    first, index, rest = server.log
    assert not first.complete and first.sent < size // 8  # left at once
    sent = sum(s.sent for s in server.log)
    if ignore_ranges:
        assert index.complete and sent > 2 * size
    else:
        assert (index.start, rest.start) == (clip.index[0] + (32 << 20), CHUNK_BYTES)
        assert sent - size == first.sent - CHUNK_BYTES  # only what the first response overran


def test_range_requests_go_to_the_address_checked_first(
    media: dict[str, Clip], server: FileServer
) -> None:
    """DNS answering a public address, then loopback (rebinding): the range requests for the
    index and the media go to the public address checked for the first one, never re-resolved."""
    clip = media["h264.mp4"]
    dns = FakeDns({"video.example": [[PUBLIC], ["127.0.0.1"]]})
    internet = FakeInternet(server.port)  # every connection reaches the file server
    url = f"http://video.example/{clip.path.name}"
    digest, _ = _fetch_measured(url, Settings(), resolver=dns, network=internet)
    assert digest == hashlib.sha256(clip.reference.read_bytes()).hexdigest()
    assert dns.queries == ["video.example"]
    assert len(internet.dials) >= 2 and set(internet.dials) == {(PUBLIC, 80)}
    server.wait_idle()
    _assert_fetched_once(server.log, clip)
