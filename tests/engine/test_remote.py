"""The remote engine against a scripted vLLM OpenAI server: requests, streams and faults.

No vLLM runs here: :mod:`tests.support.scripted_engine` records what the
engine sends and answers as each test scripts it, on a real loopback uvicorn.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamchat.config import Settings
from streamchat.engine.base import ChatTurn, Delta, GenerationRequest, SamplingOptions
from streamchat.engine.prompt import clip_frames, describe_frames, video_metadata
from streamchat.engine.remote import RemoteEngine, open_remote_engine, video_part
from streamchat.errors import (
    ContextTooLong,
    EngineFailure,
    EngineTimeout,
    EngineUnavailable,
)
from streamchat_client import ServerError, connect
from tests.support.engines import make_frames
from tests.support.live import live_server
from tests.support.media import encode_video
from tests.support.ports import free_port
from tests.support.scripted_engine import (
    VIDEO_TOKEN,
    Reply,
    ScriptedVllm,
    answer_events,
    scripted_vllm,
)

KEY = "eng-k3y-9c1d2e"
FAST = 0.02
"""Seconds between health probes in these tests."""


@contextlib.asynccontextmanager
async def remote(**options: Any) -> AsyncIterator[tuple[ScriptedVllm, RemoteEngine]]:
    async with scripted_vllm() as scripted:
        options = {"health_interval": FAST, "key": KEY} | options
        async with open_remote_engine(scripted.url, **options) as engine:
            yield scripted, engine


async def collect(engine: RemoteEngine, request: GenerationRequest) -> list[Delta]:
    async with contextlib.aclosing(engine.generate(request)) as stream:
        return [delta async for delta in stream]


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` until true (a deadline, not a sleep-then-assert)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(FAST)


def request(
    request_id: str = "r1", *, frames: int = 3, history: tuple[ChatTurn, ...] = ()
) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        question="What moves?",
        frames=make_frames(frames, size=(28, 42)),
        history=history,
        sampling=SamplingOptions(max_tokens=7, temperature=0.5, top_p=0.9, seed=3, stop=("x",)),
    )


def decode_ppm(data: bytes) -> np.ndarray[Any, Any]:
    magic, size, depth, pixels = data.split(b"\n", 3)
    width, height = map(int, size.split())
    assert (magic, depth) == (b"P6", b"255")
    return np.frombuffer(pixels, np.uint8).reshape(height, width, 3)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
async def test_the_request_is_the_memos_shape_per_family(family: str) -> None:
    """The body holds the history as text turns, the clip as PPM frames that decode back
    bit-exact, the family's metadata with num_frames -1, every sampling field, a uuid that
    is stable across identical windows; the key and a request id go as headers."""
    history = (ChatTurn("Before?", "A cat."),)
    ask = request(history=history)
    async with remote(family=family) as (scripted, engine):
        await collect(engine, ask)
        await collect(engine, dataclasses.replace(ask, request_id="r2"))
    body, again = scripted.requests
    assert body["model"] == "tiny" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and body["return_token_ids"]
    sampling = {k: body[k] for k in ("max_tokens", "temperature", "top_p", "seed", "stop")}
    assert sampling == {"max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": ["x"]}
    neutral = ("top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
    assert [body[k] for k in neutral] == [0, 0.0, 1.0, 0.0, 0.0]
    assert "structured_outputs" not in body
    old_question, old_answer, question = body["messages"]
    assert old_question == {"role": "user", "content": [{"type": "text", "text": "Before?"}]}
    assert old_answer == {"role": "assistant", "content": "A cat."}
    video, text = question["content"]
    assert text == {"type": "text", "text": f"{describe_frames(ask.frames, 2.0)}\nWhat moves?"}
    prefix = "data:video/jpeg;base64,"
    assert video["type"] == "video_url" and video["video_url"]["url"].startswith(prefix)
    pieces = video["video_url"]["url"][len(prefix) :].split(",")
    decoded = [decode_ppm(base64.b64decode(piece)) for piece in pieces]
    assert len(decoded) == len(ask.frames)
    for frame, image in zip(ask.frames, decoded, strict=True):
        assert np.array_equal(frame.image, image)
    expected = {"num_frames": -1}
    metadata = video_metadata(clip_frames(ask.frames), 2.0, family=family)
    if metadata is not None:
        del metadata["video_backend"]
        expected |= metadata
    assert body["media_io_kwargs"] == {"video": expected}
    assert video["uuid"].startswith("sc-")
    assert again["messages"][-1]["content"][0]["uuid"] == video["uuid"]
    headers = scripted.headers[0]
    assert headers["authorization"] == f"Bearer {KEY}"
    assert headers["x-request-id"].endswith("-r1")


async def test_fixed_choices_go_as_vllms_structured_output() -> None:
    """An answer bound to choices asks vLLM's server for its ``choice`` structured output."""
    ask = request()
    sampling = dataclasses.replace(ask.sampling, choices=("yes", "no"))
    async with remote() as (scripted, engine):
        await collect(engine, dataclasses.replace(ask, sampling=sampling))
    (body,) = scripted.requests
    assert body["structured_outputs"] == {"choice": ["yes", "no"]}


async def test_video_part_is_the_part_the_engine_sends() -> None:
    """:func:`video_part` gives a client with no engine (bench, tests) the very part sent."""
    ask = request()
    async with remote() as (scripted, engine):
        await collect(engine, ask)
    sent = scripted.requests[0]["messages"][-1]["content"][0]
    assert video_part([frame.image for frame in ask.frames], sent["uuid"]) == sent


async def test_another_window_or_frame_format_is_another_uuid() -> None:
    """The uuid names the pixels and their encoding: other frames or JPEG give other ids."""
    async with remote() as (scripted, engine):
        await collect(engine, request("a", frames=3))
        await collect(engine, request("b", frames=4))
    async with remote(frame_format="jpeg:90") as (jpeg, engine):
        await collect(engine, request("c", frames=3))
    ids = [
        s.requests[n]["messages"][-1]["content"][0]["uuid"]
        for s, n in ((scripted, 0), (scripted, 1), (jpeg, 0))
    ]
    assert len(set(ids)) == 3


async def test_deltas_stream_and_the_last_carries_usage() -> None:
    """Each content chunk is a delta; the last delta has the finish and the usage, video
    tokens counted from the prompt's token ids and cached tokens from the details."""
    async with remote() as (scripted, engine):
        scripted.replies.append(Reply(events=answer_events(("a", "b", "c"), cached=2)))
        deltas = await collect(engine, request())
        assert engine.healthy() and engine.running() == frozenset()
    assert [d.text for d in deltas] == ["a", "b", "c", ""]
    last = deltas[-1]
    assert last.finish_reason == "stop" and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (5, 3)
    assert (last.usage.video_tokens, last.usage.cached_tokens, last.usage.frames) == (3, 2, 3)
    assert VIDEO_TOKEN == 6


async def test_closing_the_answer_mid_stream_closes_the_http_stream() -> None:
    """A consumer that stops reading (cancel, a disconnect) closes the HTTP response: the
    engine's server sees its client go, which is how vLLM aborts a request."""
    async with remote() as (scripted, engine):
        scripted.replies.append(Reply(hold=True))
        stream = engine.generate(request())
        assert (await anext(stream)).text == "Hello"
        assert engine.running() == {"r1"}
        await stream.aclose()
        async with asyncio.timeout(10):
            await scripted.disconnected.wait()
        assert engine.running() == frozenset() and engine.healthy()


async def test_abort_ends_the_answer_cancelled_and_closes_the_stream() -> None:
    """``abort(id)`` closes that request's stream; its answer ends with ``cancelled``."""
    async with remote() as (scripted, engine):
        scripted.replies.append(Reply(hold=True))
        stream = engine.generate(request())
        assert (await anext(stream)).text == "Hello"
        await engine.abort("r1")
        rest = [delta async for delta in stream]
        assert rest[-1].finish_reason == "cancelled"
        async with asyncio.timeout(10):
            await scripted.disconnected.wait()


async def test_a_503_is_engine_unavailable_and_health_follows_the_probe() -> None:
    """An engine answering 503 fails the answer as ``engine_unavailable`` and makes the
    remote engine unhealthy; once ``/health`` answers 200 it is healthy again."""
    async with remote() as (scripted, engine):
        scripted.health = 503
        scripted.replies.append(Reply(status=503, error="the engine is dead"))
        with pytest.raises(EngineUnavailable) as failed:
            await collect(engine, request())
        assert failed.value.code == "engine_unavailable"
        assert not engine.healthy()
        scripted.health = 200
        await until(engine.healthy)
        assert [d.text for d in await collect(engine, request("r2"))][0] == "Hello"


@pytest.mark.parametrize(
    ("reply", "says"),
    [
        (Reply(events=['{"error": {"message": "Internal server error", "code": 500}}']), "Inter"),
        (Reply(status=500, error="boom"), "HTTP 500: boom"),
        (Reply(raw=["garbage"]), "malformed"),
        (Reply(events=["{not json"]), "malformed"),
        (Reply(events=answer_events()[:-1]), "malformed"),  # no [DONE]
        (Reply(events=answer_events()[:-2] + ["[DONE]"]), "malformed"),  # no usage
    ],
    ids=["error-event", "500", "not-sse", "not-json", "no-done", "no-usage"],
)
async def test_error_objects_and_malformed_streams_are_engine_errors(
    reply: Reply, says: str
) -> None:
    """An error object in the stream, a 500 or a malformed stream fail the answer with the
    plain ``engine_error`` (not one of the unavailable kinds)."""
    async with remote() as (scripted, engine):
        scripted.replies.append(reply)
        with pytest.raises(EngineFailure) as failed:
            await collect(engine, request())
    assert type(failed.value) is EngineFailure and failed.value.code == "engine_error"
    assert says in failed.value.message


async def test_an_engine_silent_past_the_timeout_is_engine_timeout() -> None:
    """An engine that sends its headers and then nothing fails the answer as
    ``engine_timeout`` after ``timeout`` seconds, and closes the stream."""
    async with remote(timeout=0.5) as (scripted, engine):
        scripted.replies.append(Reply(hang=True))
        with pytest.raises(EngineTimeout) as failed:
            await collect(engine, request())
        assert failed.value.code == "engine_timeout"
        async with asyncio.timeout(10):
            await scripted.disconnected.wait()


async def test_an_engine_killed_mid_answer_is_engine_unavailable() -> None:
    """The server killed after the first delta: the answer fails as ``engine_unavailable``
    and the engine is unhealthy (its ``/health`` is unreachable too)."""
    async with remote() as (scripted, engine):
        scripted.replies.append(Reply(hold=True))
        stream = engine.generate(request())
        assert (await anext(stream)).text == "Hello"
        await scripted.kill()
        with pytest.raises(EngineUnavailable) as failed:
            await anext(stream)
        assert "cut off" in failed.value.message
        assert not engine.healthy()
        await stream.aclose()


async def test_a_crash_that_cuts_the_body_is_engine_unavailable() -> None:
    """A body cut mid-answer (the connection dropped without the chunked end) is
    ``engine_unavailable``, not a malformed stream."""
    async with remote() as (scripted, engine):
        scripted.replies.append(Reply(hold=True, cut=True))
        stream = engine.generate(request())
        assert (await anext(stream)).text == "Hello"
        scripted.release.set()
        with pytest.raises(EngineUnavailable):
            await anext(stream)
        await stream.aclose()


async def test_unreachable_at_start_is_unhealthy_until_the_engine_comes_up() -> None:
    """Started with nothing at the URL, the engine is unhealthy and its answers are
    ``engine_unavailable``; once a server listens there, the probe finds it and answers work."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    async with open_remote_engine(url, health_interval=FAST) as engine:
        assert not engine.healthy() and engine.model_name == "remote"
        with pytest.raises(EngineUnavailable):
            await collect(engine, request())
        async with scripted_vllm(port):
            await until(engine.healthy)
            assert engine.model_name == "tiny"
            assert (await collect(engine, request("r2")))[-1].finish_reason == "stop"


async def test_a_prompt_over_the_context_drops_history_then_is_context_too_long() -> None:
    """A 400 about the context drops the older half of the history and asks again; with no
    history left it is ``context_too_long``."""
    full = "This model's maximum context length is 8192 tokens. However, you requested 9000."
    history = tuple(ChatTurn(f"q{n}", f"a{n}") for n in range(3))
    async with remote() as (scripted, engine):
        scripted.replies.extend([Reply(status=400, error=full), Reply()])
        deltas = await collect(engine, request(history=history))
        assert deltas[-1].finish_reason == "stop"
        scripted.replies.extend(Reply(status=400, error=full) for _ in range(3))
        with pytest.raises(ContextTooLong):
            await collect(engine, request("r2", history=history))
    assert [len(r["messages"]) for r in scripted.requests] == [7, 3, 7, 3, 1]


async def test_through_the_websocket_door_answers_stream_and_a_fault_keeps_the_session(
    tmp_path: Path,
) -> None:
    """The bundled client against a server on the remote engine: an answer streams; an
    engine answering 503 reaches the client as ``engine_unavailable`` on that answer only,
    ``/health`` turns 503, and the same session answers again once the engine is back."""
    import httpx

    clip = encode_video(tmp_path / "clip.webm", fps=10, seconds=2.0)
    async with (
        remote() as (scripted, engine),
        live_server(Settings(), engine) as live,
        connect(live.url, fps=2) as session,
        httpx.AsyncClient(base_url=live.base) as http,
    ):
        await session.send_file(clip)
        await session.wait_frames(2, timeout=30)
        first = await session.ask("What moves?").result()
        assert first.text == "Hello world" and first.done is not None
        assert first.done.usage is not None and first.done.usage.video_tokens == 3
        scripted.health = 503
        scripted.replies.append(Reply(status=503, error="down"))
        with pytest.raises(ServerError) as failed:
            await session.ask("And now?").result()
        assert failed.value.code == "engine_unavailable" and not failed.value.fatal
        assert (await http.get("/health")).status_code == 503
        scripted.health = 200
        await until(engine.healthy)
        assert (await session.ask("Again?").result()).text == "Hello world"
        assert (await http.get("/health")).status_code == 200
