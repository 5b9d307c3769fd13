"""URL sources: stream a video's bytes into a feed, never whole into memory, never inward.

The server reads the bytes itself and hands them to the decoder through a
:class:`~streamchat.ingest.feed.ByteFeed`, so a client-supplied string never reaches
FFmpeg as a path or protocol URL. The feed's bounded ``put`` gives natural
backpressure: a file is fetched only as fast as it is decoded.

``http``/``https`` URLs are fetched with httpx, guarded against server-side
request forgery at every hop:

1. the URL is parsed strictly (:mod:`streamchat.ingest.urlpolicy`): no user info,
   no parser disagreements, optionally only allowed domains;
2. the host is resolved once and every address it resolves to must be global
   (:mod:`streamchat.ingest.netguard`), unless ``fetch_allow_private``;
3. the connection goes to those checked addresses (the first that answers)
   and nowhere else
   (:class:`~streamchat.ingest.pinning.PinnedTransport`);
4. redirects are followed here, one at a time, each target going through
   1-3 again, at most ``fetch_max_redirects`` of them.

``fetch_timeout`` bounds the total time spent waiting for the remote side
(resolving, connecting, every read, across redirects and range requests), so
a server that drips a byte at a time cannot hold a fetch longer; time spent
waiting for the decoder to make room is not counted, so a slow decoder does
not fail a good URL. ``fetch_max_bytes`` bounds the bytes downloaded for one
URL, over all its requests. Logs name the host only: a query string may
carry a token.

``file:`` URLs are read only from below ``allowed_file_dir``.

An MP4 whose index (``moov``) follows its media (FFmpeg's default layout, and
what most cameras and phones write) cannot be decoded from its first byte.
When the first read shows one (:func:`~streamchat.ingest.faststart.sniff`), the
fetch leaves the body there and feeds the decoder the file's streamable
("faststart") form instead (:func:`~streamchat.ingest.faststart.rewrite`): ``ftyp``,
the index rewritten for its new place, then the media. The index comes from
a range request (a seek for ``file:``) from the end of the media, the media
from a second one starting where the first read stopped: bytes already read
are used, never fetched again, and a file that fits in the first read needs
no other request. Both go to the final URL over the same pinned connection
pool, within the same deadline and byte limit; a redirect in answer to
either is refused, and so is a file whose size or ``ETag`` changes between
them. The cost is those two requests, and what the network had in flight on
the first one when it was left (a few hundred KiB on loopback). The index is
refused from its size, before it is read, when it would make a header over
the decoder's limit (``VideoTooLarge``); a file that ends before its index
(cut short, or still being written) is ``VideoDecodeError``. A server that
ignores ranges (``200`` instead of ``206``) is read through: the bytes
before the wanted ones are dropped as they arrive, never held, so its media
is downloaded twice, within the same limits. Every other stream goes to the
feed exactly as it arrives, with no extra request.

What was fetched is told back (:class:`Fetched`), for a cache to know a
source again: the final URL and the response's validators (``ETag``,
``Last-Modified``), or a file's :class:`FileStamp` (path, size, modification
time, inode) taken from the file it opened. Given the validators of an
earlier fetch, the first request is conditional (``If-None-Match``,
``If-Modified-Since``) and a ``304`` ends the fetch with nothing fed
(``not_modified``); the range requests for an index never are. ``on_body``
is told before the first byte of a body goes to the feed, so a decoder need
not start for a ``304``. :func:`bytes_into` feeds bytes already in memory the
same way (an index at the end moved first), and :func:`stat_file` checks a
``file:`` URL and stamps its file without reading it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import stat
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpcore
import httpx

from ..config import DEFAULT_MAX_HEADER_BYTES, Settings
from ..errors import StreamchatError, UrlFetchFailed, UrlNotAllowed
from ..metrics import Metrics, SourceKind
from .feed import ByteFeed
from .netguard import IPAddress, Resolver, resolve_allowed, system_resolver
from .pinning import PinnedTransport
from .relayout import (
    CHUNK_BYTES,
    LocalFile,
    MemoryFile,
    RandomAccess,
    stream_faststart,
    stream_head,
)
from .urlpolicy import HttpTarget, allowed_file, check_http_url, redirect_target, url_scheme

__all__ = [
    "CHUNK_BYTES",
    "FileStamp",
    "Fetched",
    "Validators",
    "bytes_into",
    "fetch_into",
    "stat_file",
]

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Identity: a compressed body could expand far past the size limit in one chunk.
_HEADERS = {"Accept": "*/*", "Accept-Encoding": "identity", "User-Agent": "streamchat"}
# ASCII digits, and few: int() refuses some Unicode "digits" and numbers of 4,300 digits.
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,20})-([0-9]{1,20})/([0-9]{1,20}|\*)")
_CONTENT_LENGTH = re.compile(r"[0-9]{1,20}")
_MAX_VALIDATOR = 1024  # characters of an ETag or Last-Modified kept (a longer one is ignored)

logger = logging.getLogger("streamchat.fetch")


@dataclass(frozen=True, kw_only=True)
class Validators:
    """What an HTTP response said identifies its body: ``ETag``, ``Last-Modified``."""

    etag: str | None = None
    last_modified: str | None = None

    def __bool__(self) -> bool:
        return self.etag is not None or self.last_modified is not None

    def conditions(self) -> dict[str, str]:
        """The headers of a request that only wants the body if it changed."""
        headers = {}
        if self.etag is not None:
            headers["If-None-Match"] = self.etag
        if self.last_modified is not None:
            headers["If-Modified-Since"] = self.last_modified
        return headers


@dataclass(frozen=True)
class FileStamp:
    """A file as it is now: unchanged while all of these are (a rewrite moves ``mtime_ns``)."""

    path: str
    size: int
    mtime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, path: Path, status: os.stat_result) -> FileStamp:
        return cls(str(path), status.st_size, status.st_mtime_ns, status.st_ino, status.st_dev)


@dataclass(frozen=True, kw_only=True)
class Fetched:
    """What a fetch read: its final URL and what identifies the bytes there.

    ``url`` is the URL the body came from, after redirects (a ``file:`` URL of
    the resolved path for files); ``validators`` those of its response (none
    for files, whose ``file`` stamp is taken from the file opened). A
    ``not_modified`` fetch (a ``304`` to a conditional request) fed nothing.
    """

    url: str
    validators: Validators = Validators()
    file: FileStamp | None = None
    not_modified: bool = False


async def fetch_into(
    url: str,
    feed: ByteFeed,
    settings: Settings,
    *,
    resolver: Resolver | None = None,
    network: httpcore.AsyncNetworkBackend | None = None,
    max_index_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    validators: Validators | None = None,
    on_body: Callable[[Fetched], None] | None = None,
    metrics: Metrics | None = None,
) -> Fetched:
    """Stream ``url`` into ``feed`` and close it; raise a typed error on failure.

    ``resolver`` answers DNS questions (a session passes its own, one lookup
    at a time; by default :func:`~streamchat.ingest.netguard.system_resolver`, bounded
    server-wide) and ``network`` makes TCP connections to checked addresses
    (httpcore's default); tests replace both to play a network.
    ``max_index_bytes`` is the largest MP4 header (``ftyp`` and ``moov``)
    fetched for an index at the end: the decoder's own limit.

    ``validators`` (of an earlier fetch of the same URL) make the request
    conditional: a ``304`` returns ``not_modified`` with nothing fed.
    ``on_body`` is called, once, before the first byte goes to ``feed``.
    ``metrics`` counts the bytes read (as ``url`` or ``file``) and a failure by its code.
    """
    scheme = url_scheme(url)
    fetch = _Fetch(settings, max_index_bytes, metrics, "file" if scheme == "file" else "url")
    try:
        if scheme in ("http", "https"):
            target = check_http_url(url, allowed_domains=settings.fetch_allowed_domains)
            fetched = await _fetch_http(
                target, feed, fetch, resolver or system_resolver, network, validators, on_body
            )
        elif scheme == "file":
            path = allowed_file(url, settings.allowed_file_dir)
            fetched = await _read_file(path, feed, fetch, on_body)
        else:
            raise UrlNotAllowed(
                f"URL scheme {scheme or '(none)'!r} is not allowed: use http or https"
            )
    except StreamchatError as exc:
        if metrics is not None:
            metrics.fetch_failed(exc.code)
        raise
    feed.close()
    return fetched


async def stat_file(url: str, settings: Settings) -> FileStamp:
    """The stamp of the regular file a ``file:`` URL names, checked as :func:`fetch_into` does."""
    path = allowed_file(url, settings.allowed_file_dir)
    try:
        status = await asyncio.to_thread(path.stat)
    except OSError:
        raise UrlFetchFailed("the file cannot be opened") from None
    if not stat.S_ISREG(status.st_mode):
        raise UrlNotAllowed("only regular files are served")
    return FileStamp.of(path, status)


async def bytes_into(
    data: bytes,
    feed: ByteFeed,
    settings: Settings,
    *,
    max_index_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> None:
    """Feed ``data`` (a whole file in memory) into ``feed`` and close it.

    As a fetched file is fed: an MP4 with its index at the end is fed in its
    streamable form, the rest as it is.
    """
    await _stream_local(MemoryFile(data), feed, _Fetch(settings, max_index_bytes))
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


class _Fetch:
    """One URL's limits, and what it has spent of them over all its requests."""

    def __init__(
        self,
        settings: Settings,
        max_index_bytes: int,
        metrics: Metrics | None = None,
        kind: SourceKind = "url",
    ) -> None:
        self.settings = settings
        self.max_index_bytes = max_index_bytes
        self.metrics = metrics
        self.kind: SourceKind = kind
        self.budget = _Budget(settings.fetch_timeout)
        self.received = 0
        self.ranges = False
        """Set once more than one request (or seek) reads the file."""

    def count(self, size: int) -> None:
        """Count ``size`` more bytes downloaded; refuse beyond ``fetch_max_bytes``."""
        self.received += size
        if self.metrics is not None:
            self.metrics.bytes_received(self.kind, size)
        if self.ranges and self.received > self.settings.fetch_max_bytes:
            raise UrlFetchFailed(
                f"more than {self.settings.fetch_max_bytes} bytes downloaded for the video"
            )
        _check_size(self.received, self.settings)


async def _fetch_http(
    target: HttpTarget,
    feed: ByteFeed,
    fetch: _Fetch,
    resolver: Resolver,
    network: httpcore.AsyncNetworkBackend | None,
    validators: Validators | None,
    on_body: Callable[[Fetched], None] | None,
) -> Fetched:
    settings = fetch.settings
    for _hop in range(settings.fetch_max_redirects + 1):
        try:
            async with fetch.budget.waiting():
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
        location = await _get(target, addresses, feed, fetch, network, validators, on_body)
        if isinstance(location, Fetched):
            return location
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
    fetch: _Fetch,
    network: httpcore.AsyncNetworkBackend | None,
    validators: Validators | None,
    on_body: Callable[[Fetched], None] | None,
) -> str | Fetched:
    """GET ``target`` from ``addresses`` into ``feed``; a redirect's ``Location`` instead.

    The transport is used without an ``httpx.AsyncClient``: the client would
    log every request's full URL (query string and all) at INFO level. Range
    requests for an index at the end reuse it: same checked addresses.
    """
    try:
        async with PinnedTransport(
            target.host, target.port, [str(a) for a in addresses], network=network
        ) as (transport):
            remote = _HttpFile(transport, target, fetch)
            response = await remote.send(validators.conditions() if validators else None)
            try:
                if response.status_code in _REDIRECTS:
                    location: str | None = response.headers.get("Location")
                    if not location:
                        raise UrlFetchFailed("the URL redirects nowhere")
                    return location
                fetched = Fetched(url=str(target.url), validators=_validators(response))
                if response.status_code == 304 and validators:
                    logger.info("%s: not modified", target.host)
                    known = fetched.validators or validators  # a 304 need not repeat them
                    return Fetched(url=fetched.url, validators=known, not_modified=True)
                _check_response(response, fetch.settings)
                remote.first(response)
                if on_body is not None:
                    on_body(fetched)
                async with contextlib.aclosing(_body(response, fetch)) as chunks:
                    found = await stream_head(chunks, feed, fetch.max_index_bytes)
            finally:
                await response.aclose()
            if found is not None:
                remote.head, layout = found
                logger.info("%s: the MP4's index follows its media: range requests", target.host)
                fetch.ranges = True
                await stream_faststart(remote, layout, feed, limit=fetch.max_index_bytes)
            return fetched
    except httpx.TimeoutException:
        raise UrlFetchFailed(f"no answer within {fetch.settings.fetch_timeout:g} s") from None
    except httpx.HTTPError as exc:
        logger.info("fetch from %s failed: %s", target.host, exc.__class__.__name__)
        raise UrlFetchFailed("could not fetch the URL (connection failed)") from None


def _check_response(response: httpx.Response, settings: Settings) -> None:
    if response.status_code != 200:
        raise UrlFetchFailed(f"the URL answered HTTP {response.status_code}")
    _check_identity(response)
    length = _content_length(response)
    if length is not None:
        _check_size(length, settings)


def _check_identity(response: httpx.Response) -> None:
    if response.headers.get("Content-Encoding", "identity").lower() != "identity":
        raise UrlFetchFailed("the server sent a compressed response")


def _validators(response: httpx.Response) -> Validators:
    etag, modified = response.headers.get("ETag"), response.headers.get("Last-Modified")
    return Validators(
        etag=etag if etag and len(etag) <= _MAX_VALIDATOR else None,
        last_modified=modified if modified and len(modified) <= _MAX_VALIDATOR else None,
    )


def _content_length(response: httpx.Response) -> int | None:
    length = response.headers.get("Content-Length")
    return int(length) if length is not None and _CONTENT_LENGTH.fullmatch(length) else None


async def _body(response: httpx.Response, fetch: _Fetch) -> AsyncGenerator[bytes, None]:
    """The body's chunks as they come, each counted; waiting for them spends the budget."""
    chunks = response.aiter_raw(CHUNK_BYTES)
    while True:
        async with fetch.budget.waiting():
            chunk = await anext(chunks, None)
        if chunk is None:
            return
        fetch.count(len(chunk))
        yield chunk


class _HttpFile(RandomAccess):
    """The final URL of a fetch, read by offset with range requests on its transport."""

    def __init__(
        self, transport: httpx.AsyncBaseTransport, target: HttpTarget, fetch: _Fetch
    ) -> None:
        super().__init__()
        self._transport = transport
        self._target = target
        self._fetch = fetch
        self._etag: str | None = None

    async def send(self, headers: dict[str, str] | None = None) -> httpx.Response:
        request = httpx.Request("GET", self._target.url, headers={**_HEADERS, **(headers or {})})
        request.extensions["timeout"] = httpx.Timeout(self._fetch.settings.fetch_timeout).as_dict()
        async with self._fetch.budget.waiting():
            return await self._transport.handle_async_request(request)

    def first(self, response: httpx.Response) -> None:
        """Remember what the plain GET said of the file, to tell if it changes."""
        self.size = _content_length(response)
        self._etag = response.headers.get("ETag")

    async def _remote(self, start: int, end: int | None) -> AsyncGenerator[bytes, None]:
        """Range requests until ``end``: a server may answer one with fewer bytes than asked."""
        position = start
        while end is None or position < end:
            got = 0
            async with contextlib.aclosing(self._request(position, end)) as chunks:
                async for chunk in chunks:
                    got += len(chunk)
                    yield chunk
            position += got
            # Nothing more, or a 200 that carried the rest: the file ends here.
            if not got or not self.seeks or (self.size is not None and position >= self.size):
                return

    async def _request(self, start: int, end: int | None) -> AsyncGenerator[bytes, None]:
        last = "" if end is None else str(end - 1)
        response = await self.send({"Range": f"bytes={start}-{last}"})
        try:
            skip = self._skip(response, start)
            if skip is None:
                return
            left = None if end is None else end - start
            async with contextlib.aclosing(_body(response, self._fetch)) as chunks:
                async for chunk in chunks:
                    if skip >= len(chunk):  # a server ignoring ranges: read through
                        skip -= len(chunk)
                        continue
                    piece = chunk[skip:] if left is None else chunk[skip : skip + left]
                    skip = 0
                    yield piece
                    if left is not None:
                        left -= len(piece)
                        if left == 0:
                            return
        finally:
            await response.aclose()

    def _skip(self, response: httpx.Response, start: int) -> int | None:
        """How many bytes of the body come before ``start``; ``None``: the file ends before it."""
        status = response.status_code
        if status == 416:
            return None
        if status == 206:
            _check_identity(response)
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if match is None or int(match[1]) != start:
                raise UrlFetchFailed("the server answered a range request with other bytes")
            self._same_file(response, None if match[3] == "*" else int(match[3]))
            return 0
        if status == 200:
            _check_response(response, self._fetch.settings)
            self._same_file(response, _content_length(response))
            if self.seeks:
                logger.info(
                    "%s ignores range requests: reading through to the bytes wanted",
                    self._target.host,
                )
                self.seeks = False
            return start
        raise UrlFetchFailed(f"the URL answered HTTP {status} to a range request")

    def _same_file(self, response: httpx.Response, size: int | None) -> None:
        etag = response.headers.get("ETag")
        if (size is not None and self.size not in (None, size)) or (
            etag is not None and self._etag not in (None, etag)
        ):
            raise UrlFetchFailed("the file changed on the server while it was being fetched")
        if self.size is None:
            self.size = size


async def _read_file(
    path: Path, feed: ByteFeed, fetch: _Fetch, on_body: Callable[[Fetched], None] | None
) -> Fetched:
    try:
        # Checked before opening: opening a FIFO would block its thread for good.
        if not stat.S_ISREG((await asyncio.to_thread(path.stat)).st_mode):
            raise UrlNotAllowed("only regular files are served")
        handle = await asyncio.to_thread(path.open, "rb")
    except OSError:
        raise UrlFetchFailed("the file cannot be opened") from None
    try:
        status = os.fstat(handle.fileno())
        fetched = Fetched(url=path.as_uri(), file=FileStamp.of(path, status))
        if on_body is not None:
            on_body(fetched)
        await _stream_local(LocalFile(handle, status.st_size, fetch.count), feed, fetch)
    except OSError as exc:  # a disk error, a file on a network share gone away
        logger.info("reading a file failed: %s", exc.__class__.__name__)
        raise UrlFetchFailed("the file cannot be read") from None
    finally:
        handle.close()
    return fetched


async def _stream_local(local: RandomAccess, feed: ByteFeed, fetch: _Fetch) -> None:
    """A whole file read by offset (a disk's, or bytes in memory) into ``feed``."""
    async with local.open(0, None) as cursor, contextlib.aclosing(cursor.rest()) as chunks:
        found = await stream_head(chunks, feed, fetch.max_index_bytes)
    if found is not None:
        local.head, layout = found
        logger.info("the MP4 file's index follows its media: reading it first")
        fetch.ranges = True
        await stream_faststart(local, layout, feed, limit=fetch.max_index_bytes)


def _check_size(received: int, settings: Settings) -> None:
    if received > settings.fetch_max_bytes:
        raise UrlFetchFailed(f"the video is larger than {settings.fetch_max_bytes} bytes")
