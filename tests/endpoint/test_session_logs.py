"""Every line a session logs names the session, whichever layer logs it."""

from __future__ import annotations

import contextvars
import logging
from typing import Any

import msgpack
import pytest
from starlette.testclient import TestClient

from streamchat.app import SESSION_PATH, create_app
from streamchat.config import Settings
from streamchat.engine.fake import FakeEngine
from streamchat.sessionlog import SessionLog
from tests.support.media import chunks, encode_video

SETTINGS = Settings(max_message_bytes=64 * 1024, min_pixels=28 * 28, max_pixels=56 * 56)


def send(ws: Any, message: dict[str, Any]) -> None:
    ws.send_bytes(msgpack.packb(message, use_bin_type=True))


def until(ws: Any, done: Any) -> dict[str, Any]:
    """The first message ``done`` holds true of, reading past the others."""
    while True:
        message: dict[str, Any] = msgpack.unpackb(ws.receive_bytes())
        if done(message):
            return message


def hello(ws: Any) -> str:
    send(ws, {"type": "hello", "fps": 2})
    ready = until(ws, lambda m: True)
    assert ready["type"] == "ready"
    session: str = ready["session"]
    return session


def source_over(message: dict[str, Any]) -> bool:
    return message["type"] == "video.status" and message["state"] in ("ended", "failed")


def test_every_line_of_two_sessions_at_once_names_its_own_session(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One session pushes video and asks, the other has a URL refused: each line logged while
    they run (the endpoint's, the session's, the decoder thread's, the fetch's) begins with the
    id of the session it is about, and carries it as the record's ``session``."""
    with TestClient(create_app(SETTINGS, engine=FakeEngine())) as client:
        caplog.set_level(logging.DEBUG, logger="streamchat")
        caplog.clear()
        with (
            client.websocket_connect(SESSION_PATH) as pushing,
            client.websocket_connect(SESSION_PATH) as fetching,
        ):
            pusher, fetcher = hello(pushing), hello(fetching)
            for piece in chunks(encode_video(seconds=1.0), 4096):
                send(pushing, {"type": "video.chunk", "data": piece, "format": "webm"})
            send(pushing, {"type": "video.end"})
            assert until(pushing, source_over)["state"] == "ended"
            send(fetching, {"type": "video.url", "url": "http://127.0.0.1/clip.webm"})
            assert until(fetching, source_over)["state"] == "failed"
            send(pushing, {"type": "ask", "id": "q", "text": "what?"})
            assert until(pushing, lambda m: m["type"] == "answer.done")["finish_reason"] == "stop"
    # The test client cancels a session's task when its socket closes, so whether the
    # endpoint's "closed" lines make it in varies; every line that does is checked.
    records = list(caplog.records)
    owner = {pusher: "pushing", fetcher: "fetching"}
    lines = [(r.name, getattr(r, "session", None), r.getMessage()) for r in records]
    assert all(
        session in owner and message.startswith(f"session {session}: ")
        for _, session, message in lines
    ), lines
    by_layer = {
        name: {owner[session] for layer, session, _ in lines if layer == name}
        for name in ("streamchat.session", "streamchat.decoder", "streamchat.fetch")
    }
    assert by_layer == {
        "streamchat.session": {"pushing", "fetching"},
        "streamchat.decoder": {"pushing"},
        "streamchat.fetch": {"fetching"},
    }


def test_lines_of_the_layers_below_are_tagged_only_inside_a_tagged_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The decoder's, the fetcher's and the engine's lines get a session's prefix only where
    a session tagged the context they run in: start-up lines and direct calls stay as they are."""
    caplog.set_level(logging.INFO, logger="streamchat")

    def in_a_session() -> None:
        SessionLog(logging.getLogger("streamchat.session"), "abc").tag_task()
        logging.getLogger("streamchat.fetch").info("fetching from %s", "video.example")

    logging.getLogger("streamchat.decoder").info("before")
    contextvars.copy_context().run(in_a_session)
    logging.getLogger("streamchat.engine").info("after")
    said = [(r.getMessage(), getattr(r, "session", None)) for r in caplog.records]
    assert said == [
        ("before", None),
        ("session abc: fetching from video.example", "abc"),
        ("after", None),
    ]
