"""Prometheus metrics: every family the server exports, defined in this one place.

:class:`Metrics` holds one app's families in a registry of its own (never
``prometheus_client``'s global one), so two apps in one process (tests start
many) count apart and never clash over a name. The places where things
happen call its small methods (a session opened, a frame delivered, an
answer finished, an error told); ``GET /metrics`` renders it
(:meth:`Metrics.exposition`) in a worker thread, so a scrape never holds the
event loop.

Labels are bounded sets the code defines, never what a client or the model
chose: the door (``websocket``, ``openai``), error codes of
:mod:`streamchat.errors` and of the OpenAI door, finish reasons, source
kinds. No session ids, no URLs, no keys.

The engine's own families (vLLM's ``vllm:*``, which vLLM's Prometheus stat
logger writes into the global registry) come through an engine that offers
them (:class:`EngineStats`): one scrape shows streamchat's and vLLM's.
Docs: ``docs/metrics.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal, Protocol, runtime_checkable

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "CONTENT_TYPE",
    "DOORS",
    "CacheCounts",
    "LATENCY_BUCKETS",
    "LAG_BUCKETS",
    "Door",
    "EngineStats",
    "Metrics",
    "SourceKind",
]

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""Prometheus' text format, version 0.0.4: what every Prometheus reads (prometheus_client
answers so too when a scraper does not ask for another)."""

Door = Literal["websocket", "openai"]
DOORS: tuple[Door, ...] = ("websocket", "openai")
SourceKind = Literal["push", "image", "url", "file", "data"]
"""How media bytes arrived: pushed chunks, ``image`` messages, fetched ``http(s)`` URLs,
``file:`` URLs, ``data:`` URLs of the OpenAI door."""

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
"""Seconds, for time to first token and answer time: 50 ms (a repeated question on a GPU)
to a minute (a long answer on a CPU)."""
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
"""Seconds a decoder is behind its stream: a live decoder keeps well under its chunk
interval (0.4 s from the browser page); seconds mean it is falling behind."""


class _Counted(Protocol):
    """What an engine counted for one answer (:class:`streamchat.engine.base.Usage`)."""

    @property
    def prompt_tokens(self) -> int: ...
    @property
    def cached_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def video_tokens(self) -> int: ...


class _Engine(Protocol):
    def running(self) -> frozenset[str]: ...


@runtime_checkable
class EngineStats(Protocol):
    """An engine that tells its scheduler's load and exports families of its own."""

    def load(self) -> tuple[int, int]:
        """Requests the engine is running and requests waiting for a place, now."""
        ...

    def families(self) -> Iterable[Metric]:
        """The engine's own families (collected in the scrape's worker thread)."""
        ...


class _EngineFamilies(Collector):
    """A collector that passes an engine's own families through to this registry."""

    def __init__(self, engine: EngineStats) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        yield from self._engine.families()


class CacheCounts(Protocol):
    """What the decoded-video cache counted (:class:`streamchat.videocache.CacheStats`)."""

    body_fetches: int
    not_modified: int
    decodes: int
    hits: int
    shared: int
    evictions: int
    bytes: int
    entries: int


_CACHE_COUNTERS = (
    ("hits", "Requests for media by URL answered from the decoded-video cache."),
    ("shared", "Requests for media by URL that joined an identical one in flight."),
    ("decodes", "Decoders the cache ran (a video, an image, a data:video/jpeg sequence)."),
    ("body_fetches", "Bodies the cache read: an http(s) 200's, a file's."),
    ("not_modified", "304 answers to the cache's conditional requests."),
    ("evictions", "Entries the cache dropped, least recently used first, to stay in its bytes."),
)


class _CacheFamilies(Collector):
    """The decoded-video cache's own counts, read at each scrape (they are the cache's)."""

    def __init__(self, counts: CacheCounts) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        counts = self._counts
        for name, help_text in _CACHE_COUNTERS:
            family = CounterMetricFamily(f"streamchat_video_cache_{name}", help_text)
            family.add_metric([], getattr(counts, name))
            yield family
        held = GaugeMetricFamily(
            "streamchat_video_cache_bytes", "Pixel bytes the decoded-video cache holds now."
        )
        held.add_metric([], counts.bytes)
        yield held
        entries = GaugeMetricFamily(
            "streamchat_video_cache_entries", "Videos and images the decoded-video cache holds now."
        )
        entries.add_metric([], counts.entries)
        yield entries


class Metrics:
    """One app's metric families, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.sessions_open = Gauge(
            "streamchat_sessions_open", "WebSocket sessions open now.", registry=r
        )
        self.sessions_opened = Counter(
            "streamchat_sessions_opened",
            "WebSocket sessions accepted (handshake passed; the client may not have said hello).",
            registry=r,
        )
        self.sessions_refused = Counter(
            "streamchat_sessions_refused",
            "Sessions (websocket) and requests (openai) refused before any work, by the error "
            "code they were told: unauthorized, origin_not_allowed, server_busy, idle_timeout "
            "(no valid hello in time).",
            ["door", "reason"],
            registry=r,
        )
        self.asks = Counter(
            "streamchat_asks",
            "Questions answered (or ended), by how they ended: stop, length, cancelled, error, "
            "shutdown.",
            ["door", "finish_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "streamchat_time_to_first_token_seconds",
            "Seconds from a question's start to its first token (answers that had one).",
            ["door"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.answer_time = Histogram(
            "streamchat_answer_seconds",
            "Seconds from a question's start to the end of its answer, however it ended.",
            ["door"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = self._tokens("prompt", "Prompt tokens (video tokens included).")
        self.cached_prompt_tokens = self._tokens(
            "cached_prompt", "Prompt tokens served from the engine's prefix cache, not computed."
        )
        self.video_tokens = self._tokens("video", "Prompt tokens that stand for video frames.")
        self.completion_tokens = self._tokens("completion", "Tokens generated in answers.")
        self.frames_decoded = Counter(
            "streamchat_frames_decoded",
            "Frames the decoders delivered: sampled at the requested rate, sized for the model.",
            ["door"],
            registry=r,
        )
        self.frames_kept = Counter(
            "streamchat_frames_kept",
            "Frames that entered a session's window (video frames and images).",
            registry=r,
        )
        self.frames_dropped = Counter(
            "streamchat_frames_dropped",
            "Frames dropped: 'evicted' from a full window by newer ones (the window sliding, "
            "expected on a long stream), 'stale' (delivered after their source was replaced).",
            ["reason"],
            registry=r,
        )
        self.decode_lag = Histogram(
            "streamchat_decode_lag_seconds",
            "How far a session's decoder was behind its stream when it delivered a frame: "
            "seconds the oldest undecoded byte had waited (video.status decode_lag).",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.received = Counter(
            "streamchat_media_received_bytes",
            "Media bytes received, by how they came: push, image, url, file, data.",
            ["kind"],
            registry=r,
        )
        self.fetch_failures = Counter(
            "streamchat_fetch_failures",
            "URL fetches (http, https, file) that failed, by error code.",
            ["code"],
            registry=r,
        )
        self.errors = Counter(
            "streamchat_errors",
            "Typed errors told to clients (WebSocket error messages and refused handshakes, "
            "HTTP error bodies and stream error events), by door and code.",
            ["door", "code"],
            registry=r,
        )
        self.engine_running = Gauge(
            "streamchat_engine_requests_running",
            "Requests the engine is generating for now (as of its last step).",
            registry=r,
        )
        self.engine_waiting = Gauge(
            "streamchat_engine_requests_waiting",
            "Requests waiting in the engine's queue for a place (as of its last step).",
            registry=r,
        )
        self.decode_memory_reserved = Gauge(
            "streamchat_decode_memory_reserved_bytes",
            "Decoder memory reserved now by every decoder (sessions' and the video cache's), "
            "out of streamchat_decode_memory_bytes.",
            registry=r,
        )
        self.decode_memory_capacity = Gauge(
            "streamchat_decode_memory_bytes",
            "The server's decoding memory (--decode-memory-bytes, else a quarter of the "
            "machine's).",
            registry=r,
        )
        self.decode_memory_waiting = Gauge(
            "streamchat_decode_memory_waiting",
            "Decoders waiting for room in the decoding memory.",
            registry=r,
        )
        for door in DOORS:  # present from the start, so rates and quantiles have a zero
            for family in (self.ttft, self.answer_time, self.frames_decoded):
                family.labels(door)
            for family in (
                self.prompt_tokens,
                self.cached_prompt_tokens,
                self.video_tokens,
                self.completion_tokens,
            ):
                family.labels(door)
        self.frames_dropped.labels("evicted")
        self.frames_dropped.labels("stale")

    def _tokens(self, kind: str, help: str) -> Counter:
        return Counter(f"streamchat_{kind}_tokens", help, ["door"], registry=self.registry)

    def watch_engine(self, engine: object) -> None:
        """Pass the engine's own families through, if it exports any (:class:`EngineStats`)."""
        if isinstance(engine, EngineStats):
            self.registry.register(_EngineFamilies(engine))

    def watch_video_cache(self, counts: CacheCounts) -> None:
        """Export the decoded-video cache's counts (``streamchat_video_cache_*``)."""
        self.registry.register(_CacheFamilies(counts))

    # -- the calls where things happen (all on the event loop) ----------------------------

    def session_opened(self) -> None:
        self.sessions_opened.inc()
        self.sessions_open.inc()

    def session_closed(self) -> None:
        self.sessions_open.dec()

    def decode_memory(self, *, reserved: int, waiting: int, capacity: int) -> None:
        """The decoding memory's account changed (:mod:`streamchat.media.memory`)."""
        self.decode_memory_reserved.set(reserved)
        self.decode_memory_waiting.set(waiting)
        self.decode_memory_capacity.set(capacity)

    def refused(self, door: Door, reason: str) -> None:
        self.sessions_refused.labels(door, reason).inc()

    def error(self, door: Door, code: str) -> None:
        self.errors.labels(door, code).inc()

    def answered(
        self,
        door: Door,
        finish_reason: str,
        usage: _Counted | None,
        *,
        ttft: float | None,
        seconds: float,
    ) -> None:
        """One question ended; ``usage`` is None when the engine counted nothing."""
        self.asks.labels(door, finish_reason).inc()
        self.answer_time.labels(door).observe(seconds)
        if ttft is not None:
            self.ttft.labels(door).observe(ttft)
        if usage is not None:
            self.prompt_tokens.labels(door).inc(usage.prompt_tokens)
            self.cached_prompt_tokens.labels(door).inc(usage.cached_tokens)
            self.video_tokens.labels(door).inc(usage.video_tokens)
            self.completion_tokens.labels(door).inc(usage.completion_tokens)

    def frame(self, *, kept: bool, evicted: int, lag: float | None = None) -> None:
        """A session's decoder delivered a frame; ``evicted``: frames it pushed out."""
        self.frames_decoded.labels("websocket").inc()
        if kept:
            self.frames_kept.inc()
        else:
            self.frames_dropped.labels("stale").inc()
        if evicted:
            self.frames_dropped.labels("evicted").inc(evicted)
        if lag is not None:
            self.decode_lag.observe(lag)

    def decoded(self, door: Door, frames: int) -> None:
        """Frames decoded for the OpenAI door (a video or an image, fetched or given)."""
        self.frames_decoded.labels(door).inc(frames)

    def bytes_received(self, kind: SourceKind, size: int) -> None:
        self.received.labels(kind).inc(size)

    def fetch_failed(self, code: str) -> None:
        self.fetch_failures.labels(code).inc()

    def engine_load(self, engine: _Engine) -> None:
        """Read the engine's load now (before a scrape): its own counts if it tells them,
        else the answers it is streaming, none waiting."""
        if isinstance(engine, EngineStats):
            running, waiting = engine.load()
        else:
            running, waiting = len(engine.running()), 0
        self.engine_running.set(running)
        self.engine_waiting.set(waiting)

    # -- the scrape -----------------------------------------------------------------------

    def exposition(self) -> bytes:
        """Every family in Prometheus' text format. Blocking: call it in a worker thread."""
        return generate_latest(self.registry)
