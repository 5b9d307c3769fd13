"""Opening a session: the WebSocket handshake, ``hello`` and ``ready``.

Every way opening can fail becomes one :class:`ConnectError` (nothing
listening, a bad URL, a refused handshake with the server's HTTP status and
error code, no ``ready`` in time) or the :class:`ServerError` the server sent
instead of ``ready``. The connection is closed on every failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from .errors import ConnectError, ProtocolViolation
from .messages import Encoding, Ready, decode, encode, hello_message, parse_error, parse_ready

__all__ = ["CLOSE_TIMEOUT", "MAX_SERVER_MESSAGE_BYTES", "hello_message", "open_session"]

MAX_SERVER_MESSAGE_BYTES = 1024 * 1024
"""The server sends only small maps (statuses, deltas, errors); anything bigger is a fault."""
CLOSE_TIMEOUT = 5.0


async def open_session(
    url: str,
    hello: Mapping[str, Any],
    *,
    encoding: Encoding,
    open_timeout: float,
    api_key: str | None,
) -> tuple[ClientConnection, Ready]:
    """Connect to ``url``, send ``hello`` and wait for ``ready``."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    try:
        websocket = await ws_connect(
            url,
            additional_headers=headers,
            open_timeout=open_timeout,
            close_timeout=CLOSE_TIMEOUT,
            max_size=MAX_SERVER_MESSAGE_BYTES,
            # Video is already compressed: deflate would only burn CPU on both ends.
            compression=None,
        )
    except InvalidStatus as exc:
        raise _refused(url, exc) from exc
    except (OSError, TimeoutError, InvalidURI, InvalidHandshake) as exc:
        raise ConnectError(f"cannot connect to {url}: {exc}") from exc
    try:
        await websocket.send(encode(dict(hello), encoding))
        async with asyncio.timeout(open_timeout):
            reply = decode(await websocket.recv())
        if reply["type"] == "error":
            raise parse_error(reply)
        if reply["type"] != "ready":
            raise ProtocolViolation(f"expected 'ready', got {reply['type']!r}")
        return websocket, parse_ready(reply)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            await websocket.close()
        if isinstance(exc, ConnectionClosed):
            raise ConnectError(f"{url} closed the connection before 'ready'") from exc
        if isinstance(exc, TimeoutError):
            raise ConnectError(f"{url} sent no 'ready' within {open_timeout} s") from exc
        raise


def _refused(url: str, exc: InvalidStatus) -> ConnectError:
    """The server answered the handshake with an HTTP error: say which, and why."""
    status = exc.response.status_code
    code: str | None = None
    message = exc.response.reason_phrase
    with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
        body = json.loads(exc.response.body or b"")
        code, message = str(body["code"]), str(body["message"])
    return ConnectError(
        f"{url} refused the session (HTTP {status}): {message}", status=status, code=code
    )
