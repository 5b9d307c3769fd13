"""``python -m bench.latency``: what streamchat adds to an ask's time to first token.

One vLLM engine (the tiny Qwen2-VL model built offline, streamchat's engine
defaults) serves every series, in this process, so they are measured side by
side on the same engine, interleaved window by window:

* ``direct``: ``AsyncLLMEngine.generate`` called with a prompt dict, the
  model's chat template on the same messages streamchat builds and the same
  frames as one ``(T, H, W, 3)`` array (decoded here by streamchat's decoder
  with the session's options, stacked before the clock starts). Time to first
  token: from ``generate()`` to the first output with text.
* ``ws``: a streamchat app on that engine, served by uvicorn on loopback; the
  bundled client pushes a clip, waits until it is decoded (``ended``), then
  asks. Each question gets a new session on the same clip, so the window is
  the same and there is no history: the prompt is the direct one, token for
  token. Time to first token: from ``session.ask()`` to the first delta at
  the client. The server's own figure (``answer.done``'s
  ``time_to_first_token``, from the ``ask`` arriving to the first delta
  leaving) splits it.
* ``ws+history``: the same, all questions in one session, as a client asks:
  earlier answers are replayed as chat history before the newest question.

Caches: vLLM keys processed multimodal inputs on a hash of the frames and
reuses KV blocks by prefix. The first ask on a window is measured on frames no
cache has seen (each window is its own clip, used by one series only); the
next ``--asks-per-window - 1`` questions on the unchanged window are the
*later* asks. The window is the server default: 32 frames at 2 fps (16 s of
640x360 video resized to the 448x448 budget, 588x336).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from streamchat.config import Settings
from streamchat.engine.base import GenerationRequest, SamplingOptions
from streamchat.engine.prompt import build_messages
from streamchat.engine.tiny_model import build_tiny_model
from streamchat.media.decoder import DecoderOptions, decode_stream
from streamchat.window import Frame
from streamchat_client import Session, connect

from .common import base_parser, percentiles, print_table, write_result
from .media import Clip, encode_clip

__all__ = ["main"]

QUESTIONS = (
    "What is moving in the video?",
    "What colour is the square?",
    "Where does the square go?",
    "Describe the background.",
    "How fast is the camera panning?",
    "Is anything else in the picture?",
)
SERIES = ("direct", "adapter", "adapter-vllm-hash", "ws", "ws+history")
PAIRED = SERIES[1:]
"""Series compared with ``direct``, ask by ask."""
_WIDTH, _HEIGHT, _CLIP_FPS = 640, 360, 15


@dataclasses.dataclass
class _Ask:
    series: str
    window: int
    index: int
    """0 for the first ask on the window, 1... for the later ones."""
    ttft: float
    total: float
    prompt_tokens: int
    server_ttft: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _clip(out: Path, seconds: float, seed: int) -> Clip:
    return encode_clip(
        out, "h264", width=_WIDTH, height=_HEIGHT, fps=_CLIP_FPS, seconds=seconds, seed=seed
    )


def decode_window(clip: Clip, settings: Settings) -> list[Frame]:
    """The frames a session's window holds once ``clip`` has been pushed and decoded."""
    options = DecoderOptions(
        fps=settings.fps,
        min_pixels=min(settings.min_pixels, settings.max_pixels),
        max_pixels=settings.max_pixels,
        factor=settings.factor,
        container=clip.container,
        max_decode_pixels=settings.max_decode_pixels,
    )
    kept: list[Frame] = []
    with clip.path.open("rb") as source:
        decode_stream(source, options, kept.append, threading.Event())
    return kept[-settings.window_frames :]


class _Direct:
    """Asks vLLM's engine itself, as a program holding the frames would."""

    def __init__(self, engine: Any, settings: Settings, max_tokens: int) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.settings = settings
        self.params = SamplingParams(
            max_tokens=max_tokens, temperature=0.0, output_kind=RequestOutputKind.DELTA
        )
        self.count = 0

    async def window(self, clip: Clip, number: int, asks: int) -> list[_Ask]:
        frames = await asyncio.to_thread(decode_window, clip, self.settings)
        video = np.stack([frame.image for frame in frames])
        results = []
        for index in range(asks):
            question = QUESTIONS[index % len(QUESTIONS)]
            messages = build_messages(question, frames, fps=self.settings.fps)
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            prompt = {"prompt": text, "multi_modal_data": {"video": video}}
            self.count += 1
            first: float | None = None
            prompt_tokens = 0
            started = time.perf_counter()
            outputs = self.engine.llm.generate(prompt, self.params, f"direct-{self.count}")
            async for output in outputs:
                if output.prompt_token_ids is not None:
                    prompt_tokens = len(output.prompt_token_ids)
                if first is None and output.outputs[0].text:
                    first = time.perf_counter() - started
            total = time.perf_counter() - started
            assert first is not None, "the engine produced no text"
            results.append(_Ask("direct", number, index, first, total, prompt_tokens))
        return results


class _Adapter:
    """Asks streamchat's engine adapter (:class:`VllmEngine`) directly: no session, no socket."""

    def __init__(self, name: str, engine: Any, settings: Settings, max_tokens: int) -> None:
        self.name = name
        self.engine = engine
        self.settings = settings
        self.sampling = SamplingOptions(max_tokens=max_tokens, temperature=0.0)
        self.count = 0

    async def window(self, clip: Clip, number: int, asks: int) -> list[_Ask]:
        frames = await asyncio.to_thread(decode_window, clip, self.settings)
        results = []
        for index in range(asks):
            self.count += 1
            request = GenerationRequest(
                request_id=f"{self.name}-{self.count}",
                question=QUESTIONS[index % len(QUESTIONS)],
                frames=list(frames),  # as a session's window snapshot: a new list, same frames
                sampling=self.sampling,
                fps=self.settings.fps,
            )
            first: float | None = None
            prompt_tokens = 0
            started = time.perf_counter()
            async for delta in self.engine.generate(request):
                if first is None and delta.text:
                    first = time.perf_counter() - started
                if delta.usage is not None:
                    prompt_tokens = delta.usage.prompt_tokens
            total = time.perf_counter() - started
            assert first is not None, "the engine produced no text"
            results.append(_Ask(self.name, number, index, first, total, prompt_tokens))
        return results


async def _ws_window(
    url: str, series: str, clip: Clip, number: int, asks: int, max_tokens: int
) -> list[_Ask]:
    """Push ``clip``, wait until it is decoded, ask ``asks`` questions.

    ``ws`` opens a new session for every question, pushing the clip again: the
    window is the same (same frames, so the same cache keys for vLLM) and the
    session has no history.
    """
    results = []
    session_per_ask = series == "ws"
    session: Session | None = None
    for index in range(asks):
        if session is None or session_per_ask:
            if session is not None:
                await session.close()
            session = await connect(url)
            await session.send_file(clip.path, format=clip.container)
            await session.wait_ended(timeout=120)
        first: float | None = None
        started = time.perf_counter()
        answer = session.ask(QUESTIONS[index % len(QUESTIONS)], max_tokens=max_tokens)
        async for _delta in answer:
            if first is None:
                first = time.perf_counter() - started
        await answer.result()
        total = time.perf_counter() - started
        assert first is not None and answer.done is not None, "no answer"
        usage = answer.done.usage
        results.append(_Ask(series, number, index, first, total, usage.prompt_tokens))
        results[-1].server_ttft = usage.time_to_first_token
    if session is not None:
        await session.close()
    return results


def _figures(asks: Sequence[_Ask], *, first: bool) -> list[_Ask]:
    return [a for a in asks if (a.index == 0) is first]


def _paired(
    asks: Sequence[_Ask], series: str, *, first: bool
) -> tuple[list[float], list[float], bool]:
    """ws-side minus direct per (window, ask index): differences, ratios, same prompts."""
    direct = {(a.window, a.index): a for a in _figures(asks, first=first) if a.series == "direct"}
    differences, ratios, same = [], [], True
    for ask in _figures(asks, first=first):
        if ask.series != series:
            continue
        peer = direct[(ask.window, ask.index)]
        differences.append(ask.ttft - peer.ttft)
        ratios.append(ask.ttft / peer.ttft)
        same = same and ask.prompt_tokens == peer.prompt_tokens
    return differences, ratios, same


def _ms(figures: dict[str, float | int], key: str) -> str:
    return f"{figures[key] * 1000:.1f}"


def _report(asks: Sequence[_Ask]) -> dict[str, Any]:
    series: dict[str, Any] = {}
    rows = []
    for name in SERIES:
        mine = [a for a in asks if a.series == name]
        entry: dict[str, Any] = {}
        for label, first in (("first", True), ("later", False)):
            chosen = _figures(mine, first=first)
            if not chosen:
                continue
            ttft = percentiles([a.ttft for a in chosen])
            figures: dict[str, Any] = {
                "ttft": ttft,
                "total": percentiles([a.total for a in chosen]),
                "prompt_tokens": percentiles([a.prompt_tokens for a in chosen]),
            }
            server = [a.server_ttft for a in chosen if a.server_ttft is not None]
            if server:
                figures["server_ttft"] = percentiles(server)
            entry[label] = figures
            rows.append(
                [
                    name,
                    label,
                    str(ttft["n"]),
                    _ms(ttft, "p50"),
                    _ms(ttft, "p90"),
                    f"{_ms(ttft, 'min')}-{_ms(ttft, 'max')}",
                    _ms(figures["total"], "p50"),
                    _ms(figures["server_ttft"], "p50") if server else "",
                    f"{figures['prompt_tokens']['p50']:.0f}",
                ]
            )
        if "first" in entry and "later" in entry:
            entry["later_over_first_ttft_p50"] = (
                entry["later"]["ttft"]["p50"] / entry["first"]["ttft"]["p50"]
            )
        series[name] = entry
    print_table(
        ["series", "ask", "n", "TTFT p50 ms", "p90", "min-max", "total p50", "server", "tokens"],
        rows,
    )
    overhead: dict[str, Any] = {}
    rows = []
    for name in PAIRED:
        for label, first in (("first", True), ("later", False)):
            differences, ratios, same = _paired(asks, name, first=first)
            if not differences:
                continue
            diff, ratio = percentiles(differences), percentiles(ratios)
            overhead[f"{name}/{label}"] = {
                "ttft_difference": diff,
                "ttft_ratio": ratio,
                "same_prompt_tokens": same,
            }
            rows.append(
                [
                    name,
                    label,
                    _ms(diff, "p50"),
                    _ms(diff, "p90"),
                    f"{_ms(diff, 'min')}-{_ms(diff, 'max')}",
                    f"{ratio['p50']:.2f}",
                    f"{ratio['p90']:.2f}",
                    "yes" if same else "no",
                ]
            )
    print("\nvs direct, paired per (window, ask):")
    print_table(
        ["series", "ask", "+TTFT p50 ms", "p90", "min-max", "ratio p50", "p90", "same prompt"],
        rows,
    )
    ids = _content_ids(asks)
    if ids is not None:
        print(
            "content ids (adapter / adapter-vllm-hash, later asks, paired): "
            f"ratio p50 {ids['ttft_ratio']['p50']:.2f}, "
            f"difference p50 {ids['ttft_difference']['p50'] * 1000:.1f} ms"
        )
    return {"series": series, "vs_direct": overhead, "content_ids_later": ids}


def _content_ids(asks: Sequence[_Ask]) -> dict[str, Any] | None:
    """What streamchat's video ids save on later asks: adapter against adapter-vllm-hash.

    Paired by (window, ask index) like the comparisons with ``direct`` (each
    series has its own clips of the same size, so the work is the same).
    """
    hashed = {(a.window, a.index): a for a in asks if a.series == "adapter-vllm-hash"}
    pairs = [
        (a.ttft, hashed[(a.window, a.index)].ttft)
        for a in asks
        if a.series == "adapter" and a.index > 0 and (a.window, a.index) in hashed
    ]
    if not pairs:
        return None
    return {
        "ttft_ratio": percentiles([mine / theirs for mine, theirs in pairs]),
        "ttft_difference": percentiles([mine - theirs for mine, theirs in pairs]),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from streamchat.app import create_app
    from streamchat.engine.vllm import make_engine_args, open_vllm_engine

    from .servers import serve_app

    if args.quick:
        windows, asks_per_window, seconds, max_tokens = 2, 2, 4.0, 4
    else:
        windows, asks_per_window = args.windows, args.asks_per_window
        seconds, max_tokens = args.seconds, args.max_tokens
    print(f"encoding {windows * len(SERIES) + 1} clips of {seconds:g} s ...", flush=True)
    warmup = _clip(args.out, seconds, seed=1000)
    clips = [_clip(args.out, seconds, seed=1001 + i) for i in range(windows * len(SERIES))]
    model = build_tiny_model(args.out / "tiny-qwen2-vl")
    engine_args = make_engine_args(model)
    asks: list[_Ask] = []
    started = time.perf_counter()
    async with open_vllm_engine(engine_args) as engine:
        print(f"engine ready in {time.perf_counter() - started:.1f} s", flush=True)
        from streamchat.engine.vllm import VllmEngine

        settings = Settings(model=str(model))
        resolved = dataclasses.replace(settings, frame_factor=engine.frame_factor)
        # A second adapter on the same vLLM engine, hashing left to vLLM (not closed:
        # closing an adapter shuts its engine down; dropped before the engine goes).
        hashing = VllmEngine(engine.llm, content_ids=False)
        runners: dict[str, Any] = {
            "direct": _Direct(engine, resolved, max_tokens),
            "adapter": _Adapter("adapter", engine, resolved, max_tokens),
            "adapter-vllm-hash": _Adapter("adapter-vllm-hash", hashing, resolved, max_tokens),
        }
        del hashing
        app = create_app(settings, engine=engine)
        async with serve_app(app, settings) as base:
            url = base.replace("http://", "ws://") + "/v1/session"

            async def one(name: str, clip: Clip, number: int) -> list[_Ask]:
                if name in runners:
                    results: list[_Ask] = await runners[name].window(clip, number, asks_per_window)
                    return results
                return await _ws_window(url, name, clip, number, asks_per_window, max_tokens)

            for name in SERIES:  # first requests pay one-off costs: not measured
                await one(name, warmup, -1)
            for window in range(windows):
                shift = window % len(SERIES)
                order = SERIES[shift:] + SERIES[:shift]  # rotate who goes first
                for name in order:
                    clip = clips[window * len(SERIES) + SERIES.index(name)]
                    asks.extend(await one(name, clip, window))
                print(f"  window {window + 1}/{windows}", flush=True)
        runners.clear()
    report = _report(asks)
    return {
        "quick": args.quick,
        "windows": windows,
        "asks_per_window": asks_per_window,
        "max_tokens": max_tokens,
        "clip": {"width": _WIDTH, "height": _HEIGHT, "fps": _CLIP_FPS, "seconds": seconds},
        "model": "tiny-qwen2-vl",
        "engine_args": {
            key: getattr(engine_args, key)
            for key in ("dtype", "max_model_len", "max_num_seqs", "enforce_eager")
        },
        **report,
        "asks": [a.as_dict() for a in asks],
    }


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0], repeat=None)  # repeats by --windows
    parser.add_argument("--windows", type=int, default=30, help="fresh windows per series")
    parser.add_argument("--asks-per-window", type=int, default=4, help="first + later asks")
    parser.add_argument("--seconds", type=float, default=16.0, help="clip length")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per answer")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    result = asyncio.run(run(args))
    write_result(Path(args.out), "latency", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
