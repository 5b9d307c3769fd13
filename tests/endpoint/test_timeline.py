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
from tests.support.media import encode_video
from tests.support.testclient import SMALL, Peer, push_video, until_source_ends, with_image


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


@pytest.mark.parametrize("context", ["timeline", "window"])
def test_frames_after_a_timeline_ask_are_handed_to_the_engine_ahead_of_the_next(
    context: ContextKind,
) -> None:
    """Once a timeline session has asked, each new frame hands the engine what the next ask
    would carry (for it to compute ahead); a window session never does."""
    engine = FakeEngine()
    settings = dataclasses.replace(SMALL, context=context)
    with TestClient(create_app(settings, engine=engine)) as client:
        with client.websocket_connect(SESSION_PATH) as ws:
            peer = Peer(ws)
            peer.send({"type": "hello", "window_frames": 8})
            session = peer.recv()["session"]
            for pts in (0.0, 0.5):
                with_image(peer, pts=pts)
                peer.recv_type("video.status")
            assert list(engine.prefills) == []  # no ask yet: nothing to extend
            peer.send({"type": "ask", "id": "a", "text": "what?"})
            peer.answer("a")
            with_image(peer, pts=1.0)
            peer.recv_type("video.status")
            expected = [(session, 3, 1.0)] if context == "timeline" else []
            assert list(engine.prefills) == expected


def test_decoded_video_frames_are_handed_to_the_engine_ahead_of_the_next_ask() -> None:
    """On a timeline session that asked, every frame a video source decodes hands the engine
    the newest frames an ask would carry, the one just decoded last."""
    engine = FakeEngine()
    settings = dataclasses.replace(SMALL, context="timeline")
    with TestClient(create_app(settings, engine=engine)) as client:
        with client.websocket_connect(SESSION_PATH) as ws:
            peer = Peer(ws)
            peer.send({"type": "hello", "window_frames": 8, "fps": 2})
            session = peer.recv()["session"]
            for pts in (0.0, 0.5):
                with_image(peer, pts=pts)
                peer.recv_type("video.status")
            peer.send({"type": "ask", "id": "a", "text": "what?"})
            peer.answer("a")
            clip = encode_video(container="webm", codec="vp8", fps=10, seconds=2.0)
            push_video(peer, clip, fmt="webm")
            peer.send({"type": "video.end"})
            status = until_source_ends(peer)
            assert status["state"] == "ended" and status["frames"] == 4
    handed = [(s, pts) for s, _, pts in engine.prefills]
    first = status["first_pts"]
    assert handed == [(session, pytest.approx(first + i / 2, abs=0.06)) for i in range(4)]
