"""Which sources are known, and who waits for what: entries by identity, LRU, single flight.

See the package's docstring for the rules; this module keeps them:
:class:`VideoCache` finds a source's entry (``data:`` by digest, ``file:`` by
its stamp, ``http(s)`` revalidated with its validators), else starts one
flight of work per identical request and keeps its outcome within the byte
bound.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, cast

import httpcore

from ..config import Settings
from ..errors import UrlNotAllowed
from ..ingest import (
    DataUrl,
    Fetched,
    Resolver,
    Validators,
    bytes_into,
    fetch_into,
    is_data_url,
    parse_data_url,
    stat_file,
    url_scheme,
)
from ..media import DecodeMemory
from ..metrics import Metrics
from ..window import Frame
from .decoding import (
    DecodedVideo,
    Known,
    Pipe,
    Sampling,
    Threads,
    image_frame,
    jpeg_frames,
    picture,
    video_frames,
)

__all__ = ["CacheStats", "VideoCache"]

_Kind = Literal["video", "image"]
_Key = tuple[object, ...]
_Media = DecodedVideo | Frame


@dataclass
class CacheStats:
    """What the cache did, counted since it was made (``bytes`` and ``entries``: held now)."""

    body_fetches: int = 0
    """Bodies read: an ``http(s)`` response's (``200``), a file's."""
    not_modified: int = 0
    """``304`` answers to conditional requests."""
    decodes: int = 0
    """Decoders run: a video, an image, a ``data:video/jpeg`` sequence."""
    hits: int = 0
    """Requests answered from an entry (an unchanged file, the same ``data:``, a ``304``, a
    ``200`` with the entry's validators)."""
    shared: int = 0
    """Requests that joined an identical one in flight."""
    evictions: int = 0
    bytes: int = 0
    entries: int = 0


@dataclass(frozen=True, eq=False)
class _Entry:
    value: _Media
    identity: object
    """What the source was when decoded: a ``FileStamp``, an ``http(s)`` ``Fetched``, a digest."""

    @property
    def nbytes(self) -> int:
        return self.value.nbytes

    def same(self, fetched: Fetched) -> bool:
        """Whether a fetch found the source this entry was decoded from."""
        if fetched.file is not None:
            return fetched.file == self.identity
        known = self.identity
        return (
            isinstance(known, Fetched)
            and known.url == fetched.url
            and bool(fetched.validators)
            and known.validators == fetched.validators
        )


class _Flight:
    def __init__(self, task: asyncio.Task[_Media]) -> None:
        self.task = task
        self.waiters = 0


class VideoCache:
    """Sampled frames of media named by URL, bounded in bytes, shared by identical requests.

    ``max_bytes`` bounds the frames kept (``settings.video_cache_bytes`` if
    None); ``resolver`` and ``network`` are handed to the fetcher (tests play
    a network with them); ``metrics`` counts bytes received, fetch failures and
    frames decoded. :meth:`aclose` stops what is in flight.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        max_bytes: int | None = None,
        resolver: Resolver | None = None,
        network: httpcore.AsyncNetworkBackend | None = None,
        metrics: Metrics | None = None,
        memory: DecodeMemory | None = None,
    ) -> None:
        self.settings = settings
        self.memory = memory
        self.metrics = metrics or Metrics()
        self.max_bytes = settings.video_cache_bytes if max_bytes is None else max_bytes
        self.stats = CacheStats()
        self._resolver = resolver
        self._network = network
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()
        self._flights: dict[_Key, _Flight] = {}
        self._threads = Threads(settings.max_media_decodes)

    async def video(self, url: str, sampling: Sampling) -> DecodedVideo:
        """The frames of the video at ``url``: ``http(s)``, ``file:`` or ``data:``."""
        return cast(DecodedVideo, await self._media(url, "video", sampling, sampling))

    async def image(self, url: str, sampling: Sampling) -> Frame:
        """The image at ``url`` (PNG, JPEG or WebP) as one frame at time 0."""
        budget = (sampling.min_pixels, sampling.max_pixels, sampling.factor)
        return cast(Frame, await self._media(url, "image", sampling, budget))

    async def aclose(self) -> None:
        """Cancel the work in flight and let the decoder threads go (each ends at its next read)."""
        tasks = [flight.task for flight in self._flights.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._threads.close()

    # -- sources -------------------------------------------------------------

    async def _media(self, url: str, kind: _Kind, sampling: Sampling, variant: object) -> _Media:
        if is_data_url(url):
            data = await asyncio.to_thread(
                parse_data_url,
                url,
                max_bytes=self.settings.max_data_url_bytes,
                max_frames=self.settings.max_data_url_frames,
            )
            self.metrics.bytes_received("data", sum(len(p) for p in data.payloads))
            if kind == "video":
                data.check_video()
            else:
                data.check_image()
            key: _Key = ("data", data.digest, kind, variant)
            if (hit := self._hit(key, data.digest)) is not None:
                return hit
            return await self._join(key, lambda: self._from_data(key, data, kind, sampling))
        scheme = url_scheme(url)
        if scheme == "file":
            stamp = await stat_file(url, self.settings)
            key = ("file", stamp.path, kind, variant)
            if (hit := self._hit(key, stamp)) is not None:
                return hit
            return await self._join(key, lambda: self._from_url(key, url, kind, sampling))
        if scheme in ("http", "https"):
            key = ("url", url, kind, variant)
            return await self._join(key, lambda: self._from_url(key, url, kind, sampling))
        raise UrlNotAllowed(
            f"URL scheme {scheme or '(none)'!r} is not allowed: use http, https, data or file"
        )

    async def _from_data(self, key: _Key, data: DataUrl, kind: _Kind, sampling: Sampling) -> _Media:
        self.stats.decodes += 1
        settings = self.settings
        value: _Media
        if kind == "image":
            value = await self._threads.run(lambda: picture(data.payloads[0], settings, sampling))
        elif data.jpeg_frames:
            value = await self._threads.run(lambda: jpeg_frames(data.payloads, settings, sampling))
        else:
            pipe = Pipe(
                settings,
                self._threads,
                lambda feed, stop, need: video_frames(feed, stop, settings, sampling, need),
                self.memory,
            )
            pipe.start(None)
            _, decoded = await pipe.run(bytes_into(data.payloads[0], pipe.feed, settings))
            value = cast(DecodedVideo, decoded)
        self._decoded(value)
        self._store(key, _Entry(value, data.digest))
        return value

    async def _from_url(self, key: _Key, url: str, kind: _Kind, sampling: Sampling) -> _Media:
        """Fetch and decode ``url``, conditionally if an entry for it has validators."""
        entry = self._entries.get(key)
        known = entry.identity if entry is not None else None
        validators = known.validators if isinstance(known, Fetched) else None
        try:
            fetched, value = await self._fetch(url, kind, sampling, validators, entry)
            if value is None and not (isinstance(known, Fetched) and known.url == fetched.url):
                # A 304 from elsewhere (the redirects changed): ask without conditions.
                fetched, value = await self._fetch(url, kind, sampling, None, entry)
        except Known:
            value = None
        if value is None:
            assert entry is not None
            self.stats.hits += 1
            self._store(key, entry)  # again: it may have been evicted meanwhile
            return entry.value
        self._decoded(value)
        if fetched.file is not None or fetched.validators:
            self._store(key, _Entry(value, fetched.file or fetched))
        else:
            self._drop(key)  # nothing to revalidate an entry with
        return value

    async def _fetch(
        self,
        url: str,
        kind: _Kind,
        sampling: Sampling,
        validators: Validators | None,
        entry: _Entry | None,
    ) -> tuple[Fetched, _Media | None]:
        """``url`` fetched into a decoder: what was fetched, and its frames (none for a ``304``).

        Raises ``Known`` for a body that is ``entry``'s, before reading it.
        """
        settings = self.settings
        pipe: Pipe[_Media] = Pipe(
            settings,
            self._threads,
            (lambda feed, stop, need: image_frame(feed, settings, sampling))
            if kind == "image"
            else (lambda feed, stop, need: video_frames(feed, stop, settings, sampling, need)),
            self.memory,
        )

        def on_body(fetched: Fetched) -> None:
            if entry is not None and entry.same(fetched):
                raise Known
            self.stats.body_fetches += 1
            self.stats.decodes += 1
            pipe.start(fetched)

        fetch = fetch_into(
            url,
            pipe.feed,
            settings,
            resolver=self._resolver,
            network=self._network,
            validators=validators,
            on_body=on_body,
            metrics=self.metrics,
        )
        fetched, value = await pipe.run(fetch)
        assert fetched is not None  # a fetch always says what it fetched
        if value is None:
            self.stats.not_modified += 1
        return fetched, value

    def _decoded(self, value: _Media) -> None:
        self.metrics.decoded("openai", len(value.frames) if isinstance(value, DecodedVideo) else 1)

    # -- entries and flights -----------------------------------------------------

    def _hit(self, key: _Key, identity: object) -> _Media | None:
        entry = self._entries.get(key)
        if entry is None or entry.identity != identity:
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry.value

    async def _join(self, key: _Key, work: Callable[[], Coroutine[Any, Any, _Media]]) -> _Media:
        """The outcome of ``work()``, or of the identical work already in flight."""
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight(asyncio.create_task(work()))
            flight.task.add_done_callback(lambda _: self._landed(key, flight))
        else:
            self.stats.shared += 1
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if not flight.waiters and not flight.task.done():
                flight.task.cancel()  # nobody wants it any more
                self._landed(key, flight)

    def _landed(self, key: _Key, flight: _Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        task = flight.task
        if task.done() and not task.cancelled():
            task.exception()  # each waiter has it; retrieved here in case none is left

    def _store(self, key: _Key, entry: _Entry) -> None:
        self._drop(key)
        if entry.nbytes > self.max_bytes:
            return  # given to its requests, not kept
        self._entries[key] = entry
        self.stats.bytes += entry.nbytes
        while self.stats.bytes > self.max_bytes:
            _, oldest = self._entries.popitem(last=False)
            self.stats.bytes -= oldest.nbytes
            self.stats.evictions += 1
        self.stats.entries = len(self._entries)

    def _drop(self, key: _Key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.stats.bytes -= entry.nbytes
            self.stats.entries = len(self._entries)
