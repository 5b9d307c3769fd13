"""URL sources: stream a video's bytes into a feed, never whole into memory, never inward.

The server reads the bytes itself and hands them to the decoder through a
:class:`~streamchat.feed.ByteFeed`, so a client-supplied string never reaches
FFmpeg as a path or protocol URL. The feed's bounded ``put`` gives natural
backpressure: a file is fetched only as fast as it is decoded.

``http``/``https`` URLs are fetched with httpx, guarded against server-side
request forgery at every hop:

1. the URL is parsed strictly (:mod:`streamchat.urlpolicy`): no user info,
   no parser disagreements, optionally only allowed domains;
2. the host is resolved once and every address it resolves to must be global
   (:mod:`streamchat.netguard`), unless ``fetch_allow_private``;
3. the connection goes to those checked addresses (the first that answers)
   and nowhere else
   (:class:`~streamchat.pinning.PinnedTransport`);
4. redirects are followed here, one at a time, each target going through
   1-3 again, at most ``fetch_max_redirects`` of them.

``fetch_timeout`` bounds the total time spent waiting for the remote side
(resolving, connecting, every read, across redirects), so a server that
drips a byte at a time cannot hold a fetch longer; time spent waiting for the
decoder to make room is not counted, so a slow decoder does not fail a good
URL. Logs name the host only: a query string may carry a token.

``file:`` URLs are read only from below ``allowed_file_dir``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import httpcore
import httpx

from .config import Settings
from .errors import UrlFetchFailed, UrlNotAllowed
from .feed import ByteFeed
from .netguard import IPAddress, Resolver, resolve_allowed, system_resolver
from .pinning import PinnedTransport
from .urlpolicy import HttpTarget, allowed_file, check_http_url, redirect_target, url_scheme

__all__ = ["CHUNK_BYTES", "fetch_into"]

CHUNK_BYTES = 256 * 1024

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Identity: a compressed body could expand far past the size limit in one chunk.
_HEADERS = {"Accept": "*/*", "Accept-Encoding": "identity", "User-Agent": "streamchat"}

logger = logging.getLogger("streamchat.fetch")


async def fetch_into(
    url: str,
    feed: ByteFeed,
    settings: Settings,
    *,
    resolver: Resolver | None = None,
    network: httpcore.AsyncNetworkBackend | None = None,
) -> None:
    """Stream ``url`` into ``feed`` and close it; raise a typed error on failure.

    ``resolver`` answers DNS questions (the event loop's ``getaddrinfo`` by
    default) and ``network`` makes TCP connections to checked addresses
    (httpcore's default); tests replace both to play a network.
    """
    scheme = url_scheme(url)
    if scheme in ("http", "https"):
        target = check_http_url(url, allowed_domains=settings.fetch_allowed_domains)
        await _fetch_http(target, feed, settings, resolver or system_resolver, network)
    elif scheme == "file":
        await _read_file(allowed_file(url, settings.allowed_file_dir), feed, settings)
    else:
        raise UrlNotAllowed(f"URL scheme {scheme or '(none)'!r} is not allowed: use http or https")
    feed.close()


class _Budget:
    """``fetch_timeout`` seconds, spent only while waiting for the remote side."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._left = seconds

    @contextlib.asynccontextmanager
    async def waiting(self) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(max(self._left, 0.0)):
                yield
        except TimeoutError:
            raise UrlFetchFailed(
                f"the server took more than {self.seconds:g} s in total to send the video"
            ) from None
        finally:
            self._left -= loop.time() - started


async def _fetch_http(
    target: HttpTarget,
    feed: ByteFeed,
    settings: Settings,
    resolver: Resolver,
    network: httpcore.AsyncNetworkBackend | None,
) -> None:
    budget = _Budget(settings.fetch_timeout)
    for _hop in range(settings.fetch_max_redirects + 1):
        try:
            async with budget.waiting():
                addresses = await resolve_allowed(
                    target.host,
                    target.port,
                    resolver=resolver,
                    allow_private=settings.fetch_allow_private,
                )
        except UrlNotAllowed as exc:
            logger.info("refused to fetch from %s: %s", target.host, exc.message)
            raise
        logger.info("fetching from %s port %d (%s)", target.host, target.port, addresses[0])
        location = await _get(target, addresses, feed, settings, budget, network)
        if location is None:
            return
        try:
            following = redirect_target(
                target, location, allowed_domains=settings.fetch_allowed_domains
            )
        except UrlNotAllowed as exc:
            logger.info("refused a redirect from %s: %s", target.host, exc.message)
            raise
        logger.info("%s redirects to %s", target.host, following.host)
        target = following
    raise UrlFetchFailed(f"more than {settings.fetch_max_redirects} redirects")


async def _get(
    target: HttpTarget,
    addresses: list[IPAddress],
    feed: ByteFeed,
    settings: Settings,
    budget: _Budget,
    network: httpcore.AsyncNetworkBackend | None,
) -> str | None:
    """GET ``target`` from ``addresses`` into ``feed``; a redirect's ``Location`` instead.

    The transport is used without an ``httpx.AsyncClient``: the client would
    log every request's full URL (query string and all) at INFO level.
    """
    request = httpx.Request("GET", target.url, headers=_HEADERS)
    request.extensions["timeout"] = httpx.Timeout(settings.fetch_timeout).as_dict()
    try:
        async with PinnedTransport(
            target.host, target.port, [str(a) for a in addresses], network=network
        ) as (transport):
            async with budget.waiting():
                response = await transport.handle_async_request(request)
            try:
                if response.status_code in _REDIRECTS:
                    location: str | None = response.headers.get("Location")
                    if not location:
                        raise UrlFetchFailed("the URL redirects nowhere")
                    return location
                _check_response(response, settings)
                await _stream_body(response, feed, settings, budget)
                return None
            finally:
                await response.aclose()
    except httpx.TimeoutException:
        raise UrlFetchFailed(f"no answer within {settings.fetch_timeout:g} s") from None
    except httpx.HTTPError as exc:
        logger.info("fetch from %s failed: %s", target.host, exc.__class__.__name__)
        raise UrlFetchFailed("could not fetch the URL (connection failed)") from None


def _check_response(response: httpx.Response, settings: Settings) -> None:
    if response.status_code != 200:
        raise UrlFetchFailed(f"the URL answered HTTP {response.status_code}")
    if response.headers.get("Content-Encoding", "identity").lower() != "identity":
        raise UrlFetchFailed("the server sent a compressed response")
    length = response.headers.get("Content-Length")
    if length is not None and length.isdigit():
        _check_size(int(length), settings)


async def _stream_body(
    response: httpx.Response, feed: ByteFeed, settings: Settings, budget: _Budget
) -> None:
    received = 0
    chunks = response.aiter_raw(CHUNK_BYTES)
    while True:
        async with budget.waiting():
            chunk = await anext(chunks, None)
        if chunk is None:
            return
        received += len(chunk)
        _check_size(received, settings)
        await feed.put(chunk)  # backpressure from the decoder: not the server's time


async def _read_file(path: Path, feed: ByteFeed, settings: Settings) -> None:
    try:
        # Checked before opening: opening a FIFO would block its thread for good.
        if not stat.S_ISREG((await asyncio.to_thread(path.stat)).st_mode):
            raise UrlNotAllowed("only regular files are served")
        handle = await asyncio.to_thread(path.open, "rb")
    except OSError:
        raise UrlFetchFailed("the file cannot be opened") from None
    received = 0
    try:
        while chunk := await asyncio.to_thread(handle.read, CHUNK_BYTES):
            received += len(chunk)
            _check_size(received, settings)
            await feed.put(chunk)
    finally:
        handle.close()


def _check_size(received: int, settings: Settings) -> None:
    if received > settings.fetch_max_bytes:
        raise UrlFetchFailed(f"the video is larger than {settings.fetch_max_bytes} bytes")
