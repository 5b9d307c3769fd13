"""What a window costs in the model's context, and what fits: pure arithmetic.

A real model's context holds the prompt's text, its video tokens and the
answer. Video tokens dominate: each pair of frames (a temporal patch) costs
``(height / factor) * (width / factor)`` tokens after the model's processor
has sized it, where ``factor`` is the vision patch size times the merge size
(28 for Qwen2-VL and Qwen2.5-VL, 32 for Qwen3-VL); Qwen3-VL also writes a
timestamp before each pair. A full default window of 720p at the default
pixel budget is 4032 video tokens for Qwen2-VL, more than a 2048-token
context holds.

:func:`plan` checks at start-up that the configured window, the reserve for
the question and history, and the longest answer fit ``max_model_len``;
when the window does not, it is lowered (and the server says so), and when
not even a few frames fit the server refuses to start. The engine adapter
still checks each prompt exactly (vLLM counts its tokens) and refuses one
that cannot fit with a typed error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["MIN_ASK_FRAMES", "ContextPlan", "VisionCosts", "plan"]

MIN_ASK_FRAMES = 2
"""Below this many frames per question a server is refused at start-up."""


@dataclass(frozen=True, kw_only=True)
class VisionCosts:
    """The model's token arithmetic for video, from its own config and processor.

    * ``max_model_len``: the engine's context length.
    * ``factor``: pixels per merged vision token side (patch x merge).
    * ``temporal_patch``: frames per temporal patch (2 for every Qwen-VL).
    * ``min_frame_pixels``: the processor's smallest frame; smaller frames are
      enlarged by it, and cost what a frame of this size does.
    * ``pair_text_tokens``: text tokens written before each temporal patch
      (Qwen3-VL's ``<t seconds>``, at its longest), 0 for other families.
    * ``clip_text_tokens``: tokens around each video (vision start and end).
    """

    max_model_len: int
    factor: int
    temporal_patch: int = 2
    min_frame_pixels: int = 0
    pair_text_tokens: int = 0
    clip_text_tokens: int = 2

    def pair_tokens(self, max_pixels: int) -> int:
        """Tokens of one temporal patch of frames within ``max_pixels`` (at most)."""
        pixels = max(max_pixels, self.min_frame_pixels)
        return pixels // (self.factor * self.factor) + self.pair_text_tokens

    def frame_tokens(self, max_pixels: int) -> int:
        """Tokens one frame within ``max_pixels`` costs at most (a pair's share, rounded up)."""
        return math.ceil(self.pair_tokens(max_pixels) / self.temporal_patch)

    def video_tokens(self, frames: int, max_pixels: int, *, clips: int = 1) -> int:
        """Tokens of ``frames`` frames cut into ``clips`` videos, at most.

        Each clip with an odd number of frames is padded to whole temporal
        patches by the processor, so a clip may cost one frame more.
        """
        if frames <= 0:
            return 0
        clips = max(1, min(clips, frames))
        padded = frames + clips * (self.temporal_patch - 1)
        pairs = padded // self.temporal_patch
        return pairs * self.pair_tokens(max_pixels) + clips * self.clip_text_tokens


@dataclass(frozen=True, kw_only=True)
class ContextPlan:
    """What the server promises each question (told to clients in ``ready``)."""

    tokens_per_frame: int
    """Most tokens one frame costs at the server's pixel budget."""
    max_ask_frames: int
    """Most frames one question carries; more in the asked range are thinned evenly."""
    window_frames: int
    """The default window, lowered to ``max_ask_frames`` if it was larger."""
    lowered_from: int | None
    """The configured window when it did not fit, else None."""


def plan(
    costs: VisionCosts,
    *,
    window_frames: int,
    max_pixels: int,
    answer_tokens: int,
    reserve_tokens: int,
    max_clips: int,
) -> ContextPlan:
    """Fit the window into the context next to the answer and the text reserve.

    ``answer_tokens`` is the longest answer a client may ask for and
    ``reserve_tokens`` the room kept for the chat template, the system and
    question text and the history. Raises ``ValueError`` with the figures
    when fewer than :data:`MIN_ASK_FRAMES` frames would fit.
    """
    room = costs.max_model_len - answer_tokens - reserve_tokens
    frames = _most_frames(costs, room, max_pixels, max(1, max_clips))
    tokens_per_frame = costs.frame_tokens(max_pixels)
    if frames < MIN_ASK_FRAMES:
        raise ValueError(
            f"the model's context of {costs.max_model_len} tokens cannot hold "
            f"{MIN_ASK_FRAMES} frames of {tokens_per_frame} tokens besides answers of up to "
            f"{answer_tokens} tokens and {reserve_tokens} tokens for the question and "
            "history: raise --max-model-len, or lower --max-pixels, --max-tokens-limit or "
            "--context-reserve"
        )
    lowered = window_frames if window_frames > frames else None
    return ContextPlan(
        tokens_per_frame=tokens_per_frame,
        max_ask_frames=frames,
        window_frames=min(window_frames, frames),
        lowered_from=lowered,
    )


def _most_frames(costs: VisionCosts, room: int, max_pixels: int, clips: int) -> int:
    """The largest frame count whose worst case (every clip padded) fits ``room`` tokens.

    :meth:`VisionCosts.video_tokens` never decreases with the frame count, so
    this inverts it: below ``clips`` frames each frame is a clip of its own (a
    padded pair and the clip's text each); from ``clips`` on, the pairs of
    ``frames + clips * (temporal_patch - 1)`` padded frames must fit.
    """
    pair = costs.pair_tokens(max_pixels)
    if room <= 0 or pair <= 0:
        return 0
    if clips * (pair + costs.clip_text_tokens) > room:
        return room // (pair + costs.clip_text_tokens)
    pairs = (room - clips * costs.clip_text_tokens) // pair
    t = costs.temporal_patch
    return (pairs + 1) * t - 1 - clips * (t - 1)
