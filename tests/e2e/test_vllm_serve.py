"""A real ``vllm serve`` as a remote deployment's engine (issue 15), checked against the local one.

What a remote engine relies on, asked of vLLM's own OpenAI server with the
request shape of /work/notes/15-research.md §4 (the window's frames as PPM
pieces of one ``data:video/jpeg`` URL, a uuid, ``media_io_kwargs``,
``return_token_ids``, every sampling field set): the prompt it builds is
token for token the local engine's, the greedy answer is the same text, and
a stream the client closes leaves nothing running in vLLM (its own gauges).

The two engines run one after the other: each test asks the local engine
first, then the server.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from streamchat.engine.base import ChatTurn, GenerationRequest, Video
from streamchat.engine.prompt import clip_frames, conversation, video_metadata
from streamchat.engine.remote import open_remote_engine
from streamchat.engine.vllm import DEFAULT_MAX_MODEL_LEN, VllmEngine
from streamchat.window import Frame
from tests.support.engines import ask, make_frames
from tests.support.vllm_server import (
    SERVED_MODEL,
    Streamed,
    VllmServer,
    serve_args,
    stream_chat,
    video_part,
)

pytestmark = pytest.mark.engine

FAMILY = "qwen2_vl"
"""The family of the package's tiny model (``tiny_qwen2_vl``)."""


def window_body(request: GenerationRequest, family: str = FAMILY) -> dict[str, Any]:
    """``request`` as a chat completion for ``vllm serve`` (the memo's §4), streamed.

    One video part per clip (the frames the local adapter stacks, as PPM),
    the history as text turns, the video metadata the local path gives the
    processor as ``media_io_kwargs`` (they cover every video of a request,
    so several videos with metadata are not expressible: not asked here).
    """
    messages, _ = conversation(request)
    body_messages: list[dict[str, Any]] = []
    metadata: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "assistant":
            body_messages.append({"role": "assistant", "content": str(message.content[0])})
            continue
        parts: list[dict[str, Any]] = []
        for part in message.content:
            if isinstance(part, Video):
                frames = clip_frames(part.frames)
                stacked = np.stack([frame.image for frame in frames])
                meta = video_metadata(frames, part.fps, family=family, measured=part.measured)
                if meta is not None:
                    meta.pop("video_backend")
                    metadata.append(meta)
                parts.append(video_part(stacked, _uuid(stacked, meta)))
            else:
                parts.append({"type": "text", "text": str(part)})
        body_messages.append({"role": message.role, "content": parts})
    assert len(metadata) <= 1, "per-video metadata needs one request per video"
    sampling = request.sampling
    return {
        "model": SERVED_MODEL,
        "messages": body_messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
        "max_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "seed": sampling.seed,
        "stop": list(sampling.stop),
        # --generation-config vllm already keeps the checkpoint's defaults out; sent anyway.
        "top_k": 0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "media_io_kwargs": {"video": {"num_frames": -1, **(metadata[0] if metadata else {})}},
    }


def _uuid(frames: np.ndarray[Any, Any], metadata: dict[str, Any] | None) -> str:
    digest = hashlib.blake2b(frames.tobytes(), digest_size=16)
    digest.update(repr((frames.shape, sorted((metadata or {}).items()))).encode())
    return "sc-" + digest.hexdigest()


async def local_prompt_ids(engine: VllmEngine, request: GenerationRequest) -> list[int]:
    """The prompt the local adapter would submit for ``request`` (rendered, not submitted)."""
    engine_input, _, _ = await engine._render(request)
    engine._forget(engine_input)  # never submitted: as _render does with its own trials
    return list(engine_input["prompt_token_ids"])


async def served(server: VllmServer, request: GenerationRequest) -> Streamed:
    """``request`` asked of ``server`` as :func:`window_body`, read to the end."""
    async with server.client() as http:
        return await stream_chat(http, window_body(request))


async def local_text(engine: VllmEngine, request: GenerationRequest) -> str:
    return "".join([delta.text async for delta in engine.generate(request)])


def gapped(times: Sequence[float], seed: int) -> list[Frame]:
    """Frames at ``times`` (seconds), random pixels."""
    rng = np.random.default_rng(seed)
    return [Frame(pts=t, image=rng.integers(0, 256, (84, 112, 3), dtype=np.uint8)) for t in times]


CASES = {
    "window": ask("window", make_frames(8, seed=1)),
    "window-history": ask(
        "window-history",
        make_frames(6, seed=2),
        history=[ChatTurn("What is red?", "A ball."), ChatTurn("And now?", "It rolls.")],
    ),
    "single-frame": ask("single-frame", make_frames(1, seed=3)),
    "two-clips": ask("two-clips", gapped([0, 0.5, 1, 1.5, 6, 6.5, 7, 7.5], seed=4)),
    "40-frames": ask("40-frames", make_frames(40, seed=5, size=(56, 84))),
}
"""Windows a session sends: with history, one frame, clips at a gap, more than 32 frames."""


@pytest.mark.parametrize("case", CASES)
async def test_server_prompt_is_the_local_prompt(
    vllm_engine: VllmEngine, vllm_serve: VllmServer, case: str
) -> None:
    """The server builds exactly the local engine's prompt token ids for the same window."""
    request = CASES[case]
    expected = await local_prompt_ids(vllm_engine, request)
    streamed = await served(vllm_serve, request)
    assert streamed.prompt_token_ids == expected
    assert streamed.usage is not None
    assert streamed.usage["prompt_tokens"] == len(expected)
    assert streamed.finish_reason == "length"


@pytest.mark.parametrize("case", ["window", "window-history", "two-clips"])
async def test_greedy_answer_is_the_local_answer(
    vllm_engine: VllmEngine, vllm_serve: VllmServer, case: str
) -> None:
    """A greedy answer through the server is the local engine's text for the same frames."""
    request = CASES[case]
    expected = await local_text(vllm_engine, request)
    assert expected  # the tiny model never ends a turn early: max_tokens of text
    assert (await served(vllm_serve, request)).text == expected


async def test_a_fixed_choice_answer_through_the_remote_engine_is_the_local_one(
    vllm_engine: VllmEngine, vllm_serve: VllmServer
) -> None:
    """Bound to choices, the RemoteEngine gets from the server the local engine's choice."""
    request = ask("choices", make_frames(8, seed=7), max_tokens=16)
    choices = ("a red square", "a blue circle", "nothing")
    request = dataclasses.replace(
        request, sampling=dataclasses.replace(request.sampling, choices=choices)
    )
    expected = await local_text(vllm_engine, request)
    assert expected in choices
    async with open_remote_engine(vllm_serve.url, key=vllm_serve.api_key) as remote:
        assert "".join([delta.text async for delta in remote.generate(request)]) == expected


async def test_closed_stream_leaves_nothing_in_the_engine(vllm_serve: VllmServer) -> None:
    """A streamed answer the client closes mid-way is aborted: vLLM's own gauges fall to 0."""
    request = ask("long", make_frames(4, seed=6), max_tokens=4000)
    content = 0
    async with vllm_serve.client() as http:
        body = window_body(request)
        async with http.stream("POST", "/chat/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                content += '"content":' in line
                if content >= 3:
                    break
            # Still generating (thousands of tokens to go), as vLLM itself reports it.
            assert await vllm_serve.wait_in_engine(lambda count: count >= 1) == 1
        # Leaving the block closed the unfinished response, and with it the connection.
    assert content >= 3
    await vllm_serve.wait_idle()


async def test_api_needs_the_key_health_and_metrics_do_not(vllm_serve: VllmServer) -> None:
    """The engine key guards /v1 only: probes read /health and /metrics without it."""
    async with httpx.AsyncClient(base_url=vllm_serve.root, timeout=30) as http:
        assert (await http.get("/v1/models")).status_code == 401
        assert (await http.get("/health")).status_code == 200
        assert (await http.get("/metrics")).status_code == 200
    async with vllm_serve.client() as http:
        models = (await http.get("/models")).json()["data"]
    assert [(model["id"], model["max_model_len"]) for model in models] == [
        (SERVED_MODEL, DEFAULT_MAX_MODEL_LEN)
    ]


def _flags(args: Sequence[str]) -> dict[str, str | None]:
    """``--flag value`` and ``--switch`` pairs of a command line (positionals left out)."""
    flags: dict[str, str | None] = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            following = args[i + 1] if i + 1 < len(args) else None
            flags[arg] = None if following is None or following.startswith("--") else following
    return flags


def _compose(name: str) -> dict[str, Any]:
    import yaml

    loader: Any = type("Loader", (yaml.SafeLoader,), {})
    loader.add_constructor("!reset", lambda loader, node: None)  # compose's own tag
    path = Path(__file__).parents[2] / "docker" / name
    loaded: dict[str, Any] = yaml.load(path.read_text(), Loader=loader)
    return loaded


def test_fleet_compose_serves_with_the_tested_flags() -> None:
    """docker/compose.fleet*.yaml start the engine with the flags these tests serve with."""
    where = {"--model", "--host", "--port", "--served-model-name", "--disable-uvicorn-access-log"}
    tested = {k: v for k, v in _flags(serve_args(Path("model"), 1)).items() if k not in where}
    fleet = _compose("compose.fleet.yaml")["services"]
    engine = {k: v for k, v in _flags(fleet["vllm"]["command"]).items() if k not in where}
    assert engine == tested
    gpu = _flags(_compose("compose.fleet.gpu.yaml")["services"]["vllm"]["command"])
    on_gpu = {k: v for k, v in gpu.items() if k not in where}
    # A GPU sizes its KV cache by memory fraction and captures graphs: those two only differ.
    assert on_gpu == {
        k: v for k, v in tested.items() if k not in ("--kv-cache-memory-bytes", "--enforce-eager")
    }
    frontend = _flags(fleet["frontend"]["command"])
    assert frontend["--engine-url"] == "http://vllm:8000/v1"
    assert "STREAMCHAT_ENGINE_KEY" in fleet["frontend"]["environment"]
    assert "VLLM_API_KEY" in fleet["vllm"]["environment"]
