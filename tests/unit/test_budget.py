"""The context budget: what a window costs a real model, and what the server promises."""

from __future__ import annotations

import logging

import pytest

from streamchat.budget import VisionCosts, plan
from streamchat.config import Settings
from streamchat.media.sampling import target_size
from streamchat.server import fit_context

QWEN2 = VisionCosts(max_model_len=8192, factor=28, min_frame_pixels=128 * 28 * 28)
QWEN3 = VisionCosts(max_model_len=8192, factor=32, pair_text_tokens=7)


def test_a_full_default_window_of_720p_costs_what_the_issue_measured() -> None:
    """32 frames of 720p at 448x448 pixels: 4032 video tokens for Qwen2-VL, 2880 for Qwen3-VL."""
    w2, h2 = target_size(1280, 720, factor=28, max_pixels=448 * 448)
    assert (w2 // 28) * (h2 // 28) * 16 == 4032
    w3, h3 = target_size(1280, 720, factor=32, max_pixels=448 * 448)
    assert (w3 // 32) * (h3 // 32) * 16 == 2880
    # The budget's bound holds the real cost, with little to spare.
    assert 4032 <= QWEN2.video_tokens(32, 448 * 448) - 2 <= 4096


def test_odd_clips_are_padded_to_whole_pairs() -> None:
    """Each clip of an odd frame count costs one frame more (the processor pads it)."""
    one = QWEN2.video_tokens(7, 448 * 448, clips=1)
    three = QWEN2.video_tokens(7, 448 * 448, clips=3)
    assert one == 4 * 256 + 2
    assert three == 5 * 256 + 3 * 2


def test_small_frames_cost_what_the_processor_enlarges_them_to() -> None:
    """Frames below the processor's minimum are counted at that minimum."""
    assert QWEN2.pair_tokens(56 * 56) == 128


def test_the_default_settings_fit_the_default_context() -> None:
    """With the defaults, the window, the longest answer and the reserve fit 8192 tokens."""
    s = Settings()
    fitted = plan(
        QWEN2,
        window_frames=s.window_frames,
        max_pixels=s.max_pixels,
        answer_tokens=s.max_tokens_limit,
        reserve_tokens=s.context_reserve,
        max_clips=4,
    )
    assert fitted.lowered_from is None
    assert fitted.max_ask_frames >= s.window_frames
    assert fitted.tokens_per_frame == 128
    worst = QWEN2.video_tokens(fitted.max_ask_frames, s.max_pixels, clips=4)
    assert worst + s.max_tokens_limit + s.context_reserve <= 8192


def test_a_window_too_large_for_the_context_is_lowered_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 2048-token context cannot hold 32 frames: the window is lowered and the log says so."""
    small = VisionCosts(max_model_len=2048, factor=28)
    settings = Settings(max_tokens_limit=256, context_reserve=256)
    with caplog.at_level(logging.WARNING, "streamchat.app"):
        fitted = fit_context(settings, small)
    assert fitted.max_ask_frames is not None and fitted.max_ask_frames < 32
    assert fitted.window_frames == fitted.max_ask_frames
    assert small.video_tokens(fitted.max_ask_frames, settings.max_pixels, clips=4) <= 2048 - 512
    assert "lowered to" in caplog.text


def test_a_context_that_holds_no_frames_refuses_to_start() -> None:
    """When not even two frames fit, the server must not start: the error names the figures."""
    with pytest.raises(ValueError, match="cannot hold 2 frames"):
        fit_context(Settings(), VisionCosts(max_model_len=2048, factor=28))


def test_without_costs_nothing_changes() -> None:
    """An engine that cannot tell its costs (the fake) leaves the settings as they are."""
    settings = Settings()
    assert fit_context(settings, None) is settings


@pytest.mark.parametrize("temporal_patch", [1, 2, 3])
@pytest.mark.parametrize("clip_text", [0, 2, 7])
def test_the_frames_that_fit_are_the_most_whose_worst_case_fits(
    temporal_patch: int, clip_text: int
) -> None:
    """The planned count is the largest whose worst case fits (found by counting up), any room."""
    for max_clips in (1, 2, 4):
        costs = VisionCosts(
            max_model_len=10_000,
            factor=28,
            temporal_patch=temporal_patch,
            clip_text_tokens=clip_text,
        )
        for room in range(0, 900, 7):
            frames = 0
            while costs.video_tokens(frames + 1, 112 * 112, clips=max_clips) <= room:
                frames += 1
            try:
                fitted = plan(
                    costs,
                    window_frames=10_000,
                    max_pixels=112 * 112,
                    answer_tokens=10_000 - room,
                    reserve_tokens=0,
                    max_clips=max_clips,
                )
            except ValueError:
                assert frames < 2
            else:
                assert fitted.max_ask_frames == frames, (room, max_clips)
