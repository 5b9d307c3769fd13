"""Hostile media: a corpus generated here, through the decoder and through a served session.

Every item is real media with one thing wrong (cut short, lying about its size,
length or sample count, a playlist pointing elsewhere) or no media at all. Each
must end with its own typed error code, never a crash, and a resolution or
index bomb must be refused before FFmpeg allocates for it: the served test
samples the server's RSS throughout and bounds its peak.

Playlists (HLS, ffconcat) name a FIFO, which an ``open`` for reading would block
on (so a decoder that followed the entry would never report), and which tells
afterwards whether anyone has it open; and a loopback HTTP server that counts
requests. The control test shows both detectors fire on an unsandboxed FFmpeg.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import io
import os
import random
import re
import struct
import threading
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import av
import pytest
from starlette.types import Receive, Scope, Send

from streamchat.errors import StreamchatError
from streamchat.media.decoder import DecoderOptions, decode_image, decode_stream
from streamchat.window import Frame
from streamchat_client import ServerError, connect
from tests.support.live import serve, serve_files
from tests.support.measure import RssSampler, high_water_mark
from tests.support.media import (
    Codec,
    Container,
    encode_image,
    encode_video,
    patch_fmp4_largesize,
    patch_fmp4_samples,
    patch_h264_size,
    patch_jpeg_size,
    patch_mp4_header,
    patch_png_size,
    patch_vp8_size,
    pattern_frame,
)
from tests.support.process import ServerProcess, server_process

MAX_SOURCE_SECONDS = 600.0
MAX_SOURCE_FRAMES = 200
SERVER_FLAGS = [
    "--max-source-seconds",
    str(MAX_SOURCE_SECONDS),
    "--max-source-frames",
    str(MAX_SOURCE_FRAMES),
]
RSS_HEADROOM = 300 * 1024 * 1024
"""Peak server RSS may exceed its baseline (after a warm-up video) by this much.

One 8192x8192 frame is 96 MiB in YUV 4:2:0, and a decoder holds several, so a
bomb that got through would break the bound; 50 million MP4 index entries
would need about 1.2 GB, and a fragment declaring 20 million samples took 700 MB.
"""
ITEM_TIMEOUT = 30.0
DECODE = "video_decode_failed"
LARGE = "video_too_large"


@dataclass(frozen=True)
class Item:
    """One corpus entry: bytes, how they are sent, and how the source must end."""

    name: str
    data: bytes
    hint: str | None  # the client's `format` field
    code: str | None  # the error code; None: the source ends normally
    frames: bool = False  # frames are decoded before the end or the failure
    image: bool = False  # sent as an `image` message, not as a video source


def _zip(data: bytes, compression: int) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=compression) as archive:
        archive.writestr("clip.ts", data)
        archive.writestr("readme.txt", "a clip " * 100)
    return out.getvalue()


def _gif() -> bytes:
    out = io.BytesIO()
    with av.open(out, "w", format="gif") as container:
        stream = container.add_stream("gif", rate=10)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "rgb8"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(pattern_frame(i, 160, 120), format="rgb24")
            frame = frame.reformat(format="rgb8")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return out.getvalue()


@functools.cache
def corpus() -> tuple[Item, ...]:
    """Every item that needs no playlist target; encoded once per test session."""
    ts = encode_video(container="mpegts", codec="h264", seconds=2)
    later = encode_video(container="mpegts", codec="h264", seconds=2, start_pts=2.0)
    webm = encode_video(container="webm", codec="vp8", seconds=2)
    faststart = encode_video(container="mp4-faststart", codec="h264", seconds=2)
    fragmented = encode_video(container="mp4", codec="h264", seconds=10)
    any_box = struct.pack(">I4s", 16, b"junk") + bytes(8)  # the MP4 prober skips any box
    png, jpeg = encode_image("png"), encode_image("jpeg")
    junk = random.Random(5).randbytes(200_000)
    items = [
        Item("random bytes", junk, None, "video_unsupported"),
        Item("random bytes as webm", junk, "webm", "video_decode_failed"),
        Item("zip (deflated)", _zip(ts, zipfile.ZIP_DEFLATED), None, "video_unsupported"),
        # A stored zip holds the TS byte for byte: the demuxer finds its packets.
        Item("zip (stored mpegts)", _zip(ts, zipfile.ZIP_STORED), None, None, frames=True),
        Item("gif", _gif(), None, "video_unsupported"),
        Item("vp8 12000x12000", patch_vp8_size(webm, 12000, 12000), "webm", "video_too_large"),
        Item("h264 8192x8192", patch_h264_size(ts, 8192, 8192), "mpegts", "video_too_large"),
        Item(
            "h264 160x120 then 8192x8192",
            ts + patch_h264_size(later, 8192, 8192),
            "mpegts",
            "video_too_large",
            frames=True,
        ),
        Item(
            "mp4 declaring 50M samples",
            patch_mp4_header(faststart, samples=50_000_000),
            "mp4",
            "video_too_long",
        ),
        Item(
            "fragmented mp4, first fragment declaring 20M samples",
            patch_fmp4_samples(fragmented, 20_000_000),
            "mp4",
            "video_too_long",
        ),
        Item(
            "fragmented mp4, 9th fragment declaring 20M samples",
            patch_fmp4_samples(fragmented, 20_000_000, fragment=8),
            "mp4",
            "video_too_long",
            frames=True,
        ),
        Item(
            "fragmented mp4, mdat of 2^62 bytes",
            patch_fmp4_largesize(fragmented, 1 << 62, fragment=1),
            "mp4",
            DECODE,
            frames=True,
        ),
        Item(
            "unknown box, then mp4 declaring 50M samples",
            any_box + patch_mp4_header(faststart, samples=50_000_000),
            None,
            "video_unsupported",
        ),
        Item(
            "mp4 declaring 10 hours",
            patch_mp4_header(faststart, seconds=36_000),
            "mp4",
            "video_too_long",
        ),
        Item(
            "timestamps jump by 20 min",
            ts + encode_video(container="mpegts", codec="h264", seconds=2, start_pts=1200),
            "mpegts",
            "video_too_long",
            frames=True,
        ),
        Item(
            f"{MAX_SOURCE_FRAMES + 10} frames",
            encode_video(container="webm", codec="vp8", seconds=(MAX_SOURCE_FRAMES + 10) / 10),
            "webm",
            "video_too_long",
            frames=True,
        ),
        Item("png 65535x65535", patch_png_size(png, 65535, 65535), None, LARGE, image=True),
        Item("png 10000x10000", patch_png_size(png, 10000, 10000), None, LARGE, image=True),
        Item("jpeg 65500x65500", patch_jpeg_size(jpeg, 65500, 65500), None, LARGE, image=True),
        Item("png, then junk", png[:33] + junk[:2000], None, "video_decode_failed", image=True),
        Item("gif as image", _gif(), None, "video_unsupported", image=True),
    ]  # fmt: skip
    # Truncated files: in the header, early, half way, just before the end.
    truncated: dict[Container, tuple[Codec, str, list[tuple[str | None, bool]]]] = {
        # container: (codec, hint, [(code, frames) at 1000 B, half, end - 7 B])
        "webm": ("vp8", "webm", [(None, True), (None, True), (None, True)]),
        "matroska": ("h264", "matroska", [(DECODE, False), (None, True), (None, True)]),
        "mp4": ("h264", "mp4", [(DECODE, False), (DECODE, True), (None, True)]),
        "mp4-faststart": ("h264", "mp4", [(DECODE, False), (None, True), (DECODE, True)]),
        "mpegts": ("h264", "mpegts", [(DECODE, False), (None, True), (None, True)]),
    }
    for container, (codec, hint, outcomes) in truncated.items():
        data = encode_video(container=container, codec=codec, seconds=2)
        items.append(Item(f"{container} cut at 100 B", data[:100], hint, DECODE))
        cuts = {"1000 B": 1000, "half": len(data) // 2, "end - 7 B": len(data) - 7}
        for (label, cut), (code, frames) in zip(cuts.items(), outcomes, strict=True):
            items.append(Item(f"{container} cut at {label}", data[:cut], hint, code, frames))
    return tuple(items)


# -- playlists and their targets ---------------------------------------------------------


class RequestCounter:
    """An HTTP app that serves an MPEG-TS segment for any path and records every request."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.paths: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.paths.append(scope["path"])
        headers = [(b"content-type", b"video/mp2t")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


@dataclass
class Targets:
    """What the playlists point at: a FIFO (also as ``seg.ts`` in ``directory``) and a URL."""

    directory: Path
    fifo: Path
    counter: RequestCounter
    url: str

    def playlists(self) -> list[Item]:
        hls = "\n".join(
            [
                "#EXTM3U",
                "#EXT-X-TARGETDURATION:2",
                "#EXTINF:2.0,",
                f"{self.url}/hls.ts",
                "#EXTINF:2.0,",
                self.fifo.as_uri(),
                "#EXTINF:2.0,",
                str(self.fifo),
                "#EXTINF:2.0,",
                "seg.ts",
                "#EXT-X-ENDLIST",
                "",
            ]
        )
        concat = f"ffconcat version 1.0\nfile seg.ts\nfile {self.fifo}\nfile {self.url}/c.ts\n"
        return [
            Item("hls playlist", hls.encode(), None, "video_unsupported"),
            Item("ffconcat list", concat.encode(), None, "video_unsupported"),
        ]

    def fifo_opened(self) -> bool:
        """True if anyone holds the FIFO open for reading (or waits to)."""
        try:
            fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no reader
                return False
            raise
        os.close(fd)
        return True


@pytest.fixture
async def targets(tmp_path: Path) -> AsyncIterator[Targets]:
    directory = tmp_path / "targets"
    directory.mkdir()
    fifo = directory / "seg.ts"
    os.mkfifo(fifo)
    counter = RequestCounter(encode_video(container="mpegts", codec="h264", seconds=1))
    async with serve(counter, lifespan="off") as url:
        yield Targets(directory, fifo, counter, url)


def _all_items(targets: Targets) -> list[Item]:
    return [*corpus(), *targets.playlists()]


# -- through the decoder ------------------------------------------------------------------


def _decode(item: Item) -> tuple[str | None, int]:
    """``(error code or None, frames emitted)`` of one item through the decoder itself."""
    frames: list[Frame] = []
    try:
        if item.image:
            decode_image(item.data)
            return None, 1
        options = DecoderOptions(
            container=item.hint,
            max_source_seconds=MAX_SOURCE_SECONDS,
            max_source_frames=MAX_SOURCE_FRAMES,
        )
        decode_stream(io.BytesIO(item.data), options, frames.append, threading.Event())
    except StreamchatError as exc:
        return exc.code, len(frames)
    return None, len(frames)


async def test_every_item_gets_its_typed_error_from_the_decoder(
    targets: Targets, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run directly, each item ends with its own code, with frames only where some came first.

    The working directory holds the FIFO as ``seg.ts``, the relative name the
    playlists use, so following a relative entry would block on it.
    """
    monkeypatch.chdir(targets.directory)
    observed = {}
    for item in _all_items(targets):
        async with asyncio.timeout(ITEM_TIMEOUT):
            code, frames = await asyncio.to_thread(_decode, item)
        observed[item.name] = (code, frames > 0)
    expected = {item.name: (item.code, item.frames) for item in _all_items(targets)}
    assert observed == expected
    assert targets.counter.paths == []
    assert not targets.fifo_opened()


async def test_the_playlists_reach_their_targets_without_the_sandbox(
    targets: Targets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control: an unrestricted FFmpeg follows HLS and concat entries, which the detectors see."""

    def play(text: str, fmt: str, options: dict[str, str]) -> int:
        with av.open(io.BytesIO(text.encode()), "r", format=fmt, options=options) as container:
            return len(list(container.decode(video=0)))

    hls = f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{targets.url}/hls.ts\n#EXT-X-ENDLIST\n"
    assert await asyncio.to_thread(play, hls, "hls", {}) == 10
    assert targets.counter.paths == ["/hls.ts"]
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "clip.ts").write_bytes(targets.counter.body)
    monkeypatch.chdir(plain)  # a relative concat entry names a file of the server's
    assert await asyncio.to_thread(play, "ffconcat version 1.0\nfile clip.ts\n", "concat", {}) == 10
    reader = os.open(targets.fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert targets.fifo_opened()
    finally:
        os.close(reader)
    assert not targets.fifo_opened()


# -- through a served session ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def streamchat_server(cwd: Path, *flags: str) -> AsyncIterator[ServerProcess]:
    async with server_process(
        "--engine", "fake", "--fetch-allow-private", *flags, cwd=cwd
    ) as served:
        yield served


@pytest.fixture(scope="module")
def valid_clip() -> bytes:
    return encode_video(container="webm", codec="vp8", seconds=1)


def _suffix(item: Item) -> str:
    return {"webm": ".webm", "matroska": ".mkv", "mp4": ".mp4", "mpegts": ".ts"}.get(
        item.hint or "", ".bin"
    )


async def test_a_served_session_survives_the_corpus_pushed_and_fetched(
    targets: Targets, tmp_path: Path, valid_clip: bytes
) -> None:
    """Each item, pushed and fetched, gets its code; the session goes on; RSS stays bounded."""
    items = _all_items(targets)
    www = tmp_path / "www"
    www.mkdir()
    (www / "valid.webm").write_bytes(valid_clip)
    files = {}
    for number, item in enumerate(items):
        files[item.name] = f"{number:02d}{_suffix(item)}"
        (www / files[item.name]).write_bytes(item.data)
    errors: asyncio.Queue[ServerError] = asyncio.Queue()
    observed: dict[tuple[str, str], tuple[str | None, bool]] = {}

    async with (
        serve_files(www) as base,
        streamchat_server(targets.directory, *SERVER_FLAGS) as server,
        connect(server.url, fps=2) as session,
    ):
        rss = RssSampler(server.process.pid)
        session.on_error = errors.put_nowait

        async def valid(mode: str) -> None:
            if mode == "push":
                await session.send_bytes(valid_clip, format="webm")
                await session.end_video()
            else:
                await session.send_url(f"{base}/valid.webm")
            status = await session.wait_ended(timeout=ITEM_TIMEOUT)
            assert status.frames == 2, (mode, status)

        async def run(item: Item, mode: str) -> tuple[str | None, bool]:
            while not errors.empty():
                errors.get_nowait()
            if item.image:
                await session.send_image(item.data)
                error = await asyncio.wait_for(errors.get(), ITEM_TIMEOUT)
                return error.code, False
            if mode == "push":  # one message: chunks after a failure would start a new source
                await session.send_bytes(item.data, format=item.hint, chunk_bytes=1 << 20)
                await session.end_video()
            else:
                await session.send_url(f"{base}/{files[item.name]}", format=item.hint)
            try:
                status = await session.wait_ended(timeout=ITEM_TIMEOUT)
            except ServerError:
                # The error itself, as sent: exactly one per failed source, not fatal.
                reported = [errors.get_nowait() for _ in range(errors.qsize())]
                assert len(reported) == 1 and not reported[0].fatal, (item.name, mode, reported)
                assert session.status is not None and session.status.state == "failed"
                return reported[0].code, session.status.frames > 0
            assert errors.empty(), (item.name, mode, errors.get_nowait())
            return None, status.frames > 0

        for mode in ("push", "url"):
            await valid(mode)  # warm-up: the baseline is a server that has decoded video
        baseline = rss.now()
        for item in items:
            for mode in ("push",) if item.image else ("push", "url"):
                observed[(item.name, mode)] = await run(item, mode)
                assert not session.closed
                await valid(mode)
        answer = await session.ask("What is moving?", max_tokens=8).result()
        peak = await rss.stop()
        high_water = high_water_mark(server.process.pid)
        assert server.process.returncode is None
        await server.stop()

    expected = {
        (item.name, mode): (item.code, item.frames)
        for item in items
        for mode in (("push",) if item.image else ("push", "url"))
    }
    assert observed == expected
    assert answer.text
    assert targets.counter.paths == []
    assert not targets.fifo_opened()
    bad = [line for line in server.log if "Traceback" in line or re.search(r"\bERROR\b", line)]
    assert bad == []
    mib = 1024 * 1024
    report = (
        f"RSS baseline {baseline / mib:.0f} MiB, sampled peak {peak / mib:.0f} MiB "
        f"({rss.samples} samples), kernel high-water mark {high_water / mib:.0f} MiB, "
        f"bound {(baseline + RSS_HEADROOM) / mib:.0f} MiB"
    )
    print(report)
    for (name, mode), (code, frames) in observed.items():
        print(f"| {name} | {mode} | {code} | {'frames kept' if frames else ''} |")
    assert peak < baseline + RSS_HEADROOM, report
    assert high_water < baseline + RSS_HEADROOM, report
