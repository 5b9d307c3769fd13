"""Per-session rate limits: token buckets, fed the loop's clock. No I/O.

A session may send ``message_burst`` messages at once and
``messages_per_second`` on average. A message over that is refused with
``rate_limited`` and dropped (the session goes on); a client that keeps
sending after being refused, more than a further burst's worth, is flooding:
the session is closed with close code 4429.

Pushed video is never dropped for its rate (a gap inside a container stream
corrupts what follows it): after a burst of one feed buffer, chunks beyond
``video_bytes_per_second`` are *paced*. The limiter says how long the reader
must wait before taking the next message, and TCP slows the client down.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import Settings
from .errors import Flooding, RateLimited

__all__ = ["RateLimiter", "TokenBucket"]


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

    def admit_message(self, now: float) -> None:
        """Raise :class:`RateLimited` (or :class:`Flooding`) unless a message may go on."""
        if not self.messages.take(now):
            self._refuse(now, f"more than {self.messages.rate:g} messages per second")

    def video_delay(self, now: float, size: int) -> float:
        """Seconds to wait before reading on, after ``size`` pushed bytes (0: none).

        The bytes are always taken; the allowance may go negative, and the
        wait is what brings it back to zero.
        """
        bucket = self.video
        bucket.take(now, 0.0)  # refill up to now
        bucket.tokens -= size
        return max(0.0, -bucket.tokens / bucket.rate)

    def _refuse(self, now: float, what: str) -> None:
        if not self.refusals.take(now):
            raise Flooding(f"{what}, after being told to slow down: closing")
        raise RateLimited(f"{what}: message dropped, slow down")
