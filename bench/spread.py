"""``python -m bench.spread``: decoding a few frames spread over a whole file, beside vLLM's loader.

What the OpenAI-compatible door does with a ``video_url`` before the engine
sees it: 32 frames spread over the clip (vLLM's ``linspace`` choice), resized
to 448x448's pixel budget. For each clip (H.264 640x360 at 30 fps, a keyframe
every 2 s, in an MP4 with its index first: the clips of ``bench.peer``) and
each repetition, in turn:

* ``streamchat``: the door's decode (``videocache``'s ``video_frames``) of the
  file's bytes through a :class:`~streamchat.ingest.ByteFeed`: of an MP4 only
  the groups of pictures that hold the wanted frames are decoded;
* ``streamchat-all``: the same with every frame decoded (as for a video whose
  length is not declared: MPEG-TS, a recorder's WebM), kept at the spread's rate;
* ``vllm``: vLLM's own loader for Qwen2-VL (OpenCV: ``grab`` every frame up to
  the last one wanted, ``retrieve`` the wanted ones) on the same bytes, asked
  for the same ``num_frames`` and ``fps``.

Wall time and the frames decoded (streamchat's report; vLLM's, every frame
up to the last it wants) per clip, after one untimed run of each (imports);
ratios per repetition, summarised. vLLM's processor then resizes its frames
(not timed here; streamchat's come resized).
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import lengths_parser, print_table, summarise, write_result
from bench.media import CLIP_LENGTHS, Clip, peer_clip

logger = logging.getLogger("bench.spread")

FRAMES = 32
_MAX_PIXELS = 448 * 448
MODES = ("streamchat", "streamchat-all", "vllm")


def _streamchat(clip: Clip, *, planned: bool) -> tuple[float, int, int]:
    """Seconds, frames kept and frames decoded, as the door decodes a ``file:`` URL."""
    from streamchat.config import Settings
    from streamchat.ingest import ByteFeed
    from streamchat.media import DecoderOptions, FrameSpread, decode_stream

    settings = Settings()
    fps = FRAMES / clip.seconds
    options = DecoderOptions.from_settings(
        settings,
        fps=fps,
        min_pixels=settings.min_pixels,
        max_pixels=_MAX_PIXELS,
        spread=FRAMES if planned else None,
    )
    data = clip.path.read_bytes()
    started = time.perf_counter()
    feed = ByteFeed(max_bytes=len(data) + 1, read_timeout=60.0)
    feed.put_nowait(data)
    feed.close()
    chosen = FrameSpread(FRAMES)
    report = decode_stream(feed, options, chosen.add, threading.Event())
    kept = len(chosen.result())
    return time.perf_counter() - started, kept, report.frames_decoded


def _vllm(clip: Clip) -> tuple[float, int, int]:
    """Seconds, frames kept and frames decoded by vLLM's Qwen2-VL video loader."""
    from streamchat.engine import cpu_compat

    cpu_compat.install()
    from vllm.multimodal.video import Qwen2VLVideoBackend

    data = clip.path.read_bytes()
    started = time.perf_counter()
    frames, metadata = Qwen2VLVideoBackend.load_bytes(
        data,
        num_frames=FRAMES,
        fps=FRAMES / clip.seconds,  # type: ignore[arg-type]  # typed int, computed as a float
    )
    seconds = time.perf_counter() - started
    return seconds, len(frames), int(metadata["frames_indices"][-1]) + 1


_RUNS: dict[str, Callable[[Clip], tuple[float, int, int]]] = {
    "streamchat": lambda clip: _streamchat(clip, planned=True),
    "streamchat-all": lambda clip: _streamchat(clip, planned=False),
    "vllm": _vllm,
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    lengths = [2.0] if args.quick else list(args.lengths)
    repeat = 1 if args.quick else args.repeat
    clips = {length: peer_clip(args.out, length) for length in lengths}
    for mode in MODES:  # imports and first-use costs, not timed
        _RUNS[mode](clips[lengths[0]])
    rows: list[dict[str, Any]] = []
    for length, clip in clips.items():
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        decoded: dict[str, int] = {}
        kept: dict[str, int] = {}
        for _ in range(repeat):
            for mode in MODES:
                seconds, count, frames = _RUNS[mode](clip)
                times[mode].append(seconds)
                kept[mode], decoded[mode] = count, frames
        ratios = {
            mode: summarise([a / b for a, b in zip(times[mode], times["vllm"], strict=True)])
            for mode in ("streamchat", "streamchat-all")
        }
        rows.append(
            {
                "clip": clip.as_dict(),
                "seconds": {mode: summarise(times[mode]).as_dict() for mode in MODES},
                "frames_decoded": decoded,
                "frames_kept": kept,
                "over_vllm": {mode: summary.as_dict() for mode, summary in ratios.items()},
            }
        )
        print(
            f"  {length:g} s: " + ", ".join(f"{m} {summarise(times[m]).text(3)} s" for m in MODES)
        )
    headers = [
        "clip",
        *(f"{m} s" for m in MODES),
        "decoded (sc / all / vllm)",
        "sc / vllm",
        "all / vllm",
    ]
    print_table(
        headers,
        [
            [
                f"{row['clip']['seconds']:g} s",
                *(f"{row['seconds'][m]['median']:.3f}" for m in MODES),
                " / ".join(str(row["frames_decoded"][m]) for m in MODES),
                f"{row['over_vllm']['streamchat']['median']:.3f}",
                f"{row['over_vllm']['streamchat-all']['median']:.3f}",
            ]
            for row in rows
        ],
    )
    return {"quick": args.quick, "frames": FRAMES, "repeat": repeat, "clips": rows}


def main(argv: list[str] | None = None) -> int:
    parser = lengths_parser(__doc__.split("\n\n")[0], CLIP_LENGTHS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    write_result(Path(args.out), "spread", run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
