"""Decoding only the groups of pictures that hold the frames a request wants.

A request for ``count`` frames spread over a whole video (what vLLM's loader
samples: the first frame, the last, evenly between) needs a few frames of a
long video, yet every frame between two keyframes depends on the ones
before it. When the container declares the video's length (an MP4's index,
a Matroska duration), the times wanted are known before the first packet:
:func:`spread_times`. :class:`GopPlan` then looks at each group of pictures
(a keyframe and the packets up to the next one, compressed, in decode
order) once it is complete and says how many of its packets to decode:
none when no wanted time falls in it, otherwise up to the last packet
shown at or before the latest wanted time in it. :class:`Picks` takes, for
each wanted time, the last decoded frame shown at or before it (vLLM's
``linspace`` indices are truncated the same way).

Frames of a skipped group are never decoded, so a 300 s clip with a
keyframe every 2 s costs 32 groups rather than 150 (measured in
docs/benchmarks.md). The wanted frame is never in a skipped group: a group
is skipped only when no wanted time lies between its first picture and the
next keyframe. With open groups (leading pictures shown before their
keyframe that refer to the group before) a wanted time among those leading
pictures is served by the group before: at most the few leading pictures
early. No I/O here: the decoder feeds it times and flags.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["GopPlan", "Picks", "spread_times"]


def spread_times(first: float, last: float, count: int, fps: float) -> list[float]:
    """The times of at most ``count`` frames spread evenly from ``first`` to ``last``.

    No more than ``fps`` a second: ``min(count, floor(span * fps) + 1)`` of
    them, so their spacing is at least ``1 / fps``; one time when the span
    is empty.
    """
    if count < 1 or not fps > 0:
        raise ValueError("count must be at least 1 and fps positive")
    span = max(0.0, last - first)
    n = min(count, math.floor(span * fps + 1e-9) + 1)
    if n == 1:
        return [first]
    return [first + span * j / (n - 1) for j in range(n)]


class GopPlan:
    """Which packets of each group of pictures to decode, for frames at ``times``.

    Call :meth:`take` with each complete group's packet times (decode order,
    ``None`` where a packet has none) and the time of the keyframe that ends
    it, and :meth:`finish` with the last group's at the end of the video.
    ``tolerance`` absorbs rounding between a wanted time and a frame's timestamp.
    """

    def __init__(self, times: Sequence[float], tolerance: float) -> None:
        self._times = sorted(times)
        self._next = 0
        self._tolerance = tolerance

    @property
    def done(self) -> bool:
        """Every wanted time is served by a group already decided on."""
        return self._next >= len(self._times)

    def take(self, packet_times: Sequence[float | None], next_key: float | None) -> int:
        """How many leading packets of this group to decode: 0 skips it whole.

        ``next_key`` is the time of the keyframe that ends the group; ``None`` when it has
        none: the group is decoded whole, no wanted time counted as served.
        """
        if not packet_times:
            return 0
        if next_key is None or any(time is None for time in packet_times):
            return len(packet_times)  # no way to tell: decode it
        return self._cut(packet_times, next_key - self._tolerance)

    def finish(self, packet_times: Sequence[float | None]) -> int:
        """The last group, at the end of the video: it serves every wanted time left."""
        if not packet_times:
            return 0
        if any(time is None for time in packet_times):
            self._next = len(self._times)
            return len(packet_times)
        return self._cut(packet_times, math.inf)

    def _cut(self, packet_times: Sequence[float | None], end: float) -> int:
        latest: float | None = None
        while self._next < len(self._times) and self._times[self._next] < end:
            latest = self._times[self._next]
            self._next += 1
        if latest is None:
            return 0
        limit = latest + self._tolerance
        last = max(
            (i for i, time in enumerate(packet_times) if time is not None and time <= limit),
            default=0,  # a wanted time before the group's first picture: its keyframe
        )
        return last + 1


class Picks:
    """For each wanted time, the last frame shown at or before it (the first, if none is).

    :meth:`offer` each decoded frame's time in display order; it returns how
    many times the *previous* frame is wanted for (0 or more), now that a
    later frame shows it is the last at or before them. :meth:`finish` does
    the same for the last frame at the end. A frame wanted for several times
    (a source slower than the spread) is counted for each: the caller keeps
    it once.
    """

    def __init__(self, times: Sequence[float], tolerance: float) -> None:
        self._times = sorted(times)
        self._next = 0
        self._tolerance = tolerance
        self._seen = False

    @property
    def done(self) -> bool:
        """Every wanted time has its frame."""
        return self._next >= len(self._times)

    def offer(self, time: float) -> tuple[int, int]:
        """``(for the previous frame, for this one)``: how many times each is now wanted for.

        This frame counts only for times before the first frame (nothing was
        shown at or before them).
        """
        served_previous = served_this = 0
        while self._next < len(self._times) and time > self._times[self._next] + self._tolerance:
            if self._seen:
                served_previous += 1
            else:
                served_this += 1
            self._next += 1
        self._seen = True
        return served_previous, served_this

    def finish(self) -> int:
        """How many times the last frame offered is wanted for: every time left."""
        left = len(self._times) - self._next if self._seen else 0
        self._next = len(self._times)
        return left
