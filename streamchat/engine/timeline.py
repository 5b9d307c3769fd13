"""A live session's context as an append-only timeline: pure, no engine.

Asking about a window that moved by a few frames since the last question
should cost those frames and the question, not the whole window again. An
engine with a prefix cache (vLLM's) computes only what follows the longest
prompt prefix it has seen, and an encoder cache keyed by content ids runs
the vision tower only on videos it has not seen. So a session's context is
kept as a list that only grows at its end:

* **segments**: the stream cut into short videos of :attr:`Timeline.segment_frames`
  frames (an even count: a temporal patch is two frames), each frozen once
  cut: the same frames give the same content id and the same tokens at
  every ask;
* **turns**: a question (with the sentence saying how far the stream goes)
  and its answer, in the order the answers ended.

An ask's prompt (:class:`Draft`) is every committed entry, then the segments
cut since, then its question. Every model family's positions are causal (a
token's position depends only on what precedes it), so the previous prompt's
tokens keep their positions and their cached keys and values.

The timeline grows by what the stream and the answers add; :meth:`Timeline.rebase`
drops what lies before the window (segments and the turns asked before the
oldest one kept) and re-cuts runs of short segments, keeping order. That
prompt is new to the prefix cache: the engine decides when (its budget) and
can compute it ahead of the next ask.

Frames that share an ask's newest odd frame out: a segment is an even
number of frames, so an odd newest frame waits for its partner (the next
ask gets it), unless it is all that is new (then it is shown twice, as a
single-frame clip is).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..window import Frame
from .base import Message, Part, Video

__all__ = ["DEFAULT_SEGMENT_FRAMES", "MAX_SEGMENTS", "Draft", "Segment", "Timeline", "Turn"]

DEFAULT_SEGMENT_FRAMES = 4
"""Frames per segment: two temporal patches. Shorter segments follow the stream more
closely (fewer frames wait) but cost two marker tokens and a label each."""
MAX_SEGMENTS = 64
"""Videos one timeline prompt holds at most (the engine's ``limit_mm_per_prompt``): more
forces a rebase, which re-cuts short segments into full ones."""
_GAP = 2.0
"""An interval this many times the typical one is a gap: a segment never spans one."""
_NOMINAL = 0.25
"""A typical interval within this fraction of ``1 / fps`` is told as ``fps`` itself."""


@dataclass(frozen=True, slots=True, eq=False)
class Segment:
    """A few consecutive frames of the stream, shown to the model as one video.

    Compared by identity: two segments of the same frames are still two
    entries of a timeline (the engine's content ids make them one in its caches).
    """

    frames: tuple[Frame, ...]
    fps: float
    """The nominal rate the frames were sampled at (what the model is told)."""

    @property
    def first(self) -> float:
        return self.frames[0].pts

    @property
    def last(self) -> float:
        return self.frames[-1].pts

    def label(self) -> str:
        """The stream times of the segment, written before its video."""
        if len(self.frames) == 1:
            return f"t={self.first:.1f}s:"
        return f"t={self.first:.1f}-{self.last:.1f}s:"


@dataclass(frozen=True, slots=True)
class Turn:
    """One question (as the model read it) and the answer the engine gave."""

    text: str
    answer: str


Entry = Segment | Turn


@dataclass(frozen=True, slots=True)
class Draft:
    """One ask's context: the committed entries, the segments new with it, its text."""

    entries: tuple[Entry, ...]
    new: tuple[Segment, ...]
    text: str
    """The question, after the sentence saying how far the stream goes."""

    @property
    def segments(self) -> list[Segment]:
        """Every segment the ask shows, oldest first."""
        return [e for e in self.entries if isinstance(e, Segment)] + list(self.new)

    def messages(self, *, labels: bool = True) -> list[Message]:
        """The chat messages of the draft: user turns with segments, assistant answers.

        ``labels`` writes each segment's stream times before its video (a
        family whose video tokens carry timestamps themselves, Qwen3-VL,
        needs none).
        """
        messages: list[Message] = []
        content: list[Part] = []
        for entry in (*self.entries, *self.new):
            if isinstance(entry, Segment):
                if labels:
                    content.append(entry.label())
                content.append(Video(entry.frames, entry.fps, measured=False))
            else:
                messages.append(Message("user", (*content, entry.text)))
                messages.append(Message("assistant", (entry.answer,)))
                content = []
        messages.append(Message("user", (*content, self.text)))
        return messages


@dataclass
class Timeline:
    """One session's context, as it grows ask after ask (see the module's docstring)."""

    fps: float
    """The session's sampling rate, what segments are told unless the stream is far slower."""
    segment_frames: int = DEFAULT_SEGMENT_FRAMES
    entries: list[Entry] = field(default_factory=list)
    pending: list[Segment] = field(default_factory=list)
    """Segments cut for asks whose answers have not ended (or never will): shown again
    by every later ask until a committed turn places them."""
    interval: float = 0.0
    """The stream's typical frame interval (the median of the last window's; ``1 / fps``
    until known): a keyframes-only or slow source is sparser than the session's fps."""

    def __post_init__(self) -> None:
        if self.segment_frames < 2 or self.segment_frames % 2:
            raise ValueError("segments hold an even number of frames, at least 2")
        self.interval = self.interval or 1.0 / self.fps

    @property
    def rate(self) -> float:
        """The rate new segments are told: the session's fps, unless the stream is far off it."""
        if abs(self.interval * self.fps - 1.0) <= _NOMINAL:
            return self.fps
        return 1.0 / self.interval

    @property
    def segments(self) -> list[Segment]:
        """Every segment, committed or pending, oldest first."""
        return [e for e in self.entries if isinstance(e, Segment)] + self.pending

    @property
    def frames(self) -> int:
        """Frames the timeline holds (and keeps alive), in all its segments."""
        return sum(len(s.frames) for s in self.segments)

    @property
    def newest(self) -> Frame | None:
        segments = self.segments
        return segments[-1].frames[-1] if segments else None

    def draft(self, window: Sequence[Frame], question: str) -> Draft:
        """An ask about ``window`` (the session's frames now, oldest first).

        Frames of ``window`` after the newest one already cut become new
        segments. A window that does not continue the timeline (its frames
        went back in time: a new source) drops every segment first.
        """
        self._measure(window)
        new = self._cut(self._new_frames(window))  # first: it may drop every segment
        self.pending.extend(new)
        newest = self.newest
        seen = (
            f"The videos above are the stream up to t={newest.pts:.1f}s."
            if newest is not None
            else "No video frames are available."
        )
        return Draft(tuple(self.entries), tuple(self.pending), f"{seen}\n{question}")

    def ahead(self, window: Sequence[Frame]) -> Draft | None:
        """The timeline with the full segments new in ``window``, before any question.

        What the engine computes while the stream goes on, so that the next ask
        finds those segments in the prefix cache: only whole segments are cut
        (the frames of a partial one wait, as an ask would cut them later the
        same way), and they stay pending, shown by every later draft until an
        answer places them. None when no full segment is new.
        """
        self._measure(window)
        runs = self._runs(self._new_frames(window))
        if runs:
            runs[-1] = runs[-1][: len(runs[-1]) // self.segment_frames * self.segment_frames]
        new = [segment for run in runs for segment in self._chunks(run)]
        if not new:
            return None
        self.pending.extend(new)
        return Draft(tuple(self.entries), tuple(self.pending), "")

    def commit(self, draft: Draft, answer: str) -> None:
        """``draft``'s answer ended: its new segments still pending, then its turn, join."""
        placed = [s for s in draft.new if any(s is p for p in self.pending)]
        self.entries.extend(placed)
        self.pending = [p for p in self.pending if not any(p is s for s in placed)]
        self.entries.append(Turn(draft.text, answer))

    def rebased(self, start: float, *, turns: int) -> Timeline:
        """A copy of the committed entries, rebased (:meth:`rebase`), with nothing pending.

        What the engine warms up while asks go on with this timeline; :meth:`adopt`
        then brings over what they added.
        """
        copy = Timeline(fps=self.fps, segment_frames=self.segment_frames, interval=self.interval)
        copy.entries = list(self.entries)
        copy.rebase(start, turns=turns)
        return copy

    def adopt(self, older: Timeline, mark: int) -> None:
        """Take over from ``older``: its entries committed after ``mark`` and its pending ones."""
        self.entries.extend(older.entries[mark:])
        self.pending = list(older.pending)
        self.interval = older.interval

    def rebase(self, start: float, *, turns: int) -> None:
        """Drop segments that end before ``start`` and all but the last ``turns`` turns.

        Order is kept; adjacent short segments are re-cut into full ones (a
        full segment is kept as it is: its content id, and so its encoder
        output, stays the same). Pending segments are re-cut the same way.
        """
        every_turn = [e for e in self.entries if isinstance(e, Turn)]
        kept_turns = {id(t) for t in every_turn[len(every_turn) - turns :]} if turns > 0 else set()
        kept: list[Entry] = [
            e
            for e in self.entries
            if (isinstance(e, Segment) and e.last >= start) or id(e) in kept_turns
        ]
        self.entries = list(self._merged(kept))
        pending = self._merged([p for p in self.pending if p.last >= start])
        self.pending = [e for e in pending if isinstance(e, Segment)]

    # -- cutting --------------------------------------------------------------

    def _measure(self, window: Sequence[Frame]) -> None:
        """The stream's typical interval, from ``window``'s frames."""
        steps = [b.pts - a.pts for a, b in zip(window, window[1:], strict=False)]
        if any(step > 0 for step in steps):
            self.interval = statistics.median(step for step in steps if step > 0)

    def _new_frames(self, window: Sequence[Frame]) -> list[Frame]:
        newest = self.newest
        if newest is None:
            return list(window)
        for index, frame in enumerate(window):
            if frame is newest:
                return list(window[index + 1 :])
        if window and window[0].pts <= newest.pts:
            # Not a continuation: the stream started again (times went back).
            self.entries = [e for e in self.entries if isinstance(e, Turn)]
            self.pending = []
        return list(window)

    def _runs(self, frames: Sequence[Frame]) -> list[list[Frame]]:
        """``frames`` cut at gaps (an interval over twice the nominal one)."""
        runs: list[list[Frame]] = []
        for frame in frames:
            if runs and frame.pts - runs[-1][-1].pts <= _GAP * self.interval:
                runs[-1].append(frame)
            else:
                runs.append([frame])
        return runs

    def _cut(self, frames: Sequence[Frame]) -> list[Segment]:
        """New segments of ``frames``: full ones, then an even rest; an odd newest frame waits."""
        runs = self._runs(frames)
        segments: list[Segment] = []
        for number, run in enumerate(runs):
            last_run = number == len(runs) - 1
            if last_run and len(run) % 2 and (segments or len(run) > 1):
                run = run[:-1]  # its partner is the next frame: wait for it
            segments.extend(self._chunks(run))
        return segments

    def _chunks(self, run: Sequence[Frame]) -> Iterable[Segment]:
        n = self.segment_frames
        for start in range(0, len(run), n):
            yield Segment(tuple(run[start : start + n]), self.rate)

    def _merged(self, entries: Sequence[Entry]) -> Iterable[Entry]:
        """``entries`` with each run of adjacent short segments re-cut into full ones."""
        run: list[Frame] = []
        for entry in entries:
            if isinstance(entry, Segment) and len(entry.frames) < self.segment_frames:
                if run and entry.first - run[-1].pts > _GAP * self.interval:
                    yield from self._chunks(run)
                    run = []
                run.extend(entry.frames)
                continue
            if run:
                yield from self._chunks(run)
                run = []
            yield entry
        if run:
            yield from self._chunks(run)
