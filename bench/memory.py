"""``python -m bench.memory``: server RSS over one long stream (should stay flat).

One session streams 30 minutes of 720p H.264 video (a 10 s clip remuxed again
and again into one continuous MPEG-TS stream with rising timestamps) to
``streamchat serve --engine fake`` in a subprocess, faster than real time:
the client pushes as fast as the server decodes, holding at most half the
server's undecoded-byte buffer in flight (as the bundled client's
``send_file`` does), so the feed is always busy but never overflows. The
server's RSS is sampled every half second with psutil.

Reported: RSS before the session; once the frame window has filled (from
then on the window holds a constant number of frames, so memory should not
grow); at the last sample while the stream was still being pushed; after the
source ended (decoder gone, window still held); the peak after the fill; the
growth from the fill to the last sample while decoding; and a least-squares
slope over the samples in between, in MiB per hour of video. A leak shows as
a positive slope and growth; allocator noise as a few MiB either way.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from streamchat_client import Session, VideoStatus, connect

from .common import base_parser, print_table, summarise, write_result
from .media import encode_clip, looped_mpegts
from .servers import ResourceSampler, StreamchatServer, start_streamchat

__all__ = ["main"]

MIB = 1 << 20
_STALL_SECONDS = 30.0
"""A push waits at most this long for the server to decode before giving up."""


class _FlowControl:
    """Holds the push while more than half the server's buffer is undecoded.

    ``send_bytes`` has no flow control of its own (``send_file`` does, but
    the looped stream is generated on the fly, not a file): this mirrors
    ``send_file``'s, from the public ``video.status`` callback.
    """

    def __init__(self, session: Session, sampler: ResourceSampler) -> None:
        self.session = session
        self.sampler = sampler
        self.changed = asyncio.Event()
        self.window_full: tuple[float, int, float] | None = None
        """(seconds since start, RSS, video seconds) when the window first filled."""
        self.max_lag = 0.0
        session.on_status = self._on_status

    def _on_status(self, status: VideoStatus) -> None:
        self.changed.set()
        self.max_lag = max(self.max_lag, status.decode_lag)
        if self.window_full is None and status.frames >= self.session.limits.window_frames:
            at, rss = self.sampler.sample()
            self.window_full = (at, rss, status.last_pts or 0.0)

    async def wait_room(self, sent: int) -> None:
        budget = self.session.limits.video_buffer_bytes // 2
        while True:
            status = self.session.status
            decoded = 0 if status is None else status.bytes_received - status.backlog_bytes
            if status is not None and status.state != "decoding":
                raise RuntimeError(f"the source ended early: {self.session.errors}")
            if sent - decoded <= budget:
                return
            self.changed.clear()
            async with asyncio.timeout(_STALL_SECONDS):
                await self.changed.wait()


def _slope(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over time, bytes per second."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_r = sum(r for _, r in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    if var == 0:
        return 0.0
    return sum((t - mean_t) * (r - mean_r) for t, r in samples) / var


async def _one_run(
    server: StreamchatServer, args: argparse.Namespace, total: float
) -> dict[str, Any]:
    clip = encode_clip(
        args.out, "h264", width=args.width, height=args.height, seconds=args.clip_seconds
    )
    sampler = ResourceSampler(server)
    _, baseline = sampler.sample()
    sampler.start()
    async with connect(server.ws_url) as session:
        flow = _FlowControl(session, sampler)
        step = max(1, session.limits.video_buffer_bytes // 8)
        started = time.perf_counter()
        sent = 0
        for piece in looped_mpegts(clip, total):
            for offset in range(0, len(piece), step):
                chunk = piece[offset : offset + step]
                await flow.wait_room(sent + len(chunk))
                await session.send_bytes(chunk, format="mpegts")
                sent += len(chunk)
        last_decoding, _ = sampler.sample()
        await session.end_video()
        status = await session.wait_ended(timeout=_STALL_SECONDS + total)
        elapsed = time.perf_counter() - started
        _, end_rss = sampler.sample()
        await sampler.stop()
        window_frames = session.limits.window_frames
    if flow.window_full is None:
        raise RuntimeError("the window never filled")
    full_at, full_rss, _ = flow.window_full
    # A short (quick) stream may be pushed whole before the window fills.
    after = [(t, r) for t, r in sampler.samples if full_at <= t <= last_decoding] or [
        (full_at, full_rss)
    ]
    decoding_rss = after[-1][1]
    video_seconds = float(status.last_pts or 0.0)
    media_per_wall = video_seconds / elapsed
    return {
        "video_seconds": video_seconds,
        "wall_seconds": elapsed,
        "realtime": media_per_wall,
        "bytes_pushed": sent,
        "frames_decoded": status.frames_decoded,
        "window_frames": window_frames,
        "max_decode_lag": flow.max_lag,
        "rss_baseline_mib": baseline / MIB,
        "rss_window_full_mib": full_rss / MIB,
        "rss_last_decoding_mib": decoding_rss / MIB,
        "rss_end_mib": end_rss / MIB,
        "rss_peak_after_fill_mib": max(r for _, r in after) / MIB,
        "growth_mib": (decoding_rss - full_rss) / MIB,
        # bytes per wall second -> MiB per hour of video
        "slope_mib_per_video_hour": _slope(after) * 3600 / media_per_wall / MIB,
        "samples": [(round(t, 2), round(r / MIB, 1)) for t, r in sampler.samples],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        args.width, args.height, args.clip_seconds = 320, 180, 4.0
    total = 30.0 if args.quick else args.minutes * 60
    repeat = 1 if args.quick else args.repeat
    runs = []
    for index in range(repeat):
        print(f"run {index + 1}/{repeat}: {total:g} s of {args.height}p H.264", flush=True)
        async with start_streamchat(args.out / "memory-server.log") as server:
            runs.append(await _one_run(server, args, total))
    keys = [
        "rss_baseline_mib",
        "rss_window_full_mib",
        "rss_last_decoding_mib",
        "rss_end_mib",
        "rss_peak_after_fill_mib",
        "growth_mib",
        "slope_mib_per_video_hour",
        "realtime",
        "max_decode_lag",
    ]
    summary = {key: summarise([r[key] for r in runs]).as_dict() for key in keys}
    print_table(
        ["figure", "median (min-max)"],
        [[key, summarise([r[key] for r in runs]).text(1)] for key in keys],
    )
    return {
        "quick": args.quick,
        "repeat": repeat,
        "video": {"height": args.height, "width": args.width, "seconds": total, "codec": "h264"},
        "summary": summary,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0], repeat=1)
    parser.add_argument("--minutes", type=float, default=30.0, help="video length")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--clip-seconds", type=float, default=10.0, help="the looped clip")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    write_result(Path(args.out), "memory", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
