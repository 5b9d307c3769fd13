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
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from importlib import resources

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from . import __version__, openai
from .access import KeyStore
from .config import Settings
from .endpoint import RefusedHandshakeFilter, session_endpoint
from .engine.base import Engine
from .errors import AccessError, Unauthorized
from .metrics import CONTENT_TYPE
from .server import ServerState, fit_context

__all__ = ["METRICS_PATH", "SESSION_PATH", "create_app"]

SESSION_PATH = "/v1/session"
METRICS_PATH = "/metrics"

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


async def _metrics(request: Request) -> Response:
    """Every metric family in Prometheus' text format (``docs/metrics.md``).

    With ``metrics_auth`` it takes the API keys the sessions take, as a Bearer
    token (401 otherwise). Rendered in a worker thread: a scrape never holds the loop.
    """
    state: ServerState = request.app.state.streamchat
    if state.settings.metrics_auth:
        client = request.client.host if request.client else None
        try:
            if state.admit(request.headers, client).needs_token:
                raise Unauthorized("this server's metrics need an API key: Bearer <key>")
        except AccessError as exc:
            body = {"code": exc.code, "message": exc.message}
            if isinstance(exc, Unauthorized):
                return JSONResponse(body, 401, {"WWW-Authenticate": "Bearer"})
            return JSONResponse(body, 403)
    state.metrics.engine_load(state.engine)
    text = await asyncio.to_thread(state.metrics.exposition)
    return Response(text, media_type=CONTENT_TYPE)


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
            if settings.context == "auto":  # the engine knows what is truest to its model
                resolved = dataclasses.replace(resolved, context=served.default_context)
            resolved = fit_context(resolved, served.vision_costs)
            state = ServerState(resolved, served, KeyStore.from_settings(resolved))
            if resolved.metrics_auth and not state.keys.enabled:
                raise ValueError("metrics_auth puts /metrics behind the API keys: give some")
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
            Route(METRICS_PATH, _metrics),
            WebSocketRoute(SESSION_PATH, session_endpoint),
            *openai.routes(),
            Mount("/static", StaticFiles(packages=[(__package__, "static")]), name="static"),
        ],
        lifespan=lifespan,
    )
