"""Requests -> chat messages and video metadata for the model.

Pure: the engine adapter renders the messages with the model's chat template
(so the model's own video placeholder tokens appear where they belong) and
passes the frames as the prompt's videos and images, in the same order.

A live session's question (:func:`conversation`): only the newest question
carries video; earlier turns are replayed as text, which keeps the prompt
short. A whole conversation (an OpenAI-style request) is rendered as given,
each video where its message put it.

Time. Frames keep their stream times (seconds since the source's first
frame), and every model family is told those times, not a nominal rate:

* the sentence before the question states the stream times the frames span
  and the rate they were actually sampled at (after ``max_frames`` thinning
  that is not the session's fps);
* Qwen3-VL writes a timestamp before every pair of frames, computed from the
  metadata as ``frames_indices / fps``: the indices count milliseconds of
  stream time (:data:`CLOCK`), so the timestamps are the frames' own stream
  times, whatever the window's start, spacing or gaps;
* Qwen2.5-VL's M-RoPE clock takes one interval per video
  (``second_per_grid_ts``, from the metadata's sampled fps), so it can only
  express evenly spaced frames. The frames are therefore cut into **clips** at
  gaps (a stalled stream, a background tab, variable frame rate): each clip is
  a video of its own with its own measured rate, and the sentence names each
  clip's times. Filling gaps with repeated frames was the alternative; it
  costs video tokens for nothing the model can see.
* Qwen2-VL has no notion of time beyond frame order; the clips and the
  sentence are all it gets.

At most :data:`MAX_CLIPS` videos go into one prompt (the engine allows that
many): beyond that the smallest gaps are not cut.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from ..window import Frame
from .base import ChatRequest, ChatTurn, GenerationRequest, Image, Message, Request, Video

__all__ = [
    "CLOCK",
    "MAX_CLIPS",
    "build_messages",
    "clip_frames",
    "clip_rate",
    "conversation",
    "describe_frames",
    "hf_messages",
    "media_frames",
    "split_clips",
    "video_metadata",
]

HfMessage = dict[str, Any]
Clip = Sequence[Frame]

MAX_CLIPS = 4
"""Videos in one prompt at most (the engine's ``limit_mm_per_prompt``)."""
CLOCK = 1000.0
"""Ticks per second of the Qwen3-VL frame indices: timestamps to the millisecond."""
_GAP = 2.0
"""An interval this many times the typical one is a gap: the clip ends there."""


def split_clips(frames: Sequence[Frame], *, max_clips: int = MAX_CLIPS) -> list[list[Frame]]:
    """``frames`` cut at gaps into runs of evenly spaced frames (at most ``max_clips``).

    The typical interval is the median of the intervals, so thinning, a
    slow source or a low fps set no gap by themselves; an interval more than
    :data:`_GAP` times that is a gap. With more gaps than ``max_clips`` allows,
    only the largest are cut.
    """
    if not frames:
        return []
    intervals = [b.pts - a.pts for a, b in zip(frames, frames[1:], strict=False)]
    if not intervals:
        return [list(frames)]
    typical = statistics.median(intervals)
    gaps = [i for i, step in enumerate(intervals) if step > _GAP * typical and step > 0]
    gaps = sorted(sorted(gaps, key=lambda i: intervals[i], reverse=True)[: max_clips - 1])
    clips: list[list[Frame]] = []
    start = 0
    for gap in gaps:
        clips.append(list(frames[start : gap + 1]))
        start = gap + 1
    clips.append(list(frames[start:]))
    return clips


def clip_rate(clip: Clip, fps: float) -> float:
    """Frames per second the clip was actually sampled at (``fps`` for a single frame)."""
    if len(clip) < 2 or clip[-1].pts <= clip[0].pts:
        return fps
    return (len(clip) - 1) / (clip[-1].pts - clip[0].pts)


def clip_frames(clip: Clip) -> list[Frame]:
    """The frames given to the model for ``clip``: a single frame is shown twice.

    A video is made of two-frame temporal patches, and Qwen3-VL's processor
    refuses fewer frames than that (the others pad to two themselves, so the
    tokens are the same).
    """
    return list(clip) * (2 if len(clip) == 1 else 1)


def describe_frames(frames: Sequence[Frame], fps: float) -> str:
    """One sentence telling the model which stretches of the stream it sees."""
    if not frames:
        return "No video frames are available."
    if len(frames) == 1:
        return f"The video is 1 frame at t={frames[0].pts:.1f}s of the stream."
    clips = split_clips(frames)
    if len(clips) == 1:
        return f"The video is {_describe(clips[0], fps)} of the stream."
    parts = "; ".join(f"clip {n}: {_describe(clip, fps)}" for n, clip in enumerate(clips, 1))
    return f"The video comes in {len(clips)} clips, with gaps between them: {parts}."


def _describe(clip: Clip, fps: float) -> str:
    if len(clip) == 1:
        return f"1 frame at t={clip[0].pts:.1f}s"
    return (
        f"{len(clip)} frames from t={clip[0].pts:.1f}s to t={clip[-1].pts:.1f}s, "
        f"sampled at {clip_rate(clip, fps):.3g} fps"
    )


def conversation(request: Request) -> tuple[list[Message], int]:
    """The messages of ``request``, and how many of its earlier turns may be dropped to fit.

    A live session's question becomes its history replayed as text (those
    turns may be dropped, oldest first), then one user message: a video per
    clip of the window, and the sentence saying what they span before the
    question. A :class:`ChatRequest` is taken as it is, with nothing to drop.
    """
    if isinstance(request, ChatRequest):
        return list(request.messages), 0
    messages: list[Message] = []
    for turn in request.history:
        messages.append(Message("user", (turn.question,)))
        messages.append(Message("assistant", (turn.answer,)))
    videos = [Video(clip, request.fps) for clip in split_clips(request.frames)]
    text = f"{describe_frames(request.frames, request.fps)}\n{request.question}"
    messages.append(Message("user", (*videos, text)))
    return messages, len(request.history)


def hf_messages(messages: Sequence[Message], *, system: str | None = None) -> list[HfMessage]:
    """``messages`` in the Hugging Face multimodal format the chat templates read.

    Each video and image is a placeholder where it stands; the engine passes
    the media themselves, in the same order.
    """
    rendered: list[HfMessage] = []
    if system:
        rendered.append({"role": "system", "content": [{"type": "text", "text": system}]})
    for message in messages:
        content: list[dict[str, Any]] = []
        for part in message.content:
            if isinstance(part, str):
                content.append({"type": "text", "text": part})
            elif isinstance(part, Video):
                content.append({"type": "video"})
            else:
                content.append({"type": "image"})
        rendered.append({"role": message.role, "content": content})
    return rendered


def media_frames(messages: Sequence[Message]) -> int:
    """Frames the model is shown: every video's frames and every image."""
    return sum(
        len(part.frames) if isinstance(part, Video) else 1
        for message in messages
        for part in message.content
        if isinstance(part, Video | Image)
    )


def build_messages(
    question: str,
    frames: Sequence[Frame],
    history: Sequence[ChatTurn] = (),
    *,
    fps: float,
    system: str | None = None,
) -> list[HfMessage]:
    """A live session's question as chat messages in the Hugging Face format: one video per clip."""
    request = GenerationRequest(
        request_id="", question=question, frames=frames, history=history, fps=fps
    )
    return hf_messages(conversation(request)[0], system=system)


def video_metadata(
    clip: Clip, fps: float, *, family: str, measured: bool = True
) -> dict[str, Any] | None:
    """The metadata ``family``'s processor gets with the video of ``clip`` (None: none).

    We sample frames ourselves, so the processor must not sample again
    (``do_sample_frames`` is false). ``clip`` is as given to the model
    (:func:`clip_frames`). Qwen2.5-VL derives its temporal interval from
    ``fps * len(frames_indices) / total_num_frames``: the clip's measured
    rate (``fps`` itself when not ``measured``: a timeline segment of a few
    frames is told the session's nominal rate, as the official processing
    tells a whole video its sampling rate; a measured 2.06 fps would shift its
    positions). Qwen3-VL's timestamps are ``frames_indices / fps``: stream
    times in :data:`CLOCK` ticks.
    """
    if not clip or family not in ("qwen2_5_vl", "qwen3_vl"):
        return None
    rate = clip_rate(_distinct(clip), fps) if measured else fps
    duration = clip[-1].pts - clip[0].pts + 1.0 / rate
    if family == "qwen2_5_vl":
        return {
            "fps": rate,
            "total_num_frames": len(clip),
            "frames_indices": list(range(len(clip))),
            "duration": duration,
            "video_backend": "pyav",
            "do_sample_frames": False,
        }
    indices = [round(frame.pts * CLOCK) for frame in clip]
    return {
        "fps": CLOCK,
        "total_num_frames": indices[-1] + 1,
        "frames_indices": indices,
        "duration": duration,
        "video_backend": "pyav",
        "do_sample_frames": False,
    }


def _distinct(clip: Clip) -> list[Frame]:
    """``clip`` without the repeats :func:`clip_frames` adds."""
    seen: set[float] = set()
    kept = []
    for frame in clip:
        if frame.pts not in seen:
            seen.add(frame.pts)
            kept.append(frame)
    return kept
