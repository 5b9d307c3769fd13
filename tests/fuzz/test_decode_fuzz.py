"""The pure layers under fuzzing: ``decode_client`` and ``SessionProtocol`` never fail untyped.

Every payload either decodes into a message whose fields honour the protocol's
types and ranges, or raises a :class:`StreamchatError` with one of the decoder's
stable codes; every message a session then receives yields actions whose
``error``s carry known codes and encode on both wires. Runs are derandomized
(the same examples every time); ``STREAMCHAT_FUZZ_SCALE`` multiplies the counts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamchat.config import Settings
from streamchat.engine.base import Usage
from streamchat.errors import StreamchatError
from streamchat.messages import (
    CONTAINER_FORMATS,
    MAX_ID_CHARS,
    Ask,
    Cancel,
    ClientMessage,
    Error,
    Hello,
    VideoChunk,
    VideoUrl,
    decode_client,
    encode_server,
)
from streamchat.protocol import (
    DecodeImage,
    FeedLevel,
    Send,
    SessionProtocol,
    StartAnswer,
    StartSource,
    State,
)
from streamchat.window import Frame
from tests.fuzz import payloads as p
from tests.fuzz import strategies as s

EXAMPLES = {
    "raw": p.scaled(4_000),
    "structural": p.scaled(3_000),
    "fields": p.scaled(2_000),
    "sessions": p.scaled(1_000),
}
"""10,000 examples in all (the sessions carry up to 24 messages each)."""

SETTINGS = Settings(max_concurrent_asks=2, max_question_chars=200, history_turns=2)


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def run_counted(
    examples: int, strategy: st.SearchStrategy[Any], check: Callable[[Any], object]
) -> int:
    """Run ``check`` over ``examples`` generated values; the number of examples run."""
    ran = 0

    @fuzz_settings(examples)
    @given(strategy)
    def property_(value: Any) -> None:
        nonlocal ran
        ran += 1
        check(value)

    property_()
    return ran


def assert_encodable(message: Any) -> None:
    """A server message the writer can send on either wire (no NaN, no lone surrogates)."""
    encode_server(message, binary=True)
    encode_server(message, binary=False)


def assert_sound(value: Any, where: str) -> None:
    """Decoded fields are of their declared kind: finite floats, real ints, encodable text."""
    if isinstance(value, str):
        value.encode("utf-8")  # raises on a lone surrogate
    elif isinstance(value, float):
        assert math.isfinite(value), where
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            inner = getattr(value, f.name)
            if f.type in ("int | None", "int"):
                assert inner is None or (type(inner) is int), f"{where}.{f.name}"
            if f.type in ("float | None", "float"):
                assert inner is None or type(inner) is float, f"{where}.{f.name}"
            assert_sound(inner, f"{where}.{f.name}")


def decode(payload: s.Payload) -> ClientMessage | StreamchatError:
    """The decoder's verdict on ``payload``; anything but a typed error fails the test."""
    try:
        message = decode_client(payload)
    except StreamchatError as exc:
        assert exc.code in p.DECODE_CODES, exc.code
        assert_encodable(Error(code=exc.code, message=exc.message, id=exc.id))
        return exc
    assert_sound(message, message.type)
    match message:
        case Hello(fps=fps):
            assert fps is None or 0.01 <= fps <= 120.0
        case Ask(id=id) | Cancel(id=id):
            assert 1 <= len(id) <= MAX_ID_CHARS
        case VideoChunk(format=fmt) | VideoUrl(format=fmt):
            assert fmt is None or fmt in CONTAINER_FORMATS
    return message


def test_raw_bytes_and_text() -> None:
    """Arbitrary bytes and text (lone surrogates included) decode or raise a decoder code."""
    ran = run_counted(EXAMPLES["raw"], s.raw_frames, decode)
    assert ran >= EXAMPLES["raw"]


def test_structural_attacks() -> None:
    """Huge declared lengths, 10k-deep nesting, bad UTF-8, extension types, timestamps,
    duplicate and unhashable keys, huge JSON numbers, truncation and bit flips are typed errors."""
    ran = run_counted(EXAMPLES["structural"], s.structural(), decode)
    assert ran >= EXAMPLES["structural"]


def test_wrong_types_and_fields() -> None:
    """Maps with any ``type`` and fields of any type decode to sound messages or typed errors."""
    ran = run_counted(EXAMPLES["fields"], s.encoded(s.message_maps()), decode)
    assert ran >= EXAMPLES["fields"]


def _frame(pts: float) -> Frame:
    return Frame(pts, np.zeros((28, 28, 3), np.uint8))


class Driver:
    """Feeds one session's messages to a ``SessionProtocol`` and plays the shell's part.

    Images "decode" at once and answers finish two messages after they start,
    so asks, cancels and the history are exercised as well as refusals.
    """

    def __init__(self) -> None:
        self.protocol = SessionProtocol(SETTINGS, session_id="fuzz", model="fake")
        self.hello_seen = False
        self.answers: list[str] = []
        self.now = 0.0
        self.codes: list[str] = []

    def check(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Send):
                assert_encodable(action.message)
                if isinstance(action.message, Error):
                    error = action.message
                    assert error.code in p.KNOWN_CODES and not error.fatal, error
                    self.codes.append(error.code)
            elif isinstance(action, DecodeImage):
                self.check(self.protocol.image_decoded(_frame(action.pts)))
            elif isinstance(action, StartSource):
                self.check(
                    self.protocol.frame_decoded(
                        action.number, _frame(self.now), now=self.now, level=FeedLevel()
                    )
                )
            elif isinstance(action, StartAnswer):
                self.answers.append(action.id)
        assert len(self.protocol.answers) <= SETTINGS.max_concurrent_asks

    def send(self, payload: s.Payload) -> None:
        self.now += 0.25
        if len(self.answers) > 1:
            done = self.answers.pop(0)
            usage = Usage(prompt_tokens=1, completion_tokens=1, video_tokens=1, frames=1)
            self.check(self.protocol.answer_finished(done, "ok", "stop", usage, 0.01))
        outcome = decode(payload)
        if isinstance(outcome, StreamchatError):
            return
        before = len(self.codes)
        actions = self.protocol.receive(outcome, now=self.now)
        self.check(actions)
        if not self.hello_seen and not isinstance(outcome, Hello):
            assert self.codes[before:] == ["hello_required"] and len(actions) == 1
        elif isinstance(outcome, Hello):
            assert self.codes[before:] == ([] if not self.hello_seen else ["duplicate_hello"])
            self.hello_seen = True
        assert self.protocol.state is (State.OPEN if self.hello_seen else State.AWAITING_HELLO)


sessions = st.lists(
    st.one_of(s.encoded(s.valid_maps), s.encoded(s.valid_maps), s.adversarial), max_size=24
)


def test_sessions_of_valid_and_hostile_messages() -> None:
    """Valid messages in any order, mixed with hostile ones, keep the state machine consistent."""

    def play(messages: list[s.Payload]) -> None:
        driver = Driver()
        for payload in messages:
            driver.send(payload)
        driver.protocol.close()
        assert driver.protocol.state is State.CLOSED

    ran = run_counted(EXAMPLES["sessions"], sessions, play)
    assert ran >= EXAMPLES["sessions"]
