"""The WebSocket connection: admit -> (read | write) -> close.

A handshake is checked before anything is accepted (origin, API key,
capacity; see :mod:`streamchat.access`) and refused with an HTTP status and a
JSON body naming the error, logged so that no rate of refusals floods the log.
A connection that has not authenticated (no key at the handshake, or auth off)
holds a *waiting* place (:meth:`ServerState.reserve_waiting`), apart from the
sessions', until a valid ``hello``; it has ``hello_timeout`` seconds from the
handshake for it, and nothing else it sends extends them. An admitted
connection runs two tasks:

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
Every line about the connection, from its acceptance on, goes through the
session's :class:`~streamchat.sessionlog.SessionLog`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from contextvars import ContextVar

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from .access import admit, check_token
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
from .messages import (
    ClientMessage,
    Error,
    Hello,
    decode_client,
    encode_server,
    message_id,
    peek_id,
)
from .server import ServerState, Waiting
from .session import Close, Session

__all__ = ["RefusedHandshakeFilter", "session_endpoint"]

SHUTTING_DOWN = "the server is shutting down"
CLOSE_GRACE = 1.0
"""Seconds the writer gets to tell a connection closed before it authenticated why."""

_HTTP_STATUS: dict[type[AccessError], int] = {
    Unauthorized: 401,
    OriginNotAllowed: 403,
    ServerBusy: 503,
}


async def session_endpoint(websocket: WebSocket) -> None:
    state: ServerState = websocket.app.state.streamchat
    client = websocket.client.host if websocket.client else None
    identity: str | None = None
    waiting: Waiting | None = None
    try:
        grant = admit(
            websocket.headers,
            websocket.scope.get("subprotocols", ()),
            client,
            keys=state.keys,
            allowed_origins=state.settings.allowed_origins,
        )
        if grant.needs_token or not state.keys.enabled:
            # Not authenticated yet: auth off, a session is its address's once it says hello.
            then = None if state.keys.enabled else grant.identity
            waiting = state.reserve_waiting(grant.identity, then=then)
        else:
            state.reserve(grant.identity)
            identity = grant.identity
    except AccessError as exc:
        state.refused(exc, client or "unknown")
        state.metrics.error("websocket", exc.code)
        await _deny(websocket, exc)
        return
    deadline = asyncio.get_running_loop().time() + state.settings.hello_timeout
    connection: _Connection | None = None
    try:
        await websocket.accept(subprotocol=grant.subprotocol)
        session = Session(
            state.settings,
            state.engine,
            session_id=secrets.token_hex(16),
            metrics=state.metrics,
            memory=state.memory,
        )
        session.log.tag_task()
        await state.add(session)
        session.identity = identity
        session.log.info("opened (%s)", grant.identity)
        connection = _Connection(websocket, session, state, identity, waiting, deadline)
        if state.closing:  # the drain began during the handshake, and did not see this one
            await session.going_away(SHUTTING_DOWN, 0.0)
            await session.close_soon(CloseCode.GOING_AWAY, SHUTTING_DOWN)
        try:
            await connection.run()
        finally:
            await session.aclose()
            connection.give_back()  # before it is forgotten: who waits on that sees the counts
            await state.discard(session)
            session.log.info("closed")
    finally:
        if connection is not None:
            connection.give_back()
        elif identity is not None:
            state.release(identity)
        elif waiting is not None:
            state.release_waiting(waiting)


_REFUSED: ContextVar[bool] = ContextVar("streamchat_refused", default=False)
"""Set in the task of a connection whose handshake this app refused."""

_INCOMPLETE_HANDSHAKE = "ASGI callable returned without completing handshake."


class RefusedHandshakeFilter(logging.Filter):
    """Drops the ASGI server's own lines about a handshake the app refused.

    uvicorn logs each refusal two or three times on ``uvicorn.error``: the
    request and status, websockets' "connection rejected", and, with
    ``websockets-sansio`` after a denial response, a false ERROR "returned
    without completing handshake" (it never marks a denial as complete:
    Kludex/uvicorn#3138). :class:`~streamchat.access.RefusalLog` logs
    refusals instead, at a bounded rate. Only records logged from the task of
    a connection :func:`_deny` refused are dropped, and of those only INFO and
    below and that false error: a real failure there is still logged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not _REFUSED.get():
            return True
        if record.levelno <= logging.INFO:
            return False
        return record.msg != _INCOMPLETE_HANDSHAKE


async def _deny(websocket: WebSocket, exc: AccessError) -> None:
    """Refuse the handshake with an HTTP status, or a close code if HTTP is not possible."""
    _REFUSED.set(True)  # the connection's own task: what the server logs after is about it
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
        self,
        websocket: WebSocket,
        session: Session,
        state: ServerState,
        identity: str | None,
        waiting: Waiting | None,
        deadline: float,
    ) -> None:
        self.websocket = websocket
        self.session = session
        self.state = state
        self.settings: Settings = state.settings
        self.identity = identity
        """What this session counts against the session limits (its key's hash, else its
        address); None until it authenticates."""
        self.waiting = waiting
        """The place it holds until it authenticates (None once it has)."""
        self.deadline = deadline
        """When a connection still waiting is closed (loop time)."""
        self.limits = RateLimiter(state.settings)
        self.binary = True
        self.failed = False
        self._timer: asyncio.TimerHandle | None = None
        self._reader: asyncio.Task[None] | None = None

    async def run(self) -> None:
        id = self.session.id
        reader = asyncio.create_task(self._read(), name=f"reader-{id}")
        writer = asyncio.create_task(self._write(), name=f"writer-{id}")
        self._reader = reader
        if self.waiting is not None:
            if self.waiting.evicted:  # while the handshake was being accepted
                self._give_way()
            else:
                self.waiting.on_evict = self._give_way
                self._timer = asyncio.get_running_loop().call_at(self.deadline, self._expire)
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if self._timer is not None:
                self._timer.cancel()
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
                    if isinstance(item, Error):  # the one place every error passes on its way out
                        self.state.metrics.error("websocket", item.code)
                    payload = encode_server(item, binary=self.binary)
                    if isinstance(payload, bytes):
                        await websocket.send_bytes(payload)
                    else:
                        await websocket.send_text(payload)
            except TimeoutError:
                session.log.warning(
                    "client read nothing for %g s, disconnecting", self.settings.send_timeout
                )
                return
            except (WebSocketDisconnect, RuntimeError, OSError):
                # The peer is gone; the reader sees the disconnect too.
                session.log.debug("send failed, peer gone")
                return

    # -- reader -------------------------------------------------------------

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # A connection still waiting to authenticate is ended by its deadline instead.
            idle = self.settings.idle_timeout
            try:
                async with asyncio.timeout(idle):
                    event = await self.websocket.receive()
            except TimeoutError:
                if self.failed or self.session.busy:
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
                self.session.log.exception("decoding failed")
                await self.session.report(exc)
                continue
            try:
                await self.session.handle(message)
            except Exception as exc:  # a bug: tell the client, keep the session
                self.session.log.exception("%s failed", message.type)
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
            id = peek_id(data)
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
        if self.waiting is not None:
            self._authenticate(message)
        return message, delay

    def _authenticate(self, message: ClientMessage) -> None:
        """End the wait on a valid ``hello``: the connection becomes a counted session.

        With auth on, anything else is refused (fatal); with auth off the
        protocol refuses it (``hello_required``). Either way the deadline runs on.
        """
        assert self.waiting is not None
        keys = self.state.keys
        if not isinstance(message, Hello):
            if keys.enabled:
                raise Unauthorized(
                    f"send 'hello' with your API key before '{message.type}'",
                    id=message_id(message),
                )
            return
        identity = check_token(message.token, keys) if keys.enabled else self.waiting.address
        self.state.reserve(identity)  # ServerBusy is fatal: no room for this key (or address)
        self.identity = identity
        self.session.identity = identity
        self._stop_waiting()
        if self._timer is not None:
            self._timer.cancel()
        if keys.enabled:
            self.session.log.info("authenticated as %s", identity)

    def give_back(self) -> None:
        """Give back the place this connection holds (again: nothing)."""
        if self.identity is not None:
            self.state.release(self.identity)
            self.identity = None
        self._stop_waiting()

    def _stop_waiting(self) -> None:
        if self.waiting is not None:
            self.state.release_waiting(self.waiting)
            self.waiting.on_evict = None
            self.waiting = None

    def _expire(self) -> None:
        if self.waiting is not None:
            timeout = self.settings.hello_timeout
            self._end_waiting(IdleTimeout(f"no valid 'hello' within {timeout:g} s: closing"))

    def _give_way(self) -> None:
        self._end_waiting(
            ServerBusy("too many connections are waiting to authenticate: try again later")
        )

    def _end_waiting(self, exc: AccessError) -> None:
        """Close a connection still waiting to authenticate (deadline passed, or it gave way).

        Synchronous, so nothing the reader may be waiting on (a client that
        reads nothing, a paced chunk) holds the connection open: the error and
        the close are queued if there is room, the writer gets
        :data:`CLOSE_GRACE` seconds to send them, then the reader is stopped,
        which ends the connection.
        """
        self.session.log.info("%s before authenticating", exc.code)
        self.state.metrics.refused("websocket", exc.code)
        if not self.failed:  # else a fatal error and the close are on their way already
            self.failed = True
            outbox = self.session.outbox
            error = self.session.protocol.error(exc).message
            for item in (error, Close(exc.close_code, close_reason(exc.message))):
                if not outbox.full():
                    outbox.put_nowait(item)
        if self._timer is not None:
            self._timer.cancel()
        if self._reader is not None:
            self._timer = asyncio.get_running_loop().call_later(CLOSE_GRACE, self._reader.cancel)

    async def _fail(self, exc: StreamchatError) -> None:
        """Send the fatal error, then close; messages read meanwhile are ignored."""
        self.failed = True
        self.session.log.info("closing: %s", exc.code)
        if self.waiting is not None and isinstance(exc, AccessError):  # refused at its hello
            self.state.metrics.refused("websocket", exc.code)
        await self.session.fail(exc)
