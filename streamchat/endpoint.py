"""The WebSocket connection: admit -> (read | write) -> close.

A handshake is checked before anything is accepted (origin, API key,
capacity; see :mod:`streamchat.access`) and refused with an HTTP status and a
JSON body naming the error. An admitted connection runs two tasks:

* the **reader** never stops receiving while the session lives, so a
  disconnect is seen the moment it happens and the session's engine requests
  are aborted at once. It decodes each message for the session and enforces
  message size, rate limits (see :mod:`streamchat.limits`: pushed media is
  paced by reading later, anything else over its rate is refused) and the
  idle timeout;
* the **writer** sends the session's outbox in the encoding (msgpack or JSON)
  of the client's most recent message. Each send must finish within
  ``send_timeout``: a client that stops reading is disconnected rather than
  left to stall its session (the outbox in front of it is bounded).

Whichever task ends first ends the connection; the session is then closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import msgpack
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from .access import Grant, admit, check_token
from .config import Settings
from .errors import (
    AccessError,
    CloseCode,
    IdleTimeout,
    MessageTooLarge,
    OriginNotAllowed,
    ServerBusy,
    StreamchatError,
    Unauthorized,
    close_reason,
)
from .limits import RateLimiter
from .messages import MAX_ID_CHARS, ClientMessage, Hello, decode_client, encode_server
from .protocol import message_id
from .session import Close, Session

if TYPE_CHECKING:
    from .app import ServerState

__all__ = ["session_endpoint"]

logger = logging.getLogger("streamchat.endpoint")

SHUTTING_DOWN = "the server is shutting down"
TOKEN_TIMEOUT = 10.0
"""Seconds a session admitted without a key has to send ``hello`` with one."""

PEEK_CHARS = 64 * 1024
"""How much of a message too large to parse is read for the id of the ask it may be."""

_HTTP_STATUS: dict[type[AccessError], int] = {
    Unauthorized: 401,
    OriginNotAllowed: 403,
    ServerBusy: 503,
}


async def session_endpoint(websocket: WebSocket) -> None:
    state: ServerState = websocket.app.state.streamchat
    client = websocket.client.host if websocket.client else None
    try:
        grant = admit(
            websocket.headers,
            websocket.scope.get("subprotocols", ()),
            client,
            keys=state.keys,
            allowed_origins=state.settings.allowed_origins,
        )
        state.reserve(grant.identity)
    except AccessError as exc:
        logger.info("session refused (%s): %s", exc.code, exc.message)
        await _deny(websocket, exc)
        return
    connection: _Connection | None = None
    try:
        await websocket.accept(subprotocol=grant.subprotocol)
        session = Session(state.settings, state.engine, session_id=uuid.uuid4().hex[:12])
        await state.add(session)
        session.log.info("session %s opened (%s)", session.id, grant.identity)
        connection = _Connection(websocket, session, state, grant)
        if state.closing:  # the drain began during the handshake, and did not see this one
            await session.going_away(SHUTTING_DOWN, 0.0)
            await session.close_soon(CloseCode.GOING_AWAY, SHUTTING_DOWN)
        try:
            await connection.run()
        finally:
            await session.aclose()
            await state.discard(session)
            session.log.info("session %s closed", session.id)
    finally:
        state.release(connection.identity if connection is not None else grant.identity)


async def _deny(websocket: WebSocket, exc: AccessError) -> None:
    """Refuse the handshake with an HTTP status, or a close code if HTTP is not possible."""
    status = _HTTP_STATUS.get(type(exc), 403)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if status == 503:
        headers = {"Retry-After": "5"}
    response = JSONResponse({"code": exc.code, "message": exc.message}, status, headers)
    try:
        await websocket.send_denial_response(response)
    except RuntimeError:  # the server has no denial-response extension
        await websocket.close(exc.close_code, close_reason(exc.message))


class _Connection:
    def __init__(
        self, websocket: WebSocket, session: Session, state: ServerState, grant: Grant
    ) -> None:
        self.websocket = websocket
        self.session = session
        self.state = state
        self.settings: Settings = state.settings
        self.identity = grant.identity
        """What this session counts against per-client limits (a key given in
        ``hello`` replaces the address it was admitted under)."""
        self.needs_token = grant.needs_token
        self.limits = RateLimiter(state.settings)
        self.binary = True
        self.failed = False

    async def run(self) -> None:
        id = self.session.id
        reader = asyncio.create_task(self._read(), name=f"reader-{id}")
        writer = asyncio.create_task(self._write(), name=f"writer-{id}")
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, writer):
                task.cancel()
            for task in (reader, writer):
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # -- writer -------------------------------------------------------------

    async def _write(self) -> None:
        websocket, session = self.websocket, self.session
        while True:
            item = await session.outbox.get()
            try:
                async with asyncio.timeout(self.settings.send_timeout):
                    if isinstance(item, Close):
                        await websocket.close(item.code, item.reason)
                        return
                    payload = encode_server(item, binary=self.binary)
                    if isinstance(payload, bytes):
                        await websocket.send_bytes(payload)
                    else:
                        await websocket.send_text(payload)
            except TimeoutError:
                session.log.warning(
                    "session %s: client read nothing for %g s, disconnecting",
                    session.id,
                    self.settings.send_timeout,
                )
                return
            except (WebSocketDisconnect, RuntimeError, OSError):
                # The peer is gone; the reader sees the disconnect too.
                session.log.debug("session %s: send failed, peer gone", session.id)
                return

    # -- reader -------------------------------------------------------------

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Until a session without a key at the handshake authenticates, it only
            # gets a short while: it holds a place in the server's session limits.
            idle = self.settings.idle_timeout
            if self.needs_token:
                idle = min(idle, TOKEN_TIMEOUT)
            try:
                async with asyncio.timeout(idle):
                    event = await self.websocket.receive()
            except TimeoutError:
                if self.failed or (self.session.busy and not self.needs_token):
                    continue
                await self._fail(IdleTimeout(f"nothing to do for {idle:g} s: closing"))
                continue
            if event["type"] == "websocket.disconnect":
                return
            data: bytes | str | None = event.get("bytes")
            if data is None:
                data = event.get("text")
            if data is None or self.failed:
                continue
            self.binary = isinstance(data, bytes)
            now = loop.time()
            try:
                message, delay = self._decode(data, now)
            except StreamchatError as exc:
                if exc.fatal:
                    await self._fail(exc)
                else:
                    await self.session.report(exc)
                continue
            except Exception as exc:  # a bug in decoding: tell the client, keep the session
                self.session.log.exception("session %s: decoding failed", self.session.id)
                await self.session.report(exc)
                continue
            try:
                await self.session.handle(message)
            except Exception as exc:  # a bug: tell the client, keep the session
                self.session.log.exception("session %s: %s failed", self.session.id, message.type)
                await self.session.report(exc, id=message_id(message))
            if delay > 0:
                # Pushed media over its rate is paced, never dropped: read on later.
                remaining = now + delay - loop.time()
                if remaining > 0:
                    await asyncio.sleep(remaining)

    def _decode(self, data: bytes | str, now: float) -> tuple[ClientMessage, float]:
        """Parse one incoming message and check it against every limit.

        Returns the message and how long to wait before reading the next one
        (pushed media over its byte rate). A message is parsed before it is
        charged: which budget it counts against depends on its type, and a
        refusal of an ``ask`` must name its id. Parsing is
        bounded all the same: nothing over ``max_message_bytes`` is parsed,
        and a client sending over its message rate is refused, then closed.
        Messages refused before they are read count against the message rate.
        """
        max_bytes = self.settings.max_message_bytes
        size = len(data)
        if isinstance(data, str) and size * 4 > max_bytes:
            size = len(data.encode("utf-8", "surrogatepass"))  # text frames: bytes, not characters
        if size > max_bytes:
            id = _peek_id(data)
            self.limits.admit_message(now, id=id)
            raise MessageTooLarge(
                f"a message is limited to {max_bytes} bytes; send smaller chunks", id=id
            )
        try:
            message = decode_client(data)
        except StreamchatError as exc:
            self.limits.admit_message(now, id=exc.id)
            raise
        delay = self.limits.admit(now, message)
        if self.needs_token:
            if not isinstance(message, Hello):
                raise Unauthorized(
                    f"send 'hello' with your API key before '{message.type}'",
                    id=message_id(message),
                )
            identity = check_token(message.token, self.state.keys)
            self.state.release(self.identity)
            self.identity = "addr:-"  # counted nowhere, should the new place be refused
            self.state.reserve(identity)  # ServerBusy is fatal: the key has enough sessions
            self.identity = identity
            self.needs_token = False
            self.session.log.info("session %s: authenticated as %s", self.session.id, identity)
        return message, delay

    async def _fail(self, exc: StreamchatError) -> None:
        """Send the fatal error, then close; messages read meanwhile are ignored."""
        self.failed = True
        self.session.log.info("session %s: %s", self.session.id, exc.code)
        await self.session.fail(exc)


# -- the id of a message too large to parse -------------------------------------------
# Wire-format code, the one piece outside messages.py: it belongs there (as a
# public peek_id) when that module is next changed.

_PEEKED = frozenset({"type", "id"})
_JSON = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")


def _peek_id(data: bytes | str) -> str | None:
    """The id of an ``ask`` too large to parse, if its head names one.

    Only the first :data:`PEEK_CHARS` are read, and top-level values other
    than ``type`` and ``id`` are skipped, so the cost is bounded whatever the
    message holds. Clients write ``type`` and ``id`` before the question (the
    bundled client and browsers' ``JSON.stringify`` of ``{type, id, text}``
    do); an id found nowhere in the head is not named.
    """
    fields: dict[str, object] = {}
    try:
        head = data[:PEEK_CHARS]
        pairs = _msgpack_pairs(head) if isinstance(head, bytes) else _json_pairs(head)
        for key, value in pairs:
            fields[key] = value
            if len(fields) == len(_PEEKED):
                break
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException):
        pass  # the head ends, or is not a map: what was found so far stands
    id = fields.get("id")
    if fields.get("type") != "ask" or not isinstance(id, str):
        return None
    return id if 0 < len(id) <= MAX_ID_CHARS else None


def _msgpack_pairs(head: bytes) -> Iterator[tuple[str, object]]:
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(head) or 1)
    unpacker.feed(head)
    for _ in range(unpacker.read_map_header()):
        key = unpacker.unpack()
        if isinstance(key, str) and key in _PEEKED:
            yield key, unpacker.unpack()
        else:
            unpacker.skip()


def _json_pairs(head: str) -> Iterator[tuple[str, object]]:
    at = _skip_space(head, 0)
    if head[at : at + 1] != "{":
        return
    at += 1
    while True:
        key, at = _JSON.raw_decode(head, _skip_space(head, at))
        at = _skip_space(head, at)
        if head[at : at + 1] != ":":
            return
        value, at = _JSON.raw_decode(head, _skip_space(head, at + 1))
        if isinstance(key, str) and key in _PEEKED:
            yield key, value
        at = _skip_space(head, at)
        if head[at : at + 1] != ",":
            return
        at += 1


def _skip_space(text: str, at: int) -> int:
    match = _SPACE.match(text, at)
    return match.end() if match else at
