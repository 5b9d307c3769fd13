"""``python -m bench.remote``: the cost of going remote, and what frame encodings do to pixels.

``streamchat serve --engine-url`` decodes in the front-end and sends every
question to a ``vllm serve`` over its OpenAI API
(:class:`~streamchat.engine.remote.RemoteEngine`): the window's frames travel
base64 in a ``data:video/jpeg`` URL, encoded as lossless PPM (the default) or
4:4:4 JPEG of a quality. Two measurements:

1. **Local against remote.** The same tiny Qwen2-VL (scaled as
   ``bench.timeline`` scales it, :data:`~bench.timeline.BENCH_SCALE`, so that
   encoding and prefill weigh as with a real model), the same engine settings
   (streamchat's engine defaults with :data:`Shape.max_model_len` as context
   and batch), the same windows (:data:`FPS`, 448x448 ``testsrc2`` frames) and
   question, greedy, asked through (a) the local :class:`VllmEngine` in this
   process and (b) :class:`RemoteEngine` against ``vllm serve`` on loopback,
   started as ``bench.peer`` starts it. Both engines are up, but only one is
   asked at a time, and the sides take turns window by window (the order
   rotating per repetition), so a drifting load on this shared machine hits
   them alike. Every ask is on frames no cache has seen (checked: 0 cached
   tokens; the formats' content ids differ, so they share no cache either).
   Per window and repetition, the remote TTFT over the local one (paired).
   The front-end's own cost is measured apart with no engine running:
   encoding and base64 of a window, per format, and the bytes of its URL.
   Whether the greedy answer equals the local one for
   the same frames is counted too.
2. **Image quality.** Frames of three contents (``testsrc2``: sharp synthetic
   edges and text; ``clip``: bench media's textured pan as the decoder gives
   it after H.264; ``noise``: uniform noise, JPEG's worst case) encoded in each
   format and decoded back by vLLM's own loader for ``data:video/jpeg`` URLs
   (``VideoMediaIO``), what the server hands the model's processor: mean and
   largest absolute error in 0-255 levels against the frames the local path
   would give it, the size against raw RGB, and the time to encode and to
   decode a frame.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np
import numpy.typing as npt

from streamchat.engine.base import Engine, GenerationRequest, SamplingOptions
from streamchat.engine.remote import encode_frame
from streamchat.engine.tiny_model import DEFAULT_SCALE, Scale, build_tiny_model
from streamchat.window import Frame

from .common import base_parser, print_table, summarise, write_result
from .media import encode_clip
from .peer import engine_flags, vllm_serve
from .timeline import BENCH_SCALE

__all__ = ["FORMATS", "QUALITY_FORMATS", "main"]

FPS = 2.0
FORMATS = ("ppm", "jpeg:95", "jpeg:85")
"""The remote engine's frame formats asked through (``--engine-frame-format``)."""
QUALITY_FORMATS = ("ppm", "jpeg:100", "jpeg:95", "jpeg:85", "jpeg:75")
CONTENTS = ("testsrc2", "clip", "noise")
QUESTION = "What is happening in the video?"
_ENGINE_START = 420.0  # seconds: 15-60 s on a quiet machine, 200 s seen on a busy one
_ANSWER_TIMEOUT = 600.0  # the engine's silence allowed: a 64-frame prefill under load


@dataclasses.dataclass(frozen=True, slots=True)
class Shape:
    """What one run asks about: windows, frame size, answers, context, model size."""

    windows: tuple[int, ...]
    size: int
    max_tokens: int
    max_model_len: int
    scale: Scale
    quality_frames: int

    @property
    def engine(self) -> dict[str, Any]:
        """Engine arguments over streamchat's defaults, on both sides.

        The batch is the context: vLLM sizes its encoder cache by it, and a
        64-frame window is one item of 8,192 video tokens.
        """
        return {"max_model_len": self.max_model_len, "max_num_batched_tokens": self.max_model_len}


FULL = Shape(
    windows=(32, 64),
    size=448,
    max_tokens=8,
    max_model_len=16384,
    scale=BENCH_SCALE,
    quality_frames=16,
)
QUICK = Shape(
    windows=(8,),
    size=224,
    max_tokens=4,
    max_model_len=4096,
    scale=DEFAULT_SCALE,
    quality_frames=4,
)


# -- frames -----------------------------------------------------------------


def _rgb(frame: av.VideoFrame) -> npt.NDArray[np.uint8]:
    """The frame's RGB pixels, copied: PyAV's array is a view of its buffer, rows padded."""
    return np.array(frame.to_ndarray(format="rgb24"), dtype=np.uint8)


def _testsrc(size: int) -> Iterator[npt.NDArray[np.uint8]]:
    """FFmpeg's ``testsrc2`` at :data:`FPS`: moving shapes, gradients and a frame counter,
    so every frame differs from every other (no cache can serve one for another)."""
    with av.open(f"testsrc2=size={size}x{size}:rate={FPS:g}", format="lavfi") as source:
        for frame in source.decode(video=0):
            yield _rgb(frame)


def _windows(shape: Shape, repeat: int) -> Iterator[tuple[int, int, list[Frame]]]:
    """(window, repetition, frames) in the order every engine asks: the same frames for each
    engine, fresh for each ask (the source runs on, so no two asks share a frame)."""
    images = _testsrc(shape.size)
    count = 0
    for repetition in range(repeat):
        for window in shape.windows:
            frames = []
            for _ in range(window):
                frames.append(Frame(pts=count / FPS, image=next(images)))
                count += 1
            yield window, repetition, frames


def _noise(count: int, size: int, seed: int) -> list[npt.NDArray[np.uint8]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def _clip_frames(out: Path, count: int, size: int) -> list[npt.NDArray[np.uint8]]:
    """Bench media's textured pan, H.264 at 30 fps, decoded and sampled at :data:`FPS`."""
    step = round(30 / FPS)
    clip = encode_clip(out, "h264", width=size, height=size, fps=30, seconds=count * step / 30)
    frames = []
    with av.open(str(clip.path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index % step == 0:
                frames.append(_rgb(frame))
    return frames[:count]


def _content(out: Path, content: str, count: int, size: int) -> list[npt.NDArray[np.uint8]]:
    if content == "testsrc2":
        images = _testsrc(size)
        return [next(images) for _ in range(count)]
    if content == "clip":
        return _clip_frames(out, count, size)
    return _noise(count, size, seed=7)


# -- the front-end's cost and the pixels' error -------------------------------


def _url(images: Sequence[npt.NDArray[np.uint8]], frame_format: str) -> str:
    """The base64 part of a ``data:video/jpeg`` URL, as the remote engine builds it."""
    return ",".join(base64.b64encode(encode_frame(i, frame_format)).decode() for i in images)


def _timed_url(images: Sequence[npt.NDArray[np.uint8]], frame_format: str) -> tuple[float, str]:
    started = time.perf_counter()
    url = _url(images, frame_format)
    return time.perf_counter() - started, url


def _timed_load(loader: Any, url: str) -> tuple[float, npt.NDArray[np.uint8]]:
    """vLLM's decoding of a ``data:video/jpeg`` URL's data: its seconds and the frames."""
    started = time.perf_counter()
    frames, _metadata = loader.load_base64("video/jpeg", url).media
    return time.perf_counter() - started, np.asarray(frames, dtype=np.uint8)


def _quality(out: Path, shape: Shape) -> dict[str, Any]:
    """Per content and format: the error of the frames vLLM decodes, sizes, times."""
    from vllm.multimodal.media.image import ImageMediaIO
    from vllm.multimodal.media.video import VideoMediaIO

    loader = VideoMediaIO(ImageMediaIO(), num_frames=-1)
    result: dict[str, Any] = {}
    for content in CONTENTS:
        images = _content(out, content, shape.quality_frames, shape.size)
        original = np.stack(images).astype(np.int16)
        raw = original.size
        rows: dict[str, Any] = {}
        for frame_format in QUALITY_FORMATS:
            encode_s, url = min(
                (_timed_url(images, frame_format) for _ in range(3)), key=lambda t: t[0]
            )
            decode_s, decoded = min(
                (_timed_load(loader, url) for _ in range(3)), key=lambda t: t[0]
            )
            assert decoded.shape == original.shape, (decoded.shape, original.shape)
            error = np.abs(np.asarray(decoded, dtype=np.int16) - original)
            encoded = sum(len(encode_frame(i, frame_format)) for i in images)
            rows[frame_format] = {
                "mae": float(error.mean()),
                "max_error": int(error.max()),
                "exact_pixels": float((error == 0).all(axis=-1).mean()),
                "size_over_raw": encoded / raw,
                "encode_ms_per_frame": encode_s * 1000 / len(images),
                "decode_ms_per_frame": decode_s * 1000 / len(images),
            }
        result[content] = rows
    return result


def _encoding(shape: Shape) -> dict[str, Any]:
    """Per window and format: encoding and base64 of a whole window (ms), its URL's bytes."""
    result: dict[str, Any] = {}
    for window, _repetition, frames in _windows(shape, 1):
        images = [f.image for f in frames]
        entry = {}
        for frame_format in FORMATS:
            timings = [_timed_url(images, frame_format) for _ in range(3)]
            entry[frame_format] = {
                "encode_ms": summarise([t * 1000 for t, _ in timings]).as_dict(),
                "url_bytes": len("data:video/jpeg;base64,") + len(timings[0][1]),
            }
        result[str(window)] = entry
    return result


# -- asking -------------------------------------------------------------------


async def _ask(
    engine: Engine, side: str, frames: list[Frame], shape: Shape, request_id: str
) -> dict[str, Any]:
    """One greedy ask: time to the first text (or the end), the whole answer, its usage."""
    request = GenerationRequest(
        request_id=request_id,
        question=QUESTION,
        frames=frames,
        sampling=SamplingOptions(max_tokens=shape.max_tokens, temperature=0.0),
        fps=FPS,
    )
    first: float | None = None
    text, usage = "", None
    started = time.perf_counter()
    async for delta in engine.generate(request):
        if first is None and (delta.text or delta.finish_reason is not None):
            first = time.perf_counter() - started
        text += delta.text
        usage = delta.usage or usage
    total = time.perf_counter() - started
    assert first is not None and usage is not None, f"{side}: no answer"
    return {
        "side": side,
        "ttft": first,
        "total": total,
        "prompt_tokens": usage.prompt_tokens,
        "video_tokens": usage.video_tokens,
        "cached_tokens": usage.cached_tokens,
        "completion_tokens": usage.completion_tokens,
        "text": text,
    }


def _warm_frames(shape: Shape, window: int) -> list[Frame]:
    """Noise: frames of no measured window, for the unmeasured first ask of a shape."""
    return [Frame(pts=i / FPS, image=a) for i, a in enumerate(_noise(window, shape.size, 99))]


def _server_flags(shape: Shape) -> list[str]:
    """``vllm serve``'s flags: streamchat's engine defaults with the shape's, as the local
    engine gets them, and what the remote engine needs (:data:`SERVER_FLAGS`)."""
    from streamchat.engine.remote import SERVER_FLAGS

    return [*engine_flags(shape.engine), *SERVER_FLAGS, "--disable-uvicorn-access-log"]


@contextlib.asynccontextmanager
async def _vllm_serve(out: Path, model: Path, shape: Shape) -> AsyncIterator[str]:
    """``vllm serve`` on loopback, started as ``bench.peer`` starts it; yields its API's URL."""
    log = out / "remote-vllm-server.log"
    async with vllm_serve(log, model, _server_flags(shape)) as root:
        yield f"{root}/v1"


async def _asks(out: Path, model: Path, shape: Shape, repeat: int) -> list[dict[str, Any]]:
    """Every side asked about every window: the local engine and each remote format in turn.

    Both engines are up at once (``vllm serve`` first, then the local one) but
    asked one at a time, so each ask has the cores to itself, and the sides take
    turns window by window: a load that drifts (this machine is shared) hits
    them alike and the ratios are paired. Each side's first ask of a shape pays
    one-off costs: it is made on noise before and not measured.
    """
    from streamchat.engine.remote import open_remote_engine
    from streamchat.engine.vllm import make_engine_args, open_vllm_engine

    asks = []
    async with contextlib.AsyncExitStack() as stack:
        started = time.perf_counter()
        url = await stack.enter_async_context(_vllm_serve(out, model, shape))
        print(f"vllm serve ready in {time.perf_counter() - started:.0f} s", flush=True)
        started = time.perf_counter()
        local = await stack.enter_async_context(
            open_vllm_engine(make_engine_args(model, **shape.engine))
        )
        print(f"local engine ready in {time.perf_counter() - started:.0f} s", flush=True)
        engines: dict[str, Engine] = {"local": local}
        for frame_format in FORMATS:
            engines[frame_format] = await stack.enter_async_context(
                open_remote_engine(url, frame_format=frame_format, timeout=_ANSWER_TIMEOUT)
            )
        for window in shape.windows:
            for side in ("local", FORMATS[0]):
                await _ask(engines[side], side, _warm_frames(shape, window), shape, "warm")
        sides = list(engines)
        for window, repetition, frames in _windows(shape, repeat):
            turn = sides[repetition % len(sides) :] + sides[: repetition % len(sides)]
            for side in turn:
                rid = f"{side}-{window}-{repetition}"
                ask = await _ask(engines[side], side, frames, shape, rid)
                asks.append({"window": window, "repetition": repetition, **ask})
                print(f"  {side}: {window} frames, TTFT {ask['ttft'] * 1000:.0f} ms", flush=True)
    return asks


# -- summaries ----------------------------------------------------------------


def _summaries(asks: list[dict[str, Any]], shape: Shape) -> dict[str, Any]:
    """Per window: each side's times and tokens; each format's ratios over local, paired."""
    out: dict[str, Any] = {}
    for window in shape.windows:
        mine = [a for a in asks if a["window"] == window]
        local = {a["repetition"]: a for a in mine if a["side"] == "local"}
        entry: dict[str, Any] = {}
        for side in ("local", *FORMATS):
            own = [a for a in mine if a["side"] == side]
            figures: dict[str, Any] = {
                key: summarise([a[key] for a in own]).as_dict()
                for key in ("ttft", "total", "prompt_tokens", "video_tokens")
            }
            figures["cached_tokens_max"] = max(a["cached_tokens"] for a in own)
            if side != "local":
                pairs = [(a, local[a["repetition"]]) for a in own]
                for key in ("ttft", "total"):
                    ratios = [a[key] / ref[key] for a, ref in pairs]
                    figures[f"{key}_over_local"] = summarise(ratios).as_dict()
                figures["ttft_added_ms"] = summarise(
                    [(a["ttft"] - ref["ttft"]) * 1000 for a, ref in pairs]
                ).as_dict()
                figures["same_answer"] = sum(a["text"] == ref["text"] for a, ref in pairs)
                figures["same_prompt_tokens"] = all(
                    a["prompt_tokens"] == ref["prompt_tokens"] for a, ref in pairs
                )
            entry[side] = figures
        out[str(window)] = entry
    return out


def _ms(figures: dict[str, Any]) -> str:
    return (
        f"{figures['median'] * 1000:.0f} ({figures['min'] * 1000:.0f}-{figures['max'] * 1000:.0f})"
    )


def _ratio(figures: dict[str, Any]) -> str:
    return f"{figures['median']:.2f} ({figures['min']:.2f}-{figures['max']:.2f})"


def _tables(summaries: dict[str, Any], encoding: dict[str, Any], quality: dict[str, Any]) -> None:
    rows = []
    for window, entry in summaries.items():
        for side, figures in entry.items():
            remote = side != "local"
            cost = encoding[window][side] if remote else None
            rows.append(
                [
                    window,
                    side,
                    _ms(figures["ttft"]),
                    _ratio(figures["ttft_over_local"]) if remote else "",
                    _ms(figures["total"]),
                    _ratio(figures["total_over_local"]) if remote else "",
                    f"{cost['encode_ms']['median']:.0f}" if cost else "",
                    f"{cost['url_bytes'] / 1e6:.1f}" if cost else "",
                    f"{figures['prompt_tokens']['median']:.0f}",
                    str(figures["cached_tokens_max"]),
                    f"{figures['same_answer']}/{figures['ttft']['n']}" if remote else "",
                ]
            )
    print("\nlocal VllmEngine against RemoteEngine -> vllm serve on loopback:")
    print_table(
        [
            "frames",
            "side",
            "TTFT ms",
            "/local",
            "total ms",
            "/local",
            "encode ms",
            "URL MB",
            "prompt",
            "cached max",
            "same answer",
        ],
        rows,
    )
    rows = []
    for content, formats in quality.items():
        for frame_format, q in formats.items():
            rows.append(
                [
                    content,
                    frame_format,
                    f"{q['mae']:.2f}",
                    str(q["max_error"]),
                    f"{q['exact_pixels'] * 100:.0f}%",
                    f"{q['size_over_raw'] * 100:.0f}%",
                    f"{q['encode_ms_per_frame']:.1f}",
                    f"{q['decode_ms_per_frame']:.1f}",
                ]
            )
    print("\nframes decoded by vLLM's data:video/jpeg loader against the local path's:")
    print_table(
        ["content", "format", "MAE", "max", "exact px", "size/raw", "enc ms/fr", "dec ms/fr"],
        rows,
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    shape = QUICK if args.quick else FULL
    repeat = 1 if args.quick else args.repeat
    print(
        f"windows {shape.windows} frames of {shape.size}x{shape.size} at {FPS:g} fps, "
        f"{repeat} repetition(s); model scale {shape.scale.as_dict()}; engine {shape.engine}; "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    quality = _quality(args.out, shape)
    encoding = _encoding(shape)
    suffix = "" if shape.scale == DEFAULT_SCALE else "-bench"
    model = build_tiny_model(args.out / f"tiny-qwen2_vl{suffix}", scale=shape.scale)
    asks = await _asks(args.out, model, shape, repeat)
    summaries = _summaries(asks, shape)
    _tables(summaries, encoding, quality)
    return {
        "quick": args.quick,
        "repeat": repeat,
        "shape": {**dataclasses.asdict(shape), "scale": shape.scale.as_dict(), "fps": FPS},
        "model": f"tiny-qwen2_vl{suffix}",
        "server_flags": _server_flags(shape),
        "formats": list(FORMATS),
        "windows": summaries,
        "encoding": encoding,
        "quality": quality,
        "ttft_over_local": {
            window: {f: entry[f]["ttft_over_local"]["median"] for f in FORMATS}
            for window, entry in summaries.items()
        },
        "asks": asks,
    }


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0], repeat=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    from streamchat.engine import cpu_compat

    cpu_compat.install()
    result = asyncio.run(run(args))
    write_result(Path(args.out), "remote", result)
    print("median TTFT remote/local: " + json.dumps(result["ttft_over_local"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
