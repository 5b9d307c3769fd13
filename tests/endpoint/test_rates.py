"""Rate limits that never lose work, over a real uvicorn server.

Pushed video is paced against the video byte rate and never refused for the
message rate, so a stream pushed in small pieces as fast as the socket takes
them decodes whole; and every refusal of an ``ask`` names its id, so a client
waiting for that answer learns it will not come. The server runs in the
test's loop with the scripted engine and real PyAV decoding.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Any

import msgpack
import pytest
from websockets.asyncio.client import ClientConnection

from streamchat.config import Settings
from streamchat.errors import CloseCode
from tests.support.live import live_server
from tests.support.media import chunks, encode_video
from tests.support.wsclient import closed_code, open_session, open_ws, recv, send

FLOOD_CHUNK = 8 * 1024
"""The piece size users pushed a 1080p60 file in when its chunks were refused."""


def write_1080p60(path: Path, seconds: float) -> Path:
    """A 1080p60 H.264 MPEG-TS, written by the ffmpeg command-line tool as a camera app would."""
    command = "ffmpeg -nostdin -loglevel error -y -f lavfi -i testsrc2=size=1920x1080:rate=60"
    options = "-c:v libx264 -preset ultrafast -g 60 -f mpegts"
    subprocess.run([*command.split(), "-t", str(seconds), *options.split(), str(path)], check=True)
    return path


def probe_duration(path: Path) -> float:
    """Seconds of video in ``path``: its frame count over its frame rate, as ffprobe reads them."""
    command = "ffprobe -v error -select_streams v:0 -count_packets -of json -show_entries"
    result = subprocess.run(
        [*command.split(), "stream=nb_read_packets,r_frame_rate", str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    [stream] = json.loads(result.stdout)["streams"]
    return int(stream["nb_read_packets"]) / float(Fraction(stream["r_frame_rate"]))


async def push_and_drain(ws: ClientConnection, pieces: list[bytes]) -> list[dict[str, Any]]:
    """Push ``pieces`` as fast as the socket takes them, end the source, and read until it ends.

    Returns every message that was not a delta, the source's last status last.
    Reading runs alongside pushing, so the server is never held up by its
    own unread status updates.
    """

    async def push() -> None:
        for piece in pieces:
            await send(ws, type="video.chunk", data=piece)
        await send(ws, type="video.end")

    pusher = asyncio.create_task(push())
    seen: list[dict[str, Any]] = []
    try:
        while True:
            message = await recv(ws)
            seen.append(message)
            if message["type"] == "video.status" and message["state"] != "decoding":
                await pusher
                return seen
    finally:
        pusher.cancel()


# -- pushed video is paced, never refused -------------------------------------


async def test_1080p60_pushed_in_8_kib_chunks_decodes_completely_at_default_rates(
    tmp_path: Path,
) -> None:
    """Over a thousand 8 KiB chunks sent at socket speed are all kept: every frame, no error."""
    video = write_1080p60(tmp_path / "1080p60.ts", seconds=3.0)
    data = video.read_bytes()
    pieces = chunks(data, FLOOD_CHUNK)
    settings = Settings()  # the default rates: 200 messages per second, 32 MiB/s of video
    assert len(pieces) > settings.message_burst + settings.messages_per_second
    async with live_server(settings) as live:
        async with asyncio.timeout(120):
            ws = await open_ws(live.url)
            fps = settings.max_fps
            await send(ws, type="hello", fps=fps)
            ready = await recv(ws, "ready")
            assert ready["limits"]["fps"] == fps
            seen = await push_and_drain(ws, pieces)
            await ws.close()
    status = seen[-1]
    expected = math.ceil(round(probe_duration(video) * fps, 6))
    assert [m for m in seen if m["type"] == "error"] == []
    assert (status["state"], status["bytes_received"]) == ("ended", len(data))
    assert (status["frames_decoded"], status["frames"]) == (expected, expected)


async def test_video_takes_nothing_from_the_message_rate() -> None:
    """With one message token left, a stream in a hundred pieces decodes and an ask still passes."""
    settings = Settings(messages_per_second=0.001, message_burst=2, min_pixels=28 * 28)
    data = encode_video(container="mpegts", codec="h264", seconds=2.0)
    pieces = chunks(data, len(data) // 100 + 1, seed=7)
    async with live_server(settings) as live:
        async with asyncio.timeout(60):
            ws = await open_session(live.url)  # hello takes the first token; the image none
            seen = await push_and_drain(ws, pieces)
            await send(ws, type="ask", id="q", text="what is there?")
            done = await recv(ws, "answer.done", "error")
            await ws.close()
    assert [m for m in seen if m["type"] == "error"] == []
    assert (seen[-1]["state"], seen[-1]["bytes_received"]) == ("ended", len(data))
    assert (done["type"], done["id"], done["finish_reason"]) == ("answer.done", "q", "stop")


# -- a refused ask names its id -----------------------------------------------


async def test_an_ask_in_a_message_flood_is_answered_or_refused_by_its_id() -> None:
    """At the default rates an ask amid a flood is answered or refused by id; no reply is lost."""
    settings = Settings(min_pixels=28 * 28)
    # At socket speed, `before` messages exceed the burst and the refill of the time
    # they take; with the few after, refusals stay under a burst: no flooding close.
    before = settings.message_burst * 2 - 20
    sent = [("cancel", f"c{n}") for n in range(before)] + [("ask", "q")]
    sent += [("cancel", f"c{n}") for n in range(before, before + 15)]
    async with live_server(settings) as live:
        async with asyncio.timeout(60):
            ws = await open_session(live.url)
            for kind, id in sent:
                await send(ws, type=kind, id=id, text="what is there?")
            errors: list[dict[str, Any]] = []
            answered: list[dict[str, Any]] = []
            while len(errors) + len(answered) < len(sent):
                message = await recv(ws, "error", "answer.done")
                (errors if message["type"] == "error" else answered).append(message)
            await ws.close()
    # Errors come in the order of the messages they refuse; an answered ask has none.
    refused = [(kind, id) for kind, id in sent if not (answered and kind == "ask")]
    replies = [(e["code"], e["id"], e["fatal"]) for e in errors]
    allowed = {
        ("cancel", id): {("unknown_id", id, False), ("rate_limited", None, False)}
        for kind, id in sent
        if kind == "cancel"
    }
    allowed["ask", "q"] = {("rate_limited", "q", False)}
    assert all(reply in allowed[m] for m, reply in zip(refused, replies, strict=True))
    assert ("rate_limited", None, False) in replies  # the flood did go over the rate
    assert [(a["id"], a["finish_reason"]) for a in answered] in ([], [("q", "stop")])


async def test_asks_over_the_rate_are_refused_by_id_up_to_the_flooding_close() -> None:
    """Refused asks name their ids, the one that trips the 4429 close as well."""
    settings = Settings(messages_per_second=0.001, message_burst=4, min_pixels=28 * 28)
    sent = [("cancel", f"c{n}") for n in range(3)] + [("ask", "q1")]
    sent += [("cancel", f"c{n}") for n in range(3, 6)] + [("ask", "q2")]
    async with live_server(settings) as live:
        async with asyncio.timeout(30):
            ws = await open_session(live.url)  # hello takes a token, the image none
            for kind, id in sent:
                await send(ws, type=kind, id=id, text="what is there?")
            replies = [await recv(ws, "error") for _ in sent]
            code = await closed_code(ws)
    assert [(r["id"], r["code"], r["fatal"]) for r in replies] == [
        ("c0", "unknown_id", False),
        ("c1", "unknown_id", False),
        ("c2", "unknown_id", False),
        ("q1", "rate_limited", False),
        (None, "rate_limited", False),  # a cancel's refusal names no answer: it may be running
        (None, "rate_limited", False),
        (None, "rate_limited", False),
        ("q2", "rate_limited", True),
    ]
    assert code == CloseCode.RATE_LIMITED


SMALL = Settings(max_message_bytes=64 * 1024, min_pixels=28 * 28)
KEYED = dataclasses.replace(SMALL, api_keys=frozenset({"k"}))
ASK = {"type": "ask", "id": "q", "text": "what?"}
HUGE = {**ASK, "text": "x" * SMALL.max_message_bytes}


@pytest.mark.parametrize(
    ("settings", "hello", "frame", "code", "fatal"),
    [
        pytest.param(SMALL, False, json.dumps(ASK), "hello_required", False, id="before-hello"),
        pytest.param(SMALL, True, HUGE, "message_too_large", False, id="too-large"),
        pytest.param(
            SMALL, True, json.dumps(HUGE), "message_too_large", False, id="too-large-json"
        ),
        pytest.param(
            SMALL, True, json.dumps(HUGE, indent=1), "message_too_large", False, id="json-spaced"
        ),
        pytest.param(SMALL, True, {**ASK, "text": " "}, "invalid_field", False, id="blank"),
        pytest.param(KEYED, False, ASK, "unauthorized", True, id="no-key"),
    ],
)
async def test_every_refusal_of_an_ask_names_its_id(
    settings: Settings, hello: bool, frame: dict[str, Any] | str, code: str, fatal: bool
) -> None:
    """Refused before hello, for its size (msgpack, JSON), a field or a missing key: id named."""
    async with live_server(settings) as live:
        async with asyncio.timeout(30):
            ws = await open_ws(live.url)
            if hello:
                await send(ws, type="hello")
                await recv(ws, "ready")
            await ws.send(frame if isinstance(frame, str) else msgpack.packb(frame))
            raw = await ws.recv()
            error = json.loads(raw) if isinstance(raw, str) else msgpack.unpackb(raw)
            await ws.close()
    assert error["type"] == "error"
    assert (error["code"], error["id"], error["fatal"]) == (code, "q", fatal)
