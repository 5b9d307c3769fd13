"""What a decoder costs in memory, and the server-wide budget that bounds their sum: pure.

Every part of a session is bounded on its own, but nothing bounded their sum:
64 sessions each decoding at ``max_decode_pixels`` (4096x2304) would want
about 24 GiB for their decoders alone (docs/security.md, "Memory bounds with
the defaults"). :class:`DecodeBudget` is the account every decoder draws from
(the session's and the video cache's): a decoder *requests* its estimated peak
(:func:`decoder_bytes`) once it knows its frame size, before it decodes a frame
at that size, and *releases* it when it ends. A request that does not fit
waits, in order, behind the earlier ones (a large request is never starved by
small ones that keep slipping past it); the shell
(:mod:`streamchat.media.admission`) bounds how long, and refuses the source
with ``decoder_busy`` when the wait runs out.

The estimate, from measurements (docs/security.md): H.264 at 4096x2304 with 16
reference frames and a B-pyramid, the worst a legal stream asks, peaked at
272 MiB in FFmpeg alone with 1 frame thread, 304 with 2, 507 with 8, 711 with
16 (29 MiB, about 2.2 frames of 8-bit 4:2:0 at that size, a thread), and at
374 MiB through ``decode_stream`` with 2 threads (91 MiB at 1920x1080). A
least-squares fit of the two sizes gives 12 MB plus 26.9 frames of
``width x height x 1.5`` bytes at 2 threads; so :data:`DECODER_FRAMES` frames
plus :data:`FRAMES_PER_THREAD` per thread, plus :data:`DECODER_FIXED_BYTES`,
all times :data:`MARGIN`. ``bench.decode_memory`` (testsrc2, same encoder
settings) then peaked at 462 MiB over its baseline for one decoder at
4096x2304, 926 MiB for four through a budget of two: hence a margin of 1.5,
not the 1.25 the first figures needed. A frame's bytes scale with its pixel format (10-bit
4:2:0 is twice 8-bit's), which the decoder reads from the stream. Every codec
we decode keeps at most 16 reference frames (H.264 and HEVC; VP9 and AV1 8),
so the estimate is the worst case of the size, not the usual one: a 720p
camera stream with one reference frame costs far less than it reserves.

Pure: no I/O, no clock, no asyncio; the shell owns waiting and time.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

__all__ = [
    "DECODER_FIXED_BYTES",
    "DECODER_FRAMES",
    "FRAMES_PER_THREAD",
    "MARGIN",
    "Budgeted",
    "DecodeBudget",
    "Refusal",
    "decoder_bytes",
    "default_budget",
]

MIB = 1 << 20

DECODER_FIXED_BYTES = 12_000_000
"""A decoder's cost whatever its size (codec context, PyAV objects, tables)."""
DECODER_FRAMES = 22.5
"""Frames of the source's size a decoder holds besides its threads' own: up to 16
reference frames, the frame being decoded, those waiting to be shown (reordering), and
the copies made while a kept frame is converted."""
FRAMES_PER_THREAD = 2.2
"""Frames each FFmpeg frame thread holds in flight (measured: 29 MiB a thread at 4096x2304)."""
MARGIN = 1.5
"""What the estimate is multiplied by: allocator rounding, padding, a stream the
measurement did not foresee."""
FULL_BUDGET_SHARE = 4
"""The default budget is the machine's memory divided by this (see :func:`default_budget`)."""


def decoder_bytes(width: int, height: int, *, bytes_per_pixel: float = 1.5, threads: int) -> int:
    """A decoder's estimated peak for frames of ``width`` x ``height``, with ``threads`` threads.

    ``bytes_per_pixel``: of the decoded pixel format (1.5 for 8-bit 4:2:0,
    3 for 10-bit 4:2:0 or 8-bit 4:4:4).
    """
    frames = DECODER_FRAMES + FRAMES_PER_THREAD * threads
    frame = width * height * bytes_per_pixel
    return int((DECODER_FIXED_BYTES + frames * frame) * MARGIN)


def default_budget(physical: int, *, largest: int) -> int:
    """The budget when none is configured: a quarter of the machine's memory, at least ``largest``.

    A quarter leaves the rest for what every session holds besides its decoder
    (window, timeline, feed, MP4 index, messages: at most about 260 MiB a session,
    16.4 GiB for 64) and for the process itself; ``largest`` (one decoder at the
    largest frame size, at 10-bit) so that one such source can always decode.
    """
    return max(physical // FULL_BUDGET_SHARE, largest)


@dataclass(eq=False)
class Budgeted:
    """One decoder's account: what it holds, and what it waits for (0: not waiting)."""

    name: str = ""
    held: int = 0
    wanted: int = 0


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused at once (no wait could make it fit)."""

    reason: str


class DecodeBudget:
    """Bytes of decoder memory held by all decoders, at most ``capacity``.

    :meth:`request` grants at once when the bytes fit and nobody waits before
    it; otherwise the request waits (at most ``max_waiters`` at once) and is
    granted, in order, by the :meth:`release` or :meth:`withdraw` that makes
    room: each returns the accounts it granted, for the shell to wake.
    """

    def __init__(self, capacity: int, *, max_waiters: int) -> None:
        if capacity < 1 or max_waiters < 0:
            raise ValueError("capacity must be positive, max_waiters not negative")
        self.capacity = capacity
        self.max_waiters = max_waiters
        self.reserved = 0
        """Bytes held now, by every account."""
        self._waiting: OrderedDict[Budgeted, None] = OrderedDict()

    @property
    def waiting(self) -> int:
        """Accounts waiting for room."""
        return len(self._waiting)

    def request(self, account: Budgeted, nbytes: int) -> bool | Refusal:
        """Ask for ``account`` to hold ``nbytes`` in all (more than it holds: the difference).

        True: granted (also when it already holds as much); False: it waits
        until a :meth:`release` or :meth:`withdraw` grants it; a
        :class:`Refusal` when it can never fit or too many wait already.
        """
        if account in self._waiting:
            raise ValueError("this account is already waiting")
        if nbytes <= account.held:
            return True
        if nbytes > self.capacity:
            return Refusal(
                f"decoding this video needs about {nbytes // MIB} MiB, more than the server's "
                f"decoding memory of {self.capacity // MIB} MiB"
            )
        if not self._waiting and self._fits(account, nbytes):
            self._grant(account, nbytes)
            return True
        if len(self._waiting) >= self.max_waiters:
            return Refusal("too many videos are waiting for the server's decoding memory")
        account.wanted = nbytes
        self._waiting[account] = None
        return False

    def withdraw(self, account: Budgeted) -> list[Budgeted]:
        """``account`` stops waiting (its wait ran out, or it was stopped); keeps what it holds."""
        if account in self._waiting:
            del self._waiting[account]
            account.wanted = 0
        return self._wake()

    def release(self, account: Budgeted) -> list[Budgeted]:
        """``account`` ended: give back all it holds (again is harmless), stop its wait."""
        self.reserved -= account.held
        account.held = 0
        return self.withdraw(account)

    def _fits(self, account: Budgeted, nbytes: int) -> bool:
        return self.reserved - account.held + nbytes <= self.capacity

    def _grant(self, account: Budgeted, nbytes: int) -> None:
        self.reserved += nbytes - account.held
        account.held, account.wanted = nbytes, 0

    def _wake(self) -> list[Budgeted]:
        """Grant the waiting accounts, oldest first, while the oldest fits."""
        granted: list[Budgeted] = []
        while self._waiting:
            first = next(iter(self._waiting))
            if not self._fits(first, first.wanted):
                break
            del self._waiting[first]
            self._grant(first, first.wanted)
            granted.append(first)
        return granted
