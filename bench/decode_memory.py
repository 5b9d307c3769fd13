"""``python -m bench.decode_memory``: peak RSS of N concurrent large decodes under the budget.

Encodes one H.264 clip of the worst kind a legal stream is (16 reference frames,
B-pyramid) with ``ffmpeg``, then starts ``--decoders`` decodes of it at once in
one process, each through the server's decoding memory
(:class:`streamchat.media.DecodeMemory`) sized for ``--fit`` decoders. RSS is
sampled every 10 ms with psutil. Printed: the estimate per decoder, the
budget, the process RSS before (baseline, after a warm-up decode), the peak
during, and the peak over the baseline against the budget; with ``--fit`` as
many as ``--decoders`` the same run shows what the decodes cost unbounded.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # no stubs in the test extras

from streamchat.errors import DecoderBusy
from streamchat.media import DecodeMemory, DecoderOptions, decode_stream, map_large_blocks
from streamchat.media.memory import decoder_bytes

MIB = 1 << 20


def _clip(width: int, height: int, seconds: float, out: Path) -> bytes:
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
         f"testsrc2=size={width}x{height}:rate=30:duration={seconds}",
         "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
         "-x264-params", "ref=16:bframes=3:b-pyramid=normal", "-f", "mpegts", str(out)],
        check=True,
    )  # fmt: skip
    return out.read_bytes()


async def _run(args: argparse.Namespace, data: bytes) -> None:
    threads = 2
    one = decoder_bytes(args.width, args.height, threads=threads)
    memory = DecodeMemory(one * args.fit, wait=120.0, max_waiters=64, threads=threads)
    options = DecoderOptions(max_decode_pixels=4096 * 2304)
    process = psutil.Process()

    def decode(hold_memory: bool) -> str:
        stop = threading.Event()
        hold = memory.hold(stop, "bench")
        need = hold.need if hold_memory else None
        try:
            memory.holding(
                hold,
                lambda: decode_stream(io.BytesIO(data), options, lambda f: None, stop, memory=need),
            )
        except DecoderBusy:
            return "busy"
        return "ok"

    await asyncio.to_thread(decode, False)  # warm-up: libraries loaded, pools made
    baseline = process.memory_info().rss
    peak = baseline
    sampling = True

    def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.monotonic()
    outcomes = await asyncio.gather(
        *(asyncio.to_thread(decode, True) for _ in range(args.decoders))
    )
    elapsed = time.monotonic() - start
    sampling = False
    sampler.join()
    print(f"clip {args.width}x{args.height} {len(data) / MIB:.1f} MiB; decoders {args.decoders}")
    print(
        f"estimate per decoder {one / MIB:.0f} MiB; budget {memory.budget.capacity / MIB:.0f} MiB"
    )
    print(f"outcomes {outcomes}; {elapsed:.1f} s")
    print(f"RSS baseline {baseline / MIB:.0f} MiB, peak {peak / MIB:.0f} MiB")
    over = (peak - baseline) / MIB
    print(f"peak over baseline {over:.0f} MiB (budget {memory.budget.capacity / MIB:.0f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--decoders", type=int, default=6)
    parser.add_argument("--fit", type=int, default=2, help="decoders the budget holds")
    args = parser.parse_args()
    map_large_blocks()  # as ``streamchat serve`` does
    with tempfile.TemporaryDirectory() as tmp:
        data = _clip(args.width, args.height, args.seconds, Path(tmp) / "clip.ts")
    asyncio.run(_run(args, data))


if __name__ == "__main__":
    main()
