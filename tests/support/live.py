"""Live servers in the test's own event loop, in the spirit of uvicorn's ``run_server``.

Each server is ``streamchat serve``'s: :class:`~streamchat.serving.GracefulServer`
on :func:`~streamchat.serving.server_config` with the app's own settings (so
the WebSocket size limit, pings and stall timeout are what those settings give
an operator), via :func:`~streamchat.serving.serve_in_loop`. The socket listens
before uvicorn starts, so a client may connect at once: no test waits (or
sleeps) for a "started" flag. Serving in the test's loop lets the server share
a session-wide vLLM engine, which is bound to that loop, and lets a test read
the server's state and its engine directly, which is how tests prove that
nothing is left running without timing anything.

* :func:`live_server`: a streamchat app (the scripted engine unless given one),
  as a :class:`Live`;
* :func:`serve`: any ASGI app, its base URL;
* :func:`serve_files`: a plain static HTTP server for URL sources.

``streamchat serve`` as a process of its own is :mod:`tests.support.process`.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from starlette.applications import Starlette
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from streamchat.app import SESSION_PATH, create_app
from streamchat.config import Settings
from streamchat.engine.fake import FakeEngine
from streamchat.server import ServerState
from streamchat.serving import GracefulServer, listening_socket, serve_in_loop

__all__ = ["Live", "live_server", "serve", "serve_files", "ws_url"]

E = TypeVar("E")


@dataclass
class Live(Generic[E]):
    """A streamchat server running in the test's loop."""

    url: str
    """The session endpoint, ``ws://127.0.0.1:PORT/v1/session``."""
    base: str
    """``http://127.0.0.1:PORT``."""
    port: int
    app: Starlette
    engine: E
    server: GracefulServer
    _running: contextlib.AsyncExitStack = field(repr=False)

    @property
    def state(self) -> ServerState:
        """The server's shared state (created by the app's lifespan)."""
        state: ServerState = self.app.state.streamchat
        return state

    async def stop(self) -> None:
        """Stop serving now, as a second SIGTERM would; return once uvicorn has stopped."""
        await self._running.aclose()


def ws_url(base: str) -> str:
    """The session endpoint of the server at ``base`` (``http://host:port``)."""
    return base.replace("http://", "ws://") + SESSION_PATH


@contextlib.asynccontextmanager
async def _serving(
    app: ASGIApp,
    settings: Settings,
    send_buffer: int | None,
    options: dict[str, Any],
) -> AsyncIterator[tuple[int, GracefulServer, contextlib.AsyncExitStack]]:
    """The server on a fresh loopback port; the stack that stops it (early, if a test asks)."""
    with listening_socket() as sock:
        if send_buffer is not None:
            # Accepted connections inherit it: a test fills a client's share of the kernel
            # buffers at once, as a slow link would, instead of after megabytes.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        async with contextlib.AsyncExitStack() as running:
            options = {"log_level": "warning", "lifespan": "on", **options}
            server = await running.enter_async_context(
                serve_in_loop(app, settings, sock, **options)
            )
            yield sock.getsockname()[1], server, running


@contextlib.asynccontextmanager
async def live_server(
    settings: Settings | None = None,
    engine: Any = None,
    *,
    send_buffer: int | None = None,
    **options: Any,
) -> AsyncIterator[Live[Any]]:
    """A streamchat app on ``engine`` (a new :class:`FakeEngine` if none), served on loopback.

    ``send_buffer`` sets the kernel send buffer of every accepted connection;
    ``options`` are uvicorn's (``log_level``, ...). A scripted engine's gate is
    opened on the way out: no answer stays parked in it.
    """
    settings = settings or Settings()
    engine = FakeEngine() if engine is None else engine
    app = create_app(settings, engine=engine)
    try:
        async with _serving(app, settings, send_buffer, options) as (port, server, running):
            base = f"http://127.0.0.1:{port}"
            yield Live(ws_url(base), base, port, app, engine, server, running)
    finally:
        if isinstance(engine, FakeEngine):
            engine.gate.set()


@contextlib.asynccontextmanager
async def serve(
    app: ASGIApp, settings: Settings | None = None, **options: Any
) -> AsyncIterator[str]:
    """Serve any ASGI ``app`` on loopback and yield its ``http://host:port`` base URL.

    ``settings`` give the transport's limits (the defaults if none): for a
    streamchat app built by the test, pass the settings it was built with.
    """
    async with _serving(app, settings or Settings(), None, options) as (port, _, _):
        yield f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def serve_files(root: Path) -> AsyncIterator[str]:
    """A plain static HTTP server for URL sources (``tests.support.httpfiles`` does ranges)."""
    async with serve(StaticFiles(directory=root), lifespan="off") as base:
        yield base
