"""The WebSocket loop: receive -> decode -> session; outbox -> encode -> send.

Receiving never stops while a session lives, so a disconnect is seen the
moment it happens (not when an answer next tries to send) and the session's
engine requests are aborted at once. A single writer task sends everything,
in the encoding (msgpack or JSON) of the client's most recent message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import TYPE_CHECKING

from starlette.websockets import WebSocket, WebSocketDisconnect

from .errors import MessageTooLarge, StreamchatError
from .messages import decode_client, encode_server
from .session import Session

if TYPE_CHECKING:
    from .app import ServerState

__all__ = ["session_endpoint"]

logger = logging.getLogger("streamchat.endpoint")


async def session_endpoint(websocket: WebSocket) -> None:
    state: ServerState = websocket.app.state.streamchat
    await websocket.accept()
    session = Session(state.settings, state.engine, session_id=uuid.uuid4().hex[:12])
    await state.add(session)
    logger.info("session %s opened", session.id)
    wire = _Wire(websocket)
    writer = asyncio.create_task(wire.drain(session), name=f"writer-{session.id}")
    try:
        await _receive_loop(websocket, session, wire, state.settings.max_message_bytes)
    finally:
        await session.aclose()
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await state.discard(session)
        logger.info("session %s closed", session.id)


class _Wire:
    """Encodes outgoing messages the way the client last spoke to us."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.binary = True

    async def drain(self, session: Session) -> None:
        try:
            while True:
                message = await session.outbox.get()
                payload = encode_server(message, binary=self.binary)
                if isinstance(payload, bytes):
                    await self.websocket.send_bytes(payload)
                else:
                    await self.websocket.send_text(payload)
        except (WebSocketDisconnect, RuntimeError, OSError):
            # The peer is gone; the receive loop sees the disconnect and ends the session.
            logger.debug("session %s: send failed, peer gone", session.id)


async def _receive_loop(
    websocket: WebSocket, session: Session, wire: _Wire, max_bytes: int
) -> None:
    while True:
        event = await websocket.receive()
        if event["type"] == "websocket.disconnect":
            return
        data: bytes | str | None = event.get("bytes")
        if data is None:
            data = event.get("text")
        if data is None:
            continue
        wire.binary = isinstance(data, bytes)
        if len(data) > max_bytes:
            await session.report(
                MessageTooLarge(f"a message is limited to {max_bytes} bytes; send smaller chunks")
            )
            continue
        try:
            message = decode_client(data)
        except StreamchatError as exc:
            await session.report(exc)
            continue
        try:
            await session.handle(message)
        except Exception as exc:  # a bug: tell the client, keep the session
            logger.exception("session %s: %s failed", session.id, message.type)
            await session.report(exc)
