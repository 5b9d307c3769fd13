"""Rate limits on an explicit clock: refill, refusal, flooding."""

from __future__ import annotations

import pytest

from streamchat.config import Settings
from streamchat.errors import Flooding, RateLimited
from streamchat.limits import RateLimiter, TokenBucket


def test_bucket_allows_a_burst_then_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=3.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.05)  # half a token back
    assert bucket.take(0.1)
    assert bucket.take(100.0, 3.0)  # never more than the burst
    assert not bucket.take(100.0, 0.5)


def test_a_refusal_spends_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=5.0)
    assert not bucket.take(0.0, 6.0)
    assert bucket.take(0.0, 5.0)


def test_messages_over_the_rate_are_refused_then_flooding_closes() -> None:
    limiter = RateLimiter(Settings(messages_per_second=10.0, message_burst=5))
    for _ in range(5):
        limiter.admit_message(0.0)
    refused = 0
    with pytest.raises(Flooding) as flooding:
        while True:
            try:
                limiter.admit_message(0.0)
            except Flooding:
                raise
            except RateLimited as exc:
                assert not exc.fatal
                refused += 1
    assert refused == 5  # a second burst's worth of refusals, then the close
    assert flooding.value.fatal and flooding.value.code == "rate_limited"
    assert flooding.value.close_code == 4429


def test_a_client_that_slows_down_is_served_again() -> None:
    limiter = RateLimiter(Settings(messages_per_second=8.0, message_burst=2))
    limiter.admit_message(0.0)
    limiter.admit_message(0.0)
    with pytest.raises(RateLimited):
        limiter.admit_message(0.0)
    for step in range(1, 50):  # 8 per second (binary-exact times), sustained, never refused
        limiter.admit_message(step * 0.125)


def test_video_over_its_rate_is_paced_not_refused() -> None:
    settings = Settings(video_bytes_per_second=1000, feed_bytes=2000)
    limiter = RateLimiter(settings)
    assert limiter.video_delay(0.0, 2000) == 0.0  # one buffer's burst
    assert limiter.video_delay(0.0, 500) == 0.5  # half a second's worth over
    assert limiter.video_delay(0.5, 1000) == 1.0  # back to zero at 0.5 s, 1 s more now
    assert limiter.video_delay(10.0, 100) == 0.0  # refilled (never beyond the burst)
