"""A session's context chosen in hello, on the real engine: the timeline reuses what was asked.

The tiny Qwen2-VL's default is the window (one new video per ask), so a session asks for the
timeline in ``hello``. Frames are 448x448 here (a server of its own on the package's engine,
whose pixel budget allows them: the shared one's caps frames at 112x112), so one segment of 4
frames is 512 video tokens, several of vLLM's 128-token blocks. Each session streams a clip no
other test sends (its own first number), so its first ask finds nothing in the cache.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from streamchat.engine.vllm import VllmEngine
from streamchat_client import connect
from tests.support.live import Live, live_server
from tests.support.media import encode_image, encode_video
from tests.support.settings import E2E

pytestmark = pytest.mark.engine

FRAMES = 8
"""The window: two segments of 4 frames, 1,024 video tokens at 448x448."""
SIDE = 448
BLOCK = 128
"""vLLM's prefix-cache block on CPU: only whole blocks are reused."""


async def _ask_twice(url: str, clip: Path, context: str) -> tuple[Any, Any]:
    """The usage of two questions in one session of ``context`` about the whole clip."""
    async with connect(url, fps=2, window_frames=FRAMES, context=context) as session:
        assert session.limits.context == context
        await session.send_file(clip)
        status = await session.wait_ended(timeout=60)
        assert status.frames == FRAMES and status.width == SIDE
        first = await session.ask("Which number is shown?", max_tokens=4).result()
        second = await session.ask("And what colour is it?", max_tokens=4).result()
    for answer in (first, second):
        assert answer.done is not None and answer.done.finish_reason in ("stop", "length")
    return first.done.usage, second.done.usage


async def test_a_second_ask_on_a_timeline_reuses_the_first_prompt_and_on_a_window_does_not(
    live: Live[VllmEngine], tmp_path: Path
) -> None:
    """On the timeline, the second ask's cached tokens cover every whole block of the first
    ask's prompt (its video among them); in a window session, whose second prompt puts the
    history before the video, far fewer are cached."""
    settings = dataclasses.replace(E2E, max_pixels=SIDE * SIDE)
    clips = [
        encode_video(
            tmp_path / f"{name}.webm",
            width=SIDE,
            height=SIDE,
            fps=10,
            seconds=FRAMES / 2,
            first_index=index,
        )
        for name, index in (("timeline", 7301), ("window", 7401))
    ]
    async with live_server(settings, live.engine) as server:
        timeline = await _ask_twice(server.url, clips[0], "timeline")
        window = await _ask_twice(server.url, clips[1], "window")
    (first, second), (window_first, window_second) = timeline, window
    assert first.video_tokens >= FRAMES * SIDE * SIDE // (28 * 28) // 2  # the frames' full size
    assert first.cached_tokens < BLOCK  # a clip nobody sent before
    assert second.prompt_tokens > first.prompt_tokens
    assert second.cached_tokens >= first.prompt_tokens // BLOCK * BLOCK
    assert window_first.prompt_tokens > 4 * BLOCK
    assert window_second.cached_tokens < second.cached_tokens // 4
    assert live.engine.engine_unfinished() == 0


async def test_frames_arriving_after_a_question_are_computed_before_the_next(
    live: Live[VllmEngine],
) -> None:
    """Through the bundled client: after a timeline question, the frames that arrive are
    computed ahead, so the next question finds them cached and computes its own text and
    at most a block more, though it shows a whole new segment (512 video tokens)."""
    settings = dataclasses.replace(E2E, max_pixels=SIDE * SIDE)
    images = [encode_image(width=SIDE, height=SIDE, index=7500 + i) for i in range(FRAMES + 4)]
    async with live_server(settings, live.engine) as server:
        async with connect(server.url, fps=2, window_frames=FRAMES, context="timeline") as session:
            for number, image in enumerate(images[:FRAMES]):
                await session.send_image(image, pts=number / 2)
            await session.wait_frames(FRAMES, timeout=60)
            first = await session.ask("Which number is shown?", max_tokens=4).result()
            counted = prefills(live.engine)
            for number, image in enumerate(images[FRAMES:], start=FRAMES):
                await session.send_image(image, pts=number / 2)
            await session.wait_frames(FRAMES + 4, timeout=60)
            await computed_ahead(live.engine, session.ready.session, counted)
            second = await session.ask("And now?", max_tokens=4).result()
    assert first.done is not None and second.done is not None
    one, two = first.done.usage, second.done.usage
    assert two.video_tokens - one.video_tokens == 4 * SIDE * SIDE // (28 * 28) // 2
    assert two.prompt_tokens - two.cached_tokens <= 2 * BLOCK
    assert live.engine.engine_unfinished() == 0


def prefills(engine: VllmEngine) -> float:
    (family,) = [f for f in engine.families() if f.name == "streamchat_timeline_prefills"]
    return sum(s.value for s in family.samples if s.name.endswith("_total"))


async def computed_ahead(engine: VllmEngine, session: str, before: float) -> None:
    """Wait (polled, with a deadline) until a prefill started after ``before`` has ended."""
    deadline = asyncio.get_running_loop().time() + 120
    while prefills(engine) == before or engine.prefilling(session) is not None:
        assert asyncio.get_running_loop().time() < deadline, "no prefill ended in time"
        await asyncio.sleep(0.05)
