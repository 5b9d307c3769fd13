"""uvicorn's server with streamchat's graceful shutdown, and its one configuration.

On the first SIGTERM (or Ctrl-C) the server stops admitting sessions, tells
every open one it is going away, lets answers in flight finish for up to
``shutdown_timeout`` seconds, ends the rest with ``finish_reason``
``shutdown``, closes each WebSocket with 1001, and only then lets uvicorn
stop, which shuts the engine (and its worker processes) down in the app's
lifespan. A second signal skips the wait.

:func:`server_config` is the one uvicorn configuration: ``streamchat serve``,
the test servers, the benchmarks and the compliance runner build it there.
:func:`serve_in_loop` runs the same server in an event loop that is already
running, so the app can share what is bound to that loop (a vLLM engine):
the tests' in-process servers and the engine benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import AsyncIterator
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette

from .config import Settings
from .transport import ServerConfig

__all__ = ["GracefulServer", "listening_socket", "serve_in_loop", "server_config"]

logger = logging.getLogger("streamchat.serving")


def server_config(app: Any, settings: Settings, **options: Any) -> ServerConfig:
    """uvicorn's configuration for ``app`` under ``settings``.

    The protocols (and the limits of request heads, write buffers and pings)
    are :class:`~streamchat.transport.ServerConfig`'s: uvicorn's httptools (or
    h11) and ``websockets-sansio``, the WebSocket implementation chosen on the
    Autobahn compliance run (docs/security.md), subclassed. ``options`` are
    uvicorn's (host, port, log level, lifespan; tests also change the pings
    and ``ws_max_size``), given over the values here.
    """
    values: dict[str, Any] = {
        "ws_per_message_deflate": False,  # only burns CPU on already-compressed video
        "ws_max_size": settings.transport_max_bytes,
        "ws_ping_interval": settings.ping_interval,
        "ws_ping_timeout": settings.ping_timeout,
        "timeout_graceful_shutdown": math.ceil(settings.send_timeout) + 5,
    }
    values.update(options)
    return ServerConfig(app, stall_timeout=settings.send_timeout, **values)


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self.app = app
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if sockets and self.started:
            # uvicorn says it is running only on sockets it bound itself; on ours too, in its
            # words, once the app has started: operators and tests wait for this line.
            host, port = sockets[0].getsockname()[:2]
            logging.getLogger("uvicorn.error").info(
                "Uvicorn running on %s://%s:%d (Press CTRL+C to quit)",
                "https" if self.config.ssl else "http",
                f"[{host}]" if ":" in host else host,
                port,
            )

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or self._draining is not None or self.should_exit:
            super().handle_exit(sig, frame)  # not started yet, or asked twice: stop now
            return
        self._loop.call_soon_threadsafe(self.begin_drain)

    def begin_drain(self) -> None:
        """Start the graceful shutdown (what the first signal does)."""
        if self._draining is None:
            self._draining = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        state = getattr(self.app.state, "streamchat", None)
        try:
            if state is not None:
                await state.drain(state.settings.shutdown_timeout)
        except Exception:
            logger.exception("graceful shutdown failed; stopping now")
        finally:
            self.should_exit = True


def listening_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: any free port; IPv6 if ``host`` has a ``:``)
    and listening.

    Clients may connect as soon as it returns: the kernel queues them until
    the server accepts, so nobody waits for a "started" flag. Its protocol is
    ``IPPROTO_TCP``, not 0, as the sockets uvicorn makes itself are: asyncio
    turns Nagle's algorithm off only on sockets that say TCP (accepted ones
    inherit it); with 0, an answer's deltas after the first wait ~40 ms for
    the client's delayed ACK.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


@contextlib.asynccontextmanager
async def serve_in_loop(
    app: Any, settings: Settings, sock: socket.socket, **options: Any
) -> AsyncIterator[GracefulServer]:
    """Serve ``app`` on ``sock`` (listening) in the running event loop until the block ends.

    The server is ``streamchat serve``'s (:class:`GracefulServer` on
    :func:`server_config`, ``options`` given over it); leaving the block stops
    it as a second signal would (``should_exit``) and waits until it has. The
    socket stays the caller's.
    """
    server = GracefulServer(server_config(app, settings, **options), app)
    serving = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    try:
        yield server
    finally:
        server.should_exit = True
        await serving
