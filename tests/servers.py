"""Real uvicorn servers on loopback ports, in the test's own event loop.

The listening socket is bound and listening before uvicorn starts, so a client
may connect at once: the kernel queues the connection until uvicorn accepts
it, and no test waits (or sleeps) for a "started" flag. Serving in the test's
loop lets the server share the session-wide vLLM engine, which is bound to
that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import uvicorn
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from streamchat.app import SESSION_PATH
from streamchat.config import Settings
from streamchat.serving import server_config


@contextlib.asynccontextmanager
async def serve(
    app: ASGIApp,
    *,
    ws_max_size: int = 16 * 1024 * 1024,
    lifespan: Literal["auto", "on", "off"] = "on",
    send_buffer: int | None = None,
    ping_interval: float | None = 20.0,
    ping_timeout: float | None = 20.0,
    log_level: str = "warning",
) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 and yield its ``http://host:port`` base URL.

    ``send_buffer`` sets the kernel's send buffer of every accepted connection
    (they inherit it from the listening socket), so a test can fill it quickly.
    """
    # IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off only on sockets whose proto
    # says TCP (accepted ones inherit it), as `streamchat serve`'s own sockets are.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    config = server_config(  # what `streamchat serve` runs
        app,
        Settings(),
        log_level=log_level,
        ws_max_size=ws_max_size,
        ws_ping_interval=ping_interval,
        ws_ping_timeout=ping_timeout,
        lifespan=lifespan,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + SESSION_PATH


@contextlib.asynccontextmanager
async def serve_files(root: Path) -> AsyncIterator[str]:
    """A plain static HTTP server for URL sources."""
    app = StaticFiles(directory=root)
    async with serve(app, lifespan="off") as base:
        yield base
