"""Prompt building puts the video on the newest question and replays history as text."""

from __future__ import annotations

import numpy as np

from streamchat.engine.base import ChatTurn
from streamchat.prompt import build_messages, describe_frames, video_metadata
from streamchat.window import Frame


def frames(*pts: float) -> list[Frame]:
    return [Frame(t, np.zeros((28, 28, 3), np.uint8)) for t in pts]


def test_video_only_on_the_last_user_message() -> None:
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
    messages = build_messages("q", frames(0.0), fps=1.0, system="be brief")
    assert messages[0]["role"] == "system"


def test_describe_frames_wording() -> None:
    assert describe_frames([], 2.0) == "No video frames are available."
    assert "1 frame at t=3.0s" in describe_frames(frames(3.0), 2.0)
    assert "3 frames from t=0.0s to t=1.0s" in describe_frames(frames(0, 0.5, 1), 2.0)


def test_video_metadata_matches_frames() -> None:
    meta = video_metadata(frames(0.0, 0.5, 1.0), 2.0)
    assert meta["total_num_frames"] == 3
    assert meta["frames_indices"] == [0, 1, 2]
    assert meta["duration"] == 1.5
    assert meta["do_sample_frames"] is False
