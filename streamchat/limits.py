"""Per-session rate limits: token buckets, fed the loop's clock. No I/O.

A session may send ``message_burst`` messages at once and
``messages_per_second`` on average; pushed video may arrive in a burst of one
feed buffer and ``video_bytes_per_second`` on average. A message over either
limit is refused with ``rate_limited`` and dropped (the session goes on). A
client that keeps sending after being refused, more than a further burst's
worth, is flooding: the session is closed with close code 4429.
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
        rate = settings.video_bytes_per_second
        self.video = TokenBucket(rate, max(settings.feed_bytes, rate, settings.max_message_bytes))

    def admit_message(self, now: float) -> None:
        """Raise :class:`RateLimited` (or :class:`Flooding`) unless a message may go on."""
        if not self.messages.take(now):
            self._refuse(now, f"more than {self.messages.rate:g} messages per second")

    def admit_video(self, now: float, size: int) -> None:
        """Raise :class:`RateLimited` (or :class:`Flooding`) unless ``size`` pushed bytes may."""
        if not self.video.take(now, size):
            self._refuse(now, f"more than {self.video.rate:.0f} video bytes per second")

    def _refuse(self, now: float, what: str) -> None:
        if not self.refusals.take(now):
            raise Flooding(f"{what}, after being told to slow down: closing")
        raise RateLimited(f"{what}: message dropped, slow down")
