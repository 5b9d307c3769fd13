"""An httpx transport that connects only to the address that was checked.

Checking a host's address and then letting the HTTP client resolve the name
again would leave a window for DNS rebinding: the second answer may be
127.0.0.1. httpcore, below httpx, takes a network backend whose
``connect_tcp(host, port)`` makes the TCP connections; :class:`PinnedTransport`
gives its connection pool one that connects to the checked address instead of
resolving ``host``, and refuses any other host. Everything above the socket is
unchanged: the ``Host`` header, TLS SNI and certificate verification all use
the URL's host name, because httpcore takes them from the request, not from
the connection.

Only public APIs are used (httpcore's ``AsyncConnectionPool`` and
``AsyncNetworkBackend``, httpx's ``AsyncBaseTransport``); httpcore's
exceptions are mapped to httpx's, as httpx's own transport does.

httpcore's DEBUG trace logs every response's headers, and a redirect's
``Location`` may carry a token (a presigned URL): importing this module
installs a filter on httpcore's HTTP loggers that keeps the status line and
drops the headers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence

import httpcore
import httpx

__all__ = ["PinnedTransport"]

# Most specific first: the first match is raised as its httpx counterpart.
_EXCEPTIONS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
)


class _NoResponseHeaders(logging.Filter):
    """Rewrites httpcore's ``receive_response_headers.complete`` trace without the headers."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("receive_response_headers.complete"):
            record.msg = "receive_response_headers.complete (headers not logged)"
            record.args = ()
        return True


for _name in ("httpcore.http11", "httpcore.http2"):
    logging.getLogger(_name).addFilter(_NoResponseHeaders())


@contextlib.contextmanager
def _httpx_errors() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for source, target in _EXCEPTIONS:
            if isinstance(exc, source):
                raise target(str(exc)) from exc
        raise


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Connects ``host:port`` to the first of ``addresses`` that answers; refuses the rest.

    Every address was checked; trying them in turn is what a client resolving
    the name itself would do (an IPv6 answer first on a host without IPv6).
    """

    def __init__(
        self,
        host: str,
        port: int,
        addresses: Sequence[str],
        network: httpcore.AsyncNetworkBackend,
    ) -> None:
        if not addresses:
            raise ValueError("no address to connect to")
        self._host = host
        self._port = port
        self._addresses = tuple(addresses)
        self._network = network

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if (host, port) != (self._host, self._port):
            raise httpcore.ConnectError("refused: not the host whose address was checked")
        *others, last = self._addresses
        for address in others:
            with contextlib.suppress(httpcore.ConnectError, httpcore.ConnectTimeout):
                return await self._connect(address, timeout, local_address, socket_options)
        return await self._connect(last, timeout, local_address, socket_options)

    async def _connect(
        self,
        address: str,
        timeout: float | None,
        local_address: str | None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None,
    ) -> httpcore.AsyncNetworkStream:
        return await self._network.connect_tcp(
            address,
            self._port,
            timeout=timeout,
            local_address=local_address,
            socket_options=socket_options,
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("refused: no Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._network.sleep(seconds)


class _Body(httpx.AsyncByteStream):
    def __init__(self, stream: AsyncIterable[bytes]) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors():
            async for part in self._stream:
                yield part

    async def aclose(self) -> None:
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            with _httpx_errors():
                await close()


class PinnedTransport(httpx.AsyncBaseTransport):
    """Requests to ``host:port`` go to ``addresses``; requests anywhere else fail to connect.

    ``network`` makes the actual connections (httpcore's AnyIO backend by
    default; tests pass one that routes a pretend public address to a
    loopback server). ``ssl_context`` defaults to httpx's (certifi, verified).
    """

    def __init__(
        self,
        host: str,
        port: int,
        addresses: Sequence[str],
        *,
        network: httpcore.AsyncNetworkBackend | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        backend = _PinnedBackend(host, port, addresses, network or httpcore.AnyIOBackend())
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context or _default_ssl_context(),
            network_backend=backend,
            max_connections=1,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _httpx_errors():
            response = await self._pool.handle_async_request(core_request)
        assert isinstance(response.stream, AsyncIterable)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_Body(response.stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    """Built once: loading the CA bundle takes tens of milliseconds, on the event loop."""
    return httpx.create_ssl_context()
