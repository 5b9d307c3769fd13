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
from collections import Counter
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
from .access import KeyStore
from .budget import VisionCosts, plan
from .config import Settings
from .endpoint import session_endpoint
from .engine.base import Engine
from .errors import CloseCode, ServerBusy
from .prompt import MAX_CLIPS

if TYPE_CHECKING:
    from .session import Session

__all__ = ["SESSION_PATH", "ServerState", "create_app"]

SESSION_PATH = "/v1/session"

logger = logging.getLogger("streamchat.app")

EngineFactory = Callable[[], AbstractAsyncContextManager[Engine]]


@dataclass(eq=False)
class ServerState:
    """What every session of one app shares."""

    settings: Settings
    engine: Engine
    keys: KeyStore = field(default_factory=KeyStore)
    sessions: set[Session] = field(default_factory=set)
    closing: bool = False
    """Shutting down: new sessions are refused."""
    _per_client: Counter[str] = field(default_factory=Counter)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def reserve(self, identity: str) -> None:
        """Count a new session against the limits, or raise :class:`ServerBusy`.

        Synchronous, so the check and the count cannot be split by another
        handshake; :meth:`release` gives the place back.
        """
        s = self.settings
        if self.closing:
            raise ServerBusy("the server is shutting down")
        if self._per_client.total() >= s.max_sessions:
            raise ServerBusy(f"the server is full ({s.max_sessions} sessions): try again later")
        if self._per_client[identity] >= s.max_sessions_per_client:
            raise ServerBusy(
                f"at most {s.max_sessions_per_client} sessions per client: close one first"
            )
        self._per_client[identity] += 1

    def release(self, identity: str) -> None:
        self._per_client[identity] -= 1
        if self._per_client[identity] <= 0:
            del self._per_client[identity]

    async def drain(self, timeout: float) -> None:
        """Stop gracefully: refuse new sessions, tell open ones, let answers finish.

        Answers still running after ``timeout`` end with ``finish_reason``
        ``shutdown``; then every session is closed with 1001 (going away).
        """
        self.closing = True
        sessions = list(self.sessions)
        logger.info("shutting down: %d session(s) open", len(sessions))
        reason = "the server is shutting down"
        await asyncio.gather(*(s.going_away(reason, timeout) for s in sessions))
        await asyncio.gather(*(s.wait_answers(timeout) for s in sessions))

        async def close(session: Session) -> None:
            await session.abort_answers("shutdown")
            await session.close_soon(CloseCode.GOING_AWAY, reason)

        # Side by side: a session whose client reads nothing waits out its send timeout alone.
        await asyncio.gather(*(close(session) for session in sessions))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.send_timeout + 1.0):
                await self.wait_sessions(0)

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


def _fit_context(settings: Settings, costs: VisionCosts | None) -> Settings:
    """Settings whose window fits the model's context (see :mod:`streamchat.budget`).

    Raises ``ValueError`` when not even a couple of frames fit: the server
    must not start and fail on every question.
    """
    if costs is None:
        return settings
    fitted = plan(
        costs,
        window_frames=settings.window_frames,
        max_pixels=settings.max_pixels,
        answer_tokens=settings.max_tokens_limit,
        reserve_tokens=settings.context_reserve,
        max_clips=MAX_CLIPS,
    )
    if fitted.lowered_from is not None:
        logger.warning(
            "a window of %d frames does not fit the model's context of %d tokens "
            "(%d tokens a frame, %d for answers, %d reserved): lowered to %d frames",
            fitted.lowered_from,
            costs.max_model_len,
            fitted.tokens_per_frame,
            settings.max_tokens_limit,
            settings.context_reserve,
            fitted.window_frames,
        )
    logger.info(
        "context: %d tokens, %d a frame, at most %d frames a question",
        costs.max_model_len,
        fitted.tokens_per_frame,
        fitted.max_ask_frames,
    )
    return dataclasses.replace(
        settings,
        window_frames=fitted.window_frames,
        max_ask_frames=fitted.max_ask_frames,
        tokens_per_frame=fitted.tokens_per_frame,
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
            resolved = _fit_context(resolved, served.vision_costs)
            app.state.streamchat = ServerState(resolved, served, KeyStore.from_settings(resolved))
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
