"""Question + frames + history -> chat messages for the model's own template.

Pure: the engine adapter renders the messages with the model's chat template
(so the model's own video placeholder tokens appear where they belong) and
passes the frames as the single video of the prompt.

Only the newest question carries the video: earlier turns are replayed as
text, which keeps one video per prompt (what vLLM allows by default) and keeps
the prompt short. The frames' timestamps are stated in words because
Qwen2-VL has no notion of absolute stream time; later models also receive them
as video metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .engine.base import ChatTurn
from .window import Frame

__all__ = ["build_messages", "describe_frames", "video_metadata"]

Message = dict[str, Any]


def describe_frames(frames: Sequence[Frame], fps: float) -> str:
    """One sentence telling the model which stretch of the stream it sees."""
    if not frames:
        return "No video frames are available."
    first, last = frames[0].pts, frames[-1].pts
    noun = "frame" if len(frames) == 1 else "frames"
    if len(frames) == 1:
        return f"The video is 1 frame at t={first:.1f}s of the stream."
    return (
        f"The video is {len(frames)} {noun} from t={first:.1f}s to t={last:.1f}s "
        f"of the stream, sampled at {fps:g} fps."
    )


def build_messages(
    question: str,
    frames: Sequence[Frame],
    history: Sequence[ChatTurn] = (),
    *,
    fps: float,
    system: str | None = None,
) -> list[Message]:
    """Chat messages in the Hugging Face multimodal format."""
    messages: list[Message] = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    for turn in history:
        messages.append({"role": "user", "content": [{"type": "text", "text": turn.question}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": turn.answer}]})
    content: list[dict[str, Any]] = []
    if frames:
        content.append({"type": "video"})
    content.append({"type": "text", "text": f"{describe_frames(frames, fps)}\n{question}"})
    messages.append({"role": "user", "content": content})
    return messages


def video_metadata(frames: Sequence[Frame], fps: float) -> dict[str, Any]:
    """Metadata that Qwen2.5-VL and Qwen3-VL processors require with a video.

    We sample frames ourselves, so the processor must not sample again
    (``do_sample_frames`` is false) and the indices are those of the frames
    as given.
    """
    count = len(frames)
    duration = (frames[-1].pts - frames[0].pts + 1.0 / fps) if frames else 0.0
    return {
        "fps": fps,
        "total_num_frames": count,
        "frames_indices": list(range(count)),
        "duration": duration,
        "video_backend": "pyav",
        "do_sample_frames": False,
    }
