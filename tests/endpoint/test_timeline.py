"""The context a session gets over the wire: the server's (or the engine's) default, or hello's."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from starlette.testclient import TestClient

from streamchat.app import SESSION_PATH, create_app
from streamchat.config import ContextChoice
from streamchat.engine.base import ContextKind, GenerationRequest, TimelineContext
from streamchat.engine.fake import FakeEngine
from tests.support.testclient import SMALL, Peer, with_image


def _session(engine: FakeEngine, served: ContextChoice, hello: dict[str, Any]) -> dict[str, Any]:
    """One session on a server whose --context is ``served``: ready's limits, after one answer
    about two frames; the session is closed (and the server stopped) on return."""
    settings = dataclasses.replace(SMALL, context=served, history_turns=3)
    with TestClient(create_app(settings, engine=engine)) as client:
        with client.websocket_connect(SESSION_PATH) as ws:
            peer = Peer(ws)
            peer.send({"type": "hello", "window_frames": 8, **hello})
            ready = peer.recv()
            assert ready["type"] == "ready"
            with_image(peer, pts=0.0)
            with_image(peer, pts=0.5)
            peer.send({"type": "ask", "id": "a", "text": "what?"})
            _, done = peer.answer("a")
            assert done["finish_reason"] == "stop"
    return dict(ready)


@pytest.mark.parametrize(
    ("engine_default", "served", "hello", "told"),
    [
        ("window", "auto", {}, "window"),
        ("timeline", "auto", {}, "timeline"),
        ("timeline", "window", {}, "window"),  # the operator's --context beats the engine's
        ("window", "timeline", {}, "timeline"),
        ("timeline", "auto", {"context": "window"}, "window"),  # hello's beats both
        ("window", "auto", {"context": "timeline"}, "timeline"),
    ],
)
def test_ready_tells_the_context_the_session_got_and_its_asks_follow_it(
    engine_default: ContextKind, served: ContextChoice, hello: dict[str, Any], told: str
) -> None:
    """auto follows the engine's default_context, --context overrides it, hello overrides
    both; ready says which, with context_frames, and an ask goes on the timeline only then."""
    engine = FakeEngine()
    engine.context = engine_default
    ready = _session(engine, served, hello)
    limits = ready["limits"]
    assert limits["context"] == told
    assert limits["context_frames"] == (8 + 4 if told == "timeline" else 8)
    [request] = engine.requests
    assert isinstance(request, GenerationRequest)
    if told == "timeline":
        expected = TimelineContext(session=ready["session"], max_frames=12, keep_turns=3)
        assert request.timeline == expected
    else:
        assert request.timeline is None
    assert len(request.frames) == 2


def test_a_closed_session_ends_its_context_in_the_engine() -> None:
    """When a session closes, the engine is told to drop its context, once, by its id."""
    engine = FakeEngine()
    ready = _session(engine, "timeline", {})
    assert engine.ended_sessions == [ready["session"]]
