"""A bounded ring of timestamped frames: the video a question is asked about.

The decoder appends frames as it samples them; a question takes a snapshot of
some part of the window. The window is bounded both by frame count and by the
bytes of pixel data it holds, so a session's memory is fixed by configuration
whatever the length of the stream: when a new frame would exceed either bound,
the oldest frames are evicted first.

This module is pure (no I/O, no asyncio): the session mutates a window only on
the event loop thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["Frame", "FrameWindow"]


@dataclass(frozen=True, slots=True, eq=False)
class Frame:
    """One sampled frame.

    ``image`` is an ``(height, width, 3)`` uint8 RGB array that the frame owns
    (it is never a view of a buffer that FFmpeg reuses). ``pts`` is the frame's
    presentation time in seconds from the start of its source.
    """

    pts: float
    image: npt.NDArray[np.uint8]

    @property
    def nbytes(self) -> int:
        return int(self.image.nbytes)

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` in pixels."""
        height, width = self.image.shape[:2]
        return int(width), int(height)


class FrameWindow:
    """Recent frames, oldest first, bounded by ``max_frames`` and ``max_bytes``."""

    def __init__(self, *, max_frames: int, max_bytes: int) -> None:
        if max_frames < 1:
            raise ValueError("max_frames must be at least 1")
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._frames: deque[Frame] = deque()
        self._nbytes = 0
        self.evicted = 0
        """Frames pushed out of the window by newer ones since creation."""

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def span(self) -> float:
        """Seconds between the oldest and newest frame (0 with fewer than two)."""
        if len(self._frames) < 2:
            return 0.0
        return self._frames[-1].pts - self._frames[0].pts

    @property
    def first_pts(self) -> float | None:
        return self._frames[0].pts if self._frames else None

    @property
    def last_pts(self) -> float | None:
        return self._frames[-1].pts if self._frames else None

    @property
    def newest_size(self) -> tuple[int, int]:
        """``(width, height)`` of the newest frame, ``(0, 0)`` when empty."""
        return self._frames[-1].size if self._frames else (0, 0)

    def push(self, frame: Frame) -> None:
        """Append ``frame``, evicting the oldest frames to stay within bounds.

        A frame larger than ``max_bytes`` on its own is refused with
        ``ValueError``: the decoder sizes frames to the pixel budget, so this
        only happens with an inconsistent configuration.
        """
        if frame.nbytes > self.max_bytes:
            raise ValueError(
                f"a frame of {frame.nbytes} bytes exceeds the window's {self.max_bytes} bytes"
            )
        while self._frames and (
            len(self._frames) >= self.max_frames or self._nbytes + frame.nbytes > self.max_bytes
        ):
            self._nbytes -= self._frames.popleft().nbytes
            self.evicted += 1
        self._frames.append(frame)
        self._nbytes += frame.nbytes

    def clear(self) -> None:
        self._frames.clear()
        self._nbytes = 0

    def select(
        self,
        *,
        start: float | None = None,
        end: float | None = None,
        last_seconds: float | None = None,
        max_frames: int | None = None,
    ) -> list[Frame]:
        """Frames with ``start <= pts <= end``, or within the last ``last_seconds``.

        When more frames match than ``max_frames``, they are thinned evenly
        across the selected span (keeping the first and last) rather than cut
        from one end, so the answer still sees the whole interval.
        """
        frames: Sequence[Frame] = self._frames
        if last_seconds is not None and frames:
            start = max(start if start is not None else -np.inf, frames[-1].pts - last_seconds)
        chosen = [
            frame
            for frame in frames
            if (start is None or frame.pts >= start) and (end is None or frame.pts <= end)
        ]
        if max_frames is not None and len(chosen) > max_frames:
            chosen = _thin(chosen, max_frames)
        return chosen


def _thin(frames: list[Frame], count: int) -> list[Frame]:
    """``count`` frames spread evenly over ``frames``, first and last included."""
    if count <= 0:
        return []
    if count == 1:
        return [frames[-1]]
    last = len(frames) - 1
    indices = sorted({round(i * last / (count - 1)) for i in range(count)})
    return [frames[i] for i in indices]
