"""URL sources: stream a video's bytes into a feed, never whole into memory.

The server reads the bytes itself and hands them to the decoder through a
:class:`~streamchat.feed.ByteFeed`, so a client-supplied string never reaches
FFmpeg as a path or protocol URL. ``http``/``https`` are fetched with httpx;
``file:`` URLs are read only from below the configured directory. The feed's
bounded ``put`` gives natural backpressure: a file is fetched only as fast as
it is decoded.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from .config import Settings
from .errors import UrlFetchFailed, UrlNotAllowed
from .feed import ByteFeed

__all__ = ["CHUNK_BYTES", "fetch_into"]

CHUNK_BYTES = 256 * 1024
MAX_REDIRECTS = 5

logger = logging.getLogger("streamchat.fetch")


async def fetch_into(url: str, feed: ByteFeed, settings: Settings) -> None:
    """Stream ``url`` into ``feed`` and close it; raise a typed error on failure."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        await _fetch_http(url, feed, settings)
    elif scheme == "file":
        await _read_file(_allowed_path(url, settings), feed, settings)
    else:
        raise UrlNotAllowed(f"URL scheme {scheme or '(none)'!r} is not allowed: use http or https")
    feed.close()


async def _fetch_http(url: str, feed: ByteFeed, settings: Settings) -> None:
    timeout = httpx.Timeout(settings.fetch_timeout)
    received = 0
    try:
        async with (
            httpx.AsyncClient(
                timeout=timeout,
                follow_redirects=True,
                max_redirects=MAX_REDIRECTS,
                trust_env=False,
            ) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise UrlFetchFailed(f"the URL answered HTTP {response.status_code}")
            async for chunk in response.aiter_bytes(CHUNK_BYTES):
                received += len(chunk)
                _check_size(received, settings)
                await feed.put(chunk)
    except httpx.InvalidURL:
        raise UrlNotAllowed("the URL is not valid") from None
    except httpx.TooManyRedirects:
        raise UrlFetchFailed(f"more than {MAX_REDIRECTS} redirects") from None
    except httpx.TimeoutException:
        raise UrlFetchFailed(f"no answer within {settings.fetch_timeout:g} s") from None
    except httpx.HTTPError as exc:
        logger.info("fetch failed: %s", exc.__class__.__name__)
        raise UrlFetchFailed("could not fetch the URL (connection failed)") from None


def _allowed_path(url: str, settings: Settings) -> Path:
    root = settings.allowed_file_dir
    if root is None:
        raise UrlNotAllowed("file: URLs are not enabled on this server")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise UrlNotAllowed("file: URLs must name a local path")
    path = Path(unquote(parts.path)).resolve()
    if not path.is_relative_to(root.resolve()):
        raise UrlNotAllowed("the file is outside the directory this server serves")
    return path


async def _read_file(path: Path, feed: ByteFeed, settings: Settings) -> None:
    try:
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
