"""The context budget over the wire: ``ready`` tells it, and asks never carry more frames."""

from __future__ import annotations

from starlette.testclient import TestClient

from streamchat.app import SESSION_PATH, create_app
from streamchat.budget import VisionCosts
from streamchat.config import Settings
from streamchat.engine.fake import FakeEngine
from tests.support.testclient import Peer, with_image

# Frames of 56x56 cost 4 tokens a pair; 52 tokens hold the 32 of answer and reserve
# and at most 3 frames (cut into up to 4 clips, each padded to whole pairs).
SETTINGS = Settings(min_pixels=28 * 28, max_pixels=56 * 56, max_tokens_limit=16, context_reserve=16)
COSTS = VisionCosts(max_model_len=52, factor=28)


def test_ready_tells_the_budget_and_asks_are_thinned_to_it() -> None:
    """A window larger than the context holds is lowered, told in ready, and asks carry no more."""
    engine = FakeEngine(vision_costs=COSTS)
    with TestClient(create_app(SETTINGS, engine=engine)) as client:
        with client.websocket_connect(SESSION_PATH) as ws:
            peer = Peer(ws)
            peer.send({"type": "hello", "window_frames": 100})
            limits = peer.recv()["limits"]
            assert limits["max_ask_frames"] == 3
            assert limits["tokens_per_frame"] == 2
            for n in range(6):
                with_image(peer, pts=n * 0.5)
            peer.send({"type": "ask", "id": "a", "text": "what?", "last_seconds": 100})
            peer.answer("a")
    (request,) = engine.requests
    assert len(request.frames) == 3
    # Thinned evenly over the window, not cut from one end.
    assert request.frames[0].pts < request.frames[-1].pts


def test_the_default_window_is_lowered_when_it_does_not_fit() -> None:
    """With no window asked for, the session gets the lowered default."""
    engine = FakeEngine(vision_costs=COSTS)
    with TestClient(create_app(SETTINGS, engine=engine)) as client:
        with client.websocket_connect(SESSION_PATH) as ws:
            peer = Peer(ws)
            peer.send({"type": "hello"})
            assert peer.recv()["limits"]["window_frames"] == 3
