"""The server's decoding memory: the pure account, the estimate, and the shell that waits on it."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Callable

import av
import pytest

from streamchat.errors import DecoderBusy, VideoDecodeError
from streamchat.media import DecodeMemory, decode_stream
from streamchat.media.decoder import DecoderOptions, bytes_per_pixel
from streamchat.media.memory import (
    MIB,
    Budgeted,
    DecodeBudget,
    Refusal,
    decoder_bytes,
    default_budget,
)
from tests.support.media import encode_video

# -- the estimate ------------------------------------------------------------------------


def test_the_estimate_covers_the_measured_peaks_with_its_margin() -> None:
    """At the sizes measured (docs/security.md, bench.decode_memory) the estimate is above
    the peak, within 1.6x of the first measurements."""
    for (width, height), measured in (((4096, 2304), 374 * MIB), ((1920, 1080), 91 * MIB)):
        estimate = decoder_bytes(width, height, threads=2)
        assert measured < estimate < 1.6 * measured
    assert decoder_bytes(4096, 2304, threads=2) > 462 * MIB


def test_the_estimate_grows_with_threads_and_the_pixel_format() -> None:
    """Each frame thread and a deeper pixel format cost more, as measured (29 MiB a thread)."""
    base = decoder_bytes(4096, 2304, threads=1)
    per_thread = decoder_bytes(4096, 2304, threads=2) - base
    assert 29 * MIB < per_thread < 1.6 * 29 * MIB
    assert decoder_bytes(4096, 2304, bytes_per_pixel=3.0, threads=2) > 1.9 * (base + per_thread)


def test_bytes_per_pixel_follow_depth_and_chroma() -> None:
    """8-bit 4:2:0 is 1.5 bytes a pixel, 10-bit twice that, 4:4:4 three, unknown 1.5."""
    assert bytes_per_pixel(av.VideoFormat("yuv420p")) == 1.5
    assert bytes_per_pixel(av.VideoFormat("nv12")) == 1.5
    assert bytes_per_pixel(av.VideoFormat("yuv420p10le")) == 3.0
    assert bytes_per_pixel(av.VideoFormat("yuv444p")) == 3.0
    assert bytes_per_pixel(None) == 1.5


def test_the_default_budget_is_a_quarter_of_the_machine_at_least_one_decoder() -> None:
    """24 GiB gives 6 GiB; a small machine still decodes one source of the largest size."""
    assert default_budget(24 << 30, largest=500 * MIB) == 6 << 30
    assert default_budget(1 << 30, largest=500 * MIB) == 500 * MIB


# -- the account -------------------------------------------------------------------------


def test_requests_that_fit_are_granted_and_released() -> None:
    """Room is granted while it lasts and given back whole on release (twice is harmless)."""
    budget = DecodeBudget(100, max_waiters=4)
    a, b = Budgeted("a"), Budgeted("b")
    assert budget.request(a, 60) is True
    assert budget.request(b, 40) is True
    assert budget.reserved == 100
    assert budget.release(a) == []
    assert budget.release(a) == []
    assert (budget.reserved, a.held) == (40, 0)


def test_a_request_that_does_not_fit_waits_and_is_granted_by_a_release() -> None:
    """A waiter is granted, in order, by the release that makes room for it."""
    budget = DecodeBudget(100, max_waiters=4)
    a, b, c = Budgeted("a"), Budgeted("b"), Budgeted("c")
    assert budget.request(a, 70) is True
    assert budget.request(b, 50) is False
    assert budget.request(c, 20) is False  # fits, but waits behind b: b is never starved
    assert budget.waiting == 2
    assert budget.release(a) == [b, c]
    assert (budget.reserved, b.held, c.held, budget.waiting) == (70, 50, 20, 0)


def test_a_withdrawn_waiter_lets_the_next_one_through() -> None:
    """A waiter whose wait ran out leaves the queue, and whoever it held back goes on."""
    budget = DecodeBudget(100, max_waiters=4)
    a, big, small = Budgeted("a"), Budgeted("big"), Budgeted("small")
    budget.request(a, 60)
    assert budget.request(big, 90) is False
    assert budget.request(small, 30) is False
    assert budget.withdraw(big) == [small]
    assert (big.held, big.wanted, small.held, budget.reserved) == (0, 0, 30, 90)


def test_growing_counts_only_the_difference() -> None:
    """A decoder whose frames grow asks for its new total; less than it holds is a no-op."""
    budget = DecodeBudget(100, max_waiters=4)
    a = Budgeted("a")
    budget.request(a, 40)
    assert budget.request(a, 30) is True
    assert budget.request(a, 90) is True
    assert (budget.reserved, a.held) == (90, 90)


def test_requests_that_can_never_fit_and_waiters_beyond_the_bound_are_refused() -> None:
    """More than the whole budget, or more waiters than allowed, is refused at once."""
    budget = DecodeBudget(100, max_waiters=1)
    assert isinstance(budget.request(Budgeted(), 101), Refusal)
    budget.request(Budgeted(), 100)
    assert budget.request(Budgeted(), 10) is False
    refusal = budget.request(Budgeted(), 10)
    assert isinstance(refusal, Refusal) and "too many" in refusal.reason
    assert budget.waiting == 1


# -- the shell: waiting on the loop, released whatever ends the decoder --------------------

ONE = decoder_bytes(160, 120, threads=2)


def _memory(capacity: int, wait: float = 30.0) -> DecodeMemory:
    return DecodeMemory(capacity, wait=wait, max_waiters=4, threads=2)


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Return once ``condition()`` holds (polled), or fail after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def _thread(work: object) -> BaseException | None:
    """Run ``work`` in a thread; what it raised, if anything (its release was posted to the
    loop before its end, so it has run once this returns)."""
    try:
        await asyncio.to_thread(work)  # type: ignore[arg-type]
    except BaseException as exc:
        return exc
    return None


class _Source:
    """A video decoded from bytes with the memory hooked in; ``stop`` stops it."""

    def __init__(self, memory: DecodeMemory, data: bytes) -> None:
        self.stop = threading.Event()
        self.hold = memory.hold(self.stop, "test")
        self.memory = memory
        self.data = data
        self.frames = 0

    def run(self) -> None:
        def emit(frame: object) -> None:
            self.frames += 1

        self.memory.holding(
            self.hold,
            lambda: decode_stream(
                io.BytesIO(self.data), DecoderOptions(), emit, self.stop, memory=self.hold.need
            ),
        )


async def test_a_decoder_holds_its_estimate_while_it_runs_and_gives_it_back() -> None:
    """A real decode reserves for its frame size, and the account is empty once it returned."""
    memory = _memory(10 * ONE)
    seen: list[int] = []
    source = _Source(memory, encode_video(seconds=1.0))

    need = source.hold.need

    def recording(width: int, height: int, bpp: float) -> None:
        need(width, height, bpp)
        seen.append(memory.budget.reserved)

    source.hold.need = recording  # type: ignore[method-assign]
    assert await _thread(source.run) is None
    assert source.frames > 0 and seen == [ONE]
    assert memory.budget.reserved == 0


def test_memory_built_before_its_loop_runs_serves_the_loop_of_its_first_decoder() -> None:
    """A server's state is built before uvicorn's loop runs: the account binds that loop
    when the first decoder's share is made, and a decode on it reserves and releases."""
    memory = _memory(10 * ONE)

    async def decode() -> None:
        source = _Source(memory, encode_video(seconds=1.0))
        assert memory.loop is asyncio.get_running_loop()
        assert await _thread(source.run) is None
        assert source.frames > 0

    asyncio.run(decode())
    assert memory.budget.reserved == 0


async def test_a_failed_decode_gives_its_memory_back() -> None:
    """A decode that fails after reserving (a stream cut off) releases all it held."""
    memory = _memory(10 * ONE)
    data = encode_video(seconds=1.0)
    error = await _thread(_Source(memory, data[: len(data) // 3]).run)
    assert isinstance(error, VideoDecodeError) or error is None
    assert memory.budget.reserved == 0


async def test_a_decoder_that_does_not_fit_waits_then_fails_busy_and_holds_nothing() -> None:
    """With the memory taken, a decoder waits its time, then raises ``DecoderBusy``."""
    memory = _memory(ONE, wait=0.05)
    taken = Budgeted("other")
    await memory.acquire(taken, ONE)
    error = await _thread(_Source(memory, encode_video(seconds=1.0)).run)
    assert isinstance(error, DecoderBusy), error
    assert (memory.budget.reserved, memory.budget.waiting) == (ONE, 0)


async def test_a_waiting_decoder_is_granted_when_another_ends() -> None:
    """A decoder waiting for room decodes once the holder releases it, not before."""
    memory = _memory(ONE)
    taken = Budgeted("other")
    await memory.acquire(taken, ONE)
    source = _Source(memory, encode_video(seconds=1.0))
    running = asyncio.ensure_future(_thread(source.run))
    await _until(lambda: memory.budget.waiting == 1)  # the decoder thread reached its request
    assert source.frames == 0
    memory.release(taken)
    assert await running is None
    assert source.frames > 0


async def test_stopping_a_waiting_decoder_ends_its_wait_and_holds_nothing() -> None:
    """A source stopped while it waits (the session closed) ends at once, leaving no account."""
    memory = _memory(ONE)
    await memory.acquire(Budgeted("other"), ONE)
    source = _Source(memory, encode_video(seconds=1.0))
    running = asyncio.ensure_future(_thread(source.run))
    await _until(lambda: memory.budget.waiting == 1)
    source.stop.set()
    source.hold.cancel()
    assert await running is None  # a stopped decode returns its report
    assert (memory.budget.reserved, memory.budget.waiting) == (ONE, 0)


def test_a_stream_without_a_hook_decodes_as_before() -> None:
    """``memory`` is optional: the decoder alone reserves nothing and needs no loop."""
    frames: list[object] = []
    decode_stream(
        io.BytesIO(encode_video(seconds=0.5)), DecoderOptions(), frames.append, threading.Event()
    )
    assert frames


async def test_refusals_are_typed_and_immediate() -> None:
    """A request over the whole memory is ``DecoderBusy`` without waiting."""
    memory = _memory(ONE - 1)
    with pytest.raises(DecoderBusy, match="more than the server's decoding memory"):
        await memory.acquire(Budgeted("big"), ONE)
