"""The fields newer servers add to ``ready``, ``video.status`` and ``answer.done``, and where the
CLI shows them.

Every new field is optional with a default, so the client still works with a
server that does not send it; a field that is sent must have its type.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from streamchat.config import Settings
from streamchat_client import ProtocolViolation, PushStats, connect
from streamchat_client.display import Display
from streamchat_client.inbox import Inbox
from streamchat_client.messages import parse_done, parse_ready, parse_status
from tests.client.scripted import LIMITS
from tests.support.live import Live

STATUS: dict[str, Any] = {
    "type": "video.status", "source": 1, "state": "decoding", "frames": 4, "span": 1.5,
    "first_pts": 0.0, "last_pts": 1.5, "decode_lag": 0.25, "backlog_bytes": 2048,
    "frames_decoded": 4, "frames_dropped": 0, "bytes_received": 4096,
}  # fmt: skip


def _ready(**limits: Any) -> dict[str, Any]:
    return {
        "type": "ready",
        "session": "s",
        "model": "m",
        "protocol": 1,
        "limits": {**LIMITS, **limits},
    }


def test_new_fields_are_optional_and_typed() -> None:
    """An older server's ready and status parse with the new fields None; a newer server's
    carry them; a mistyped one is a protocol violation naming the field."""
    old = parse_ready(_ready()).limits
    assert (old.message_burst, old.tokens_per_frame, old.max_ask_frames) == (None, None, None)
    new = parse_ready(_ready(message_burst=400, tokens_per_frame=66, max_ask_frames=24)).limits
    assert (new.message_burst, new.tokens_per_frame, new.max_ask_frames) == (400, 66, 24)
    with pytest.raises(ProtocolViolation, match="tokens_per_frame"):
        parse_ready(_ready(tokens_per_frame="66"))

    status = parse_status(STATUS)
    assert (status.width, status.height) == (None, None)
    status = parse_status({**STATUS, "width": 168, "height": 308})
    assert (status.width, status.height) == (168, 308)
    with pytest.raises(ProtocolViolation, match="height"):
        parse_status({**STATUS, "width": 168, "height": 308.5})


USAGE = {"prompt_tokens": 1, "completion_tokens": 1, "video_tokens": 0, "frames": 0,
         "time_to_first_token": None}  # fmt: skip


def test_cached_tokens_are_optional_and_typed() -> None:
    """answer.done's usage.cached_tokens is None from an older server, the count from a newer
    one; a mistyped one is a protocol violation naming the field."""
    done: dict[str, Any] = {"type": "answer.done", "id": "q", "finish_reason": "stop"}
    assert parse_done({**done, "usage": USAGE}).usage.cached_tokens is None
    assert parse_done({**done, "usage": {**USAGE, "cached_tokens": 0}}).usage.cached_tokens == 0
    with pytest.raises(ProtocolViolation, match="cached_tokens"):
        parse_done({**done, "usage": {**USAGE, "cached_tokens": 1.5}})


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"type": "answer.delta", "id": "q1"}, "text"),
        ({"type": "answer.delta", "id": 7, "text": "x"}, "id"),
        ({"type": "answer.done", "finish_reason": "stop", "usage": USAGE}, "id"),
        ({"type": "going_away", "reason": "stopping"}, "timeout"),
    ],
)
def test_every_server_message_is_checked_field_by_field(
    message: dict[str, Any], field: str
) -> None:
    """A delta, a done or a going_away with a field missing or mistyped is a protocol violation
    naming the field, as ready and video.status are."""
    with pytest.raises(ProtocolViolation, match=f"'{field}'"):
        Inbox(max_errors=1).dispatch(message)


def test_messages_the_client_does_not_read_are_ignored() -> None:
    """A later version's message type, and a stray ready, change nothing and raise nothing."""
    inbox = Inbox(max_errors=1)
    inbox.dispatch({"type": "video.frame", "whatever": 1})
    inbox.dispatch({"type": "ready"})
    assert (inbox.status, list(inbox.errors), inbox.going_away) == (None, [], None)


def test_cli_shows_frame_size_and_the_frame_budget() -> None:
    """The progress line says the size of the frames the model gets, the session line the
    frame budget, and --json passes both on, with a ready line first."""
    err = io.StringIO()
    display = Display(out=io.StringIO(), err=err)
    display.ready(parse_ready(_ready(tokens_per_frame=66, max_ask_frames=24)))
    display.status(parse_status({**STATUS, "width": 168, "height": 308}))
    display.pushed(PushStats("clip.mp4", container="mp4", codec="h264", remuxed=True))
    lines = err.getvalue().splitlines()
    assert lines[0].endswith("at most 24 per question, 66 tokens a frame")
    assert "4 frames (1.5 s buffered, 168x308)" in lines[1]
    assert "pushing clip.mp4: h264, remuxed into fragmented MP4 without re-encoding" in lines

    out = io.StringIO()
    json_display = Display(out=out, err=io.StringIO(), json_lines=True)
    json_display.ready(parse_ready(_ready(tokens_per_frame=66, max_ask_frames=24)))
    json_display.status(parse_status({**STATUS, "width": 168, "height": 308}))
    ready, status = (json.loads(line) for line in out.getvalue().splitlines())
    assert ready["type"] == "ready"
    assert (ready["limits"]["tokens_per_frame"], ready["limits"]["max_ask_frames"]) == (66, 24)
    assert (status["type"], status["width"], status["height"]) == ("video.status", 168, 308)


async def test_a_live_server_tells_its_burst_and_frame_budget(server: Live) -> None:
    """The server's ready carries message_burst and the frame budget, which is 0 (not known)
    with the scripted engine, whose frames cost nothing it could count."""
    async with connect(server.url) as session:
        limits = session.limits
    assert limits.message_burst == Settings().message_burst
    assert (limits.tokens_per_frame, limits.max_ask_frames) == (0, 0)
