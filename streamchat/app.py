"""The Starlette application: routes and the engine's lifecycle.

``create_app`` is a factory with no module-level state. The engine is either
given (tests share one across apps) or opened by ``engine_factory`` inside the
app's lifespan, so it starts before the first session and is shut down, with
its worker processes, when the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from . import __version__
from .config import Settings
from .endpoint import session_endpoint
from .engine.base import Engine

if TYPE_CHECKING:
    from .session import Session

__all__ = ["SESSION_PATH", "ServerState", "create_app"]

SESSION_PATH = "/v1/session"

EngineFactory = Callable[[], AbstractAsyncContextManager[Engine]]


@dataclass(eq=False)
class ServerState:
    """What every session of one app shares."""

    settings: Settings
    engine: Engine
    sessions: set[Session] = field(default_factory=set)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def add(self, session: Session) -> None:
        async with self._changed:
            self.sessions.add(session)
            self._changed.notify_all()

    async def discard(self, session: Session) -> None:
        """Forget a session once it has fully stopped (answers aborted, decoders ended)."""
        async with self._changed:
            self.sessions.discard(session)
            self._changed.notify_all()

    async def wait_sessions(self, count: int) -> None:
        """Return once exactly ``count`` sessions are open (for tests and shutdown)."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.sessions) == count)


def _index_route() -> Route:
    """The browser page (``static/index.html``), read once; its assets are under ``/static``."""
    page = resources.files(__package__).joinpath("static", "index.html").read_text("utf-8")

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    return Route("/", index)


async def _health(request: Request) -> JSONResponse:
    state: ServerState = request.app.state.streamchat
    return JSONResponse(
        {
            "status": "ok",
            "version": __version__,
            "model": state.engine.model_name,
            "sessions": len(state.sessions),
            "requests_running": len(state.engine.running()),
        }
    )


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    engine_factory: EngineFactory | None = None,
) -> Starlette:
    """A streamchat app serving ``engine``, or one opened by ``engine_factory``."""
    if (engine is None) == (engine_factory is None):
        raise TypeError("give exactly one of engine and engine_factory")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            served = engine
            if served is None:
                assert engine_factory is not None
                served = await stack.enter_async_context(engine_factory())
            resolved = settings
            if settings.frame_factor is None and served.frame_factor is not None:
                resolved = dataclasses.replace(settings, frame_factor=served.frame_factor)
            app.state.streamchat = ServerState(resolved, served)
            yield

    return Starlette(
        routes=[
            _index_route(),
            Route("/health", _health),
            WebSocketRoute(SESSION_PATH, session_endpoint),
            Mount("/static", StaticFiles(packages=[(__package__, "static")]), name="static"),
        ],
        lifespan=lifespan,
    )
