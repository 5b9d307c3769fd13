"""Lock-out and log-flood attacks on admission, over a real uvicorn server.

Default settings throughout (keys on where a test says so), the scripted
engine, attackers on loopback addresses of their own (``127.0.0.2`` and up),
the server in the test's loop so the test reads its admission state. The
attacks are the ones of issue 10: as many keyless connections as there are
session places, from 8 addresses, sending junk to keep their places (or, auth
off, never saying hello); 300 refused handshakes; a DNS-rebinding page.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamchat.access import RefusalLog
from streamchat.config import Settings
from streamchat.engine.fake import FakeEngine
from streamchat.errors import CloseCode, ServerBusy, Unauthorized
from streamchat.server import REFUSAL_LOG_INTERVAL, ServerState
from tests.support.live import live_server
from tests.support.wsclient import IMAGE, open_ws, recv, send

KEY = "k-lockout-7d2e"
KEYED = Settings(api_keys=frozenset({KEY}))
BEARER = {"Authorization": f"Bearer {KEY}"}
ATTACKERS = [f"127.0.0.{n}" for n in range(2, 10)]
"""8 addresses, as in the issue; the key holder comes from 127.0.0.1."""


async def ask_and_answer(ws: ClientConnection, **hello: Any) -> dict[str, Any]:
    """Hello, an image, a question: the ``answer.done``."""
    await send(ws, type="hello", **hello)
    ready = await recv(ws)
    assert ready["type"] == "ready", ready
    await send(ws, type="image", data=IMAGE)
    await recv(ws, "video.status")
    await send(ws, type="ask", id="q", text="what is there?")
    return await recv(ws, "answer.done")


@dataclasses.dataclass
class Attacker:
    ws: ClientConnection
    opened: float
    """Loop time before the handshake began."""
    closed: float | None = None
    code: int | None = None


async def open_attackers(url: str, each: int) -> tuple[list[Attacker], int]:
    """``each`` keyless connections from every attacking address: those admitted, and the 503s."""
    loop = asyncio.get_running_loop()
    admitted: list[Attacker] = []
    refused = 0
    for address in ATTACKERS:
        for _ in range(each):
            opened = loop.time()
            try:
                ws = await open_ws(url, local_addr=(address, 0))
            except InvalidStatus as exc:
                assert exc.response.status_code == 503
                refused += 1
            else:
                admitted.append(Attacker(ws, opened))
    return admitted, refused


async def hold(attacker: Attacker, junk_every: float | None) -> None:
    """Keep the connection until the server closes it, sending junk every ``junk_every`` s.

    Bounded: a server that never closes it fails the caller's timeout.
    """
    ws = attacker.ws
    with contextlib.suppress(ConnectionClosed):
        while True:
            if junk_every is not None:
                await send(ws, type="nope")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(junk_every):
                    while True:
                        await ws.recv()  # the refusals of the junk; then the close
    attacker.closed = asyncio.get_running_loop().time()
    attacker.code = ws.close_code


async def attack_then_get_in(
    settings: Settings, junk_every: float | None, clients: list[tuple[dict[str, Any], Any]]
) -> tuple[list[Attacker], int]:
    """Run the lock-out attack, get clients entitled to a session in; how the attack ended.

    ``clients``: how each connects (``connect`` options) and what its ``hello`` carries.
    """
    async with live_server(settings) as live:
        attackers, refused = await open_attackers(live.url, settings.max_sessions // len(ATTACKERS))
        state = live.state
        holding = [asyncio.create_task(hold(a, junk_every)) for a in attackers]
        try:
            async with contextlib.AsyncExitStack() as stack:
                for connect_options, hello in clients:
                    # The attack is on: every waiting place is held, or was taken back.
                    assert state.waiting == settings.max_pending_sessions
                    ws = await stack.enter_async_context(await open_ws(live.url, **connect_options))
                    done = await ask_and_answer(ws, **hello)
                    assert (done["id"], done["finish_reason"]) == ("q", "stop")
                async with asyncio.timeout(3 * settings.hello_timeout):
                    await asyncio.gather(*holding)
                    await state.wait_sessions(len(clients))
                assert state.waiting == 0
        finally:
            for task in holding:
                task.cancel()
    return attackers, refused


def check_attack_ended(settings: Settings, attackers: list[Attacker], refused: int) -> None:
    """Every admitted attacker was closed: at its deadline (not before), or made to give way."""
    assert refused > 0 and len(attackers) + refused == settings.max_sessions
    at_deadline = [a for a in attackers if a.code == CloseCode.IDLE_TIMEOUT]
    gave_way = [a for a in attackers if a.code == CloseCode.TRY_AGAIN_LATER]
    assert len(at_deadline) + len(gave_way) == len(attackers)
    # Those that gave way did so as the attack began (to each other) and to the one client
    # that needed a waiting place; the others stayed to their deadline.
    assert len(at_deadline) == settings.max_pending_sessions - 1
    for a in at_deadline:
        assert a.closed is not None
        assert settings.hello_timeout <= a.closed - a.opened < 2 * settings.hello_timeout


async def test_keyless_junk_senders_cannot_lock_out_a_key_holder() -> None:
    """Keyless connections sending junk hold no session place, and the junk does not keep them.

    One key holder gives its key at the handshake (it never needs a waiting place), one in
    ``hello`` (it takes a waiting place from the busiest attacker).
    """
    attackers, refused = await attack_then_get_in(
        KEYED,
        KEYED.hello_timeout / 4,
        [({"additional_headers": BEARER}, {}), ({"local_addr": ("127.0.0.1", 0)}, {"token": KEY})],
    )
    check_attack_ended(KEYED, attackers, refused)


async def test_with_auth_off_connections_that_never_say_hello_cannot_keep_a_client_out() -> None:
    """Auth off: silent connections wait apart from sessions, and are closed at the deadline."""
    settings = Settings()
    attackers, refused = await attack_then_get_in(
        settings, None, [({"local_addr": ("127.0.0.1", 0)}, {})]
    )
    check_attack_ended(settings, attackers, refused)


def test_a_full_waiting_pool_takes_a_place_back_from_the_address_holding_most() -> None:
    """Admission is exact and synchronous: the busiest address's oldest place goes, at once."""
    settings = Settings(max_pending_sessions=4, max_pending_per_address=3)
    state = ServerState(settings, FakeEngine())
    evicted: list[str] = []

    def enter(address: str, name: str) -> None:
        place = state.reserve_waiting(address, then=None)
        place.on_evict = lambda: evicted.append(name)

    enter("a", "a1")
    enter("b", "b1")
    enter("b", "b2")
    enter("b", "b3")
    with pytest.raises(ServerBusy):  # over b's share: refused, nobody evicted
        state.reserve_waiting("b", then=None)
    enter("c", "c1")  # full: b holds most, its oldest goes
    enter("d", "d1")  # full: b still holds most (2)
    enter("e", "e1")  # a, b, c, d hold one each: the oldest of all, a1
    assert evicted == ["b1", "b2", "a1"]
    assert state.waiting == settings.max_pending_sessions


def test_refusals_are_logged_once_then_counted_and_summed_each_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A refusal after a quiet spell is told in full; the rest only in one summary an interval."""
    caplog.set_level(logging.INFO, logger="streamchat.access")
    log = RefusalLog(interval=10.0)
    busy, wrong = ServerBusy("full"), Unauthorized("the API key is not valid")
    assert log.refused(wrong, "10.0.0.1", now=0.0)  # begins an interval: flush due at 10
    for n in range(999):
        assert not log.refused(busy if n % 3 else wrong, f"10.0.0.{n % 2 + 1}", now=n / 100)
    assert log.flush(now=10.0)  # refusals went on: a new interval began
    assert not log.flush(now=20.0)  # nothing in it: quiet again
    assert log.refused(wrong, "10.0.0.9", now=30.0)
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said == [
        ("INFO", "handshake from 10.0.0.1 refused (unauthorized): the API key is not valid"),
        (
            "WARNING",
            "999 more handshake(s) refused in the last 10.0 s "
            "(server_busy 666, unauthorized 333); most from 10.0.0.1 (500)",
        ),
        ("INFO", "handshake from 10.0.0.9 refused (unauthorized): the API key is not valid"),
    ]


# -- refused handshakes in the log ----------------------------------------------


class Lines(logging.Handler):
    """Every record of streamchat and uvicorn at INFO and above: what ``streamchat serve`` logs."""

    NAMES = ("streamchat", "uvicorn")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @contextlib.contextmanager
    def attached(self, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
        """Attached once uvicorn has started (its logging set-up replaces its handlers)."""
        caplog.set_level(logging.INFO, logger="streamchat")
        caplog.set_level(logging.INFO, logger="uvicorn.error")
        for name in self.NAMES:
            logging.getLogger(name).addHandler(self)
        try:
            yield
        finally:
            for name in self.NAMES:
                logging.getLogger(name).removeHandler(self)


async def test_300_refused_handshakes_log_a_bounded_number_of_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """401s, 403s and 503s at full speed: a line or two an interval, none at ERROR, no key."""
    loop = asyncio.get_running_loop()
    lines = Lines()
    async with live_server(KEYED) as live:
        held = [await open_ws(live.url, additional_headers=BEARER)]
        with lines.attached(caplog):
            # The key's share of sessions, so that one more is refused with 503.
            held += [
                await open_ws(live.url, additional_headers=BEARER)
                for _ in range(KEYED.max_sessions_per_client - 1)
            ]
            assert any(r.name == "uvicorn.error" for r in lines.records), "uvicorn's lines reach us"
            state = live.state
            start, began = len(lines.records), loop.time()
            attempts: list[tuple[dict[str, str], int]] = [
                ({"Authorization": "Bearer wrong"}, 401),
                ({**BEARER, "Origin": "http://evil.example"}, 403),
                (BEARER, 503),
            ]
            statuses = []
            for headers, _ in attempts * 100:
                with pytest.raises(InvalidStatus) as refused:
                    await open_ws(live.url, additional_headers=headers)
                statuses.append(refused.value.response.status_code)
            elapsed = loop.time() - began
            during = lines.records[start:]
            state.flush_refusals()
            said = lines.records[start:]
            for ws in held:
                await ws.close()
    assert statuses == [status for _, status in attempts] * 100
    assert not [r for r in said if r.levelno >= logging.ERROR]
    assert len(during) <= 2 * (int(elapsed / REFUSAL_LOG_INTERVAL) + 1)
    # Nothing lost: the first in full, the rest counted in the summaries.
    first = [r for r in said if r.levelno == logging.INFO]
    counted = [int(m.group(1)) for r in said if (m := re.match(r"(\d+) more", r.getMessage()))]
    assert len(first) == 1 and sum(counted) == len(statuses) - 1
    assert all(KEY not in r.getMessage() for r in lines.records)


# -- origins with auth off --------------------------------------------------------


async def connect_as(url: str, name: str, **options: Any) -> ClientConnection:
    """A connection to the server at ``url`` made as if it were found at ``name``.

    The TCP connection goes to the server's loopback address, the handshake
    names ``name`` in ``Host`` and ``Origin``: what a page on ``name`` sends
    once its DNS answers this server's address (DNS rebinding).
    """
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    sock = socket.create_connection(("127.0.0.1", port))
    origin = f"http://{name}:{port}"
    return await open_ws(f"ws://{name}:{port}/v1/session", sock=sock, origin=origin, **options)


async def test_with_auth_off_a_dns_rebinding_page_is_refused_and_the_own_page_works() -> None:
    """Auth off: a page on a host name is refused; on localhost or the IP address it works."""
    async with live_server(Settings()) as live:
        with pytest.raises(InvalidStatus) as refused:
            await connect_as(live.url, "rebind.example")
        assert refused.value.response.status_code == 403
        assert b"origin_not_allowed" in refused.value.response.body
        for name in ("localhost", "127.0.0.1"):
            async with await connect_as(live.url, name) as ws:
                done = await ask_and_answer(ws)
                assert done["finish_reason"] == "stop"
    async with live_server(KEYED) as live:
        async with await connect_as(live.url, "rebind.example", additional_headers=BEARER) as ws:
            assert (await ask_and_answer(ws))["finish_reason"] == "stop"  # the key protects
