"""Rate limits on an explicit clock: refill, refusal, flooding, pacing of pushed media."""

from __future__ import annotations

import pytest

from streamchat.config import Settings
from streamchat.errors import Flooding, RateLimited
from streamchat.limits import (
    MEDIA_MESSAGE_FLOOR,
    ClientRates,
    RateLimiter,
    TokenBucket,
    media_floor,
)
from streamchat.messages import Ask, Cancel, Hello, Image, VideoChunk, VideoEnd, VideoUrl


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


# -- which budget each message is charged to ----------------------------------


def test_refusals_name_the_id_of_the_ask_they_drop() -> None:
    """Over the message rate an ask's refusal carries its id; a cancel's (a live answer's) not."""
    limiter = RateLimiter(Settings(messages_per_second=1.0, message_burst=3))
    for _ in range(3):
        assert limiter.admit(0.0, Hello()) == 0.0
    refused: list[tuple[str | None, bool]] = []
    for message in (Ask(id="q1", text="what?"), Cancel(id="c1"), VideoUrl(url="http://x/v")):
        with pytest.raises(RateLimited) as exc:
            limiter.admit(0.0, message)
        refused.append((exc.value.id, exc.value.fatal))
    assert refused == [("q1", False), (None, False), (None, False)]


def test_the_ask_that_trips_the_flooding_close_is_named() -> None:
    """The fatal refusal that closes a flooding session names the ask it dropped."""
    limiter = RateLimiter(Settings(messages_per_second=1.0, message_burst=2))
    limiter.admit(0.0, Hello())
    limiter.admit(0.0, Cancel(id="c0"))
    for n in range(2):
        with pytest.raises(RateLimited):
            limiter.admit(0.0, Cancel(id=f"c{n + 1}"))
    with pytest.raises(Flooding) as closing:
        limiter.admit(0.0, Ask(id="last", text="still there?"))
    assert (closing.value.id, closing.value.fatal) == ("last", True)


def test_messages_refused_before_they_are_read_count_and_name_what_is_known() -> None:
    """A malformed or oversized message takes a token; over the rate its refusal names its ask."""
    limiter = RateLimiter(Settings(messages_per_second=1.0, message_burst=1))
    limiter.admit_message(0.0, id="q1")
    with pytest.raises(RateLimited) as exc:
        limiter.admit_message(0.0, id="q2")
    assert exc.value.id == "q2"


def test_pushed_media_is_never_refused_and_takes_no_message_token() -> None:
    """Thousands of media messages far over the message rate are paced, and an ask still passes."""
    limiter = RateLimiter(Settings(messages_per_second=1.0, message_burst=1))
    delays = []
    for n in range(3000):
        message = (VideoChunk(data=b"x"), Image(data=b"png"), VideoEnd())[n % 3]
        delays.append(limiter.admit(0.0, message))
    assert delays[0] == 0.0 and delays[-1] > 0.0  # paced once past the burst
    assert limiter.admit(0.0, Ask(id="q", text="what?")) == 0.0  # its one token was left


def test_each_media_message_costs_at_least_the_floor() -> None:
    """Tiny chunks and video.end are charged the floor, larger chunks their size."""
    floor = MEDIA_MESSAGE_FLOOR
    settings = Settings(
        video_bytes_per_second=10 * floor, feed_bytes=2 * floor, messages_per_second=1.0
    )
    assert media_floor(settings) == floor
    limiter = RateLimiter(settings)
    assert limiter.admit(0.0, VideoChunk(data=b"x")) == 0.0
    assert limiter.admit(0.0, VideoEnd()) == 0.0  # the burst: two floors
    assert limiter.admit(0.0, VideoChunk(data=b"y")) == pytest.approx(0.1)
    limiter = RateLimiter(settings)
    assert limiter.admit(0.0, VideoChunk(data=bytes(3 * floor))) == pytest.approx(0.1)


def test_the_floor_is_never_more_than_one_messages_share_of_the_byte_rate() -> None:
    """With a byte rate set low, media may still send as many messages as anything else."""
    settings = Settings(video_bytes_per_second=1000, messages_per_second=200.0)
    assert media_floor(settings) == pytest.approx(5.0)
    assert media_floor(Settings()) == MEDIA_MESSAGE_FLOOR


def _push(limiter: RateLimiter, chunk: int, per_second: float, seconds: float) -> list[float]:
    """Delays told to a client that sends ``chunk``-byte pieces at ``per_second``, obeying them."""
    now, delays = 0.0, []
    while now < seconds:
        delay = limiter.admit(now, VideoChunk(data=bytes(chunk)))
        delays.append(delay)
        now += max(1.0 / per_second, delay)
    return delays


def test_real_time_1080p60_in_8_kib_chunks_is_never_paced_at_default_rates() -> None:
    """A minute of a 40 Mbit/s stream (above 1080p60 H.264 at good quality) in 8 KiB chunks."""
    bits_per_second, chunk = 40e6, 8 * 1024
    delays = _push(RateLimiter(Settings()), chunk, bits_per_second / 8 / chunk, 60.0)
    assert len(delays) > 60 * 600 and max(delays) == 0.0


def test_tiny_media_messages_are_held_to_the_floor_rate() -> None:
    """Tiny chunks sent as fast as allowed average no more than the byte rate over the floor."""
    settings = Settings()
    delays = _push(RateLimiter(settings), 1, 1e9, 10.0)
    most = (settings.feed_bytes + 10.0 * settings.video_bytes_per_second) / media_floor(settings)
    assert max(delays) > 0.0 and len(delays) <= most + 1


def test_requests_are_limited_per_client() -> None:
    """Each client identity has its own request bucket: one over its burst does not touch
    another's, and is served again once its bucket refills."""
    rates = ClientRates(rate=1.0, burst=2)
    assert [rates.take("key:a", 0.0) for _ in range(3)] == [True, True, False]
    assert rates.take("key:b", 0.0)
    assert rates.take("key:a", 1.0) and not rates.take("key:a", 1.0)


def test_request_buckets_are_bounded() -> None:
    """However many clients ask, at most max_clients buckets are kept (the oldest forgotten),
    and a client asking again keeps its own."""
    rates = ClientRates(rate=1.0, burst=1, max_clients=3)
    assert rates.take("busy", 0.0)
    for n in range(1000):
        assert rates.take(f"addr:{n}", 0.0)
        assert not rates.take("busy", 0.0)  # still its own, spent bucket: used most recently
    assert len(rates) == 3
