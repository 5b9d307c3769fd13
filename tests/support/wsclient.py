"""A bare msgpack WebSocket client, for tests the bundled client would get in the way of.

Speaking the protocol by hand lets a test read nothing, send what no client
sends, flood, or keep a connection in a state the bundled client never leaves.
"""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.support.media import encode_image

__all__ = ["IMAGE", "closed_code", "open_session", "open_ws", "recv", "send"]

IMAGE = encode_image(width=64, height=48)
"""A small frame to ask about."""


async def open_ws(url: str, **options: Any) -> ClientConnection:
    """A WebSocket to ``url``: no compression (as the bundled client), no proxy from the env."""
    return await connect(url, compression=None, proxy=None, **options)


async def send(ws: ClientConnection, **message: Any) -> None:
    await ws.send(msgpack.packb(message, use_bin_type=True))


async def recv(ws: ClientConnection, *types: str) -> dict[str, Any]:
    """The next message of one of ``types``, skipping status updates and deltas."""
    while True:
        message = dict(msgpack.unpackb(await ws.recv()))
        if not types or message["type"] in types:
            return message
        assert message["type"] in ("video.status", "answer.delta"), message


async def open_session(url: str, **options: Any) -> ClientConnection:
    """A session past ``hello`` (answers of up to 4096 tokens) with :data:`IMAGE` in its window."""
    ws = await open_ws(url, **options)
    await send(ws, type="hello", generation={"max_tokens": 4096})
    assert (await recv(ws))["type"] == "ready"
    await send(ws, type="image", data=IMAGE)
    await recv(ws, "video.status")
    return ws


async def closed_code(ws: ClientConnection) -> int | None:
    """Read until the server closes; the close code."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            await ws.recv()
    return ws.close_code
