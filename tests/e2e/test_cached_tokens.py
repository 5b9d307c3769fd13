"""Prompt tokens served from vLLM's prefix cache, as both doors tell them (the real engine).

vLLM counts them per request (``num_cached_tokens``); the WebSocket's ``answer.done`` tells them as
``usage.cached_tokens``, the OpenAI door as ``usage.prompt_tokens_details.cached_tokens``. The
cache is the package's one engine's, shared with every other test, so each test here sends a clip
no other test sends (its first frame's number is its own): its first ask cannot find the video in
the cache, the repeated one must. vLLM caches whole blocks (128 tokens on CPU) and always computes
a prompt's last token, so a repeat is cached up to the last whole block before that token. The
clips are long enough for a prompt over one block.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import openai
import pytest

from streamchat.engine.vllm import VllmEngine
from streamchat_client import connect
from tests.support.live import Live
from tests.support.media import encode_video

pytestmark = pytest.mark.engine

FRAMES = 16
"""A full window at 2 fps: enough video tokens for a prompt over one block."""


async def _ask_in_a_new_session(live: Live[VllmEngine], clip: Path, question: str) -> Any:
    """``question`` about ``clip`` in a session of its own (no history before the video)."""
    async with connect(live.url, fps=2, window_frames=FRAMES) as session:
        await session.send_file(clip)
        status = await session.wait_ended(timeout=60)
        assert status.frames == FRAMES
        answer = await session.ask(question, max_tokens=4).result()
    assert answer.done is not None and answer.done.finish_reason in ("stop", "length")
    return answer.done.usage


async def test_the_same_question_on_the_same_window_is_served_from_the_cache(
    live: Live[VllmEngine], tmp_path: Path
) -> None:
    """Asked twice (two sessions, the same clip and question), answer.done tells 0 cached
    tokens the first time and most of the prompt the second, never all of it."""
    clip = encode_video(tmp_path / "cached.webm", fps=10, seconds=FRAMES / 2, first_index=7001)
    first = await _ask_in_a_new_session(live, clip, "Which number is shown?")
    again = await _ask_in_a_new_session(live, clip, "Which number is shown?")
    assert first.prompt_tokens == again.prompt_tokens > 128
    assert first.cached_tokens == 0
    assert 0 < again.cached_tokens < again.prompt_tokens
    assert again.cached_tokens >= again.prompt_tokens - 128  # all but the last (partial) block
    assert live.engine.engine_unfinished() == 0


async def test_a_follow_up_in_a_session_tells_what_it_reused(
    live: Live[VllmEngine], tmp_path: Path
) -> None:
    """A second question in one session tells its cached tokens too, within its prompt."""
    clip = encode_video(tmp_path / "follow-up.webm", fps=10, seconds=FRAMES / 2, first_index=7101)
    async with connect(live.url, fps=2, window_frames=FRAMES) as session:
        await session.send_file(clip)
        await session.wait_ended(timeout=60)
        first = await session.ask("What is it?", max_tokens=4).result()
        second = await session.ask("And now?", max_tokens=4).result()
    assert first.done is not None and second.done is not None
    assert first.done.usage.cached_tokens == 0
    assert 0 <= second.done.usage.cached_tokens < second.done.usage.prompt_tokens


async def test_a_repeated_openai_request_is_served_from_the_cache(live: Live[VllmEngine]) -> None:
    """The same chat request twice, whole then streamed, through the official client:
    usage.prompt_tokens_details.cached_tokens is 0, then most of the prompt, never all of it."""
    webm = encode_video(container="webm", fps=10, seconds=FRAMES / 2, first_index=7201)
    url = f"data:video/webm;base64,{base64.b64encode(webm).decode()}"
    body: dict[str, Any] = {
        "model": live.engine.model_name,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": url}},
                    {"type": "text", "text": "Which number is shown?"},
                ],
            }
        ],
        "max_tokens": 4,
        "extra_body": {"media_io_kwargs": {"video": {"num_frames": FRAMES}}},
    }
    client = openai.AsyncOpenAI(base_url=live.base + "/v1", api_key="none", max_retries=0)
    async with client:
        whole = await client.chat.completions.create(**body)
        stream = await client.chat.completions.create(
            **body, stream=True, stream_options={"include_usage": True}
        )
        streamed = [chunk async for chunk in stream][-1].usage
    told = []
    for usage in (whole.usage, streamed):
        assert usage is not None and usage.prompt_tokens_details is not None
        told.append((usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens))
    (cold, prompt), (warm, again) = told
    assert prompt == again > 128
    assert cold == 0
    assert prompt - 128 <= warm < prompt
    assert live.engine.engine_unfinished() == 0
