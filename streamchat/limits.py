"""Per-session rate limits: token buckets, fed the loop's clock. No I/O.

Two budgets, and every client message is charged to exactly one of them:

* **Pushed media** (``video.chunk``, ``video.end``, ``image``) is charged in
  bytes against ``video_bytes_per_second``, after a burst of one feed buffer,
  and is never refused for its rate: a gap inside a container stream corrupts
  what follows it, a lost ``video.end`` leaves the tail of a source undecoded
  until it times out, and a lost image is a lost frame the client cannot name.
  Media over the rate is *paced*: the limiter says how long the reader must
  wait before taking the next message, and TCP slows the client down.

  Each media message costs at least :func:`media_floor` bytes, however small
  it is, so that tiny messages are no free way round the message rate: what
  a message costs the server (a WebSocket frame, a parse, a protocol step, a
  feed append) does not shrink with its payload. At the default rates the
  floor is :data:`MEDIA_MESSAGE_FLOOR`, 16 KiB: at most 2048 media messages a
  second, about ten times the message rate (a tiny ``video.chunk`` costs a
  server about 45 us of CPU end to end, so under a tenth of a core), while a
  1080p60 H.264 stream of 28 Mbit/s pushed in 8 KiB chunks is 430 chunks a
  second, charged 7 MB/s of the 32 MiB/s: a fifth of the allowance, so
  real-time video in small chunks is never paced.
  Where the byte rate is set so low that 16 KiB would be more than one
  message's share of it (``video_bytes_per_second / messages_per_second``),
  that share is the floor instead: media may always send as many messages
  as anything else may.

* **Every other message** (``hello``, ``video.url``, ``ask``, ``cancel``,
  and messages refused before they could be read: malformed or too large)
  takes one of ``message_burst`` tokens, refilled at ``messages_per_second``.
  Over that it is refused with ``rate_limited`` and dropped (the session goes
  on); a client that keeps sending after being refused, more than a further
  burst's worth, is flooding: the session is closed with close code 4429. A
  refusal of an ``ask`` names its id, so the client knows which answer will
  never come (see :func:`~streamchat.messages.message_id`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from .config import Settings
from .errors import Flooding, RateLimited
from .messages import ClientMessage, Image, VideoChunk, VideoEnd, message_id

__all__ = ["MEDIA_MESSAGE_FLOOR", "ClientRates", "RateLimiter", "TokenBucket", "media_floor"]

MEDIA_MESSAGE_FLOOR = 16 * 1024
"""Bytes a pushed media message costs at least against the video byte rate (see above)."""


def media_floor(settings: Settings) -> float:
    """Bytes each pushed media message is charged at least, for ``settings``' rates."""
    if settings.messages_per_second <= 0:
        return float(MEDIA_MESSAGE_FLOOR)
    share = settings.video_bytes_per_second / settings.messages_per_second
    return min(float(MEDIA_MESSAGE_FLOOR), share)


@dataclass(slots=True)
class TokenBucket:
    """``burst`` tokens at most, refilled at ``rate`` per second."""

    rate: float
    burst: float
    tokens: float = field(init=False)
    stamp: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def take(self, now: float, amount: float = 1.0) -> bool:
        """Spend ``amount`` if the bucket holds it; a refusal spends nothing."""
        if self.stamp is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if amount > self.tokens:
            return False
        self.tokens -= amount
        return True


class RateLimiter:
    """The limits of one session."""

    def __init__(self, settings: Settings) -> None:
        burst = max(settings.message_burst, 1)
        self.messages = TokenBucket(settings.messages_per_second, burst)
        self.refusals = TokenBucket(settings.messages_per_second, burst)
        self.video = TokenBucket(settings.video_bytes_per_second, settings.feed_bytes)
        self.floor = media_floor(settings)

    def admit(self, now: float, message: ClientMessage) -> float:
        """Charge one parsed message: seconds to wait before reading on (0: none).

        Pushed media is charged to the byte budget and paced, never refused;
        anything else takes a message token or raises :class:`RateLimited`
        (:class:`Flooding` once the client ignored a burst of refusals),
        naming the id of an ``ask``.
        """
        match message:
            case VideoChunk(data=data) | Image(data=data):
                return self.video_delay(now, max(float(len(data)), self.floor))
            case VideoEnd():
                return self.video_delay(now, self.floor)
        self.admit_message(now, id=message_id(message))
        return 0.0

    def admit_message(self, now: float, *, id: str | None = None) -> None:
        """Take a message token, or raise :class:`RateLimited` (or :class:`Flooding`).

        Also for messages refused before they were read (malformed, too
        large): a refusal costs the server a read too. ``id`` is what the
        refusal names: the id of the ``ask`` refused, if known.
        """
        if not self.messages.take(now):
            self._refuse(now, f"more than {self.messages.rate:g} messages per second", id)

    def video_delay(self, now: float, size: float) -> float:
        """Seconds to wait before reading on, after ``size`` pushed bytes (0: none).

        The bytes are always taken; the allowance may go negative, and the
        wait is what brings it back to zero.
        """
        bucket = self.video
        bucket.take(now, 0.0)  # refill up to now
        bucket.tokens -= size
        return max(0.0, -bucket.tokens / bucket.rate)

    def _refuse(self, now: float, what: str, id: str | None) -> None:
        if not self.refusals.take(now):
            raise Flooding(f"{what}, after being told to slow down: closing", id=id)
        raise RateLimited(f"{what}: message dropped, slow down", id=id)


class ClientRates:
    """Requests per second per client identity, for a door without sessions (HTTP).

    A WebSocket's messages are counted by its session's :class:`RateLimiter`;
    an HTTP request has no session to hold a bucket, so the buckets are kept
    here by identity (an API key's hash, else an address). Memory is bounded:
    at most ``max_clients`` buckets, the least recently used forgotten first,
    and a forgotten client only gets a fresh burst, as a new one would.
    """

    def __init__(self, rate: float, burst: int, *, max_clients: int = 4096) -> None:
        self.rate = rate
        self.burst = max(burst, 1)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, identity: str, now: float) -> bool:
        """Count one request of ``identity``; False when it is over its rate (nothing spent)."""
        bucket = self._buckets.get(identity)
        if bucket is None:
            bucket = self._buckets[identity] = TokenBucket(self.rate, self.burst)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(identity)
        return bucket.take(now)
