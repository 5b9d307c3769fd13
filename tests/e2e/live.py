"""What the end-to-end tests share: the server's settings and a handle on it."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.applications import Starlette

from streamchat.app import ServerState
from streamchat.config import Settings
from streamchat.engine.vllm import VllmEngine

SETTINGS = Settings(
    fps=2.0,
    window_frames=16,
    min_pixels=28 * 28,
    max_pixels=112 * 112,
    max_message_bytes=256 * 1024,
    max_tokens=16,
)


@dataclass
class Live:
    url: str
    """The session endpoint, ``ws://127.0.0.1:PORT/v1/session``."""
    base: str
    engine: VllmEngine
    app: Starlette

    @property
    def state(self) -> ServerState:
        """The server's shared state (created by the app's lifespan)."""
        state: ServerState = self.app.state.streamchat
        return state
