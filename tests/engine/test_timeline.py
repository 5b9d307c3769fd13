"""The session timeline through the real engine: what each ask computes, read from vLLM itself.

vLLM reports per request how many prompt tokens its prefix cache served
(``num_cached_tokens``, our ``Usage.cached_tokens``); whatever it did not
serve it computed. Its CPU cache works in whole blocks (128 tokens) and always
computes a prompt's last token, so "everything the previous ask's prompt
held" means its whole blocks. Frames are 448x448 (a segment of 4 frames is
512 video tokens for Qwen2/2.5-VL, 392 for Qwen3-VL: several blocks), and
every test draws frames no other test uses (its own seed), so nothing it asks
is in the cache before it asks.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence

from streamchat.engine.base import (
    Delta,
    GenerationRequest,
    SamplingOptions,
    TimelineContext,
    Usage,
)
from streamchat.engine.prompt import conversation
from streamchat.engine.vllm import VllmEngine
from streamchat.window import Frame
from tests.support.engines import ask, make_frames

WINDOW = 8
"""Frames the window holds (at 2 fps: 4 s)."""
TEXT = 96
"""More than the tokens one turn's text adds (the sentence, the question and the chat markup)."""


def stream(seed: int, count: int = 40) -> list[Frame]:
    return make_frames(count, seed=seed, size=(448, 448))


def timeline_ask(
    session: str,
    number: int,
    window: Sequence[Frame],
    *,
    question: str = "What changed?",
    max_frames: int = WINDOW + 8,
    max_tokens: int = 6,
    choices: tuple[str, ...] = (),
) -> GenerationRequest:
    return GenerationRequest(
        request_id=f"{session}-{number}",
        question=question,
        frames=window,
        sampling=SamplingOptions(max_tokens=max_tokens, temperature=0.0, choices=choices),
        fps=2.0,
        timeline=TimelineContext(session=session, max_frames=max_frames, keep_turns=4),
    )


async def answer(engine: VllmEngine, request: GenerationRequest) -> tuple[str, Usage]:
    deltas: list[Delta] = [delta async for delta in engine.generate(request)]
    final = deltas[-1]
    assert final.finish_reason in ("stop", "length") and final.usage is not None
    return "".join(d.text for d in deltas), final.usage


async def finish(engine: VllmEngine, session: str) -> None:
    """End ``session`` and wait until work it had running ahead is cancelled (and aborted)."""
    running = [t for t in (engine.warming(session), engine.prefilling(session)) if t is not None]
    engine.end_session(session)
    if running:
        await asyncio.wait(running)


async def settled(engine: VllmEngine, session: str) -> None:
    """Wait until ``session`` has no warm-up running (one may follow another)."""
    while (warming := engine.warming(session)) is not None:
        await asyncio.wait([warming])


def rebases(engine: VllmEngine) -> dict[str, float]:
    """``streamchat_timeline_rebases_total`` by ``when``, as ``/metrics`` exports it."""
    (family,) = [f for f in engine.families() if f.name == "streamchat_timeline_rebases"]
    return {s.labels["when"]: s.value for s in family.samples if s.name.endswith("_total")}


def block(engine: VllmEngine) -> int:
    return int(engine.llm.vllm_config.cache_config.block_size)


def whole_blocks(tokens: int, size: int) -> int:
    return tokens // size * size


async def test_an_ask_after_new_frames_computes_the_new_segments_and_the_question(
    vllm_engine: VllmEngine,
) -> None:
    """The second ask reuses every whole block of the first ask's prompt and computes about
    the new segment, the question and the previous answer; a third with no new frame reuses
    the second's."""
    frames, size = stream(seed=1401), block(vllm_engine)
    ask_about = functools.partial(timeline_ask, "t1", max_frames=WINDOW + 16)
    _, first = await answer(vllm_engine, ask_about(1, frames[:WINDOW]))
    assert first.cached_tokens == 0
    _, second = await answer(vllm_engine, ask_about(2, frames[4 : WINDOW + 4]))
    new_video = second.video_tokens - first.video_tokens
    assert new_video > size  # the 4 new frames, while the 4 that left the window stay
    assert second.cached_tokens >= whole_blocks(first.prompt_tokens, size)
    computed = second.prompt_tokens - second.cached_tokens
    assert computed <= new_video + first.completion_tokens + TEXT + size
    assert vllm_engine.warming("t1") is None  # less than half the slack used: no rebase
    _, third = await answer(vllm_engine, ask_about(3, frames[4 : WINDOW + 4]))
    assert third.video_tokens == second.video_tokens
    assert third.cached_tokens >= whole_blocks(second.prompt_tokens, size)
    assert third.prompt_tokens - third.cached_tokens <= second.completion_tokens + TEXT + size
    await finish(vllm_engine, "t1")
    assert vllm_engine.engine_unfinished() == 0


async def test_a_yes_no_evaluation_on_the_timeline_costs_what_is_new_and_is_one_choice(
    vllm_engine: VllmEngine,
) -> None:
    """A fixed-choice ask after new frames reuses the earlier prompt like any ask, answers
    one of its choices, and the ask after it reuses the choice as a committed turn."""
    frames, size = stream(seed=1406), block(vllm_engine)
    ask_about = functools.partial(timeline_ask, "t6", max_frames=WINDOW + 16)
    _, first = await answer(vllm_engine, ask_about(1, frames[:WINDOW]))
    text, second = await answer(
        vllm_engine,
        ask_about(2, frames[4 : WINDOW + 4], question="Is it dark?", choices=("yes", "no")),
    )
    assert text in ("yes", "no")
    new_video = second.video_tokens - first.video_tokens
    assert second.cached_tokens >= whole_blocks(first.prompt_tokens, size)
    assert second.prompt_tokens - second.cached_tokens <= new_video + TEXT + size + 16
    _, third = await answer(vllm_engine, ask_about(3, frames[4 : WINDOW + 4]))
    assert third.cached_tokens >= whole_blocks(second.prompt_tokens, size)
    await finish(vllm_engine, "t6")
    assert vllm_engine.engine_unfinished() == 0


def prefills(engine: VllmEngine) -> float:
    """``streamchat_timeline_prefills_total``, as ``/metrics`` exports it."""
    (family,) = [f for f in engine.families() if f.name == "streamchat_timeline_prefills"]
    return sum(s.value for s in family.samples if s.name.endswith("_total"))


async def test_segments_prefilled_ahead_leave_the_next_ask_little_more_than_its_question(
    vllm_engine: VllmEngine,
) -> None:
    """New frames handed over between asks are computed ahead (only once the session asked,
    one prefill at a time): the ask after finds them cached and computes its question and at
    most a block more, not the new segment; ending the session cancels a running prefill."""
    frames, size = stream(seed=1407), block(vllm_engine)
    context = TimelineContext(session="t7", max_frames=WINDOW + 16, keep_turns=4)
    ask_about = functools.partial(timeline_ask, "t7", max_frames=WINDOW + 16)
    counted = prefills(vllm_engine)
    vllm_engine.prefill(context, frames[:WINDOW])
    assert vllm_engine.prefilling("t7") is None  # no timeline to extend before the first ask
    _, first = await answer(vllm_engine, ask_about(1, frames[:WINDOW]))
    vllm_engine.prefill(context, frames[4 : WINDOW + 4])
    running = vllm_engine.prefilling("t7")
    assert running is not None
    vllm_engine.prefill(context, frames[6 : WINDOW + 6])  # one at a time: not started
    assert vllm_engine.prefilling("t7") is running
    await asyncio.wait([running])
    assert prefills(vllm_engine) - counted == 1
    _, second = await answer(vllm_engine, ask_about(2, frames[4 : WINDOW + 4]))
    new_video = second.video_tokens - first.video_tokens
    computed = second.prompt_tokens - second.cached_tokens
    assert new_video > TEXT + size
    assert computed <= TEXT + size
    vllm_engine.prefill(context, frames[8 : WINDOW + 8])
    assert vllm_engine.prefilling("t7") is not None
    await finish(vllm_engine, "t7")
    assert vllm_engine.engine_unfinished() == 0


async def test_a_steady_stream_rebases_ahead_of_its_asks_and_keeps_the_budget(
    vllm_engine: VllmEngine,
) -> None:
    """Sliding 4 frames an ask with room for 4 more than the window, the timeline is rebased
    after an answer, never shows more than the window and its slack, and the ask after the
    warm-up finds the rebased prompt in the cache."""
    frames, size, slack = stream(seed=1402), block(vllm_engine), 4
    context = int(vllm_engine.llm.model_config.max_model_len)
    counted = rebases(vllm_engine)
    warmed = 0
    for number in range(1, 7):
        end = WINDOW + 4 * (number - 1)
        request = timeline_ask("t2", number, frames[end - WINDOW : end], max_frames=WINDOW + slack)
        _, usage = await answer(vllm_engine, request)
        assert usage.frames <= WINDOW + slack
        assert usage.prompt_tokens + request.sampling.max_tokens <= context
        if number > 1:
            # Never on the ask's path: at worst the new segment, the turn and a block or two.
            assert usage.prompt_tokens - usage.cached_tokens <= 512 + TEXT + 2 * size + 16
        warming = vllm_engine.warming("t2")
        if warming is not None:
            warmed += 1
            await asyncio.wait([warming])
    assert warmed >= 2
    now = rebases(vllm_engine)
    assert now["ahead"] - counted["ahead"] == warmed
    assert now["on_ask"] == counted["on_ask"]
    await finish(vllm_engine, "t2")
    assert vllm_engine.engine_unfinished() == 0


async def test_an_evicted_prefix_gives_the_same_answer_only_slower(
    vllm_engine: VllmEngine,
) -> None:
    """Two sessions ask the same on the same frames; with vLLM's caches emptied before the
    second session's follow-up, that follow-up computes its whole prompt and answers the same."""
    frames = stream(seed=1403)
    texts: list[str] = []
    usages: list[Usage] = []
    for session in ("t3a", "t3b"):
        await answer(vllm_engine, timeline_ask(session, 1, frames[:WINDOW]))
        if session == "t3b":
            await vllm_engine.llm.reset_prefix_cache()
            await vllm_engine.llm.reset_encoder_cache()
        text, usage = await answer(vllm_engine, timeline_ask(session, 2, frames[4 : WINDOW + 4]))
        texts.append(text)
        usages.append(usage)
        await finish(vllm_engine, session)
    assert texts[0] == texts[1]
    assert usages[0].prompt_tokens == usages[1].prompt_tokens
    assert usages[0].cached_tokens > 0 and usages[1].cached_tokens == 0


async def test_a_prompt_rendered_but_never_sent_does_not_fail_the_next_ask(
    vllm_engine: VllmEngine,
) -> None:
    """A render dropped without telling vLLM's front end (a cancel between render and submit)
    leaves its videos recorded as sent; the next ask with them still gets an answer."""
    engine, request = vllm_engine, ask("t4-1", stream(seed=1404)[:WINDOW], max_tokens=6)
    messages, _ = conversation(request)
    rendered = await engine._rendered(messages, engine._media(messages))  # noqa: SLF001
    assert rendered.length is not None  # rendered, recorded, never submitted
    deltas = [delta async for delta in engine.generate(request)]
    assert deltas[-1].finish_reason in ("stop", "length")
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens > 0
    assert engine.engine_unfinished() == 0


async def test_ending_a_session_stops_its_warm_up(vllm_engine: VllmEngine) -> None:
    """A session that ends while its rebased prompt is being computed leaves nothing running."""
    frames = stream(seed=1405)
    await answer(vllm_engine, timeline_ask("t5", 1, frames[:WINDOW], max_frames=WINDOW))
    await answer(vllm_engine, timeline_ask("t5", 2, frames[4 : WINDOW + 4], max_frames=WINDOW))
    warming = vllm_engine.warming("t5")
    assert warming is not None
    await finish(vllm_engine, "t5")
    assert warming.cancelled()
    assert vllm_engine.warming("t5") is None
    assert vllm_engine.engine_unfinished() == 0


async def test_sessions_asking_in_turn_keep_each_others_prefixes(vllm_engine: VllmEngine) -> None:
    """Two sessions on different streams asking at once, round after round: each ask reuses
    its own session's previous prompt, whatever the other session asked meanwhile."""
    streams = {"t6a": stream(seed=1406), "t6b": stream(seed=1407)}
    size = block(vllm_engine)
    previous: dict[str, Usage] = {}
    for number in range(1, 4):
        end = WINDOW + 2 * (number - 1)
        requests = [
            timeline_ask(session, number, frames[end - WINDOW : end])
            for session, frames in streams.items()
        ]
        results = await asyncio.gather(*(answer(vllm_engine, r) for r in requests))
        for request, (_, usage) in zip(requests, results, strict=True):
            session = request.timeline.session if request.timeline else ""
            if session in previous:
                assert usage.cached_tokens >= whole_blocks(previous[session].prompt_tokens, size)
            else:
                assert usage.cached_tokens == 0
            previous[session] = usage
    for session in streams:
        await finish(vllm_engine, session)
    assert vllm_engine.engine_unfinished() == 0


async def test_asks_go_on_with_the_timeline_while_its_rebased_copy_warms_up(
    vllm_engine: VllmEngine,
) -> None:
    """An ask right after a rebase ahead is served on the timeline as it was (the copy is not
    waited for: its frames are still all there); once the copy took over, asks show the rebased
    timeline and find its prompt in the cache."""
    frames, size = stream(seed=1408), block(vllm_engine)
    ask_about = functools.partial(timeline_ask, "t7", max_frames=WINDOW + 8)
    await answer(vllm_engine, ask_about(1, frames[:WINDOW]))
    await answer(vllm_engine, ask_about(2, frames[4 : WINDOW + 4]))  # half the slack used
    warming = vllm_engine.warming("t7")
    assert warming is not None
    _, during = await answer(vllm_engine, ask_about(3, frames[8 : WINDOW + 8]))
    assert during.frames == WINDOW + 8  # the old timeline: every frame since the first ask
    await settled(vllm_engine, "t7")  # the copy took over (and may have been rebased again)
    _, after = await answer(vllm_engine, ask_about(4, frames[8 : WINDOW + 8]))
    assert after.frames <= WINDOW + 4  # the rebased copy, with what the third ask added
    assert (
        after.prompt_tokens - after.cached_tokens
        <= 512 + during.completion_tokens + 2 * TEXT + 2 * size
    )
    await finish(vllm_engine, "t7")
    assert vllm_engine.engine_unfinished() == 0
