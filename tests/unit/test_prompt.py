"""Prompt building: the video on the newest question, history as text, true stream time.

The metadata tests hold what each family is given against the official
computation for the same frame times: Qwen3-VL's timestamps as its processor
computes them from the metadata (transformers' ``_calculate_timestamps``), and
Qwen2.5-VL's temporal M-RoPE positions from the interval its processor derives
(``temporal_patch_size / VideoMetadata.sampled_fps``), against what
qwen-vl-utils' even sampling of the same instants would give.
"""

from __future__ import annotations

import numpy as np
import pytest

from streamchat.engine import cpu_compat
from streamchat.engine.base import ChatTurn
from streamchat.engine.prompt import (
    build_messages,
    clip_frames,
    describe_frames,
    split_clips,
    video_metadata,
)
from streamchat.window import Frame, FrameWindow

cpu_compat.install()  # transformers imports torchvision, a CUDA build beside CPU torch here

from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor  # noqa: E402
from transformers.video_utils import VideoMetadata  # noqa: E402

TOKENS_PER_SECOND = 2  # Qwen2.5-VL's vision_config.tokens_per_second
TEMPORAL_PATCH = 2


def frames(*pts: float) -> list[Frame]:
    return [Frame(t, np.zeros((28, 28, 3), np.uint8)) for t in pts]


def window_of(pts: list[float], **select: float) -> list[Frame]:
    window = FrameWindow(max_frames=1000, max_bytes=1 << 30)
    for frame in frames(*pts):
        window.push(frame)
    return window.select(**select)  # type: ignore[arg-type]


def test_video_only_on_the_last_user_message() -> None:
    """History is replayed as text; only the newest question carries the video."""
    messages = build_messages(
        "what now?", frames(1.0, 1.5), [ChatTurn("first?", "an answer")], fps=2.0
    )
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"] == [{"type": "text", "text": "first?"}]
    assert messages[1]["content"] == [{"type": "text", "text": "an answer"}]
    last = messages[-1]["content"]
    assert last[0] == {"type": "video"}
    assert last[1]["text"].endswith("what now?")
    assert "t=1.0s to t=1.5s" in last[1]["text"]


def test_system_prompt_comes_first() -> None:
    """A system prompt is the first message."""
    messages = build_messages("q", frames(0.0), fps=1.0, system="be brief")
    assert messages[0]["role"] == "system"


def test_describe_frames_wording() -> None:
    """The sentence names the stream times and the rate the frames were really sampled at."""
    assert describe_frames([], 2.0) == "No video frames are available."
    assert "1 frame at t=3.0s" in describe_frames(frames(3.0), 2.0)
    assert "3 frames from t=0.0s to t=1.0s, sampled at 2 fps" in describe_frames(
        frames(0, 0.5, 1), 2.0
    )
    # Thinned to every other frame: the rate said is the real one, not the session's.
    assert "sampled at 1 fps" in describe_frames(frames(0, 1, 2, 3), 2.0)


def test_a_gap_cuts_the_video_into_clips_each_with_its_times() -> None:
    """Frames after a 3 s gap are a clip of their own, and the sentence says where both lie."""
    pts = [0.0, 0.5, 1.0, 1.5, 4.5, 5.0, 5.5]
    clips = split_clips(frames(*pts))
    assert [[f.pts for f in clip] for clip in clips] == [pts[:4], pts[4:]]
    messages = build_messages("q", frames(*pts), fps=2.0)
    content = messages[-1]["content"]
    assert content[:2] == [{"type": "video"}, {"type": "video"}]
    text = content[2]["text"]
    assert "t=0.0s to t=1.5s" in text and "t=4.5s to t=5.5s" in text


def test_even_frames_thinned_or_slow_make_one_clip() -> None:
    """Evenly spaced frames, whatever their rate, are never cut."""
    assert len(split_clips(frames(*[i * 2.3 for i in range(8)]))) == 1
    assert len(split_clips(frames(0.0, 0.47, 1.0, 1.53, 2.0))) == 1


def test_clips_are_bounded() -> None:
    """Many gaps still give at most MAX_CLIPS videos, cut at the largest gaps."""
    pts = [0.0, 0.5, 3.0, 3.5, 7.0, 7.5, 9.0, 9.5, 20.0, 20.5, 22.0, 22.5]
    clips = split_clips(frames(*pts), max_clips=3)
    assert len(clips) == 3
    assert [clip[0].pts for clip in clips] == [0.0, 7.0, 20.0]  # the gaps of 3.5 and 10.5 s


# -- what each family is told, against the official computation -----------------


def official_qwen3_timestamps(clip: list[Frame]) -> list[float]:
    """Qwen3-VL's timestamps for frames sampled at these stream times (qwen-vl-utils' view:
    the source's frame indices over its fps), as the processor averages them per pair."""
    source_fps = 30.0
    indices = [round(f.pts * source_fps) for f in clip]
    return Qwen3VLProcessor._calculate_timestamps(None, indices, source_fps, TEMPORAL_PATCH)  # type: ignore[arg-type]


def ours_qwen3_timestamps(clip: list[Frame]) -> list[float]:
    meta = video_metadata(clip, 2.0, family="qwen3_vl")
    assert meta is not None and meta["do_sample_frames"] is False
    return Qwen3VLProcessor._calculate_timestamps(  # type: ignore[arg-type]
        None, list(meta["frames_indices"]), meta["fps"], TEMPORAL_PATCH
    )


def qwen25_positions(meta: dict[str, object], pairs: int) -> list[int]:
    """Temporal M-RoPE positions of each frame pair, from what the processor derives."""
    sampled_fps = VideoMetadata(**{k: v for k, v in meta.items() if k != "do_sample_frames"})
    second_per_grid = TEMPORAL_PATCH / sampled_fps.sampled_fps
    return [int(k * second_per_grid * TOKENS_PER_SECOND) for k in range(pairs)]


CASES = {
    # 16 s at 2 fps, asked with max_frames=8: frames every 15/7 s, not 0.5 s.
    "thinned": dict(pts=[i / 2 for i in range(32)], select={"max_frames": 8}),
    # A stall: 3 s without frames in the middle.
    "gapped": dict(pts=[0, 0.5, 1, 1.5, 2, 2.5, 5.5, 6, 6.5, 7, 7.5, 8], select={}),
    # The last 4 s of a stream that began long before.
    "late": dict(pts=[i / 2 for i in range(20)], select={"last_seconds": 4.0}),
}


@pytest.mark.parametrize("case", CASES)
def test_qwen3_timestamps_are_stream_times(case: str) -> None:
    """Qwen3-VL's timestamps equal the official ones for the same instants, per clip."""
    spec = CASES[case]
    chosen = window_of(spec["pts"], **spec["select"])  # type: ignore[arg-type]
    for clip in split_clips(chosen):
        given = clip_frames(clip)
        assert ours_qwen3_timestamps(given) == pytest.approx(
            official_qwen3_timestamps(given), abs=0.02
        )
    if case == "late":
        assert ours_qwen3_timestamps(chosen)[0] == pytest.approx(5.75, abs=0.01)


@pytest.mark.parametrize("case", CASES)
def test_qwen25_clock_runs_at_stream_speed(case: str) -> None:
    """Qwen2.5-VL's temporal positions advance with stream time within every clip."""
    spec = CASES[case]
    chosen = window_of(spec["pts"], **spec["select"])  # type: ignore[arg-type]
    for clip in split_clips(chosen):
        given = clip_frames(clip)
        meta = video_metadata(given, 2.0, family="qwen2_5_vl")
        assert meta is not None
        pairs = (len(given) + 1) // 2
        # The official view: frames evenly sampled at these instants, pair k at t[2k].
        expected = [
            int((given[2 * k].pts - given[0].pts) * TOKENS_PER_SECOND) for k in range(pairs)
        ]
        ours = qwen25_positions(meta, pairs)
        assert all(abs(a - b) <= 1 for a, b in zip(ours, expected, strict=True)), (ours, expected)


def test_qwen2_takes_no_metadata() -> None:
    """Qwen2-VL's processor takes frames alone."""
    assert video_metadata(frames(0.0, 0.5), 2.0, family="qwen2_vl") is None
