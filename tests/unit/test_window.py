"""The frame window stays within its bounds and selects the frames asked for."""

from __future__ import annotations

import numpy as np
import pytest

from streamchat.window import Frame, FrameWindow


def frame(pts: float, side: int = 4) -> Frame:
    return Frame(pts, np.full((side, side, 3), int(pts) % 256, dtype=np.uint8))


def test_evicts_oldest_by_count() -> None:
    """Pushing past max_frames drops the oldest frames and counts them."""
    window = FrameWindow(max_frames=3, max_bytes=10_000)
    for t in range(5):
        window.push(frame(float(t)))
    assert [f.pts for f in window.select()] == [2.0, 3.0, 4.0]
    assert window.evicted == 2
    assert window.span == 2.0


def test_evicts_oldest_by_bytes() -> None:
    """The byte bound holds whatever the frame count bound allows."""
    window = FrameWindow(max_frames=100, max_bytes=3 * 48)
    for t in range(10):
        window.push(frame(float(t)))
    assert len(window) == 3
    assert window.nbytes == 3 * 48


def test_memory_stays_bounded_over_a_long_stream() -> None:
    """A long stream never holds more than the bounds."""
    window = FrameWindow(max_frames=8, max_bytes=8 * 48)
    for t in range(10_000):
        window.push(frame(t / 2))
        assert len(window) <= 8 and window.nbytes <= 8 * 48
    assert window.last_pts == 9999 / 2


def test_refuses_a_frame_larger_than_the_window() -> None:
    window = FrameWindow(max_frames=2, max_bytes=10)
    with pytest.raises(ValueError):
        window.push(frame(0.0))


def test_select_by_range_and_last_seconds() -> None:
    """Questions can ask about a time range or the most recent seconds."""
    window = FrameWindow(max_frames=100, max_bytes=100_000)
    for t in range(10):
        window.push(frame(float(t)))
    assert [f.pts for f in window.select(start=2, end=4)] == [2.0, 3.0, 4.0]
    assert [f.pts for f in window.select(last_seconds=2)] == [7.0, 8.0, 9.0]
    assert window.select(start=20) == []


def test_select_thins_evenly_keeping_both_ends() -> None:
    """max_frames spreads the kept frames over the whole selection."""
    window = FrameWindow(max_frames=100, max_bytes=100_000)
    for t in range(10):
        window.push(frame(float(t)))
    assert [f.pts for f in window.select(max_frames=4)] == [0.0, 3.0, 6.0, 9.0]
    assert [f.pts for f in window.select(max_frames=1)] == [9.0]
