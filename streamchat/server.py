"""What every session of one server shares: admission, the registry of sessions, draining.

Kept apart from the app (routes, lifespan) and the endpoint (one connection's
loops), which both use it: :class:`ServerState` is created by the app's
lifespan and found by each connection on ``app.state.streamchat``. It counts
places synchronously, so a check and its count are never split by another
handshake; the only awaits are on the registry's condition and on sessions
being told to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .access import Grant, KeyStore, RefusalLog, admit
from .budget import VisionCosts, plan
from .config import Settings
from .engine.base import Engine
from .engine.prompt import MAX_CLIPS
from .errors import AccessError, CloseCode, ServerBusy
from .limits import ClientRates
from .media import DecodeMemory
from .metrics import Metrics
from .videocache import VideoCache

if TYPE_CHECKING:
    from .session import Session

__all__ = ["ServerState", "Waiting", "fit_context"]

REFUSAL_LOG_INTERVAL = 10.0
"""Seconds between summaries of refused handshakes (see :class:`~streamchat.access.RefusalLog`)."""

logger = logging.getLogger("streamchat.server")


@dataclass(eq=False)
class Waiting:
    """A place held by a connection that has not authenticated yet.

    See :meth:`ServerState.reserve_waiting`; ``on_evict`` is how the state
    tells the connection it gave its place up.
    """

    address: str
    number: int
    """Admission order: the lowest is the oldest."""
    evicted: bool = False
    on_evict: Callable[[], None] | None = None


@dataclass(eq=False)
class ServerState:
    """What every session of one app shares.

    Two kinds of places, counted apart, each synchronously (a check and its
    count are never split by another handshake): *sessions*
    (:meth:`reserve`), held by clients that authenticated, and *waiting*
    places (:meth:`reserve_waiting`), held by connections that have not yet.
    However many connections wait, they take nothing from the sessions', so
    clients without a key can never keep a key holder out.
    """

    settings: Settings
    engine: Engine
    keys: KeyStore = field(default_factory=KeyStore)
    sessions: set[Session] = field(default_factory=set)
    closing: bool = False
    """Shutting down: new sessions are refused."""
    _per_client: Counter[str] = field(default_factory=Counter)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _waiting: dict[Waiting, None] = field(default_factory=dict)
    """Oldest first (dicts keep their insertion order)."""
    _waiting_by_address: dict[str, dict[Waiting, None]] = field(default_factory=dict)
    _numbers: itertools.count[int] = field(default_factory=itertools.count)
    refusals: RefusalLog = field(default_factory=lambda: RefusalLog(REFUSAL_LOG_INTERVAL))
    _refusals_due: asyncio.TimerHandle | None = None
    videos: VideoCache = field(default=None)  # type: ignore[assignment]
    """Decoded videos and images of the OpenAI-compatible door, kept for the next request."""
    _by_id: dict[str, Session] = field(default_factory=dict)
    _unreserved: asyncio.Event = field(default_factory=asyncio.Event)
    request_rates: ClientRates = field(default=None)  # type: ignore[assignment]
    """Requests per client of the OpenAI-compatible door (sessions count their own)."""
    metrics: Metrics = field(default_factory=Metrics)
    """This app's metric families (``GET /metrics``)."""
    memory: DecodeMemory = field(default=None)  # type: ignore[assignment]
    """The decoding memory every decoder holds room in: sessions' and the video cache's."""

    def __post_init__(self) -> None:
        self.metrics.watch_engine(self.engine)
        if self.memory is None:
            self.memory = DecodeMemory.from_settings(self.settings, self.metrics)
            logger.info(
                "decoding memory: %d MiB for all decoders", self.memory.budget.capacity >> 20
            )
        if self.videos is None:
            self.videos = VideoCache(
                self.settings,
                max_bytes=self.settings.video_cache_bytes,
                metrics=self.metrics,
                memory=self.memory,
            )
        self.metrics.watch_video_cache(self.videos.stats)
        if self.request_rates is None:
            s = self.settings
            self.request_rates = ClientRates(s.requests_per_second, s.request_burst)

    def admit(
        self, headers: Mapping[str, str], client: str | None, subprotocols: Iterable[str] = ()
    ) -> Grant:
        """A request's origin and key checked against this server's (:func:`~.access.admit`)."""
        return admit(
            headers,
            subprotocols,
            client,
            keys=self.keys,
            allowed_origins=self.settings.allowed_origins,
        )

    def find_session(self, session_id: str) -> Session | None:
        """The open session of that id, if any."""
        return self._by_id.get(session_id)

    def reserve(self, identity: str) -> None:
        """Count a new session against the limits, or raise :class:`ServerBusy`.

        :meth:`release` gives the place back.
        """
        self._check(identity)
        self._per_client[identity] += 1

    def _check(self, identity: str | None) -> None:
        """Raise :class:`ServerBusy` if a session for ``identity`` (None: any) would be refused."""
        s = self.settings
        if self.closing:
            raise ServerBusy("the server is shutting down")
        if self._per_client.total() >= s.max_sessions:
            raise ServerBusy(f"the server is full ({s.max_sessions} sessions): try again later")
        if identity is not None and self._per_client[identity] >= s.max_sessions_per_client:
            raise ServerBusy(
                f"at most {s.max_sessions_per_client} sessions per client: close one first"
            )

    def release(self, identity: str) -> None:
        self._per_client[identity] -= 1
        if self._per_client[identity] <= 0:
            del self._per_client[identity]
        if not self._per_client:
            self._unreserved.set()

    @property
    def reserved(self) -> int:
        """Places held now: sessions, and requests of the OpenAI-compatible door."""
        return self._per_client.total()

    async def wait_unreserved(self) -> None:
        """Return once no place is held (every session closed, every request answered)."""
        while self._per_client:
            self._unreserved.clear()
            await self._unreserved.wait()

    @property
    def waiting(self) -> int:
        """Connections holding a waiting place."""
        return len(self._waiting)

    def reserve_waiting(self, address: str, *, then: str | None) -> Waiting:
        """A place for a connection yet to authenticate, or :class:`ServerBusy`.

        ``then`` is the identity its session will count under once it has, if
        already known (auth off: its address): a connection that would then
        be refused is refused now. One address holds at most
        ``max_pending_per_address`` places. When all ``max_pending_sessions``
        are held, the address holding the most gives up its oldest (its
        connection is told ``server_busy`` and closed) rather than the
        newcomer being refused: connections that only hold places cannot
        keep a newcomer out, and a client waiting alone (as one does for a
        round trip) only gives way once ``max_pending_sessions`` addresses
        wait at once. :meth:`release_waiting` gives the place back.
        """
        s = self.settings
        self._check(then)
        mine = self._waiting_by_address.get(address, {})
        if len(mine) >= s.max_pending_per_address:
            raise ServerBusy(
                f"at most {s.max_pending_per_address} connections per client may wait to "
                "authenticate: send 'hello' on those first"
            )
        if len(self._waiting) >= s.max_pending_sessions:
            if not self._waiting:
                raise ServerBusy("this server takes no connections before they authenticate")
            self._evict(self._longest_queue())
        place = Waiting(address, next(self._numbers))
        self._waiting[place] = None
        self._waiting_by_address.setdefault(address, {})[place] = None
        return place

    def release_waiting(self, place: Waiting) -> None:
        """Give a waiting place back (again is harmless: evicted places are given back at once)."""
        self._waiting.pop(place, None)
        mine = self._waiting_by_address.get(place.address)
        if mine is not None:
            mine.pop(place, None)
            if not mine:
                del self._waiting_by_address[place.address]

    def _longest_queue(self) -> Waiting:
        """The oldest place of the address holding the most (of those, the oldest)."""
        queues = (next(iter(places)) for places in self._waiting_by_address.values())
        sizes = {p: len(self._waiting_by_address[p.address]) for p in queues}
        return min(sizes, key=lambda p: (-sizes[p], p.number))

    def _evict(self, place: Waiting) -> None:
        self.release_waiting(place)
        place.evicted = True
        if place.on_evict is not None:
            place.on_evict()

    def refused(self, exc: AccessError, address: str) -> None:
        """Log and count a refused handshake (see :class:`~streamchat.access.RefusalLog`)."""
        self.metrics.refused("websocket", exc.code)
        loop = asyncio.get_running_loop()
        if self.refusals.refused(exc, address, loop.time()):
            self._refusals_due = loop.call_later(self.refusals.interval, self._refusals_tick)

    def _refusals_tick(self) -> None:
        loop = asyncio.get_running_loop()
        self._refusals_due = None
        if self.refusals.flush(loop.time()):
            self._refusals_due = loop.call_later(self.refusals.interval, self._refusals_tick)

    def flush_refusals(self) -> None:
        """Say what the refusal log counted so far (at shutdown)."""
        if self._refusals_due is not None:
            self._refusals_due.cancel()
            self._refusals_due = None
        self.refusals.flush(asyncio.get_running_loop().time())

    async def drain(self, timeout: float) -> None:
        """Stop gracefully: refuse new sessions, tell open ones, let answers finish.

        Answers still running after ``timeout`` end with ``finish_reason``
        ``shutdown``; then every session is closed with 1001 (going away).
        """
        self.closing = True
        sessions = list(self.sessions)
        logger.info("shutting down: %d session(s) open", len(sessions))
        reason = "the server is shutting down"
        await asyncio.gather(*(s.going_away(reason, timeout) for s in sessions))
        await asyncio.gather(*(s.wait_answers(timeout) for s in sessions))

        async def close(session: Session) -> None:
            await session.abort_answers("shutdown")
            await session.close_soon(CloseCode.GOING_AWAY, reason)

        # Side by side: a session whose client reads nothing waits out its send timeout alone.
        await asyncio.gather(*(close(session) for session in sessions))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.send_timeout + 1.0):
                await self.wait_sessions(0)

    async def add(self, session: Session) -> None:
        async with self._changed:
            self.sessions.add(session)
            self._by_id[session.id] = session
            self.metrics.session_opened()
            self._changed.notify_all()

    async def discard(self, session: Session) -> None:
        """Forget a session once it has fully stopped (answers aborted, decoders ended)."""
        async with self._changed:
            if session in self.sessions:
                self.metrics.session_closed()
            self.sessions.discard(session)
            self._by_id.pop(session.id, None)
            self._changed.notify_all()

    async def wait_sessions(self, count: int) -> None:
        """Return once exactly ``count`` sessions are open (for tests and shutdown)."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.sessions) == count)


def fit_context(settings: Settings, costs: VisionCosts | None) -> Settings:
    """Settings whose window fits the model's context (see :mod:`streamchat.budget`).

    Raises ``ValueError`` when not even a couple of frames fit: the server
    must not start and fail on every question.
    """
    if costs is None:
        return settings
    fitted = plan(
        costs,
        window_frames=settings.window_frames,
        max_pixels=settings.max_pixels,
        answer_tokens=settings.max_tokens_limit,
        reserve_tokens=settings.context_reserve,
        max_clips=MAX_CLIPS,
    )
    if fitted.lowered_from is not None:
        logger.warning(
            "a window of %d frames does not fit the model's context of %d tokens "
            "(%d tokens a frame, %d for answers, %d reserved): lowered to %d frames",
            fitted.lowered_from,
            costs.max_model_len,
            fitted.tokens_per_frame,
            settings.max_tokens_limit,
            settings.context_reserve,
            fitted.window_frames,
        )
    logger.info(
        "context: %d tokens, %d a frame, at most %d frames a question",
        costs.max_model_len,
        fitted.tokens_per_frame,
        fitted.max_ask_frames,
    )
    return dataclasses.replace(
        settings,
        window_frames=fitted.window_frames,
        max_ask_frames=fitted.max_ask_frames,
        tokens_per_frame=fitted.tokens_per_frame,
    )
