"""The real vLLM engine on the tiny model, and a live server around it.

Shared by the test packages that need both (``tests/e2e``, ``tests/browser``):
each opens one engine for the whole package (15-60 s to start here) and one
uvicorn server in the test's event loop, so a test can look at the server's
state and at the engine directly, which is how tests prove that nothing is
left running without timing anything.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette

from streamchat.app import create_app
from streamchat.config import Settings
from streamchat.engine.tiny_model import build_tiny_model
from streamchat.engine.vllm import VllmEngine, make_engine_args, open_vllm_engine
from streamchat.server import ServerState
from tests.servers import serve, ws_url

__all__ = ["Live", "live_server", "tiny_engine"]


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


@contextlib.asynccontextmanager
async def tiny_engine(directory: Path, **overrides: Any) -> AsyncIterator[VllmEngine]:
    """The tiny Qwen2-VL model built in ``directory``, served by a started vLLM engine."""
    model = build_tiny_model(directory / "tiny-qwen2-vl")
    async with open_vllm_engine(make_engine_args(model, **overrides)) as engine:
        yield engine


@contextlib.asynccontextmanager
async def live_server(settings: Settings, engine: VllmEngine) -> AsyncIterator[Live]:
    """A streamchat app on ``engine``, served on a loopback port."""
    app = create_app(settings, engine=engine)
    async with serve(app, ws_max_size=settings.transport_max_bytes) as base:
        yield Live(ws_url(base), base, engine, app)
