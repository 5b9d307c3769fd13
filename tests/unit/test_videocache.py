"""The video cache's pure parts: frames spread over a video of unknown length, and its Sampling.

The cache itself (fetching, decoding, entries, flights) is tested over loopback
HTTP, files and ``data:`` URLs in ``tests/endpoint/test_videocache.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from streamchat.media.sampling import FrameSpread, spread
from streamchat.videocache import Sampling
from streamchat.window import Frame

PIXEL = np.zeros((1, 1, 3), np.uint8)


def offer(count: int, total: int, fps: float = 30.0) -> tuple[FrameSpread, list[int]]:
    """Offer ``total`` frames at ``fps``; the indices chosen; the most ever held is checked."""
    chosen = FrameSpread(count)
    for i in range(total):
        chosen.add(Frame(i / fps, PIXEL))
        assert len(chosen._held) <= 2 * count
    return chosen, [round(f.pts * fps) for f in chosen.result()]


@pytest.mark.parametrize("total", [1, 5, 8])
def test_no_more_frames_than_wanted_are_all_kept(total: int) -> None:
    """With at most ``count`` frames offered, every one is kept."""
    assert offer(8, total)[1] == list(range(total))


@pytest.mark.parametrize(("count", "total"), [(8, 300), (8, 9), (8, 17), (32, 1000), (5, 77)])
def test_frames_are_spread_over_the_whole_video(count: int, total: int) -> None:
    """``count`` distinct frames, the first and the last among them, each within half a
    stride of where vLLM's ``linspace`` puts its frames, however many are offered."""
    chosen, indices = offer(count, total)
    assert len(indices) == count
    assert indices == sorted(set(indices))
    assert indices[0] == 0 and indices[-1] == total - 1
    reference = np.linspace(0, total - 1, count)
    assert max(abs(np.array(indices) - reference)) <= chosen.stride / 2 + 1


def test_ten_seconds_at_thirty_fps_into_eight() -> None:
    """The case the brief names: 300 frames into 8, held in at most 16."""
    chosen, indices = offer(8, 300)
    assert chosen.stride == 32
    assert indices == [0, 32, 96, 128, 160, 224, 256, 299]


def test_one_frame_is_the_first() -> None:
    """``count`` 1 gives the first frame, as ``linspace`` does."""
    assert offer(1, 100)[1] == [0]


def test_spread_picks_nearest_to_even_times() -> None:
    """On uneven times each pick is the frame nearest its target time."""
    frames = [Frame(t, PIXEL) for t in [0.0, 0.1, 0.2, 4.0, 5.0, 9.9, 10.0]]
    assert [f.pts for f in spread(frames, 3)] == [0.0, 5.0, 10.0]
    assert [f.pts for f in spread(frames, 6)] == [0.0, 0.2, 4.0, 5.0, 9.9, 10.0]


@pytest.mark.parametrize(
    "fields",
    [
        {"fps": 0.0},
        {"fps": float("inf")},
        {"fps": float("nan")},
        {"max_frames": 0},
        {"max_pixels": 27 * 27},
        {"min_pixels": 10**9},
    ],
)
def test_impossible_sampling_is_refused(fields: dict[str, float]) -> None:
    """A rate, frame count or pixel budget that cannot be met is a ``ValueError`` at once."""
    base = {"fps": 2.0, "max_frames": 8, "min_pixels": 28 * 28, "max_pixels": 112 * 112}
    with pytest.raises(ValueError):
        Sampling(**{**base, **fields}, factor=28)  # type: ignore[arg-type]
