"""``python -m bench.concurrency``: how many real-time 720p30 sessions one server keeps up with.

``streamchat serve --engine fake`` runs in a subprocess; N sessions push the
same 720p30 H.264 clip (MPEG-TS, 20 s) at real-time pace (the bundled
client's ``send_file(realtime=True)``: each chunk leaves when the media it
holds would have been recorded), all starting together. A step *holds* when no
session reports an error and decoding keeps up: the largest ``decode_lag`` any
``video.status`` shows after a 2 s warm-up (the decoders start and probe
together), and the delay from a session's last byte to its ``ended`` status,
both stay at or under 1 s. N doubles while steps hold, then the gap to the
first failing N is bisected.

Reported per step: lag, server CPU (cores busy, and per session), server RSS
peak above the idle server, per session. The client runs in the benchmark
process and its CPU is reported too: on a 2-core machine it competes with the
server, as any load generator on the same machine would.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]  # no stubs in the test extras

from streamchat_client import VideoStatus, connect

from .common import base_parser, print_table, summarise, write_result
from .media import Clip, encode_clip
from .servers import ResourceSampler, StreamchatServer, start_streamchat

__all__ = ["main"]

MIB = 1 << 20
LAG_LIMIT = 1.0
WARMUP = 2.0
_SETTLE = 1.0  # seconds for the previous step's sessions to close before the baseline


@dataclass
class _SessionFigures:
    max_lag: float = 0.0
    max_lag_warm: float = 0.0
    end_delay: float = 0.0
    frames: int = 0
    error: str | None = None
    lags: list[float] = field(default_factory=list)


async def _one_session(server: StreamchatServer, clip: Clip, delay: float) -> _SessionFigures:
    figures = _SessionFigures()
    await asyncio.sleep(delay)  # a staggered start (--stagger): the step's schedule
    started = time.monotonic()

    def on_status(status: VideoStatus) -> None:
        figures.max_lag = max(figures.max_lag, status.decode_lag)
        if time.monotonic() - started >= WARMUP:
            figures.max_lag_warm = max(figures.max_lag_warm, status.decode_lag)

    try:
        async with connect(server.ws_url, on_status=on_status) as session:
            await session.send_file(clip.path, realtime=True, format=clip.container)
            sent = time.monotonic()
            status = await session.wait_ended(timeout=clip.seconds * 4 + 30)
            figures.end_delay = time.monotonic() - sent
            figures.frames = status.frames_decoded
            if session.errors:
                figures.error = "; ".join(str(e) for e in session.errors)
    except Exception as exc:  # a failing session fails the step, not the benchmark
        figures.error = f"{type(exc).__name__}: {exc}"
    return figures


async def _step(
    server: StreamchatServer, clip: Clip, n: int, stagger: float = 0.0
) -> dict[str, Any]:
    await asyncio.sleep(_SETTLE)  # let the previous step's decoder threads exit
    sampler = ResourceSampler(server)
    _, baseline = sampler.sample()
    cpu_before = server.cpu_seconds()
    client = psutil.Process()
    client_before = sum(client.cpu_times()[:2])
    sampler.start()
    started = time.monotonic()
    sessions = await asyncio.gather(
        *(_one_session(server, clip, i * stagger / n) for i in range(n))
    )
    wall = time.monotonic() - started
    await sampler.stop()
    cpu = server.cpu_seconds() - cpu_before
    client_cpu = sum(client.cpu_times()[:2]) - client_before
    peak = max(r for _, r in sampler.samples)
    errors = [s.error for s in sessions if s.error]
    worst_lag = max(max(s.max_lag_warm, s.end_delay) for s in sessions)
    held = not errors and worst_lag <= LAG_LIMIT
    return {
        "sessions": n,
        "stagger_seconds": stagger,
        "held": held,
        "worst_lag": worst_lag,
        "max_decode_lag_warm": max(s.max_lag_warm for s in sessions),
        "max_decode_lag": max(s.max_lag for s in sessions),
        "max_end_delay": max(s.end_delay for s in sessions),
        "wall_seconds": wall,
        "server_cpu_cores": cpu / wall,
        "server_cpu_cores_per_session": cpu / wall / n,
        "client_cpu_cores": client_cpu / wall,
        "rss_idle_mib": baseline / MIB,
        "rss_peak_mib": peak / MIB,
        "rss_per_session_mib": (peak - baseline) / MIB / n,
        "frames_per_session": summarise([s.frames for s in sessions]).as_dict(),
        "errors": errors[:5],
    }


async def _search(server: StreamchatServer, clip: Clip, limit: int) -> list[dict[str, Any]]:
    """Double N while steps hold, then bisect between the last held and the first failed."""
    steps: dict[int, dict[str, Any]] = {}

    async def measure(n: int) -> bool:
        print(f"  {n} session(s) ...", end="", flush=True)
        steps[n] = await _step(server, clip, n)
        print(" held" if steps[n]["held"] else " behind", f"(lag {steps[n]['worst_lag']:.2f} s)")
        return bool(steps[n]["held"])

    good, bad = 0, limit + 1
    n = 1
    while n <= limit and await measure(n):
        good, n = n, n * 2
    bad = min(bad, n)
    while bad - good > 1 and bad <= limit:
        middle = (good + bad) // 2
        if await measure(middle):
            good = middle
        else:
            bad = middle
    return [steps[k] for k in sorted(steps)]


def _table(steps: list[dict[str, Any]]) -> None:
    rows = [
        [
            str(s["sessions"]),
            "yes" if s["held"] else "no",
            f"{s['max_decode_lag_warm']:.2f}",
            f"{s['max_end_delay']:.2f}",
            f"{s['server_cpu_cores']:.2f}",
            f"{s['server_cpu_cores_per_session']:.3f}",
            f"{s['client_cpu_cores']:.2f}",
            f"{s['rss_peak_mib']:.0f}",
            f"{s['rss_per_session_mib']:.1f}",
        ]
        for s in steps
    ]
    headers = ["N", "held", "lag s", "end s", "cpu", "cpu/sess", "client cpu"]
    print_table([*headers, "RSS MiB", "RSS/sess MiB"], rows)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        clip = encode_clip(args.out, "h264", width=320, height=180, seconds=3)
        limit, repeat = 2, 1
    else:
        clip = encode_clip(args.out, "h264", width=1280, height=720, seconds=args.seconds)
        limit, repeat = args.max_sessions, args.repeat
    searches: list[dict[str, Any]] = []
    for index in range(repeat):
        print(f"search {index + 1}/{repeat}: {clip.label} at real-time pace", flush=True)
        async with start_streamchat(args.out / "concurrency-server.log") as server:
            if args.sessions:  # one step, e.g. to profile the server at a given N
                print(f"  server pid {server.process.pid}", flush=True)
                steps = [await _step(server, clip, args.sessions, args.stagger)]
            else:
                steps = await _search(server, clip, limit)
        _table(steps)
        held = [s for s in steps if s["held"]]
        best = max(held, key=lambda s: s["sessions"]) if held else None
        searches.append({"max_sessions_held": best["sessions"] if best else 0, "steps": steps})
    best_n = summarise([s["max_sessions_held"] for s in searches])
    print(f"largest N held: {best_n.text(0)} (limit tried: {limit})")
    return {
        "quick": args.quick,
        "repeat": repeat,
        "clip": clip.as_dict(),
        "lag_limit_seconds": LAG_LIMIT,
        "warmup_seconds": WARMUP,
        "session_limit": limit,
        "max_sessions_held": best_n.as_dict(),
        "searches": searches,
    }


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0], repeat=1)
    parser.add_argument("--seconds", type=float, default=20.0, help="clip (and step) length")
    parser.add_argument("--max-sessions", type=int, default=64, help="stop the search here")
    parser.add_argument(
        "--sessions", type=int, default=0, help="measure only this N (no search), e.g. to profile"
    )
    parser.add_argument(
        "--stagger",
        type=float,
        default=0.0,
        help="with --sessions: spread the session starts evenly over this many seconds",
    )
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    write_result(Path(args.out), "concurrency", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
