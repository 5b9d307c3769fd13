"""A live server under a flood of hostile messages: every one gets a typed answer, nothing crashes.

A real uvicorn server on loopback (scripted engine) receives a seeded corpus
of hostile messages, binary and text, before and after ``hello``, over a few
connections, pipelined in batches. Each message must be answered in order by
exactly what the pure decoder predicts: the same error code, ``hello_required``
before ``hello``, or the protocol's refusal after it. Each connection ends with
a message the WebSocket layer itself refuses (text that is not UTF-8, a frame
beyond the transport limit), which must close it with 1007 or 1009. Afterwards
the server still opens a fresh session and ``/health`` is ok, and neither
streamchat nor uvicorn logged an error.

"Named" close codes are the members of :class:`CloseCode` other than 1011
(internal error, which is a crash) plus 1007 (invalid frame payload data),
which the WebSocket layer sends for text that is not UTF-8 before streamchat
sees the message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgpack
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from streamchat.config import Settings
from streamchat.engine.fake import FakeEngine
from streamchat.errors import CloseCode, StreamchatError
from streamchat.messages import Ask, Cancel, Hello, Image, decode_client
from tests.fuzz import corpus
from tests.fuzz import payloads as p
from tests.support.live import live_server

SEED = 20_240_605
MESSAGES = p.scaled(10_000)
CONNECTIONS = 8
BATCH = 100
"""Messages sent before their answers are read: well under the session's outbox."""
TIMEOUT = 20.0
"""Upper bound for any one answer, so a server that stops answering fails the test."""

INVALID_PAYLOAD_DATA = 1007
UVICORN_UTF8_ERROR = "Invalid UTF-8 sequence received from client."
"""What uvicorn's WebSocket protocol logs (at ERROR, with a traceback) before closing with 1007.

It is uvicorn's record of a client's fault, not a server failure; the test
counts these against the connections it ended that way and allows no other."""
NAMED_CLOSE_CODES = (frozenset(CloseCode) - {CloseCode.INTERNAL_ERROR}) | {INVALID_PAYLOAD_DATA}

SETTINGS = Settings(
    max_message_bytes=64 * 1024,
    min_pixels=28 * 28,
    max_pixels=56 * 56,
    # Generous rate limits: this test measures parsing, not throttling.
    messages_per_second=1e9,
    message_burst=10**9,
    video_bytes_per_second=1 << 40,
)
VIDEO_CODES = frozenset({"video_unsupported", "video_decode_failed", "video_too_large"})
READY = "ready"


class Recorder(logging.Handler):
    """Keeps every ERROR (or worse) record of the loggers it watches."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self.watched: list[logging.Logger] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def watch(self, name: str) -> None:
        """Record ``name`` and its children (which propagate to it)."""
        logger = logging.getLogger(name)
        logger.addHandler(self)
        self.watched.append(logger)


@pytest.fixture
def errors_logged() -> Iterator[Recorder]:
    recorder = Recorder()
    recorder.watch("streamchat")
    yield recorder
    for logger in recorder.watched:
        logger.removeHandler(recorder)


def expected(payload: bytes | str, *, opened: bool) -> frozenset[str] | None:
    """The answers the server may give ``payload``: error codes, or ``ready``.

    ``None`` for a valid message that starts background work (a video source)
    rather than being answered at once; the corpus skips those after ``hello``.
    """
    if len(payload) > SETTINGS.max_message_bytes:
        return frozenset({"message_too_large"})
    try:
        message = decode_client(payload)
    except StreamchatError as exc:
        return frozenset({exc.code})
    except Exception:  # a decoder bug (the pure tests catch it): no answer is right
        return frozenset()
    if isinstance(message, Hello):
        return frozenset({"duplicate_hello"} if opened else {READY})
    if not opened:
        return frozenset({"hello_required"})
    match message:
        case Ask():
            return frozenset({"no_frames", "invalid_field"})  # no video is ever pushed
        case Cancel():
            return frozenset({"unknown_id"})
        case Image():
            return VIDEO_CODES
    return None


def decode_reply(reply: bytes | str) -> dict[str, Any]:
    value = msgpack.unpackb(reply) if isinstance(reply, bytes) else json.loads(reply)
    assert isinstance(value, dict), value
    return value


@dataclass
class Tally:
    sent: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    closes: dict[int, int] = field(default_factory=dict)

    def count(self, counts: dict[Any, int], key: Any) -> None:
        counts[key] = counts.get(key, 0) + 1


def _next(rng: random.Random, *, opened: bool) -> tuple[bytes | str, frozenset[str]]:
    """A corpus message the server must answer at once, with what it may answer.

    Before ``hello`` the corpus's own valid ``hello``s are skipped, so the
    session stays unopened until the test sends one.
    """
    while True:
        if rng.random() < 0.01:  # over max_message_bytes, under the transport limit
            size = rng.randint(SETTINGS.max_message_bytes + 1, SETTINGS.transport_max_bytes)
            payload: bytes | str = (
                rng.randbytes(size) if rng.random() < 0.5 else corpus.base64_text(size)
            )
        else:
            payload = corpus.message(rng)
        allowed = expected(payload, opened=opened)
        if allowed is not None and (opened or READY not in allowed):
            return payload, allowed


async def _answer(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(TIMEOUT):
        return decode_reply(await ws.recv())


async def _fuzz_connection(url: str, rng: random.Random, count: int, tally: Tally) -> None:
    """``count`` hostile messages (``hello`` somewhere among them), then one that must close."""
    async with connect(url, max_size=None, compression=None, ping_interval=None) as ws:
        opened = False
        hello_at = rng.randint(count // 8, count // 2)
        sent = 0
        while sent < count:
            batch: list[tuple[bytes | str, frozenset[str]]] = []
            for _ in range(min(BATCH, count - sent)):
                if sent == hello_at:
                    item: tuple[bytes | str, frozenset[str]] = (
                        p.pack({"type": "hello"}),
                        frozenset({READY}),
                    )
                else:
                    item = _next(rng, opened=opened)
                opened = opened or READY in item[1]
                batch.append(item)
                sent += 1
            for payload, _ in batch:
                await ws.send(payload)
            for payload, allowed in batch:
                reply = await _answer(ws)
                shown = repr(payload[:200])
                if reply["type"] == READY:
                    assert READY in allowed, (reply, shown)
                    continue
                assert reply["type"] == "error", (reply, shown)
                assert reply["code"] in allowed, (reply, sorted(allowed), shown)
                assert reply["code"] in p.KNOWN_CODES and reply["fatal"] is False, reply
                tally.count(tally.errors, reply["code"])
        tally.sent += count

        # The last message is refused by the WebSocket layer itself.
        ending = rng.randrange(3)
        if ending == 0:
            await ws.send(corpus.invalid_utf8_text(rng), text=True)
            want = INVALID_PAYLOAD_DATA
        elif ending == 1:
            await ws.send(rng.randbytes(SETTINGS.transport_max_bytes + rng.randint(1, 10_000)))
            want = CloseCode.MESSAGE_TOO_BIG
        else:
            await ws.send(corpus.base64_text(SETTINGS.transport_max_bytes + 1_000))
            want = CloseCode.MESSAGE_TOO_BIG
        tally.sent += 1
        with pytest.raises(ConnectionClosed) as closed:
            await _answer(ws)
        assert closed.value.rcvd is not None, "closed without a close frame"
        code = closed.value.rcvd.code
        assert code in NAMED_CLOSE_CODES and code == want, (code, want)
        tally.count(tally.closes, code)


async def test_hostile_messages_over_the_wire(errors_logged: Recorder) -> None:
    """10,000 hostile messages each get their predicted typed error (or a named close);
    the server then still serves a fresh session and reports healthy, having logged no error."""
    rng = random.Random(SEED)
    tally = Tally()
    async with live_server(SETTINGS, FakeEngine(model_name="fake-model")) as live:
        # uvicorn configures its loggers when it starts: attach after that.
        errors_logged.watch("uvicorn")
        url, base = live.url, live.base
        for _ in range(CONNECTIONS):
            await _fuzz_connection(url, rng, MESSAGES // CONNECTIONS, tally)

        async with connect(url) as ws:
            await ws.send(p.pack({"type": "hello", "fps": 2}))
            ready = await _answer(ws)
            assert ready["type"] == READY and ready["model"] == "fake-model"
        async with httpx.AsyncClient(base_url=base) as http:
            health = (await http.get("/health")).json()
        assert health["status"] == "ok"

    assert tally.sent >= MESSAGES
    assert sum(tally.errors.values()) >= MESSAGES - CONNECTIONS  # all but each hello
    assert sum(tally.closes.values()) == CONNECTIONS
    assert "internal_error" not in tally.errors
    # Both sides of hello, and the size limit, were exercised.
    assert {"hello_required", "duplicate_hello", "message_too_large"} <= tally.errors.keys()
    logged = [(r.name, r.getMessage()) for r in errors_logged.records]
    expected_logs = [("uvicorn.error", UVICORN_UTF8_ERROR)] * tally.closes.get(
        INVALID_PAYLOAD_DATA, 0
    )
    assert logged == expected_logs


async def test_flooding_is_rate_limited_then_closed() -> None:
    """Past the message burst a session gets ``rate_limited``; keeping on closes it with 4429."""
    settings = Settings(messages_per_second=1.0, message_burst=20)
    async with live_server(settings) as live, connect(live.url, compression=None) as ws:
        for _ in range(100):
            await ws.send(p.pack({"type": "cancel", "id": "x"}))
        codes: list[str] = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                reply = await _answer(ws)
                assert reply["type"] == "error", reply
                codes.append(reply["code"])
    assert codes[:20] == ["hello_required"] * 20
    assert set(codes[20:]) == {"rate_limited"}
    assert closed.value.rcvd is not None and closed.value.rcvd.code == CloseCode.RATE_LIMITED
