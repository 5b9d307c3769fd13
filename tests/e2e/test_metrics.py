"""``/metrics`` with the real engine: one question on the tiny model moves streamchat's
families and vLLM's own, both in the one scrape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from streamchat_client import connect
from tests.support.live import Live
from tests.support.media import encode_video
from tests.support.metrics import scrape

pytestmark = pytest.mark.engine


async def test_one_question_is_counted_by_streamchat_and_by_vllm(
    live: Live[Any], tmp_path: Path
) -> None:
    """A question's tokens and TTFT are observed, matching what the client was told; the
    engine gauges are there (0 once nothing streams); vLLM's own families come along."""
    path = tmp_path / "clip.webm"
    path.write_bytes(encode_video(container="webm", codec="vp8", seconds=2.0))
    before = await scrape(live.base)
    async with connect(live.url, fps=2) as session:
        await session.send_file(path)
        await session.wait_ended(timeout=60)
        answer = await session.ask("What is moving?", max_tokens=8).result()
    after = await scrape(live.base)

    def grew(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert answer.done is not None
    usage = answer.done.usage
    ws = {"door": "websocket"}
    assert grew("streamchat_asks_total", finish_reason=answer.done.finish_reason, **ws) == 1
    assert grew("streamchat_time_to_first_token_seconds_count", **ws) == 1
    assert grew("streamchat_time_to_first_token_seconds_sum", **ws) > 0
    assert grew("streamchat_prompt_tokens_total", **ws) == usage.prompt_tokens > 0
    assert grew("streamchat_cached_prompt_tokens_total", **ws) == usage.cached_tokens
    assert grew("streamchat_video_tokens_total", **ws) == usage.video_tokens > 0
    assert grew("streamchat_completion_tokens_total", **ws) == usage.completion_tokens > 0
    assert after.types["streamchat_engine_requests_running"] == "gauge"
    assert after.types["streamchat_engine_requests_waiting"] == "gauge"
    assert after.value("streamchat_engine_requests_running") == 0
    assert after.types["vllm:num_requests_running"] == "gauge"
    assert after.types["vllm:num_requests_waiting"] == "gauge"
    assert grew("vllm:time_to_first_token_seconds_count") == 1
    assert grew("vllm:prompt_tokens_total") == usage.prompt_tokens
    assert grew("vllm:generation_tokens_total") == usage.completion_tokens
