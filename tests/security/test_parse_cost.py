"""Parsing a message costs a bounded amount, whatever it holds: no client freezes the server.

Finding 1 of issue 10: one valid 4 MiB msgpack message made of millions of
empty arrays took 2-5 s to decode on the event loop, before any
authentication (JSON likewise), and ten of them froze the server for 51 s.
Here ``streamchat serve --engine fake`` runs with its default settings in a
process of its own; an attacker connection that never sends ``hello`` sends
a batch of such messages, and of the dearest messages still allowed, while
another session asks questions and ``/health`` is polled. Both are measured
against their own baselines, taken first in the same test, and the server's
peak RSS is read from ``/proc``.

Finding 9: sampling values vLLM refuses are ``invalid_field`` naming the ask.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import statistics
from collections.abc import Callable
from typing import Any

import httpx
import msgpack
import pytest

from streamchat.config import DEFAULT_MAX_MESSAGE_BYTES
from streamchat.messages import MAX_DEPTH, MAX_VALUES
from streamchat_client import ServerError
from tests.support.measure import high_water_mark, reset_peak, slowest, timed, viewer
from tests.support.process import ServerProcess, server_process
from tests.support.rawws import client_frame, upgrade_request

MIB = 1024 * 1024
SIZE = DEFAULT_MAX_MESSAGE_BYTES
ROUNDS = 3
"""Each kind of hostile message is sent this many times: 12 messages, 48 MiB in all."""
SLOWER = 10
SLACK = 1.0
"""Another session's slowest ask (or ``/health``) under attack may take ``SLOWER`` times its
own slowest baseline, plus ``SLACK`` seconds.

Before the fix one msgpack message of empty arrays held the event loop for
2-5 s (measured here: an ask 5.9 s, ``/health`` 2.8 s), so a bound near a
second tells a fixed server from a broken one. What remains is the dearest
message still allowed, tens of ms to decode (4 MiB of escaped JSON strings,
read twice: once to count values, once to decode), and an ask takes several
turns of the server's loop, each of which may wait behind one such message:
slowest ask 0.15-0.5 s on a loaded 2-core machine (load 6). ``SLACK`` is
twice that; ``SLOWER`` scales with the machine's speed as the baseline does."""
RSS_BOUND = 64 * MIB
"""What the attack may add to the server's peak RSS: a few 4 MiB messages in flight, each held
as frame, bytes and decoded value (measured: +25 MiB). 4 million empty lists are over 200 MiB."""
LIVENESS = 120.0
"""Seconds the attack may take before the test gives up on the server."""


# -- the messages ---------------------------------------------------------------


def empty_arrays_msgpack() -> bytes:
    """The attack: a valid ``ask``, id first, whose field ``x`` is millions of empty arrays."""
    head: bytes = msgpack.packb({"type": "ask", "id": "bomb", "text": "hi", "x": 0})[:-1]
    count = SIZE - len(head) - 5
    return head + b"\xdd" + count.to_bytes(4, "big") + b"\x90" * count


def empty_arrays_json() -> str:
    head = '{"type":"ask","id":"bomb","text":"hi","x":['
    return head + "[]," * ((SIZE - len(head)) // 3 - 2) + "[]]}"


def worst_allowed(binary: bool) -> bytes | str:
    """A 4 MiB ``ask`` at both structure bounds, with the strings dearest to decode.

    Four-byte UTF-8 characters in msgpack; in JSON, escaped quotes and
    backslashes with a comma between them, so the structure check must skip
    every string with the JSON scanner before the decoder reads it again.
    """
    fields: dict[str, Any] = {"type": "ask", "id": "worst", "text": "hi"}
    fields["deep"] = {"a": {"b": [7]}}
    strings = (MAX_VALUES - 14) // 2  # the fields above are 14 values
    piece = "\U0001f600" if binary else '\\",'
    each = (SIZE - 4096) // strings // (4 if binary else len(json.dumps(piece)) - 2)
    for n in range(strings):
        fields[f"k{n}"] = piece * each
    if binary:
        return msgpack.packb(fields, use_bin_type=True)  # type: ignore[no-any-return]
    return json.dumps(fields, separators=(",", ":"))


HOSTILE: list[tuple[Callable[[], bytes | str], str, str]] = [
    (empty_arrays_msgpack, "bad_message", "bomb"),
    (empty_arrays_json, "bad_message", "bomb"),
    (lambda: worst_allowed(True), "hello_required", "worst"),
    (lambda: worst_allowed(False), "hello_required", "worst"),
]
"""Each message, and the error (and id) it must get from a connection that sent no ``hello``."""


# -- measuring ------------------------------------------------------------------


def _errors(server: ServerProcess) -> list[str]:
    return [line for line in server.log if "Traceback" in line or re.search(r"\bERROR\b", line)]


def _frame(message: bytes | str) -> bytes:
    """A client frame of ``message``: binary for bytes, text for a string."""
    if isinstance(message, bytes):
        return client_frame(0x2, message)
    return client_frame(0x1, message.encode())


def _exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "closed by the server"
        data += chunk
    return data


def _attack(port: int, frames: list[bytes]) -> list[tuple[str, str | None]]:
    """Send every frame without ``hello`` nor reading, then read one error per frame.

    A raw socket in a thread of its own: sending is a ``sendall`` that holds
    no lock the test's loop needs, so the attacker costs the client side of
    the test nothing while the server parses.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=LIVENESS) as sock:
        sock.sendall(upgrade_request())
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += _exactly(sock, 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        for frame in frames:
            sock.sendall(frame)
        replies: list[tuple[str, str | None]] = []
        while len(replies) < len(frames):
            first, second = _exactly(sock, 2)
            size = second & 0x7F
            if size >= 126:
                size = int.from_bytes(_exactly(sock, 2 if size == 126 else 8), "big")
            payload = _exactly(sock, size)
            if first & 0x0F in (0x1, 0x2):  # the answer's encoding is the latest message's
                error = json.loads(payload) if first & 0x0F == 0x1 else msgpack.unpackb(payload)
                replies.append((error["code"], error["id"]))
        return replies


# -- the tests ------------------------------------------------------------------


async def test_hostile_messages_do_not_hold_up_another_session_or_health() -> None:
    """Millions-of-values messages and the dearest allowed ones leave others' asks prompt."""
    frames = [_frame(build()) for build, _, _ in HOSTILE for _ in range(ROUNDS)]
    expected = [(code, id) for _, code, id in HOSTILE for _ in range(ROUNDS)]
    async with (
        server_process("--engine", "fake") as server,
        viewer(server.url) as bystander,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=LIVENESS) as http,
    ):

        async def ask() -> None:
            assert (await bystander.ask("what is there?", max_tokens=8).result()).text

        async def health() -> None:
            assert (await http.get("/health")).status_code == 200

        ask_baseline = await slowest(ask)
        health_baseline = await slowest(health)
        rss = reset_peak(server.process.pid)
        attacking = asyncio.create_task(asyncio.to_thread(_attack, server.port, frames))
        asks: list[float] = []
        polls: list[float] = []
        async with asyncio.timeout(LIVENESS):
            while not attacking.done():
                asks.append(await timed(ask))
                polls.append(await timed(health))
            replies = await attacking
        growth = high_water_mark(server.process.pid) - rss
        await ask()

    report = (
        f"{len(frames)} messages of {SIZE / MIB:.0f} MiB; server RSS +{growth / MIB:.1f} MiB "
        f"at peak; asks: baseline (slowest) {ask_baseline * 1e3:.1f} ms, under attack "
        f"{len(asks)}, median {statistics.median(asks) * 1e3:.1f} ms, slowest "
        f"{max(asks) * 1e3:.1f} ms; /health: baseline {health_baseline * 1e3:.1f} ms, "
        f"slowest {max(polls) * 1e3:.1f} ms"
    )
    print(report)
    assert replies == expected, report
    assert max(asks) < SLOWER * ask_baseline + SLACK, report
    assert max(polls) < SLOWER * health_baseline + SLACK, report
    assert growth < RSS_BOUND, report
    assert not _errors(server), "\n".join(server.log)


@pytest.mark.parametrize(
    "generation",
    [{"top_p": 0.0}, {"temperature": 3.0}],
    ids=["top_p-0", "temperature-3"],
)
async def test_sampling_values_the_engine_refuses_are_invalid_fields(
    generation: dict[str, float],
) -> None:
    """An ask with top_p 0 or temperature 3 is invalid_field naming its id; the session goes on."""
    async with server_process("--engine", "fake") as server, viewer(server.url) as bystander:
        with pytest.raises(ServerError) as refused:
            await bystander.ask("what is there?", id="odd", **generation).result()  # type: ignore[arg-type]
        assert (refused.value.code, refused.value.id, refused.value.fatal) == (
            "invalid_field",
            "odd",
            False,
        )
        assert next(iter(generation)) in refused.value.message
        assert (await bystander.ask("and now?", max_tokens=8).result()).text
    assert not _errors(server), "\n".join(server.log)


def _shape(value: object) -> tuple[int, int]:
    """(values, nesting) of a decoded message: every key and value counts, maps as arrays."""
    if isinstance(value, dict):
        inner = [_shape(v) for v in value.values()]
        return 1 + sum(1 + n for n, _ in inner), 1 + max((d for _, d in inner), default=0)
    if isinstance(value, list):
        inner = [_shape(v) for v in value]
        return 1 + sum(n for n, _ in inner), 1 + max((d for _, d in inner), default=0)
    return 1, 0


@pytest.mark.parametrize("binary", [True, False], ids=["msgpack", "json"])
def test_the_worst_allowed_messages_are_at_the_bounds(binary: bool) -> None:
    """The dearest allowed messages above are 4 MiB, MAX_VALUES values, MAX_DEPTH deep."""
    data = worst_allowed(binary)
    raw = msgpack.unpackb(data) if isinstance(data, bytes) else json.loads(data)
    assert SIZE - 64 * 1024 < len(data if isinstance(data, bytes) else data.encode()) <= SIZE
    assert _shape(raw) == (MAX_VALUES, MAX_DEPTH)
