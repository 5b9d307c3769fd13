"""Long answers and long sessions on the real engine: every later question still answers.

A tiny model writes gibberish until ``max_tokens`` or the context ends, so one
answer can be made as long as a client may ask, and the history it joins
pushes the next prompt, video tokens included, towards the context's end. The
engine here has a small context (:data:`CONTEXT` tokens) so that takes seconds;
the arithmetic is the same at the default 8192.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from streamchat.engine.base import ChatTurn, Delta, GenerationRequest, SamplingOptions, Usage
from streamchat.errors import ContextTooLong
from streamchat.window import Frame
from streamchat_client import connect
from tests.support.engines import QUESTION, ask, make_frames, tiny_engine
from tests.support.live import Live, live_server
from tests.support.media import encode_video
from tests.support.settings import TINY

if TYPE_CHECKING:
    from streamchat.engine.vllm import VllmEngine

pytestmark = pytest.mark.engine

CONTEXT = 1024
"""``max_model_len`` of the engine under test."""
LONGEST = 640
"""``max_tokens_limit``: the longest answer a client may ask for."""
SETTINGS = dataclasses.replace(TINY, window_frames=8, max_tokens_limit=LONGEST, context_reserve=128)
"""Small frames (up to 16 video tokens a pair of frames), answers of up to LONGEST tokens."""


@pytest.fixture(scope="module")
async def small_engine(tiny_model: Callable[[str], Path]) -> AsyncIterator[VllmEngine]:
    """The tiny Qwen2-VL model on an engine with a context of :data:`CONTEXT` tokens."""
    async with tiny_engine(tiny_model("qwen2_vl"), max_model_len=CONTEXT) as engine:
        yield engine


@pytest.fixture
async def live(small_engine: VllmEngine) -> AsyncIterator[Live[VllmEngine]]:
    async with live_server(SETTINGS, small_engine) as server:
        yield server


def frames(count: int, *, seed: int = 0) -> list[Frame]:
    """Frames of 112x112: 16 video tokens a pair."""
    return make_frames(count, seed=seed, size=(112, 112))


async def answer(engine: VllmEngine, request: GenerationRequest) -> tuple[str, Delta, Usage]:
    """The answer's text, its last delta and its usage."""
    deltas = [delta async for delta in engine.generate(request)]
    last = deltas[-1]
    assert last.usage is not None
    return "".join(delta.text for delta in deltas), last, last.usage


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.ERROR or r.exc_info
    ]


async def test_a_long_answer_leaves_room_for_every_later_question(
    live: Live, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Answers as long as the limit allows, asked again and again in one session: every one
    answers in full, the history keeps what still fits, and nothing is logged as an error."""
    caplog.set_level(logging.INFO)
    clip = encode_video(tmp_path / "clip.webm", seconds=4.0)
    async with connect(live.url, fps=2) as session:
        await session.send_file(clip)
        await session.wait_ended(timeout=60)
        usages = []
        for n in range(4):
            done = (
                await session.ask(f"Tell me everything, {n}.", max_tokens=LONGEST).result()
            ).done
            assert done is not None and done.finish_reason in ("stop", "length")
            usages.append(done.usage)
        short = (await session.ask("And now?", max_tokens=8).result()).done
    assert short is not None and short.finish_reason in ("stop", "length")
    first = usages[0]
    assert first.video_tokens > 32  # the video's tokens count in every prompt below
    assert first.completion_tokens == LONGEST, "the tiny model no longer writes to the limit"
    for usage in usages:
        # Each long answer got all it asked for: history made room, not the answer.
        assert usage.completion_tokens == LONGEST
        assert usage.prompt_tokens + usage.completion_tokens <= CONTEXT
    # A short answer has room for the last long turn: trimming dropped no more than it had to.
    assert short.usage.prompt_tokens > first.prompt_tokens + LONGEST
    assert short.usage.prompt_tokens + short.usage.completion_tokens <= CONTEXT
    assert tracebacks(caplog) == []


async def test_history_is_trimmed_to_the_fewest_turns_that_make_room(
    small_engine: VllmEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """Turns are dropped oldest first, just enough for the prompt with its video tokens and
    the requested answer to fit: with room for exactly two turns, the two newest are kept."""
    caplog.set_level(logging.INFO)
    video = frames(8)
    history = [ChatTurn(f"question {i}?", f"answer {i}: " + "word " * 40) for i in range(5)]
    # The prompt with the newest k turns, as vLLM counts it (all of them fit on their own).
    lengths = []
    for kept in range(len(history) + 1):
        request = ask(
            f"measure-{kept}", video, max_tokens=1, history=history[len(history) - kept :]
        )
        lengths.append((await answer(small_engine, request))[2].prompt_tokens)
    assert lengths == sorted(set(lengths)) and lengths[-1] < CONTEXT, "nothing trimmed yet"
    wanted = CONTEXT - lengths[2]  # an answer that leaves room for two turns, not three
    _, last, usage = await answer(
        small_engine, ask("trim", video, max_tokens=wanted, history=history)
    )
    assert last.finish_reason in ("stop", "length")
    assert usage.prompt_tokens == lengths[2]
    assert usage.completion_tokens <= wanted and usage.video_tokens > 32
    assert tracebacks(caplog) == []


async def test_an_answer_longer_than_the_room_left_is_cut_to_it(
    small_engine: VllmEngine,
) -> None:
    """max_tokens as large as the whole context is lowered to the room after the prompt:
    the answer ends with length at the context's end, and is not refused."""
    _, last, usage = await answer(small_engine, ask("whole", frames(8), max_tokens=CONTEXT))
    assert last.finish_reason == "length"
    assert usage.prompt_tokens + usage.completion_tokens == CONTEXT


async def test_a_video_over_the_context_is_a_typed_refusal(
    small_engine: VllmEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """A question whose text fits but whose video tokens fill the context is context_too_long,
    with history or without, and nothing is logged as an error."""
    caplog.set_level(logging.INFO)
    video = frames(160)  # 80 pairs of 16 tokens: more than the context, in a short text
    for history in ((), [ChatTurn("Hi?", "Hello.")]):
        with pytest.raises(ContextTooLong, match=f"context of {CONTEXT} tokens"):
            await answer(small_engine, ask("over", video, max_tokens=8, history=history))
    assert small_engine.running() == frozenset()
    assert small_engine.engine_unfinished() == 0
    assert tracebacks(caplog) == []


async def test_a_refused_question_leaves_its_video_usable(
    small_engine: VllmEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """A question whose text fits but not with its video is refused before vLLM sees it, and
    the next question about the same frames answers: the refusal left no stale cache entry."""
    caplog.set_level(logging.INFO)
    # Measured on other frames of the same size and count: the same number of tokens.
    _, _, usage = await answer(small_engine, ask("measure", frames(8, seed=1), max_tokens=1))
    tokens = small_engine.tokenizer.encode
    asked = len(tokens(QUESTION))
    # A question whose text is short of the context by half the video's tokens: only the
    # video makes the prompt overflow.
    target = CONTEXT + usage.video_tokens // 2
    words = 1
    while usage.prompt_tokens - asked + len(tokens("word " * words)) < target:
        words += 1
    video = frames(8, seed=2)  # never seen by vLLM before the refused question
    long = GenerationRequest(
        request_id="long",
        question="word " * words,
        frames=video,
        sampling=SamplingOptions(max_tokens=8),
    )
    with pytest.raises(ContextTooLong, match=f"context of {CONTEXT} tokens"):
        await answer(small_engine, long)
    again = await answer(small_engine, ask("again", frames(8, seed=2), max_tokens=4))
    assert again[1].finish_reason in ("stop", "length")
    assert tracebacks(caplog) == []
