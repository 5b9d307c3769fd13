"""The vLLM adapter streams answers about frames and cleans up every request.

These run the real engine on tiny random models (see ``conftest.py``); every
claim about cleanup is checked through vLLM itself (``engine_unfinished``),
never by waiting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from tokenizers import Tokenizer

from streamchat.engine.base import (
    ChatTurn,
    Delta,
    Engine,
)
from streamchat.errors import ContextTooLong
from streamchat.window import Frame
from tests.support.engines import ask, hf_processor, make_frames, process_video

if TYPE_CHECKING:
    from streamchat.engine.vllm import VllmEngine

pytestmark = pytest.mark.engine

LONG = 1500
"""Enough tokens that a request is still running when the test acts on it."""


async def collect(deltas: AsyncIterator[Delta]) -> list[Delta]:
    return [delta async for delta in deltas]


def assert_idle(engine: VllmEngine) -> None:
    assert engine.running() == frozenset()
    assert engine.engine_unfinished() == 0


async def test_is_an_engine(vllm_engine: VllmEngine) -> None:
    """The adapter satisfies the seam sessions use and names its model."""
    assert isinstance(vllm_engine, Engine)
    assert vllm_engine.model_name


async def test_frame_factor_comes_from_the_vision_config(vllm_engine: VllmEngine) -> None:
    """Qwen3-VL's 16-pixel patches merge to 32; the Qwen2 family's 14-pixel ones to 28."""
    expected = 32 if "qwen3_vl" in vllm_engine.model_name else 28
    assert vllm_engine.frame_factor == expected


async def test_streams_deltas_then_a_final_delta_with_usage(vllm_engine: VllmEngine) -> None:
    """An answer comes as several text deltas, the last with finish reason and usage."""
    frames = make_frames(3)  # odd: the processor pads the temporal patch
    deltas = await collect(vllm_engine.generate(ask("stream", frames)))

    *pieces, last = deltas
    assert len(pieces) >= 2
    assert all(d.text and d.finish_reason is None and d.usage is None for d in pieces)
    assert last.finish_reason == "length"
    usage = last.usage
    assert usage is not None
    assert usage.completion_tokens == 16
    assert usage.frames == 3
    assert usage.video_tokens > 0
    assert usage.prompt_tokens > usage.video_tokens
    assert "".join(d.text for d in deltas).strip()
    assert_idle(vllm_engine)


async def test_same_request_gives_the_same_answer(vllm_engine: VllmEngine) -> None:
    """Greedy decoding is deterministic, and history and frames change the prompt size."""
    frames = make_frames(4, seed=1)
    first = await collect(vllm_engine.generate(ask("again-1", frames)))
    second = await collect(vllm_engine.generate(ask("again-2", frames)))
    # The text is the same; how it is cut into deltas depends on scheduling.
    assert "".join(d.text for d in first) == "".join(d.text for d in second)
    with_history = await collect(
        vllm_engine.generate(ask("again-3", frames, history=[ChatTurn("Hi?", "Hello.")]))
    )
    first_usage, history_usage = first[-1].usage, with_history[-1].usage
    assert first_usage is not None and history_usage is not None
    assert history_usage.prompt_tokens > first_usage.prompt_tokens
    assert history_usage.video_tokens == first_usage.video_tokens


async def test_a_fixed_choice_answer_is_exactly_one_of_the_choices(
    vllm_engine: VllmEngine,
) -> None:
    """Bound by vLLM's structured output, a random model answers with one of the given
    strings and stops, where unbound it says something else."""
    frames = make_frames(4, seed=5)
    free = await collect(vllm_engine.generate(ask("free", frames, max_tokens=8)))
    for number, choices in enumerate([("yes", "no"), ("a red square", "a blue circle", "none")]):
        request = ask(f"choice-{number}", frames, max_tokens=16)
        sampling = dataclasses.replace(request.sampling, choices=choices)
        deltas = await collect(
            vllm_engine.generate(dataclasses.replace(request, sampling=sampling))
        )
        text = "".join(d.text for d in deltas)
        assert text in choices
        assert deltas[-1].finish_reason == "stop"
        assert "".join(d.text for d in free) not in choices
    assert_idle(vllm_engine)


async def test_a_single_frame_is_a_video(vllm_engine: VllmEngine) -> None:
    """A window holding one frame can be asked about (Qwen3-VL wants two)."""
    deltas = await collect(vllm_engine.generate(ask("single", make_frames(1))))
    usage = deltas[-1].usage
    assert usage is not None
    assert usage.frames == 1
    assert usage.video_tokens > 0


async def test_question_without_frames_has_no_video(vllm_engine: VllmEngine) -> None:
    """With no frames the prompt is text only and the usage says so."""
    deltas = await collect(vllm_engine.generate(ask("text-only", [])))
    usage = deltas[-1].usage
    assert usage is not None
    assert (usage.frames, usage.video_tokens) == (0, 0)


async def test_frames_of_different_sizes_are_one_video(vllm_engine: VllmEngine) -> None:
    """A resolution change inside the window does not fail the question."""
    frames = make_frames(2, size=(56, 84)) + make_frames(2, seed=2)
    deltas = await collect(vllm_engine.generate(ask("resized", frames)))
    assert deltas[-1].finish_reason == "length"


async def test_two_concurrent_requests(vllm_engine: VllmEngine) -> None:
    """Two answers stream at the same time, each complete and separately accounted."""
    first = vllm_engine.generate(ask("one", make_frames(2, seed=3), max_tokens=24))
    second = vllm_engine.generate(ask("two", make_frames(5, seed=4), max_tokens=20))
    heads = [await anext(first), await anext(second)]
    assert vllm_engine.running() == {"one", "two"}

    rest_one, rest_two = await asyncio.gather(collect(first), collect(second))
    for head, rest, max_tokens, count in ((heads[0], rest_one, 24, 2), (heads[1], rest_two, 20, 5)):
        usage = rest[-1].usage
        assert head.finish_reason is None
        assert usage is not None
        assert (usage.completion_tokens, usage.frames) == (max_tokens, count)
    assert_idle(vllm_engine)


async def test_closing_the_generator_aborts_the_request(vllm_engine: VllmEngine) -> None:
    """A consumer that stops reading leaves nothing running in vLLM."""
    deltas = vllm_engine.generate(ask("closed", make_frames(2), max_tokens=LONG))
    assert (await anext(deltas)).finish_reason is None
    assert vllm_engine.engine_unfinished() == 1
    await deltas.aclose()
    assert_idle(vllm_engine)
    await assert_still_serves(vllm_engine)


async def test_cancelling_the_consumer_aborts_the_request(vllm_engine: VllmEngine) -> None:
    """Cancelling the task that reads an answer aborts it in vLLM."""
    first_delta = asyncio.Event()

    async def consume() -> None:
        async for _ in vllm_engine.generate(ask("cancelled", make_frames(2), max_tokens=LONG)):
            first_delta.set()

    task = asyncio.create_task(consume())
    await first_delta.wait()
    assert vllm_engine.engine_unfinished() == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_idle(vllm_engine)
    await assert_still_serves(vllm_engine)


async def test_abort_ends_the_answer_as_cancelled(vllm_engine: VllmEngine) -> None:
    """``abort`` stops a running answer; its stream ends with ``cancelled``."""
    deltas = vllm_engine.generate(ask("aborted", make_frames(2), max_tokens=LONG))
    await anext(deltas)
    await vllm_engine.abort("aborted")
    assert vllm_engine.engine_unfinished() == 0
    rest = await collect(deltas)
    assert rest[-1].finish_reason == "cancelled"
    usage = rest[-1].usage
    assert usage is not None and usage.completion_tokens < LONG
    assert_idle(vllm_engine)


async def test_abort_of_an_unknown_id_is_ignored(vllm_engine: VllmEngine) -> None:
    """Aborting something that is not running is a no-op."""
    await vllm_engine.abort("never-started")
    assert_idle(vllm_engine)


async def test_a_prompt_over_the_context_is_a_typed_refusal(vllm_engine: VllmEngine) -> None:
    """A question that cannot fit even without history is ``context_too_long``, naming the limit."""
    assert vllm_engine.vision_costs is not None
    limit = vllm_engine.vision_costs.max_model_len
    with pytest.raises(ContextTooLong, match=f"context of {limit} tokens"):
        await collect(vllm_engine.generate(ask("too-long", [], question="word " * limit)))
    assert_idle(vllm_engine)


async def test_history_beyond_the_context_is_trimmed_oldest_first(
    vllm_engine: VllmEngine,
) -> None:
    """A long session still gets answers: the oldest turns give way to the new question."""
    assert vllm_engine.vision_costs is not None
    limit = vllm_engine.vision_costs.max_model_len
    history = [ChatTurn(f"q{i} " + "word " * 600, "answer " * 600) for i in range(8)]
    deltas = await collect(
        vllm_engine.generate(ask("long-history", make_frames(4), history=history))
    )
    usage = deltas[-1].usage
    assert usage is not None and deltas[-1].finish_reason in ("stop", "length")
    assert usage.prompt_tokens <= limit
    tokenizer = Tokenizer.from_file(str(Path(vllm_engine.model_name) / "tokenizer.json"))
    untrimmed = sum(len(tokenizer.encode(t.question + t.answer).ids) for t in history)
    assert untrimmed > limit, "the whole history could not have fit"
    assert_idle(vllm_engine)


async def test_duplicate_running_id_is_refused(vllm_engine: VllmEngine) -> None:
    """Two requests may not share an id while the first runs (abort would hit both)."""
    deltas = vllm_engine.generate(ask("dup", [], max_tokens=LONG))
    await anext(deltas)
    with pytest.raises(ValueError, match="already running"):
        await anext(vllm_engine.generate(ask("dup", [])))
    await deltas.aclose()
    assert_idle(vllm_engine)


async def assert_still_serves(engine: VllmEngine) -> None:
    deltas = await collect(engine.generate(ask("after", make_frames(2), max_tokens=4)))
    assert deltas[-1].finish_reason == "length"


async def test_a_different_video_is_not_taken_for_a_cached_one(vllm_engine: VllmEngine) -> None:
    """Videos are identified by content: same timestamps and size but other pixels, other answer."""
    first, other = make_frames(4, seed=5), make_frames(4, seed=6)
    answer = await collect(vllm_engine.generate(ask("video-a", first)))
    different = await collect(vllm_engine.generate(ask("video-b", other)))
    copied = [Frame(pts=f.pts, image=f.image.copy()) for f in first]
    again = await collect(vllm_engine.generate(ask("video-a-copy", copied)))
    text = "".join(d.text for d in answer)
    assert "".join(d.text for d in different) != text
    assert "".join(d.text for d in again) == text


def test_frame_digests_identify_videos_by_content() -> None:
    """A video's identity follows its pixels, size and metadata, never the arrays' addresses."""
    from streamchat.engine.vllm import FrameDigests

    digests = FrameDigests()
    frames = make_frames(3, seed=7)
    size = (84, 112)
    video_id = digests.video_id(frames, video_size=size, metadata=None)
    assert digests.video_id(frames, video_size=size, metadata=None) == video_id
    copies = [Frame(pts=f.pts, image=f.image.copy()) for f in frames]
    assert digests.video_id(copies, video_size=size, metadata=None) == video_id
    changed = [*frames[:2], Frame(pts=1.0, image=frames[2].image ^ 1)]
    assert digests.video_id(changed, video_size=size, metadata=None) != video_id
    assert digests.video_id(frames[:2], video_size=size, metadata=None) != video_id
    assert digests.video_id(frames, video_size=(56, 84), metadata=None) != video_id
    assert digests.video_id(frames, video_size=size, metadata={"fps": 2.0}) != video_id


def test_frame_digests_are_computed_once_and_forgotten_with_their_frames() -> None:
    """Each image is hashed once while it lives; its entry goes when the image does."""
    from streamchat.engine.vllm import FrameDigests

    digests = FrameDigests()
    frames = make_frames(3, seed=8)
    digests.video_id(frames, video_size=(84, 112), metadata=None)
    assert len(digests) == 3
    image = frames[0].image
    before = digests.frame(image)
    image[0, 0, 0] ^= 0xFF  # never done to a window's frame: shows the digest is kept
    assert digests.frame(image) == before
    assert digests.frame(image.copy()) != before
    del frames, image
    gc.collect()
    assert len(digests) == 0


async def test_a_full_default_window_of_720p_fits_and_costs_what_the_processor_counts(
    vllm_engine: VllmEngine,
) -> None:
    """32 frames of 720p, sized by the server's rule, are answered; vLLM's video tokens equal
    the official processor's count for the same frames (the faithful tiny model's)."""
    from streamchat.config import Settings
    from streamchat.engine.prompt import build_messages
    from streamchat.media.sampling import target_size

    settings = Settings()
    factor = vllm_engine.frame_factor
    assert factor is not None
    width, height = target_size(1280, 720, factor=factor, max_pixels=settings.max_pixels)
    frames = make_frames(settings.window_frames, seed=7, size=(height, width), fps=settings.fps)
    deltas = await collect(vllm_engine.generate(ask("full-720p", frames, max_tokens=4)))
    usage = deltas[-1].usage
    assert usage is not None and deltas[-1].finish_reason in ("stop", "length")

    processor = hf_processor(Path(vllm_engine.model_name))
    family = vllm_engine.llm.model_config.hf_config.model_type
    text = processor.tokenizer.apply_chat_template(
        build_messages("What happens?", frames, fps=settings.fps),
        tokenize=False,
        add_generation_prompt=True,
    )
    official = process_video(processor, family, text, frames, settings.fps)
    pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert usage.video_tokens == int((official["input_ids"][0] == pad).sum())
    assert usage.video_tokens == 16 * (height // factor) * (width // factor)
    costs = vllm_engine.vision_costs
    assert costs is not None
    assert usage.prompt_tokens <= costs.video_tokens(32, settings.max_pixels) + 200
    assert_idle(vllm_engine)
