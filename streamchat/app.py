"""The Starlette application: routes and the engine's lifecycle.

``create_app`` is a factory with no module-level state. The engine is either
given (tests share one across apps) or opened by ``engine_factory`` inside the
app's lifespan, so it starts before the first session and is shut down, with
its worker processes, when the server stops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from importlib import resources

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from . import __version__, openai
from .access import KeyStore
from .config import Settings
from .endpoint import RefusedHandshakeFilter, session_endpoint
from .engine.base import Engine
from .server import ServerState, fit_context

__all__ = ["SESSION_PATH", "create_app"]

SESSION_PATH = "/v1/session"

logger = logging.getLogger("streamchat.app")

EngineFactory = Callable[[], AbstractAsyncContextManager[Engine]]


def _index_route() -> Route:
    """The browser page (``static/index.html``), read once; its assets are under ``/static``."""
    page = resources.files(__package__).joinpath("static", "index.html").read_text("utf-8")

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    return Route("/", index)


async def _health(request: Request) -> JSONResponse:
    """``200 ok``, or ``503`` when the engine has failed or the server is shutting down."""
    state: ServerState = request.app.state.streamchat
    status = "ok"
    if not state.engine.healthy():
        status = "engine_failed"
    elif state.closing:
        status = "shutting_down"
    return JSONResponse(
        {
            "status": status,
            "version": __version__,
            "model": state.engine.model_name,
            "sessions": len(state.sessions),
            "requests_running": len(state.engine.running()),
        },
        200 if status == "ok" else 503,
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
            resolved = fit_context(resolved, served.vision_costs)
            state = ServerState(resolved, served, KeyStore.from_settings(resolved))
            await openai.warm()
            app.state.streamchat = state
            if not state.keys.enabled:
                logger.info(
                    "auth is off: anyone who can connect may use this server; browser pages "
                    "only from %s",
                    ", ".join(resolved.allowed_origins)
                    or "their own origin on localhost or an IP address (others: --allow-origin)",
                )
            # The ASGI server's own lines about each refused handshake would undo RefusalLog.
            quiet = RefusedHandshakeFilter()
            uvicorn_log = logging.getLogger("uvicorn.error")
            uvicorn_log.addFilter(quiet)
            try:
                yield
            finally:
                uvicorn_log.removeFilter(quiet)
                state.flush_refusals()
                await state.videos.aclose()

    return Starlette(
        routes=[
            _index_route(),
            Route("/health", _health),
            WebSocketRoute(SESSION_PATH, session_endpoint),
            *openai.routes(),
            Mount("/static", StaticFiles(packages=[(__package__, "static")]), name="static"),
        ],
        lifespan=lifespan,
    )
