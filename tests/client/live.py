"""A live streamchat server for the client tests, shared by their conftest and test module.

Kept out of ``conftest.py`` because pytest imports that under its own module
name; importing it again from a test would load a second copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from streamchat.app import create_app
from streamchat.config import Settings
from streamchat.engine.fake import FakeEngine
from tests.servers import serve, ws_url

__all__ = ["CLIP_FPS", "CLIP_SECONDS", "LiveServer", "StartServer", "start_live_server"]

CLIP_SECONDS = 2.0
CLIP_FPS = 10


@dataclass
class LiveServer:
    url: str
    """The session endpoint, ``ws://127.0.0.1:PORT/v1/session``."""
    engine: FakeEngine


StartServer = Callable[..., AbstractAsyncContextManager[LiveServer]]


@contextlib.asynccontextmanager
async def start_live_server(settings: Settings | None = None) -> AsyncIterator[LiveServer]:
    """A uvicorn server with its own :class:`FakeEngine`, for the duration of the block.

    By default it may fetch from private addresses: URL tests serve their clips on loopback.
    """
    engine = FakeEngine()
    app = create_app(settings or Settings(fetch_allow_private=True), engine=engine)
    try:
        async with serve(app) as base:
            yield LiveServer(ws_url(base), engine)
    finally:
        engine.gate.set()  # never leave an answer parked in a gated engine
