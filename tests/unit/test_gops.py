"""Decoding only the groups of pictures a spread of frames needs (``streamchat.media.gops``).

The pure plan first, then the decoder on MP4s the ``ffmpeg`` tool writes with
short groups of pictures (B-frames, an open GOP, HEVC): the frames kept must
be exactly those vLLM's loader picks (``linspace`` over the frame indices,
truncated), read back from the pictures themselves, while most frames are
never decoded.
"""

from __future__ import annotations

import io
import math
import threading
from pathlib import Path

import pytest

import streamchat.media.decoder
from streamchat.media.decoder import DecodeReport, DecoderOptions, decode_stream
from streamchat.media.gops import GopPlan, Picks, spread_times
from streamchat.window import Frame
from tests.support.ffmpeg import SHORT_GOPS, Media, require_ffmpeg, write_short_gops
from tests.support.media import frame_index

# -- the plan ----------------------------------------------------------------------------


def test_spread_times_run_from_first_to_last_at_most_fps_apart() -> None:
    """The spread includes both ends, evenly between, and thins to the rate cap."""
    assert spread_times(1.0, 11.0, 3, fps=2) == [1.0, 6.0, 11.0]
    assert spread_times(0.0, 10.0, 100, fps=0.5) == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert spread_times(2.0, 2.0, 8, fps=2) == [2.0]
    assert spread_times(0.0, 9.0, 1, fps=2) == [0.0]
    with pytest.raises(ValueError):
        spread_times(0.0, 1.0, 0, fps=2)


def test_the_plan_skips_groups_without_a_wanted_time_and_cuts_after_the_last() -> None:
    """A group with no wanted time is skipped; one with is cut after its last wanted picture."""
    # Groups of 10 frames at 0.1 s (keyframes at 0, 1, 2, 3); times wanted: 0.25 and 2.0.
    plan = GopPlan([0.25, 2.0], tolerance=0.01)
    group = [i / 10 for i in range(10)]
    assert plan.take(group, next_key=1.0) == 3  # up to the frame at 0.2
    assert plan.take([1 + t for t in group], next_key=2.0) == 0
    assert plan.take([2 + t for t in group], next_key=3.0) == 1  # the keyframe itself
    assert plan.done
    assert plan.finish([3 + t for t in group]) == 0


def test_the_plan_cuts_in_decode_order_and_decodes_groups_it_cannot_read() -> None:
    """Refs come first in decode order; a group without times is decoded whole, serving none."""
    # B-frames: decode order I0 P3 B1 B2: a wanted 0.1 needs B1, so P3 before it.
    assert GopPlan([0.1], tolerance=0.001).take([0.0, 0.3, 0.1, 0.2], next_key=1.0) == 3
    plan = GopPlan([0.1, 5.5], tolerance=0.001)
    assert plan.take([0.0, None, 0.1], next_key=5.0) == 3
    assert plan.take([5.0, 5.1], next_key=None) == 2  # no keyframe time: decoded, 0.1 still open
    assert not plan.done
    assert plan.take([6.0, 6.1], next_key=7.0) == 1  # 0.1 and 5.5 both fall before 7.0
    assert plan.done
    plan = GopPlan([9.0], tolerance=0.001)
    assert plan.finish([0.0, 0.1]) == 2  # the end serves what is left
    assert plan.done


def test_picks_take_the_last_frame_at_or_before_each_time() -> None:
    """Each wanted time gets the last frame shown at or before it, known once a later one shows."""
    picks = Picks([0.0, 0.25, 0.5, 0.55, 9.0], tolerance=0.001)
    assert picks.offer(0.0) == (0, 0)
    assert picks.offer(0.1) == (1, 0)  # 0.0 is the last at or before 0.0
    assert picks.offer(0.3) == (1, 0)  # 0.1 for 0.25
    assert picks.offer(0.6) == (2, 0)  # 0.3 for 0.5 and 0.55
    assert not picks.done
    assert picks.finish() == 1  # 0.6 for 9.0
    assert picks.done


def test_a_time_before_the_first_frame_takes_the_first() -> None:
    """Nothing shown before a wanted time: the first frame serves it."""
    picks = Picks([0.0, 1.0], tolerance=0.001)
    assert picks.offer(0.5) == (0, 1)
    assert picks.offer(1.5) == (1, 0)


# -- the decoder -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_gops(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Media]:
    require_ffmpeg()
    directory = tmp_path_factory.mktemp("short-gops")
    return {variant: write_short_gops(directory, variant) for variant in SHORT_GOPS}


def _decode(media: Media, *, spread: int | None, fps: float) -> tuple[DecodeReport, list[Frame]]:
    frames: list[Frame] = []
    options = DecoderOptions(fps=fps, spread=spread, container="mp4")
    report = decode_stream(io.BytesIO(media.path.read_bytes()), options, frames.append, _never())
    return report, frames


def _never() -> threading.Event:
    return threading.Event()


def _vllm_indices(total: int, count: int) -> list[int]:
    """``np.linspace(0, total - 1, count, dtype=int)``: what vLLM's loader decodes."""
    if count == 1:
        return [0]
    return [math.floor(j * (total - 1) / (count - 1) + 1e-9) for j in range(count)]


@pytest.mark.parametrize("variant", list(SHORT_GOPS))
@pytest.mark.parametrize("count", [1, 2, 7, 32])
def test_a_spread_gets_vllms_frames_from_the_groups_that_hold_them(
    short_gops: dict[str, Media], variant: str, count: int
) -> None:
    """The frames kept are vLLM's, read back from the pictures, and most groups go undecoded."""
    media = short_gops[variant]
    total = len(media.frame_times)
    report, frames = _decode(media, spread=count, fps=media.fps)
    got = [frame_index(frame.image) for frame in frames]
    wanted = _vllm_indices(total, count)
    if variant == "h264-open-gop":
        # A wanted frame among the B-frames shown before a keyframe may be served by the
        # group before, when the keyframe's group is not decoded: at most those early.
        assert len(got) == len(wanted)
        assert all(want - 3 <= index <= want for index, want in zip(got, wanted, strict=True))
    else:
        assert got == wanted
    assert [frame.pts for frame in frames] == pytest.approx(
        [media.frame_times[i] for i in got], abs=1e-6
    )
    assert report.frames_emitted == len(frames)
    if count <= 7:  # a group of 10-12 frames between wanted ones: most never decoded
        assert report.frames_decoded <= total // 2
    assert report.frames_decoded <= total


def test_a_spread_keeps_no_more_than_fps_a_second(short_gops: dict[str, Media]) -> None:
    """A spread asked for more frames than the rate allows keeps at most fps a second."""
    media = short_gops["h264-b-frames"]  # 8 s at 25 fps
    _, frames = _decode(media, spread=100, fps=2.0)
    times = [frame.pts for frame in frames]
    assert len(times) == math.floor((media.frame_times[-1] - media.frame_times[0]) * 2) + 1
    assert min(b - a for a, b in zip(times, times[1:], strict=False)) >= 0.5 - 0.04


def test_a_group_too_large_to_hold_is_decoded_as_it_comes(
    short_gops: dict[str, Media], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group too large to hold is decoded as it arrives, and the frames are still vLLM's."""
    media = short_gops["h264-b-frames"]
    monkeypatch.setattr(streamchat.media.decoder, "_MAX_GROUP_BYTES", 2_000)
    report, frames = _decode(media, spread=7, fps=media.fps)
    total = len(media.frame_times)
    assert [frame_index(frame.image) for frame in frames] == _vllm_indices(total, 7)
    assert report.frames_decoded == total  # nothing could be skipped


def test_without_a_declared_length_every_frame_is_decoded_at_fps(tmp_path: Path) -> None:
    """Without a spread (a live stream) every frame is decoded and kept at fps."""
    media = write_short_gops(tmp_path, "h264-b-frames", seconds=2.0)
    data = media.path.read_bytes()
    frames: list[Frame] = []
    # As a live stream (no spread): sampled at fps, every frame decoded.
    options = DecoderOptions(fps=5.0, container="mp4")
    report = decode_stream(io.BytesIO(data), options, frames.append, _never())
    assert report.frames_decoded == len(media.frame_times)
    assert len(frames) == 10
