"""uvicorn's HTTP and WebSocket connections, bounded in what a client makes the server hold.

uvicorn parses HTTP with httptools (h11 without it) and hands an upgrade to
websockets' sans-I/O protocol. As shipped, the httptools path bounds neither
the size nor the time of a request head (request line and headers), and a
WebSocket answers every ping even when its client reads nothing: the pongs
pile up in the write buffer, and a close then waits for it to drain, for
ever. The subclasses here add, per connection:

* **request head**: at most :data:`MAX_HEAD_BYTES` (httptools: 431 and
  closed; h11 bounds an incomplete one: 400), complete within :data:`HEAD_TIMEOUT` of
  the connection (of its first byte, on a kept-alive one), and at most
  :data:`MAX_PENDING_HEADS` connections sending one: a newcomer closes the
  oldest, so half-open handshakes cannot keep out a client (one round trip);
* **write buffer**: a connection over :data:`WRITE_BUFFER_LIMIT` for the
  stall timeout (``send_timeout``) is aborted, at shutdown at once (a close
  would wait on a buffer its client does not read); a WebSocket over it also
  stops reading, so it answers nothing (pongs included) until its client reads;
* **pings**: :data:`PING_BURST`, then :data:`PINGS_PER_SECOND`; a client over
  it is closed (1008): each ping costs a parse and a pong.

:class:`ServerConfig` selects these protocols, and puts
:class:`~streamchat.redact.RedactQuery` on uvicorn's loggers.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections.abc import Callable
from typing import Any

import h11
import uvicorn
from uvicorn._types import ASGIReceiveEvent, ASGISendEvent
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from .limits import TokenBucket
from .redact import REDACT_QUERY, UVICORN_LOGGERS

__all__ = ["HEAD_TIMEOUT", "MAX_HEAD_BYTES", "MAX_PENDING_HEADS", "ServerConfig"]

logger = logging.getLogger("streamchat.transport")

MAX_HEAD_BYTES = 16 * 1024
"""Request line and headers, in bytes (h11's default, and Node's)."""
HEAD_TIMEOUT = 10.0
"""Seconds a request head may take to arrive: a round trip on any real network."""
MAX_PENDING_HEADS = 256
"""Connections sending a request head at once; a newcomer closes the oldest."""
WRITE_BUFFER_LIMIT = 64 * 1024
"""Bytes waiting for a client to read (asyncio's default, stated), besides the kernel's."""
PINGS_PER_SECOND = 2.0
PING_BURST = 20
"""Keepalive pings come every few seconds; a flood of them is only CPU to burn."""


class ServerConfig(uvicorn.Config):
    """uvicorn's configuration with these protocols and what they share: the stall timeout,
    this server's pending heads. Other options: :func:`streamchat.serving.server_config`.

    ``ws`` may name another of uvicorn's WebSocket implementations in place of
    :class:`BoundedWebSocket`: only the compliance runner does, to compare
    them behind the same HTTP protocol (``compliance/autobahn.py``).
    """

    def __init__(self, app: Any, *, stall_timeout: float, **options: Any) -> None:
        self.stall_timeout = stall_timeout
        self.pending_heads = _PendingHeads(MAX_PENDING_HEADS)
        options.setdefault("ws", BoundedWebSocket)
        super().__init__(
            app,
            http=BoundedHttpTools if _HTTPTOOLS else BoundedH11,  # what uvicorn's "auto" picks
            h11_max_incomplete_event_size=MAX_HEAD_BYTES,
            **options,
        )

    def configure_logging(self) -> None:
        """uvicorn's logging setup (whatever ``log_config`` says), then the redaction."""
        super().configure_logging()
        for name in UVICORN_LOGGERS:
            logging.getLogger(name).addFilter(REDACT_QUERY)


class _Deadline:
    """One timer: started once, until it fires or is stopped."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float, fire: Callable[[], None]):
        self._loop, self.delay, self._fire = loop, delay, fire
        self._timer: asyncio.TimerHandle | None = None
        self.running = False

    def start(self) -> None:
        if not self.running:
            self.running, self._timer = True, self._loop.call_later(self.delay, self._expired)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.running, self._timer = False, None

    def _expired(self) -> None:
        self.running, self._timer = False, None
        self._fire()


class _PendingHeads:
    """The connections sending a request head, oldest first."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._heads: dict[_Guarded, None] = {}

    def add(self, connection: _Guarded) -> None:
        self._heads[connection] = None
        while len(self._heads) > self._limit:
            next(iter(self._heads)).cut_head("was the oldest of too many")  # leaves the dict

    def discard(self, connection: _Guarded) -> None:
        self._heads.pop(connection, None)


class _Guarded(asyncio.Protocol):
    """What the three protocols share: the stall of the write buffer, a head's deadline."""

    config: uvicorn.Config
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        config = self.config
        if not isinstance(config, ServerConfig):
            raise TypeError("streamchat's protocols run with a streamchat.transport.ServerConfig")
        self.transport.set_write_buffer_limits(high=WRITE_BUFFER_LIMIT)
        self._pending = config.pending_heads
        self._stall = _Deadline(self.loop, config.stall_timeout, self._stalled)
        self._head = _Deadline(self.loop, HEAD_TIMEOUT, lambda: self.cut_head("took too long"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._stall.stop()
        self.end_head()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._stall.start()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._stall.stop()

    def shutdown(self) -> None:
        """Close as uvicorn does; over the limit abort now, below it allow the stall timeout."""
        super().shutdown()  # type: ignore[misc]  # every uvicorn protocol has one
        if self._stall.running:
            self.transport.abort()
        elif self.transport.get_write_buffer_size():  # uvicorn waits a little longer
            self._stall.start()

    def begin_head(self) -> None:
        if not self._head.running:
            self._head.start()
            self._pending.add(self)

    def end_head(self) -> None:
        self._head.stop()
        self._pending.discard(self)

    def cut_head(self, why: str) -> None:
        self.end_head()
        if not self.transport.is_closing():
            logger.debug("closing a connection whose request head %s", why)  # attacks: no flood
            self.transport.close()

    def _stalled(self) -> None:
        peer = self.transport.get_extra_info("peername")
        logger.info("%s read nothing for %g s: connection aborted", peer, self._stall.delay)
        self.transport.abort()


# -- HTTP -----------------------------------------------------------------------


class BoundedH11(_Guarded, H11Protocol):
    """h11 bounds the head's size itself (``h11_max_incomplete_event_size``); the time here."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.begin_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE or self.transport.get_protocol() is not self:
            self.end_head()  # a whole head arrived (or the connection was upgraded)
        elif self.conn.trailing_data[0]:
            self.begin_head()  # the next request on a kept-alive connection has begun


_HTTPTOOLS = importlib.util.find_spec("httptools") is not None
if _HTTPTOOLS:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class BoundedHttpTools(_Guarded, HttpToolsProtocol):
        """httptools bounds no head: its bytes are counted here, and its time."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._head_bytes: int | None = 0  # None: past a head (its body)
            self.begin_head()

        def data_received(self, data: bytes) -> None:
            """Feed a head at most its bound: a head not complete by then is refused."""
            while data and self._head_bytes is not None:
                room = MAX_HEAD_BYTES - self._head_bytes
                part, data = data[:room], data[room:]
                self._head_bytes += len(part)
                super().data_received(part)
                if self.transport.is_closing() or self.transport.get_protocol() is not self:
                    return  # refused, or upgraded (uvicorn drops what follows a head there too)
                if self._head_bytes is not None and self._head_bytes >= MAX_HEAD_BYTES:
                    self._refuse_head()
                    return
            if data:
                super().data_received(data)  # a body (a head after it is counted from its end)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.begin_head()  # the time: from the first byte (idle is keep-alive's to bound)

        def on_headers_complete(self) -> None:
            self.end_head()
            self._head_bytes = None
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._head_bytes = 0  # what follows is the next request's head
            super().on_message_complete()

        def _refuse_head(self) -> None:
            self.end_head()
            body = f"request line and headers are limited to {MAX_HEAD_BYTES} bytes".encode()
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                b"content-type: text/plain; charset=utf-8\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
            )
            self.transport.close()


# -- WebSocket ------------------------------------------------------------------


class BoundedWebSocket(_Guarded, WebSocketsSansIOProtocol):
    """websockets' sans-I/O protocol that stops reading while its client does not.

    uvicorn pauses reading while the app has a message to take; here also
    while the write buffer is over :data:`WRITE_BUFFER_LIMIT`, so a client that
    reads nothing gets one read's worth of answers (pongs, close frames).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # websockets' wire-level debug lines print every header and frame: the key too.
        self.conn.debug = False
        self._pings = TokenBucket(PINGS_PER_SECOND, PING_BURST)

    def pause_writing(self) -> None:
        super().pause_writing()  # the app's sends wait
        self.transport.pause_reading()  # and so does everything the client sends

    def resume_writing(self) -> None:
        super().resume_writing()
        if not self.read_paused:  # uvicorn's own pause: the app has a message to take
            self.transport.resume_reading()

    def handle_ping(self) -> None:
        if self._pings.take(self.loop.time()):
            super().handle_ping()
        elif self.close_sent:  # pings after the close (the rest of this read, or instead of
            self.transport.close()  # an answer to ours): no pong, no more reading
        else:
            self.conn.fail(1008, "too many pings")
            self.handle_parser_exception()  # tells the app, sends the close frame, closes

    async def receive(self) -> ASGIReceiveEvent:
        message = await super().receive()
        self._hold_reading()
        return message

    async def send(self, message: ASGISendEvent) -> None:
        try:
            await super().send(message)
        finally:
            self._hold_reading()

    def _hold_reading(self) -> None:
        """Undo uvicorn's resume (in the same step: nothing is read between) while over."""
        if self._stall.running:
            self.transport.pause_reading()
