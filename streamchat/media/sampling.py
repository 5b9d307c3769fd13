"""Which frames to keep, at what size, at what time: the decoder's pure arithmetic.

* :func:`target_size`: Qwen2-VL's "smart resize" (sides multiples of the
  model's factor, area within the pixel budget, aspect kept).
* :class:`FrameSampler`: frames at ``fps`` by presentation time.
* :class:`FrameSpread`: at most ``count`` of those, spread over a stream of
  unknown length, in bounded memory.
* :class:`Timeline`: source timestamps -> seconds from the first frame,
  never going backwards.
* :func:`orientation`: a container's display matrix -> how to turn the
  stored picture upright (:class:`Orientation`).

No PyAV here: these are unit-tested with plain numbers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from ..config import DEFAULT_FRAME_FACTOR, DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from ..window import Frame

__all__ = [
    "DEFAULT_FACTOR",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_PIXELS",
    "UPRIGHT",
    "check_budget",
    "FrameSampler",
    "FrameSpread",
    "Orientation",
    "Timed",
    "Timeline",
    "orientation",
    "spread",
    "target_size",
]

logger = logging.getLogger("streamchat.decoder")

# One set of defaults for the whole server: config.py's.
DEFAULT_FACTOR = DEFAULT_FRAME_FACTOR
_BACKWARD_JUMP = 0.5  # seconds of backward source time still treated as jitter
_FORWARD_JUMP = 3600.0  # a longer leap of the source clock is a discontinuity, not a gap


def target_size(
    width: int,
    height: int,
    *,
    factor: int = DEFAULT_FACTOR,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """``(width, height)`` to resize a ``width`` x ``height`` picture to for the model.

    Qwen2-VL's "smart resize": both sides become multiples of ``factor`` (the
    vision patch size times the merge size, so no patch is cut), the area lands
    within ``[min_pixels, max_pixels]`` and the aspect ratio is kept as closely
    as rounding allows. Unlike the reference, extreme shapes are not refused:
    sides never drop below ``factor``, and if that alone would break
    ``max_pixels``, the long side gives way.
    """
    if width < 1 or height < 1:
        raise ValueError(f"invalid picture size {width}x{height}")
    if factor < 1 or max_pixels < factor * factor or min_pixels > max_pixels:
        raise ValueError("need factor >= 1 and factor**2 <= max_pixels and min <= max pixels")
    w = max(factor, round(width / factor) * factor)
    h = max(factor, round(height / factor) * factor)
    if w * h > max_pixels:
        w, h = _shrink(width, height, max_pixels, factor)
    elif w * h < min_pixels:
        w, h = _grow(width, height, min_pixels, factor)
        if w * h > max_pixels:  # rounding up overshot a narrow budget
            w, h = _shrink(width, height, max_pixels, factor)
    if w * h > max_pixels:  # only for extreme aspect ratios, once sides are clamped
        if w >= h:
            w = max(factor, max_pixels // h // factor * factor)
        else:
            h = max(factor, max_pixels // w // factor * factor)
    return w, h


def check_budget(*, factor: int, min_pixels: int, max_pixels: int) -> None:
    """Raise ``ValueError`` unless :func:`target_size` can meet this resize rule."""
    target_size(factor, factor, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


# Same arithmetic as the reference, so results agree to the last float rounding.
def _shrink(width: int, height: int, max_pixels: int, factor: int) -> tuple[int, int]:
    beta = math.sqrt(width * height / max_pixels)
    w = max(factor, math.floor(width / beta / factor) * factor)
    return w, max(factor, math.floor(height / beta / factor) * factor)


def _grow(width: int, height: int, min_pixels: int, factor: int) -> tuple[int, int]:
    beta = math.sqrt(min_pixels / (width * height))
    w = max(factor, math.ceil(width * beta / factor) * factor)
    return w, max(factor, math.ceil(height * beta / factor) * factor)


class FrameSampler:
    """Decides which decoded frames to keep so that kept frames come at ``fps``.

    Kept frames sit on a grid of ``1/fps`` slots anchored at the first frame:
    a frame is kept when it is the first in a new slot. Anchoring on a grid
    rather than on the last kept frame keeps the average rate exact when the
    source rate is not a multiple of ``fps`` (25 fps sampled at 3 fps stays
    at 3, not 2.8); spacing between kept frames is ``1/fps`` minus at most one
    source frame interval. A gap (more than one empty slot, including a source
    slower than ``fps``) re-anchors the grid at the next frame, so frames after
    a gap are not kept too close together. Timestamps only need to be
    non-decreasing; a small tolerance absorbs jitter and float error at slot
    boundaries.
    """

    def __init__(self, fps: float) -> None:
        if not fps > 0:
            raise ValueError("fps must be positive")
        self.interval = 1.0 / fps
        self._tolerance = self.interval * 1e-3
        self._anchor: float | None = None
        self._slot = 0

    def take(self, pts: float) -> bool:
        """True if the frame at ``pts`` seconds is to be kept."""
        if self._anchor is None:
            self._anchor = pts
            self._slot = 0
            return True
        slot = math.floor((pts - self._anchor + self._tolerance) / self.interval)
        if slot <= self._slot:
            return False
        if slot > self._slot + 1:  # a gap: restart the grid here
            self._anchor = pts
            self._slot = 0
        else:
            self._slot = slot
        return True


class FrameSpread:
    """At most ``count`` frames spread evenly over a stream whose length is known only at its end.

    What vLLM's default video loader picks with the whole video in hand
    (``linspace`` over it: the first frame, the last, evenly between), chosen
    here as the frames go by, holding at most ``2 * count`` of them (and the
    latest one): frames are kept on a grid of every ``stride``-th frame
    offered; when ``2 * count`` are held, every other one is dropped and the
    stride doubles. At the end the held frames (and the last one offered)
    cover the whole stream at most one stride apart, and :meth:`result` picks
    ``count`` of them nearest to evenly spaced times from the first to the
    last. A frame lands at most half a stride from where ``linspace`` would
    put it; with no more than ``count`` frames offered, all are kept.
    """

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        self.count = count
        self.stride = 1
        self.offered = 0
        self._held: list[Frame] = []
        self._latest: Frame | None = None  # the last frame offered, when not held

    def add(self, frame: Frame) -> None:
        """Offer the next frame (of non-decreasing ``pts``)."""
        on_grid = self.offered % self.stride == 0
        if on_grid and len(self._held) == 2 * self.count:
            del self._held[1::2]
            self.stride *= 2
            on_grid = self.offered % self.stride == 0
        self.offered += 1
        if on_grid:
            self._held.append(frame)
            self._latest = None
        else:
            self._latest = frame

    def result(self) -> list[Frame]:
        """The frames chosen, in order: ``min(count, frames offered)`` of them."""
        frames = self._held + ([self._latest] if self._latest is not None else [])
        return spread(frames, self.count)


class Timed(Protocol):
    """Anything at a time: a :class:`~streamchat.window.Frame`, or a frame not decoded yet."""

    @property
    def pts(self) -> float: ...


_Timed = TypeVar("_Timed", bound=Timed)


def spread(frames: Sequence[_Timed], count: int) -> list[_Timed]:
    """``count`` of ``frames`` (all if fewer) nearest to ``count`` evenly spaced times.

    ``frames`` are in order of time. The times run from the first frame's to
    the last's, both included; each pick comes after the one before and
    leaves enough frames for the rest, so no frame is picked twice.
    """
    if len(frames) <= count:
        return list(frames)
    first, last = frames[0].pts, frames[-1].pts
    picked: list[_Timed] = []
    at = 0
    for j in range(count):
        target = first + (last - first) * j / (count - 1) if count > 1 else first
        latest = len(frames) - (count - j)  # leave one frame for each pick after this one
        while at < latest and abs(frames[at + 1].pts - target) <= abs(frames[at].pts - target):
            at += 1
        picked.append(frames[at])
        at += 1
    return picked


class Timeline:
    """Source frame times -> seconds from the first frame, never going backwards."""

    def __init__(self) -> None:
        self._offset: float | None = None
        self.last: float | None = None

    def place(self, source_time: float | None, frame_interval: float) -> float:
        if source_time is None:  # no timestamp: assume the nominal frame rate
            pts = 0.0 if self.last is None else self.last + frame_interval
        elif self._offset is None:
            self._offset = -source_time
            pts = 0.0
        else:
            pts = source_time + self._offset
            if self.last is not None and not -_BACKWARD_JUMP <= pts - self.last <= _FORWARD_JUMP:
                # A new clock (restarted encoder, concatenated recordings, or a
                # reset that the MPEG-TS demuxer took for a wrap-around):
                # continue just after the last frame.
                logger.info("video timestamps jumped by %.3f s", pts - self.last)
                self._offset += self.last + frame_interval - pts
                pts = self.last + frame_interval
            elif self.last is not None and pts < self.last:  # jitter
                pts = self.last
        self.last = pts
        return pts


@dataclass(frozen=True, slots=True)
class Orientation:
    """How to turn a stored picture upright: transpose first, then flip.

    The eight ways a display matrix can place a picture (four quarter turns,
    each possibly mirrored) are each a transpose or not followed by a flip of
    the rows and/or the columns. All three are numpy views, so turning a
    frame upright costs no copy of its own.
    """

    transpose: bool = False
    flip_rows: bool = False
    """Upside down: the last row first (a vertical flip)."""
    flip_cols: bool = False
    """Mirrored: the last column first (a horizontal flip)."""

    def displayed(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` as shown, of a picture stored ``width`` x ``height``."""
        return (height, width) if self.transpose else (width, height)

    def stored(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` to store a picture shown ``width`` x ``height``."""
        return self.displayed(width, height)  # a transpose is its own inverse

    def apply(self, image: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """``image`` (rows, columns, channels) upright, as a view."""
        if self.transpose:
            image = image.transpose(1, 0, 2)
        if self.flip_rows:
            image = image[::-1]
        if self.flip_cols:
            image = image[:, ::-1]
        return image


UPRIGHT = Orientation()

# FFmpeg's transpose filter's directions, as (transpose, flip_rows, flip_cols).
_CLOCK = Orientation(True, False, True)  # a quarter turn clockwise
_CCLOCK = Orientation(True, True, False)  # a quarter turn counter-clockwise
_CLOCK_FLIP = Orientation(True, True, True)
_CCLOCK_FLIP = Orientation(True, False, False)


def orientation(matrix: Sequence[int] | None) -> Orientation:
    """How to show a picture stored with the 3x3 display ``matrix`` (16.16 fixed point).

    The same choice as the FFmpeg command line's autorotate (``ffmpeg``'s
    ``get_rotation`` and the transpose / hflip / vflip it inserts), so frames
    come out as players show them: a phone's portrait video stored landscape
    with a -90 degree matrix turns a quarter clockwise. A matrix whose angle
    is not a multiple of 90 degrees (rare: an editor's free rotation) is
    rounded to the nearest quarter turn rather than resampled: a quarter turn
    costs no pixel, and the picture stays within a few degrees of upright.
    A degenerate matrix (zero scale) is ignored.
    """
    if matrix is None or len(matrix) != 9:
        return UPRIGHT
    m = matrix
    scale0, scale1 = math.hypot(m[0], m[3]), math.hypot(m[1], m[4])
    if scale0 == 0 or scale1 == 0:
        return UPRIGHT
    theta = math.degrees(math.atan2(m[1] / scale1, m[0] / scale0)) % 360.0
    quarter = round(theta / 90.0) % 4
    if abs(theta - 90.0 * quarter) % 360.0 > 1.0 and abs(theta - 90.0 * quarter) < 359.0:
        logger.info("display rotation of %.1f degrees rounded to %d", theta, 90 * quarter)
    if quarter == 1:
        return _CCLOCK_FLIP if m[3] > 0 else _CLOCK
    if quarter == 3:
        return _CLOCK_FLIP if m[3] < 0 else _CCLOCK
    if quarter == 2:
        return Orientation(False, m[4] < 0, m[0] < 0)
    return Orientation(False, m[4] < 0, False)
