"""The session state machine, driven without an event loop."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
import pytest

from streamchat.config import Settings
from streamchat.engine.base import TimelineContext
from streamchat.engine.base import Usage as Counted
from streamchat.errors import NoFrames, VideoDecodeError
from streamchat.messages import (
    AnswerDelta,
    AnswerDone,
    Ask,
    Cancel,
    Error,
    Generation,
    Hello,
    Image,
    Limits,
    Ready,
    Usage,
    VideoChunk,
    VideoEnd,
    VideoStatus,
    VideoUrl,
    encode_server,
)
from streamchat.protocol import (
    CancelAnswer,
    DecodeImage,
    EndSource,
    FeedChunk,
    FeedLevel,
    Send,
    SessionProtocol,
    SourceKind,
    SourceState,
    StartAnswer,
    StartSource,
    State,
    StopSource,
)
from streamchat.window import Frame

IDLE = FeedLevel()
SETTINGS = Settings(max_concurrent_asks=2, max_fps=4.0, max_tokens_limit=100, history_turns=2)


def opened(settings: Settings = SETTINGS) -> SessionProtocol:
    protocol = SessionProtocol(settings, session_id="s1", model="m")
    protocol.receive(Hello(), now=0.0)
    return protocol


def frame(pts: float) -> Frame:
    return Frame(pts, np.zeros((28, 28, 3), np.uint8))


def with_frames(protocol: SessionProtocol, count: int = 4) -> SessionProtocol:
    protocol.receive(VideoChunk(data=b"x"), now=0.0)
    assert protocol.source is not None
    for i in range(count):
        protocol.frame_decoded(protocol.source.number, frame(i / 2), now=0.0, level=IDLE)
    return protocol


def errors(actions: Sequence[object]) -> list[Error]:
    return [a.message for a in actions if isinstance(a, Send) and isinstance(a.message, Error)]


def test_hello_first_then_ready_with_capped_options() -> None:
    """Options beyond server limits are capped and told back in ready."""
    protocol = SessionProtocol(SETTINGS, session_id="s1", model="m")
    [err] = errors(protocol.receive(Ask(id="a", text="q"), now=0.0))
    assert err.code == "hello_required" and not err.fatal
    [action] = protocol.receive(
        Hello(fps=30, window_frames=10_000, generation=Generation(max_tokens=10_000)), now=0.0
    )
    assert isinstance(action, Send) and isinstance(action.message, Ready)
    limits = action.message.limits
    assert limits.fps == 4.0
    assert limits.window_frames == SETTINGS.max_window_frames
    assert limits.max_tokens == 100
    assert protocol.state is State.OPEN
    [dup] = errors(protocol.receive(Hello(), now=0.0))
    assert dup.code == "duplicate_hello"


def test_first_chunk_starts_a_push_source_then_feeds() -> None:
    protocol = opened()
    actions = protocol.receive(VideoChunk(data=b"abc", format="webm"), now=0.0)
    assert actions == [StartSource(1, SourceKind.PUSH, "webm"), FeedChunk(1, b"abc")]
    assert protocol.receive(VideoChunk(data=b"d"), now=0.0) == [FeedChunk(1, b"d")]
    assert protocol.receive(VideoEnd(), now=0.0) == [EndSource(1)]


def test_url_replaces_a_running_source_and_clears_the_window() -> None:
    protocol = with_frames(opened())
    actions = protocol.receive(VideoUrl(url="http://h/v.mp4"), now=0.0)
    assert actions == [StopSource(1), StartSource(2, SourceKind.URL, None, "http://h/v.mp4")]
    assert len(protocol.window) == 0
    # Frames still arriving from the stopped source are ignored.
    assert protocol.frame_decoded(1, frame(9.0), now=0.0, level=IDLE) == []
    assert len(protocol.window) == 0


def test_chunks_during_a_url_source_are_refused() -> None:
    protocol = opened()
    protocol.receive(VideoUrl(url="http://h/v.mp4"), now=0.0)
    [err] = errors(protocol.receive(VideoChunk(data=b"x"), now=0.0))
    assert err.code == "source_busy"


def test_chunk_after_end_starts_a_new_source() -> None:
    protocol = with_frames(opened())
    protocol.receive(VideoEnd(), now=0.0)
    protocol.source_ended(1, None, level=IDLE)
    actions = protocol.receive(VideoChunk(data=b"x"), now=0.0)
    assert actions[0] == StartSource(2, SourceKind.PUSH, None)


def test_ask_without_frames_is_no_frames() -> None:
    [err] = errors(opened().receive(Ask(id="a", text="what?"), now=0.0))
    assert (err.code, err.id, err.fatal) == ("no_frames", "a", False)


def test_choices_come_from_the_ask_else_from_the_session() -> None:
    """An ask's fixed choices bind its answer only; the session's, from ``hello``, the rest."""
    protocol = SessionProtocol(SETTINGS, session_id="s1", model="m")
    protocol.receive(Hello(generation=Generation(choices=("yes", "no"))), now=0.0)
    with_frames(protocol, 2)
    [session] = protocol.receive(Ask(id="a", text="dark?"), now=0.0)
    [own] = protocol.receive(
        Ask(id="b", text="which?", generation=Generation(choices=("left", "right"))), now=0.0
    )
    assert isinstance(session, StartAnswer) and isinstance(own, StartAnswer)
    assert session.request.sampling.choices == ("yes", "no")
    assert own.request.sampling.choices == ("left", "right")
    [plain] = with_frames(opened(), 2).receive(Ask(id="c", text="what?"), now=0.0)
    assert isinstance(plain, StartAnswer) and plain.request.sampling.choices == ()


def test_ask_builds_request_from_window_and_history() -> None:
    """An answer's request holds the selected frames, merged sampling and history."""
    protocol = with_frames(opened(), 6)
    [start] = protocol.receive(
        Ask(id="a", text="what?", last_seconds=1.0, generation=Generation(max_tokens=7)), now=0.0
    )
    assert isinstance(start, StartAnswer)
    assert [f.pts for f in start.request.frames] == [1.5, 2.0, 2.5]
    assert start.request.sampling.max_tokens == 7
    assert start.request.history == ()
    protocol.answer_finished("a", "an answer", "stop", None, 0.1)
    [again] = protocol.receive(Ask(id="b", text="and now?"), now=0.0)
    assert isinstance(again, StartAnswer)
    assert [t.answer for t in again.request.history] == ["an answer"]
    assert again.request.request_id != start.request.request_id


def test_history_is_bounded() -> None:
    protocol = with_frames(opened())
    for i in range(5):
        protocol.receive(Ask(id=f"q{i}", text="q"), now=0.0)
        protocol.answer_finished(f"q{i}", f"a{i}", "stop", None, None)
    assert [t.answer for t in protocol.history] == ["a3", "a4"]


def test_concurrency_and_duplicate_ids() -> None:
    protocol = with_frames(opened())
    protocol.receive(Ask(id="a", text="q"), now=0.0)
    [dup] = errors(protocol.receive(Ask(id="a", text="q"), now=0.0))
    assert dup.code == "duplicate_id"
    protocol.receive(Ask(id="b", text="q"), now=0.0)
    [many] = errors(protocol.receive(Ask(id="c", text="q"), now=0.0))
    assert many.code == "too_many_asks"


def test_cancel_known_and_unknown() -> None:
    """Cancelling marks the answer; its done message says cancelled and it stays out of history."""
    protocol = with_frames(opened())
    protocol.receive(Ask(id="a", text="q"), now=0.0)
    assert protocol.receive(Cancel(id="a"), now=0.0) == [CancelAnswer("a")]
    [again] = errors(protocol.receive(Cancel(id="a"), now=0.0))
    assert again.code == "unknown_id"
    [done] = protocol.answer_finished("a", "partial", "stop", None, None)
    assert isinstance(done, Send) and isinstance(done.message, AnswerDone)
    assert done.message.finish_reason == "cancelled"
    assert list(protocol.history) == []


def test_answer_done_reports_usage() -> None:
    """answer.done tells the engine's counts (the prompt tokens its cache served too) and the
    session's time to first token; an answer the engine counted nothing for tells zeros."""
    protocol = with_frames(opened())
    protocol.receive(Ask(id="a", text="q"), now=0.0)
    protocol.receive(Ask(id="b", text="q"), now=0.0)
    counted = Counted(
        prompt_tokens=50, completion_tokens=5, video_tokens=40, frames=4, cached_tokens=32
    )
    [done] = protocol.answer_finished("a", "text", "length", counted, 0.25)
    [none] = protocol.answer_finished("b", "", "error", None, None)
    assert isinstance(done, Send) and isinstance(done.message, AnswerDone)
    assert isinstance(none, Send) and isinstance(none.message, AnswerDone)
    assert done.message.usage == Usage(
        prompt_tokens=50,
        completion_tokens=5,
        video_tokens=40,
        frames=4,
        time_to_first_token=0.25,
        cached_tokens=32,
    )
    counts = ("prompt_tokens", "completion_tokens", "video_tokens", "frames", "cached_tokens")
    assert none.message.usage == Usage(**dict.fromkeys(counts, 0), time_to_first_token=None)


def test_deltas_of_an_answer_in_flight_are_sent_and_none_after_its_end() -> None:
    """The protocol builds each answer.delta; a delta for an answer that ended is dropped."""
    protocol = with_frames(opened())
    protocol.receive(Ask(id="a", text="q"), now=0.0)
    assert protocol.answer_delta("a", "Hel") == [Send(AnswerDelta(id="a", text="Hel"))]
    protocol.answer_finished("a", "Hel", "stop", None, 0.1)
    assert protocol.answer_delta("a", "lo") == []


def test_too_long_or_empty_question() -> None:
    protocol = with_frames(opened(Settings(max_question_chars=5)))
    [long] = errors(protocol.receive(Ask(id="a", text="x" * 6), now=0.0))
    [empty] = errors(protocol.receive(Ask(id="b", text="  "), now=0.0))
    assert long.code == empty.code == "invalid_field"


def test_status_is_throttled_and_sent_at_source_end() -> None:
    protocol = opened(Settings(status_interval=1.0))
    protocol.receive(VideoChunk(data=b"x"), now=0.0)
    sent = [
        protocol.frame_decoded(
            1, frame(t / 10), now=t / 10, level=FeedLevel(lag=0.2, backlog_bytes=100)
        )
        for t in range(15)
    ]
    statuses = [a for actions in sent for a in actions]
    assert len(statuses) == 2  # at t=0.0 and t=1.0
    first = statuses[0]
    assert isinstance(first, Send) and isinstance(first.message, VideoStatus)
    assert (first.message.decode_lag, first.message.backlog_bytes) == (0.2, 100)
    # The skipped updates are owed: one trailing status once the interval has passed.
    assert protocol.status_pending
    assert protocol.flush_status(now=1.5) == []
    [trailing] = protocol.flush_status(now=2.0)
    assert isinstance(trailing, Send) and isinstance(trailing.message, VideoStatus)
    assert trailing.message.frames == 15 and not protocol.status_pending
    assert protocol.flush_status(now=5.0) == []
    [status] = protocol.source_ended(1, None, level=IDLE)
    assert isinstance(status, Send) and isinstance(status.message, VideoStatus)
    assert status.message.state == "ended" and status.message.frames == 15


def test_failed_source_keeps_frames_and_reports_error() -> None:
    protocol = with_frames(opened(), 3)
    actions = protocol.source_ended(1, VideoDecodeError("corrupt"), level=IDLE)
    [err] = errors(actions)
    assert err.code == "video_decode_failed" and not err.fatal
    assert len(protocol.window) == 3
    status = actions[-1]
    assert isinstance(status, Send) and isinstance(status.message, VideoStatus)
    assert status.message.state == "failed"


def test_images_get_session_clock_timestamps() -> None:
    protocol = opened()
    assert protocol.receive(Image(data=b"png"), now=10.0) == [DecodeImage(b"png", 0.0)]
    [status] = protocol.image_decoded(frame(0.0))
    assert isinstance(status, Send) and isinstance(status.message, VideoStatus)
    assert status.message.frames == 1
    assert protocol.receive(Image(data=b"png"), now=12.5) == [DecodeImage(b"png", 2.5)]
    assert protocol.receive(Image(data=b"png", pts=7.0), now=13.0) == [DecodeImage(b"png", 7.0)]


def test_close_ends_the_session_and_its_source_and_ignores_what_follows() -> None:
    """After close, messages are ignored and the source's own end is not told again (the shell
    stops its work itself: the protocol does not know all of it)."""
    protocol = with_frames(opened())
    protocol.receive(Ask(id="a", text="q"), now=0.0)
    protocol.close()
    assert protocol.state is State.CLOSED
    assert protocol.source is not None and protocol.source.state is SourceState.ENDED
    assert protocol.receive(Ask(id="b", text="q"), now=0.0) == []
    assert protocol.source_ended(1, None, level=IDLE) == []


def told(protocol: SessionProtocol) -> tuple[SourceState, str]:
    """The current source's state, and what video.status says of it."""
    assert protocol.source is not None
    return protocol.source.state, protocol.status().state


def test_a_source_moves_through_its_states_and_status_tells_three_of_them() -> None:
    """DECODING -> ENDING -> ENDED or FAILED; an ending source is told as still decoding; a
    replaced source ends; no state goes back."""
    protocol = opened()
    assert protocol.status().state == "ended"  # no source yet
    protocol.receive(VideoChunk(data=b"x"), now=0.0)
    assert told(protocol) == (SourceState.DECODING, "decoding")
    protocol.receive(VideoEnd(), now=0.0)
    assert told(protocol) == (SourceState.ENDING, "decoding")
    assert protocol.receive(VideoEnd(), now=0.0) == []  # already ending
    protocol.source_ended(1, None, level=IDLE)
    assert told(protocol) == (SourceState.ENDED, "ended")

    protocol.receive(VideoChunk(data=b"x"), now=0.0)
    first = protocol.source
    protocol.receive(VideoUrl(url="http://h/v.mp4"), now=0.0)
    assert first is not None and first.state is SourceState.ENDED  # replaced
    protocol.receive(VideoEnd(), now=0.0)
    protocol.source_ended(3, VideoDecodeError("corrupt"), level=IDLE)
    assert told(protocol) == (SourceState.FAILED, "failed")
    with pytest.raises(AssertionError, match="FAILED -> DECODING"):
        protocol.source.move(SourceState.DECODING)


def test_ready_and_answer_done_encode_to_the_wire_maps_of_protocol_v1() -> None:
    """The typed limits and usage travel as the same maps as before they were typed: the same
    keys in the same order, the same value types."""
    protocol = SessionProtocol(Settings(), session_id="s1", model="m")
    [ready] = protocol.receive(Hello(keyframes_only=True), now=0.0)
    assert isinstance(ready, Send)
    limits = msgpack.unpackb(encode_server(ready.message, binary=True))["limits"]
    s = Settings()
    assert list(limits.items()) == [
        ("fps", s.fps),
        ("window_frames", s.window_frames),
        ("window_bytes", s.window_bytes),
        ("min_pixels", s.min_pixels),
        ("max_pixels", s.max_pixels),
        ("frame_factor", s.factor),
        ("max_message_bytes", s.max_message_bytes),
        ("video_buffer_bytes", s.feed_bytes),
        ("max_concurrent_asks", s.max_concurrent_asks),
        ("max_question_chars", s.max_question_chars),
        ("max_tokens", s.max_tokens),
        ("max_tokens_limit", s.max_tokens_limit),
        ("tokens_per_frame", 0),
        ("max_ask_frames", 0),
        ("keyframes_only", True),
        ("messages_per_second", s.messages_per_second),
        ("message_burst", s.message_burst),
        ("video_bytes_per_second", s.video_bytes_per_second),
        ("idle_timeout", s.idle_timeout),
        ("context", "window"),  # added since, last: protocol 1 clients ignore them
        ("context_frames", s.window_frames),
    ]
    assert [type(value) for value in limits.values()] == [
        float, int, int, int, int, int, int, int, int, int, int, int, int, int, bool,
        float, int, int, float, str, int,
    ]  # fmt: skip
    with_frames(protocol).receive(Ask(id="a", text="q"), now=0.0)
    [done] = protocol.answer_finished("a", "", "error", None, None)
    assert isinstance(done, Send)
    assert msgpack.unpackb(encode_server(done.message, binary=True)) == {
        "type": "answer.done",
        "id": "a",
        "finish_reason": "error",
        "usage": {
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "video_tokens": 0,
            "frames": 0,
            "time_to_first_token": None,
            "cached_tokens": 0,  # added since, last: protocol 1 clients ignore it
        },
    }


@pytest.mark.parametrize("exc", [RuntimeError("secret path /etc"), KeyError("x")])
def test_unexpected_errors_leak_nothing(exc: Exception) -> None:
    error = opened().error(exc).message
    assert isinstance(error, Error)
    assert error.code == "internal_error" and "secret" not in error.message


def test_history_turns_zero_keeps_no_history() -> None:
    protocol = with_frames(opened(Settings(history_turns=0)))
    protocol.receive(Ask(id="a", text="what?"), now=0.0)
    protocol.answer_finished("a", "an answer", "stop", None, 0.1)
    [again] = protocol.receive(Ask(id="b", text="and now?"), now=0.0)
    assert isinstance(again, StartAnswer)
    assert again.request.history == ()


def test_asks_before_hello_are_refused_by_their_id() -> None:
    """hello_required names the ask it refuses, so the client can end the answer it waits for."""
    protocol = SessionProtocol(SETTINGS, session_id="s1", model="m")
    refused = [
        (error.code, error.id)
        for message in (Ask(id="q1", text="what?"), Cancel(id="c1"), VideoEnd())
        for error in errors(protocol.receive(message, now=0.0))
    ]
    assert refused == [("hello_required", "q1"), ("hello_required", None), ("hello_required", None)]


def test_an_unexpected_failure_while_handling_an_ask_names_it() -> None:
    """A bug's internal_error carries the id it is given; an error's own id comes first."""
    protocol = opened()
    bug = protocol.error(RuntimeError("secret"), id="q1").message
    own = protocol.error(NoFrames("none yet", id="q2"), id="q1").message
    assert isinstance(bug, Error) and isinstance(own, Error)
    assert (bug.code, bug.id, "secret" in bug.message) == ("internal_error", "q1", False)
    assert (own.code, own.id) == ("no_frames", "q2")


# -- the context: window or timeline ------------------------------------------------

TIMELINE = dataclasses.replace(SETTINGS, context="timeline", window_frames=16)


def ready_limits(settings: Settings, hello: Hello) -> Limits:
    [ready] = SessionProtocol(settings, session_id="s1", model="m").receive(hello, now=0.0)
    assert isinstance(ready, Send) and isinstance(ready.message, Ready)
    return ready.message.limits


@pytest.mark.parametrize(
    ("settings", "hello", "told"),
    [
        (SETTINGS, Hello(), ("window", 32)),  # "auto" no app resolved: the window
        (SETTINGS, Hello(context="timeline", window_frames=16), ("timeline", 24)),
        (TIMELINE, Hello(), ("timeline", 16 + 8)),  # half the window
        (TIMELINE, Hello(context="window"), ("window", 16)),
        (TIMELINE, Hello(window_frames=10), ("timeline", 10 + 6)),  # half, rounded up to even
        (TIMELINE, Hello(window_frames=7), ("timeline", 7 + 4)),
        (TIMELINE, Hello(window_frames=4), ("timeline", 4 + 4)),  # at least 4
        (dataclasses.replace(TIMELINE, timeline_slack=0), Hello(), ("timeline", 16)),
        (dataclasses.replace(TIMELINE, timeline_slack=5), Hello(), ("timeline", 21)),
        (dataclasses.replace(TIMELINE, max_ask_frames=12), Hello(), ("timeline", 12 + 8)),
    ],
)
def test_ready_tells_the_context_and_the_most_frames_an_ask_may_see(
    settings: Settings, hello: Hello, told: tuple[str, int]
) -> None:
    """ready.limits.context is hello's choice, else the server's; context_frames is the window
    (as the context budget caps it) plus, on a timeline, its slack."""
    limits = ready_limits(settings, hello)
    assert (limits.context, limits.context_frames) == told


def test_an_ask_about_the_window_on_a_timeline_carries_the_timeline() -> None:
    """On a timeline session, an ask with no range carries the whole window and a
    TimelineContext naming the session, the window plus slack and the turns to keep."""
    protocol = with_frames(opened(dataclasses.replace(TIMELINE, window_frames=8)), 10)
    [start] = protocol.receive(Ask(id="a", text="what?"), now=0.0)
    assert isinstance(start, StartAnswer)
    assert [f.pts for f in start.request.frames] == [i / 2 for i in range(2, 10)]
    assert start.request.timeline == TimelineContext(session="s1", max_frames=8 + 4, keep_turns=2)
    window = with_frames(opened(dataclasses.replace(SETTINGS, context="window")))
    [plain] = window.receive(Ask(id="a", text="what?"), now=0.0)
    assert isinstance(plain, StartAnswer) and plain.request.timeline is None


def test_the_engine_may_compute_ahead_once_the_session_asked_on_its_timeline() -> None:
    """``ahead`` hands over what a timeline ask would carry now, only after a timeline ask,
    never on a window session nor after a ranged ask alone."""
    settings = dataclasses.replace(TIMELINE, window_frames=8, max_ask_frames=4)
    protocol = with_frames(opened(settings), 6)
    assert protocol.ahead() is None  # nothing to extend yet
    protocol.receive(Ask(id="r", text="what?", last_seconds=1.0), now=0.0)
    assert protocol.ahead() is None  # a ranged ask leaves the timeline alone
    [start] = protocol.receive(Ask(id="a", text="what?"), now=0.0)
    assert isinstance(start, StartAnswer)
    assert protocol.source is not None
    protocol.frame_decoded(protocol.source.number, frame(3.0), now=0.0, level=IDLE)
    ahead = protocol.ahead()
    assert ahead is not None
    context, frames = ahead
    assert context == start.request.timeline
    assert [f.pts for f in frames] == [1.5, 2.0, 2.5, 3.0]
    window = with_frames(opened(dataclasses.replace(SETTINGS, context="window")))
    window.receive(Ask(id="a", text="what?"), now=0.0)
    assert window.ahead() is None


def test_a_timeline_ask_over_a_small_context_carries_the_newest_frames_unthinned() -> None:
    """When the model's context holds fewer frames than the window, a timeline ask carries the
    newest ones as they came (thinning would pick other frames at every ask: nothing to append)."""
    settings = dataclasses.replace(TIMELINE, window_frames=8, max_ask_frames=4)
    protocol = with_frames(opened(settings), 10)
    [start] = protocol.receive(Ask(id="a", text="what?"), now=0.0)
    assert isinstance(start, StartAnswer) and start.request.timeline is not None
    assert [f.pts for f in start.request.frames] == [3.0, 3.5, 4.0, 4.5]


@pytest.mark.parametrize(
    "ranged",
    [
        {"last_seconds": 1.0},
        {"max_frames": 2},
        {"start": 0.5},
        {"end": 1.0},
        {"max_frames": 100},  # even one that does not thin the window
    ],
)
def test_an_ask_with_a_range_or_max_frames_goes_as_one_prompt_on_a_timeline(
    ranged: dict[str, Any],
) -> None:
    """An ask choosing its frames is not put on the timeline: timeline=None, its own frames."""
    protocol = with_frames(opened(TIMELINE), 4)
    [start] = protocol.receive(Ask(id="a", text="what?", **ranged), now=0.0)
    assert isinstance(start, StartAnswer)
    assert start.request.timeline is None
    assert start.request.frames
