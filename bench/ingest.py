"""``python -m bench.ingest``: decode+sample+resize throughput, beside ``ffmpeg -f null``.

For each clip (720p and 1080p; H.264 in MPEG-TS, VP8 and VP9 in WebM) and each
repetition, the same file goes through, in turn:

* ``ffmpeg``: ``ffmpeg -threads auto -i FILE -f null -``, the reference (decode
  only, no sampling, no conversion), if the tool is installed;
* ``feed``: streamchat's ingest path without the network: a producer thread
  pushes 64 KiB chunks through a :class:`~streamchat.ingest.feed.ByteFeed` into
  :func:`~streamchat.media.decoder.decode_stream` (sampling 2 fps, resized by swscale
  to the default 448x448 pixel budget), as a session does;
* ``feed-keyframes``: the same with ``keyframes_only=True``, the fast path;
* ``feed-area``: ``feed`` with swscale's plain ``AREA`` conversion, as before
  full chroma interpolation (``FULL_CHR_H_INT | ACCURATE_RND``) was adopted: the
  ratio ``feed`` / ``feed-area`` is what the sharper colour edges cost;
* ``push``: end to end, the bundled client pushing the file over a loopback
  WebSocket to ``streamchat serve --engine fake`` in a subprocess, timed from
  the first chunk to the ``ended`` status;
* ``url``: the same server fetching the file from a local static HTTP server.

The modes of one repetition run back to back, so each ratio streamchat/ffmpeg
compares runs taken under the same load; ratios are computed per repetition
and summarised. Throughput counts *source* frames (all frames in the file,
whichever were decoded) per wall-clock second, and media seconds per second
(x real time).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from av.video.reformatter import Interpolation

from streamchat.config import Settings
from streamchat.ingest.feed import ByteFeed
from streamchat.media import decoder
from streamchat.media.decoder import DecoderOptions, decode_stream
from streamchat.window import Frame
from streamchat_client import connect

from .common import Summary, base_parser, ffmpeg_version, print_table, summarise, write_result
from .media import Clip, Codec, encode_clip
from .servers import StreamchatServer, serve_files, start_streamchat

__all__ = ["main"]

FPS = 2.0
CHUNK_BYTES = 64 * 1024
MODES = ("ffmpeg", "feed", "feed-keyframes", "feed-area", "push", "url")
STREAMCHAT_MODES = MODES[1:]
_SIZES = {"720p": (1280, 720), "1080p": (1920, 1080)}
_QUICK_SIZES = {"180p": (320, 180)}
_CODECS: tuple[Codec, ...] = ("h264", "vp8", "vp9")
_RUN_TIMEOUT = 600.0


# -- the ways of decoding one clip: each returns wall-clock seconds -------------


def run_ffmpeg(tool: str, clip: Clip) -> float:
    command = [tool, "-hide_banner", "-nostdin", "-loglevel", "error", "-threads", "auto"]
    command += ["-i", str(clip.path), "-f", "null", "-"]
    started = time.perf_counter()
    subprocess.run(command, check=True, timeout=_RUN_TIMEOUT, stdin=subprocess.DEVNULL)
    return time.perf_counter() - started


def run_feed_area(clip: Clip) -> float:
    """``run_feed`` with the decoder's conversion set back to plain ``AREA`` for this run."""
    full = decoder._INTERPOLATION
    decoder._INTERPOLATION = Interpolation.AREA
    try:
        return run_feed(clip, keyframes_only=False)
    finally:
        decoder._INTERPOLATION = full


def run_feed(clip: Clip, *, keyframes_only: bool) -> float:
    """The session's ingest path in-process: producer thread -> ByteFeed -> decode_stream."""
    settings = Settings()
    feed = ByteFeed(max_bytes=settings.feed_bytes, read_timeout=settings.video_read_timeout)
    options = DecoderOptions(
        fps=FPS,
        container=clip.container,
        max_decode_pixels=settings.max_decode_pixels,
        keyframes_only=keyframes_only,
    )
    data = clip.path.read_bytes()  # read before timing: the disk is not what is measured
    failure: list[BaseException] = []

    async def produce() -> None:
        view = memoryview(data)
        for offset in range(0, len(view), CHUNK_BYTES):
            await feed.put(bytes(view[offset : offset + CHUNK_BYTES]))
        feed.close()

    def producer() -> None:
        try:
            asyncio.run(produce())
        except BaseException as exc:
            failure.append(exc)
            feed.abort(exc)

    kept: list[Frame] = []
    started = time.perf_counter()
    thread = threading.Thread(target=producer, name="bench-producer", daemon=True)
    thread.start()
    try:
        report = decode_stream(feed, options, kept.append, threading.Event())
    finally:
        elapsed = time.perf_counter() - started
        feed.abort()  # releases a producer still waiting for room (after a failure)
        thread.join(_RUN_TIMEOUT)
    if failure:
        raise failure[0]
    if report.frames_emitted == 0:
        raise RuntimeError(f"{clip.label}: no frames kept")
    return elapsed


async def run_push(server: StreamchatServer, clip: Clip) -> float:
    async with connect(server.ws_url, fps=FPS) as session:
        started = time.perf_counter()
        await session.send_file(clip.path, format=clip.container)
        status = await session.wait_ended(timeout=_RUN_TIMEOUT)
        elapsed = time.perf_counter() - started
    _check_status(clip, status.frames_decoded, session.errors)
    return elapsed


async def run_url(server: StreamchatServer, base_url: str, clip: Clip) -> float:
    async with connect(server.ws_url, fps=FPS) as session:
        started = time.perf_counter()
        await session.send_url(f"{base_url}/{clip.path.name}", format=clip.container)
        status = await session.wait_ended(timeout=_RUN_TIMEOUT)
        elapsed = time.perf_counter() - started
    _check_status(clip, status.frames_decoded, session.errors)
    return elapsed


def _check_status(clip: Clip, frames: int, errors: list[Any]) -> None:
    if errors:
        raise RuntimeError(f"{clip.label}: the server reported {errors}")
    expected = int(clip.seconds * FPS)
    if frames < expected - 1:  # sampling may drop the last frame at the boundary
        raise RuntimeError(f"{clip.label}: {frames} frames reached the window, {expected} expected")


# -- the benchmark ------------------------------------------------------------------


async def _measure_clip(
    clip: Clip,
    repeat: int,
    tool: str | None,
    server: StreamchatServer,
    base_url: str,
) -> dict[str, list[float]]:
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    runs: dict[str, Callable[[], Any]] = {
        "feed": lambda: asyncio.to_thread(run_feed, clip, keyframes_only=False),
        "feed-keyframes": lambda: asyncio.to_thread(run_feed, clip, keyframes_only=True),
        "feed-area": lambda: asyncio.to_thread(run_feed_area, clip),
        "push": lambda: run_push(server, clip),
        "url": lambda: run_url(server, base_url, clip),
    }
    if tool is not None:
        runs = {"ffmpeg": lambda: asyncio.to_thread(run_ffmpeg, tool, clip), **runs}
    for _ in range(repeat):
        for mode, run in runs.items():
            seconds[mode].append(await run())
    return seconds


def _clip_result(clip: Clip, seconds: dict[str, list[float]]) -> dict[str, Any]:
    modes: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    for mode, times in seconds.items():
        if not times:
            modes[mode] = {"available": False}
            continue
        modes[mode] = {
            "available": True,
            "seconds": summarise(times).as_dict(),
            "fps": summarise([clip.frames / t for t in times]).as_dict(),
            "realtime": summarise([clip.seconds / t for t in times]).as_dict(),
        }
    reference = seconds["ffmpeg"]
    for mode in STREAMCHAT_MODES:
        # Paired per repetition: ffmpeg's time over ours is our speed over ffmpeg's.
        paired = [ref / t for ref, t in zip(reference, seconds[mode], strict=False)]
        ratios[mode] = summarise(paired).as_dict() if paired else None
    return {"label": clip.label, "clip": clip.as_dict(), "modes": modes, "ratio_vs_ffmpeg": ratios}


def _table(results: list[dict[str, Any]]) -> None:
    rows = []
    for result in results:
        for mode in MODES:
            figures = result["modes"][mode]
            if not figures["available"]:
                rows.append([result["label"], mode, "unavailable", "", ""])
                continue
            fps = Summary(**figures["fps"]).text(0)
            realtime = Summary(**figures["realtime"]).text(1)
            ratio = result["ratio_vs_ffmpeg"].get(mode)
            rows.append(
                [
                    result["label"],
                    mode,
                    fps,
                    realtime,
                    Summary(**ratio).text(2) if ratio else "",
                ]
            )
    print_table(["clip", "mode", "source fps", "x real time", "vs ffmpeg"], rows)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = _QUICK_SIZES if args.quick else _SIZES
    seconds = 2.0 if args.quick else args.seconds
    repeat = 1 if args.quick else args.repeat
    tool = shutil.which("ffmpeg")
    if tool is None:
        print("ffmpeg is missing: no reference figures (apt-get install -y ffmpeg)")
    clips = [
        encode_clip(args.out, codec, width=w, height=h, seconds=seconds)
        for w, h in sizes.values()
        for codec in _CODECS
    ]
    results = []
    # The clips are served from loopback, which the server refuses to fetch from by default.
    async with start_streamchat(
        args.out / "ingest-server.log", extra=["--fetch-allow-private"]
    ) as server:
        with serve_files(clips[0].path.parent) as base_url:
            for clip in clips:
                print(f"{clip.label}: {clip.frames} frames, {repeat} repetition(s)", flush=True)
                times = await _measure_clip(clip, repeat, tool, server, base_url)
                results.append(_clip_result(clip, times))
    _table(results)
    return {
        "quick": args.quick,
        "repeat": repeat,
        "settings": {"fps": FPS, "chunk_bytes": CHUNK_BYTES, "max_pixels": Settings().max_pixels},
        "ffmpeg": {"available": tool is not None, "version": ffmpeg_version()},
        "clips": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0], repeat=3)
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="clip length (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    write_result(Path(args.out), "ingest", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
