"""The OpenAI-compatible door on a live server, with the official ``openai`` client.

The engine is the scripted fake (what it was asked is on ``engine.requests``),
everything else is real: uvicorn on loopback, the door, the video cache with
PyAV, the bundled WebSocket client for live sessions.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from streamchat.config import Settings
from streamchat.engine.base import ChatRequest, Image, Video
from streamchat.engine.fake import FakeEngine
from streamchat.openai.routes import _unless_gone
from streamchat_client import connect
from tests.support.live import Live, live_server
from tests.support.media import encode_image, encode_video, frame_index

SETTINGS = Settings(fps=2.0, window_frames=16, max_pixels=112 * 112, min_pixels=28 * 28)
KEY = "door-key-0123456789"


def _data(kind: str, data: bytes) -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def _video_part(url: str) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url}}


def _image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture
async def live() -> AsyncIterator[Live[FakeEngine]]:
    async with live_server(SETTINGS) as server:
        yield server


def _client(live: Live[Any], key: str = "none") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=live.base + "/v1", api_key=key, max_retries=0)


WEBM = encode_video(container="webm", codec="vp8", fps=10, seconds=2.0)


async def test_an_answer_about_a_video_by_data_url(live: Live[FakeEngine]) -> None:
    """A video in a data: URL is decoded, sampled as media_io_kwargs say, and answered about;
    the response is a chat.completion with usage counting the frames' tokens."""
    async with _client(live) as client:
        reply = await client.chat.completions.create(
            model="fake",
            messages=[
                {
                    "role": "user",
                    "content": [
                        _video_part(_data("video/webm", WEBM)),
                        {"type": "text", "text": "What moves?"},
                    ],
                }
            ],
            extra_body={"media_io_kwargs": {"video": {"fps": 2, "num_frames": 3}}},
        )
    request = live.engine.requests[-1]
    assert isinstance(request, ChatRequest)
    video = request.messages[0].content[0]
    assert isinstance(video, Video)
    assert len(video.frames) == 3
    assert frame_index(video.frames[0].image) == 0 and video.frames[-1].pts > 1.0
    assert reply.object == "chat.completion" and reply.model == "fake"
    assert reply.choices[0].message.content == "".join(FakeEngine.script(request))
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    details = reply.usage.prompt_tokens_details
    assert details is not None  # vLLM's place for the video tokens (the fake's: 4 a frame)
    assert (details.model_extra or {}).get("multimodal_tokens") == {"video": 4 * 3}


async def test_a_streamed_answer_with_usage(live: Live[FakeEngine]) -> None:
    """stream=true gives chat.completion.chunk events: the role first, the words, the finish
    reason, then a usage chunk (include_usage), and the text is the engine's."""
    async with _client(live) as client:
        stream = await client.chat.completions.create(
            model="fake",
            messages=[
                {
                    "role": "user",
                    "content": [
                        _image_part(_data("image/png", encode_image("png"))),
                        {"type": "text", "text": "What is it?"},
                    ],
                }
            ],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    request = live.engine.requests[-1]
    assert isinstance(request, ChatRequest)
    assert isinstance(request.messages[0].content[0], Image)
    assert text == "".join(FakeEngine.script(request))
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == (
        chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
    )


async def test_a_repeated_request_tells_its_cached_prompt_tokens(live: Live[FakeEngine]) -> None:
    """usage.prompt_tokens_details.cached_tokens is the engine's count, whole and streamed: 0 for
    a new prompt, then what the fake's prefix cache serves of the same one (all but its last)."""
    body: dict[str, Any] = {
        "model": "fake",
        "messages": [
            {
                "role": "user",
                "content": [
                    _image_part(_data("image/png", encode_image("png"))),
                    {"type": "text", "text": "What is it?"},
                ],
            }
        ],
    }
    async with _client(live) as client:
        first = await client.chat.completions.create(**body)
        again = await client.chat.completions.create(**body)
        stream = await client.chat.completions.create(
            **body, stream=True, stream_options={"include_usage": True}
        )
        streamed = [chunk async for chunk in stream][-1].usage
    cached = []
    for usage in (first.usage, again.usage, streamed):
        assert usage is not None and usage.prompt_tokens_details is not None
        cached.append((usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens))
    prompt = cached[0][1]
    assert cached == [(0, prompt), (prompt - 1, prompt), (prompt - 1, prompt)]


async def test_the_model_list_names_the_served_model(live: Live[FakeEngine]) -> None:
    """GET /v1/models lists the one model this server serves."""
    async with _client(live) as client:
        listed = [model.id async for model in client.models.list()]
    assert listed == ["fake"]


async def test_a_client_that_leaves_mid_stream_aborts_its_answer(live: Live[FakeEngine]) -> None:
    """Closing a streamed answer early ends the engine request at once (asked of the engine)."""
    live.engine.gate.clear()  # the answer stops after its first word until the gate opens
    async with _client(live) as client:
        stream = await client.chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": "Talk for a while."}],
            stream=True,
        )
        seen = []
        async for chunk in stream:
            seen.append(chunk)
            if any(c.choices and c.choices[0].delta.content for c in seen):
                break
        await live.engine.wait_running(1)
        await stream.close()
        await live.engine.wait_idle()
    request = live.engine.requests[-1]
    assert live.engine.aborted == [request.request_id]
    assert live.state.sessions == set()


async def test_a_live_session_is_a_video_source_for_its_own_key_only() -> None:
    """An OpenAI client names a WebSocket session streaming video and gets its window; another
    key naming it is told there is no such session, as is a name that does not exist."""
    settings = dataclasses.replace(SETTINGS, api_keys=frozenset({KEY, "other-key-0123456789"}))
    async with live_server(settings) as live:
        async with connect(live.url, fps=2, api_key=KEY) as session:
            await session.send_bytes(WEBM, format="webm")
            await session.wait_frames(4)
            url = f"streamchat://sessions/{session.session_id}?last_seconds=10"
            question = [
                {
                    "role": "user",
                    "content": [
                        _video_part(url),
                        {"type": "text", "text": "What happens on the camera?"},
                    ],
                }
            ]
            async with _client(live, KEY) as client:
                reply = await client.chat.completions.create(model="fake", messages=question)
            request = live.engine.requests[-1]
            assert isinstance(request, ChatRequest)
            video = request.messages[0].content[0]
            assert isinstance(video, Video) and len(video.frames) >= 4
            assert reply.usage is not None
            async with _client(live, "other-key-0123456789") as client:
                with pytest.raises(openai.NotFoundError) as other:
                    await client.chat.completions.create(model="fake", messages=question)
            assert other.value.code == "session_not_found"
        gone = [{"role": "user", "content": [_video_part("streamchat://sessions/nosuch")]}]
        async with _client(live, KEY) as client:
            with pytest.raises(openai.NotFoundError) as missing:
                await client.chat.completions.create(model="fake", messages=gone)
        assert missing.value.code == "session_not_found"


async def test_keys_are_the_websockets() -> None:
    """With keys on, no key or a wrong one is 401 (OpenAI's authentication error); the key
    works as a Bearer token."""
    settings = dataclasses.replace(SETTINGS, api_keys=frozenset({KEY}))
    question = [{"role": "user", "content": "hello"}]
    async with live_server(settings) as keyed:
        for key in ("none", "wrong-key-0123456789"):
            async with _client(keyed, key) as client:
                with pytest.raises(openai.AuthenticationError) as refused:
                    await client.chat.completions.create(model="fake", messages=question)
            assert refused.value.status_code == 401 and refused.value.code == "unauthorized"
        async with _client(keyed, KEY) as client:
            reply = await client.chat.completions.create(model="fake", messages=question)
        assert reply.choices[0].message.content


async def test_bodies_that_are_not_requests(live: Live[FakeEngine]) -> None:
    """Malformed JSON is 400 invalid_json; a body over the limit is 413 before it is read whole;
    an unknown model is 404; each in OpenAI's error object."""
    small = dataclasses.replace(SETTINGS, max_request_bytes=4096)
    async with live_server(small) as limited, httpx.AsyncClient(base_url=limited.base) as http:
        broken = await http.post("/v1/chat/completions", content=b"{messages: [")
        assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
        big = await http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "x" * 10_000}]},
        )
        assert big.status_code == 413
        assert big.json()["error"]["code"] == "request_too_large"
        unknown = await http.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]},
        )
        assert unknown.status_code == 404
        error = unknown.json()["error"]
        assert (error["code"], error["param"], error["type"]) == (
            "model_not_found",
            "model",
            "invalid_request_error",
        )


async def test_requests_over_a_clients_rate_are_refused_and_others_go_on() -> None:
    """A key over its request rate gets 429 rate_limited; another key is served meanwhile."""
    settings = dataclasses.replace(
        SETTINGS,
        api_keys=frozenset({KEY, "other-key-0123456789"}),
        requests_per_second=0.001,
        request_burst=2,
    )
    question = [{"role": "user", "content": "hello"}]
    async with live_server(settings) as live:
        async with _client(live, KEY) as client:
            for _ in range(2):
                await client.chat.completions.create(model="fake", messages=question)
            with pytest.raises(openai.RateLimitError) as refused:
                await client.chat.completions.create(model="fake", messages=question)
        assert refused.value.status_code == 429 and refused.value.code == "rate_limited"
        async with _client(live, "other-key-0123456789") as other:
            reply = await other.chat.completions.create(model="fake", messages=question)
        assert reply.choices[0].message.content


async def test_work_raced_by_a_disconnect_is_cancelled_and_awaited() -> None:
    """A client gone before the work ends: None, and the work has finished its cancellation."""
    started, cleaned = asyncio.Event(), asyncio.Event()

    async def work() -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()
        return "never"

    async def receive() -> dict[str, Any]:
        await started.wait()
        return {"type": "http.disconnect"}

    assert await _unless_gone(receive, work()) is None
    assert cleaned.is_set()  # cancelled and awaited before returning

    async def quiet() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    async def done() -> str:
        return "answer"

    assert await _unless_gone(quiet, done()) == "answer"
