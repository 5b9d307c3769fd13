"""The OpenAI-compatible door end to end: the official ``openai`` client, the real engine.

The server is the package's live one (the tiny Qwen2-VL on vLLM, loopback URLs
allowed for the test's own file server); each test checks what the client is
told, and through the engine and the video cache's counters what the server
did: no timing.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from streamchat.engine.vllm import VllmEngine
from streamchat_client import connect
from tests.support.httpfiles import FileServer
from tests.support.live import Live, live_server
from tests.support.media import encode_image, encode_video
from tests.support.ports import free_port
from tests.support.settings import E2E

pytestmark = pytest.mark.engine

KEY = "e2e-openai-key-0123456789"


def _client(live: Live[Any], key: str = "none") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=live.base + "/v1", api_key=key, max_retries=0)


def _data(kind: str, data: bytes) -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def _video(url: str) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url}}


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _video_tokens(usage: Any) -> int:
    details = usage.prompt_tokens_details
    return int((details.model_extra or {})["multimodal_tokens"]["video"])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    root = tmp_path_factory.mktemp("openai-files")
    encode_video(root / "clip.mp4", container="mp4", codec="h264", fps=10, seconds=3.0)
    encode_video(root / "other.webm", container="webm", codec="vp8", fps=10, seconds=2.0)
    server = FileServer(root)
    yield server
    server.close()


async def test_a_video_by_url_streamed_and_whole(live: Live[VllmEngine], files: FileServer) -> None:
    """A video by http URL answered whole and streamed: the same greedy text, usage with its
    video tokens; the second request for the URL fetches no body and decodes nothing again."""
    question = [{"role": "user", "content": [_video(files.url("clip.mp4")), _text("What?")]}]
    options = {"media_io_kwargs": {"video": {"num_frames": 6}}}
    async with _client(live) as client:
        whole = await client.chat.completions.create(
            model=live.engine.model_name, messages=question, max_tokens=8, extra_body=options
        )
        decodes, bodies = live.state.videos.stats.decodes, live.state.videos.stats.body_fetches
        stream = await client.chat.completions.create(
            model=live.engine.model_name,
            messages=question,
            max_tokens=8,
            extra_body=options,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and text == whole.choices[0].message.content
    assert whole.usage is not None and chunks[-1].usage is not None
    assert _video_tokens(whole.usage) == _video_tokens(chunks[-1].usage) > 0
    assert whole.usage.completion_tokens == 8 and whole.choices[0].finish_reason == "length"
    assert (live.state.videos.stats.decodes, live.state.videos.stats.body_fetches) == (
        decodes,
        bodies,
    )
    assert live.engine.engine_unfinished() == 0


async def test_data_urls_multi_frame_jpeg_and_an_image(live: Live[VllmEngine]) -> None:
    """A video in a data: URL, vLLM's multi-frame data:video/jpeg and an image are answered;
    three JPEG frames are three frames' worth of video tokens, as the same frames pushed are."""
    webm = encode_video(container="webm", codec="vp8", fps=10, seconds=1.0)
    jpegs = ",".join(base64.b64encode(encode_image("jpeg", index=i)).decode() for i in range(4))
    content = [
        _video(_data("video/webm", webm)),
        _video(f"data:video/jpeg;base64,{jpegs}"),
        {"type": "image_url", "image_url": {"url": _data("image/png", encode_image("png"))}},
        _text("Compare them."),
    ]
    async with _client(live) as client:
        reply = await client.chat.completions.create(
            model=live.engine.model_name,
            messages=[{"role": "user", "content": content}],
            max_tokens=4,
        )
    assert reply.choices[0].message.content
    assert reply.usage is not None and _video_tokens(reply.usage) > 0
    assert live.engine.engine_unfinished() == 0


async def test_a_conversation_with_a_video_in_each_turn(
    live: Live[VllmEngine], files: FileServer
) -> None:
    """Two user turns, each with its video, and the assistant's turn between: both videos
    reach the model (their tokens add up to what each costs alone)."""
    alone = []
    async with _client(live) as client:
        for name in ("clip.mp4", "other.webm"):
            single = await client.chat.completions.create(
                model=live.engine.model_name,
                messages=[{"role": "user", "content": [_video(files.url(name)), _text("?")]}],
                max_tokens=2,
            )
            assert single.usage is not None
            alone.append(_video_tokens(single.usage))
        both = await client.chat.completions.create(
            model=live.engine.model_name,
            messages=[
                {"role": "user", "content": [_video(files.url("clip.mp4")), _text("First?")]},
                {"role": "assistant", "content": "A pattern moves."},
                {"role": "user", "content": [_video(files.url("other.webm")), _text("Now?")]},
            ],
            max_tokens=4,
        )
    assert both.usage is not None and _video_tokens(both.usage) == sum(alone)
    assert both.choices[0].message.content


async def test_closing_a_stream_early_leaves_no_engine_request(live: Live[VllmEngine]) -> None:
    """A client that closes its stream after the first words: vLLM itself has no request left."""
    async with _client(live) as client:
        stream = await client.chat.completions.create(
            model=live.engine.model_name,
            messages=[{"role": "user", "content": "Say many things."}],
            max_tokens=1500,
            stream=True,
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        assert live.engine.running()
        await stream.close()
        await live.state.wait_unreserved()
    assert live.engine.running() == frozenset() and live.engine.engine_unfinished() == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_a_question_too_long_for_the_context(live: Live[VllmEngine], stream: bool) -> None:
    """A conversation over the model's context is 400 context_too_long, not an engine error,
    streamed or not (a stream is refused before its 200, as vLLM's server does)."""
    async with _client(live) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(
                model=live.engine.model_name,
                messages=[{"role": "user", "content": "word " * 20_000}],
                max_tokens=4,
                stream=stream,
            )
    assert refused.value.code == "context_too_long"
    await live.state.wait_unreserved()
    assert live.engine.engine_unfinished() == 0


async def test_an_openai_client_asks_about_a_live_session(
    vllm_engine: VllmEngine, tmp_path: Path
) -> None:
    """A WebSocket client streams video; an OpenAI client with the same key asks about that
    session's last seconds and gets an answer whose video tokens are what the session's own
    question about the same frames costs; another key is refused."""
    settings = dataclasses.replace(E2E, api_keys=frozenset({KEY, "e2e-other-key-0123456789"}))
    clip = encode_video(container="webm", codec="vp8", fps=10, seconds=3.0)
    async with live_server(settings, vllm_engine) as live:
        async with connect(live.url, fps=2, api_key=KEY) as session:
            await session.send_bytes(clip, format="webm")
            await session.wait_frames(6)
            own = await session.ask("What happens?", max_tokens=2, max_frames=6).result()
            url = f"streamchat://sessions/{session.session_id}"
            question = [{"role": "user", "content": [_video(url), _text("What happens?")]}]
            async with _client(live, KEY) as client:
                reply = await client.chat.completions.create(
                    model=vllm_engine.model_name,
                    messages=question,
                    max_tokens=2,
                    extra_body={"media_io_kwargs": {"video": {"num_frames": 6}}},
                )
            assert reply.usage is not None
            assert own.done is not None and own.done.usage is not None
            assert _video_tokens(reply.usage) == own.done.usage.video_tokens > 0
            async with _client(live, "e2e-other-key-0123456789") as other:
                with pytest.raises(openai.NotFoundError):
                    await other.chat.completions.create(
                        model=vllm_engine.model_name, messages=question, max_tokens=2
                    )


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        ([_video("data:video/mp4;base64,not*base64")], 400, "media_invalid"),
        ([_video(_data("video/mp4", encode_image("png")))], 400, "media_invalid"),
        ([_video(_data("video/webm", b"\x1a\x45\xdf\xa3" + bytes(500)))], 400, None),
        ([_video(f"http://127.0.0.1:{free_port()}/clip.mp4")], 400, "url_fetch_failed"),
        ([_video("streamchat://sessions/nosuch")], 404, "session_not_found"),
        ([_video(_data("video/webm", b"x")) for _ in range(5)], 400, "too_many_media"),
        ([_video("file:///etc/passwd")], 400, "url_not_allowed"),
        ([_video("ftp://example.com/clip.mp4")], 400, "url_not_allowed"),
        (
            [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}],
            400,
            "unsupported_content",
        ),
    ],
)
async def test_bad_media_are_clear_errors_and_the_server_goes_on(
    live: Live[VllmEngine], content: list[dict[str, Any]], status: int, code: str | None
) -> None:
    """A data: URL that is not base64 or lies about its type, a video that does not decode, a
    URL that cannot be fetched or that the policy refuses, a live session that is not there,
    too many videos, an unknown part: an OpenAI error naming the part, with its status and
    code; then a good request is answered."""
    async with _client(live) as client:
        with pytest.raises(openai.APIStatusError) as refused:
            await client.chat.completions.create(
                model=live.engine.model_name, messages=[{"role": "user", "content": content}]
            )
        assert refused.value.status_code == status
        body = refused.value.body
        assert isinstance(body, dict) and body["param"].startswith("messages[0].content[")
        if code is not None:
            assert refused.value.code == code
        reply = await client.chat.completions.create(
            model=live.engine.model_name,
            messages=[{"role": "user", "content": "still there?"}],
            max_tokens=2,
        )
    assert reply.choices[0].message.content
    assert live.state.sessions == set()
