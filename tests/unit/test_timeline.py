"""The session timeline (pure): segments, drafts, commits and rebases."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import pytest

from streamchat.engine.base import Video
from streamchat.engine.timeline import Draft, Segment, Timeline, Turn
from streamchat.media.decoder import DecoderOptions, decode_stream
from streamchat.window import Frame
from tests.support.ffmpeg import Corpus


def frames(count: int, *, start: float = 0.0, fps: float = 2.0) -> list[Frame]:
    image = np.zeros((4, 4, 3), np.uint8)
    return [Frame(pts=start + i / fps, image=image.copy()) for i in range(count)]


def sizes(segments: Sequence[Segment]) -> list[int]:
    return [len(s.frames) for s in segments]


def videos(draft: Draft) -> list[Video]:
    return [p for m in draft.messages() for p in m.content if isinstance(p, Video)]


def test_the_first_ask_cuts_the_window_into_even_segments_and_an_odd_newest_frame_waits() -> None:
    timeline = Timeline(fps=2.0)
    window = frames(11)
    draft = timeline.draft(window, "What?")
    assert sizes(draft.segments) == [4, 4, 2]
    assert draft.segments[-1].frames[-1] is window[9]  # the 11th waits for its partner
    assert [s.label() for s in draft.segments] == ["t=0.0-1.5s:", "t=2.0-3.5s:", "t=4.0-4.5s:"]
    assert draft.text == "The videos above are the stream up to t=4.5s.\nWhat?"


def test_a_lone_new_frame_is_a_segment_of_its_own() -> None:
    timeline = Timeline(fps=2.0)
    assert sizes(timeline.draft(frames(1), "What?").segments) == [1]


def test_segments_never_span_a_gap() -> None:
    timeline = Timeline(fps=2.0)
    window = frames(3) + frames(4, start=10.0)
    draft = timeline.draft(window, "What?")
    assert sizes(draft.segments) == [3, 4]
    assert draft.segments[1].first == 10.0


def test_each_ask_appends_only_what_is_new_and_earlier_prompts_stay_a_prefix() -> None:
    timeline = Timeline(fps=2.0)
    stream = frames(20)
    first = timeline.draft(stream[:8], "One?")
    timeline.commit(first, "First answer.")
    second = timeline.draft(stream[4:14], "Two?")  # the window slid: 4 old frames left it
    assert second.entries == (*first.new, Turn(first.text, "First answer."))
    assert sizes(list(second.new)) == [4, 2]
    assert second.new[0].frames[0] is stream[8]
    before = first.messages()[:-1]
    assert second.messages()[: len(before)] == before
    assert second.messages()[len(before)].content[: len(first.messages()[-1].content)] == tuple(
        first.messages()[-1].content
    )
    timeline.commit(second, "Second answer.")
    third = timeline.draft(stream[4:14], "Again?")  # no new frame: nothing new
    assert third.new == () and len(third.segments) == len(second.segments)


def test_segments_are_told_the_nominal_rate_not_their_measured_one() -> None:
    timeline = Timeline(fps=2.0)
    jittery = [Frame(pts=i * 0.485, image=np.zeros((4, 4, 3), np.uint8)) for i in range(4)]
    (video,) = videos(timeline.draft(jittery, "What?"))
    assert video.fps == 2.0 and not video.measured


def test_answers_commit_in_the_order_they_end_with_the_segments_they_first_showed() -> None:
    timeline = Timeline(fps=2.0)
    stream = frames(12)
    slow = timeline.draft(stream[:4], "Slow?")
    fast = timeline.draft(stream[:8], "Fast?")  # asked while the first streams
    assert fast.new == (*slow.new, *fast.new[1:])
    timeline.commit(fast, "fast")
    timeline.commit(slow, "slow")
    kinds = [type(e).__name__ for e in timeline.entries]
    assert kinds == ["Segment", "Segment", "Turn", "Turn"]
    assert timeline.pending == []


def test_an_answer_that_never_ended_leaves_its_segments_for_the_next_ask() -> None:
    timeline = Timeline(fps=2.0)
    stream = frames(8)
    cancelled = timeline.draft(stream[:4], "Cancelled?")
    after = timeline.draft(stream, "Next?")
    assert after.new[0] is cancelled.new[0] and sizes(list(after.new)) == [4, 4]


def test_a_rebase_drops_what_precedes_the_window_keeps_order_and_recuts_short_segments() -> None:
    timeline = Timeline(fps=2.0)
    stream = frames(24)
    for end, question in ((8, "a"), (10, "b"), (12, "c"), (20, "d")):
        timeline.commit(timeline.draft(stream[:end], question), question.upper())
    assert sizes(timeline.segments) == [4, 4, 2, 2, 4, 4]
    full = timeline.segments[4]
    timeline.rebase(stream[6].pts, turns=2)
    # From t=3.0: the segment ending there, 2 + 2 re-cut as one (turn b between them
    # went), then the two full ones.
    assert sizes(timeline.segments) == [4, 4, 4, 4]
    assert timeline.segments[0].frames[0] is stream[4]
    assert timeline.segments[2] is full  # a full segment stays the same entry
    texts = [e.text.split("\n")[1] for e in timeline.entries if isinstance(e, Turn)]
    assert texts == ["c", "d"]
    kinds = [type(e).__name__ for e in timeline.entries]
    assert kinds == ["Segment", "Segment", "Turn", "Segment", "Segment", "Turn"]


def test_a_stream_that_starts_again_drops_every_segment() -> None:
    timeline = Timeline(fps=2.0)
    timeline.commit(timeline.draft(frames(8, start=100.0), "a"), "A")
    draft = timeline.draft(frames(4), "b")
    assert draft.segments == list(draft.new) and draft.new[0].first == 0.0
    assert [type(e).__name__ for e in draft.entries] == ["Turn"]


def test_segments_hold_an_even_number_of_frames() -> None:
    with pytest.raises(ValueError):
        Timeline(fps=2.0, segment_frames=3)


def test_qwen3_prompts_carry_no_labels() -> None:
    timeline = Timeline(fps=2.0)
    draft = timeline.draft(frames(4), "What?")
    assert not any(
        isinstance(p, str) and p.startswith("t=")
        for m in draft.messages(labels=False)
        for p in m.content
    )


def test_a_stream_sparser_than_the_sessions_fps_is_cut_by_its_own_interval() -> None:
    """A keyframes-only source (a frame every 2 s at fps 2) is not a gap at every frame: its
    segments hold 4 frames and are told its own rate."""
    timeline = Timeline(fps=2.0)
    draft = timeline.draft(frames(8, fps=0.5), "What?")
    assert sizes(draft.segments) == [4, 4]
    assert {s.fps for s in draft.segments} == {0.5}
    timeline.commit(draft, "A.")
    assert sizes(timeline.draft(frames(3, start=100.0, fps=0.5), "Later?").new) == [2]


def test_a_rebased_copy_adopts_what_the_original_gained_meanwhile() -> None:
    """Asks go on with a timeline while its rebased copy warms up; the copy then takes over the
    turns and segments added since, after its own (rebased) entries, in order."""
    timeline = Timeline(fps=2.0)
    stream = frames(24)
    for end, question in ((8, "a"), (12, "b")):
        timeline.commit(timeline.draft(stream[:end], question), question.upper())
    mark = len(timeline.entries)
    copy = timeline.rebased(stream[4].pts, turns=1)
    assert sizes(copy.segments) == [4, 4] and copy.pending == []
    later = timeline.draft(stream[:16], "c")  # while the copy warms up
    timeline.commit(later, "C")
    pending = timeline.draft(stream[:20], "d")  # still streaming at the swap
    copy.adopt(timeline, mark)
    assert copy.segments == [*copy.segments[:2], later.new[0], *pending.new]
    assert [e.answer for e in copy.entries if isinstance(e, Turn)] == ["B", "C"]
    follow = copy.draft(stream[:20], "e")
    assert follow.new == pending.new


def test_ahead_cuts_only_full_segments_and_the_next_ask_shows_them_as_it_would_cut_them() -> None:
    """Between asks the new frames are cut in whole segments only (the rest waits); the ask
    after shows those segments, then the rest with what came since, its prompt extending the
    prefilled one, and its answer places them all."""
    timeline = Timeline(fps=2.0)
    stream = frames(30)
    first = timeline.draft(stream[:8], "One?")
    timeline.commit(first, "First answer.")
    assert timeline.ahead(stream[:11]) is None  # 3 new frames: no full segment yet
    ahead = timeline.ahead(stream[2:14])
    assert ahead is not None and ahead.text == ""
    assert sizes(list(ahead.new)) == [4]
    assert ahead.new[0].frames[0] is stream[8]
    assert timeline.ahead(stream[2:14]) is None  # nothing new since
    ask = timeline.draft(stream[6:19], "Two?")
    assert ask.entries == ahead.entries
    assert ask.new[: len(ahead.new)] == ahead.new
    assert sizes(list(ask.new)) == [4, 4, 2]
    assert ask.messages()[:-1] == ahead.messages()[:-1]
    last = ask.messages()[-1].content
    assert list(last[: len(ahead.messages()[-1].content) - 1]) == list(
        ahead.messages()[-1].content[:-1]
    )
    timeline.commit(ask, "Second answer.")
    assert timeline.pending == []
    assert sizes(timeline.segments) == [4, 4, 4, 4, 2]


def test_ahead_cuts_runs_before_a_gap_whole() -> None:
    """A run the stream left by a gap is cut whole (no frame of it will ever join it)."""
    timeline = Timeline(fps=2.0)
    stream = frames(6) + frames(5, start=20.0)
    timeline.commit(timeline.draft(stream[:4], "One?"), "A.")
    ahead = timeline.ahead(stream)
    assert ahead is not None
    assert sizes(list(ahead.new)) == [2, 4]


@pytest.mark.parametrize("name", ["vfr-gap", "mpegts", "mkv"])
def test_files_written_by_ffmpeg_cut_into_segments_at_their_stream_times(
    ffmpeg_corpus: Corpus, name: str
) -> None:
    """Frames the real decoder samples from streamable ffmpeg-CLI files (a VFR hole, a
    camera's MPEG-TS, a recorder's Matroska) become segments that follow their stream times:
    labels are the frames' pts, no segment spans the hole, asks and prefills together show
    every frame once."""
    media = ffmpeg_corpus[name]
    decoded: list[Frame] = []
    options = DecoderOptions(fps=2.0, max_pixels=64 * 64, min_pixels=28 * 28)
    with media.path.open("rb") as source:
        decode_stream(source, options, decoded.append, threading.Event())
    assert len(decoded) == media.expected_frames(2.0)
    timeline = Timeline(fps=2.0)
    first = timeline.draft(decoded[:4], "One?")
    timeline.commit(first, "A.")
    ahead = timeline.ahead(decoded[:-1])
    last = timeline.draft(decoded, "Two?")
    timeline.commit(last, "B.")
    shown = [f for segment in timeline.segments for f in segment.frames]
    assert shown == decoded[: len(shown)] and len(decoded) - len(shown) <= 1  # an odd one waits
    hole = media.segments()[1][0] if len(media.segments()) > 1 else None
    for segment in timeline.segments:
        assert segment.label() == f"t={segment.first:.1f}-{segment.last:.1f}s:"
        if hole is not None:
            assert segment.last < hole - 0.1 or segment.first >= hole - 0.1
    if ahead is not None:
        assert all(s in timeline.segments for s in ahead.new)
