"""End to end: the bundled client, a real uvicorn server, PyAV and vLLM on the tiny model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack
import pytest
import websockets

from streamchat_client import ServerError, connect
from tests.support.live import Live, serve_files
from tests.support.media import corrupt_payloads, encode_image, encode_video
from tests.support.settings import E2E

pytestmark = pytest.mark.engine

SUFFIX = {"webm": ".webm", "matroska": ".mkv", "mp4": ".mp4", "mpegts": ".ts"}


def clip(directory: Path, container: str = "webm", codec: str = "vp8", **kw: float) -> Path:
    path = directory / f"clip-{container}-{codec}{SUFFIX[container]}"
    path.write_bytes(encode_video(container=container, codec=codec, **kw))  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize(
    ("container", "codec"),
    [("webm", "vp8"), ("webm", "vp9"), ("matroska", "h264"), ("mp4", "h264"), ("mpegts", "h264")],
)
async def test_pushed_video_answers_stream_with_usage(
    live: Live, tmp_path: Path, container: str, codec: str
) -> None:
    """Each container a browser or camera sends decodes, and the answer streams in deltas."""
    async with connect(live.url, fps=2) as session:
        assert session.limits.frame_factor == 28  # resolved from the model's vision config
        await session.send_file(clip(tmp_path, container, codec, seconds=3.0))
        status = await session.wait_ended(timeout=60)
        assert (status.state, status.frames) == ("ended", 6)
        answer = session.ask("What is moving?", max_tokens=12)
        deltas = [delta async for delta in answer]
    assert len(deltas) >= 2 and "".join(deltas) == answer.text
    done = answer.done
    assert done is not None and done.finish_reason in ("stop", "length")
    usage = done.usage
    assert usage.frames == 6 and usage.video_tokens > 0
    assert usage.prompt_tokens > usage.video_tokens and usage.completion_tokens >= 2
    assert usage.time_to_first_token is not None and usage.time_to_first_token > 0


async def test_two_sessions_at_once(live: Live, tmp_path: Path) -> None:
    """Two sessions share the engine and each sees only its own window."""

    async def one(fps: float, seconds: float) -> int:
        directory = tmp_path / f"fps{fps:g}"  # each its own file: they run side by side
        directory.mkdir()
        async with connect(live.url, fps=fps) as session:
            await session.send_file(clip(directory, "webm", "vp8", seconds=seconds))
            await session.wait_ended(timeout=60)
            answer = await session.ask("Describe it.", max_tokens=24).result()
            assert answer.done is not None and answer.done.finish_reason in ("stop", "length")
            return answer.done.usage.frames

    assert await asyncio.gather(one(2.0, 2.0), one(1.0, 3.0)) == [4, 3]


async def test_history_and_time_ranges(live: Live, tmp_path: Path) -> None:
    """Later questions carry earlier turns; a time range narrows the frames."""
    async with connect(live.url, fps=2) as session:
        await session.send_file(clip(tmp_path, seconds=4.0))
        await session.wait_ended(timeout=60)
        first = await session.ask("What is it?", max_tokens=8).result()
        second = await session.ask("And then?", max_tokens=8, last_seconds=1.0).result()
    assert first.done is not None and second.done is not None
    assert second.done.usage.frames == 3  # pts 2.5, 3.0, 3.5
    text_tokens = [a.done.usage.prompt_tokens - a.done.usage.video_tokens for a in (first, second)]
    assert text_tokens[1] > text_tokens[0]  # the first turn is replayed as history


async def test_cancel_aborts_the_engine_request(live: Live, tmp_path: Path) -> None:
    """After cancel's answer.done, vLLM tracks no request of ours."""
    async with connect(live.url, fps=2) as session:
        await session.send_file(clip(tmp_path, seconds=2.0))
        await session.wait_ended(timeout=60)
        answer = session.ask("Tell me everything.", max_tokens=1500)
        first = await anext(aiter(answer))
        assert first
        await answer.cancel()
        rest = [delta async for delta in answer]
        assert answer.done is not None and answer.done.finish_reason == "cancelled"
        assert answer.done.usage.completion_tokens < 1500
        assert first + "".join(rest) == answer.text
        assert live.engine.running() == frozenset()
        assert live.engine.engine_unfinished() == 0
        # The session goes on.
        again = await session.ask("Short?", max_tokens=4).result()
        assert again.done is not None and again.done.finish_reason in ("stop", "length")


async def test_disconnect_aborts_the_engine_request(live: Live, tmp_path: Path) -> None:
    """A client vanishing mid-answer leaves nothing running in the engine."""
    session = await connect(live.url, fps=2)
    await session.send_file(clip(tmp_path, seconds=2.0))
    await session.wait_ended(timeout=60)
    answer = session.ask("Tell me everything.", max_tokens=1500)
    await anext(aiter(answer))
    assert len(live.engine.running()) == 1
    await session.close()
    async with asyncio.timeout(30):
        await live.state.wait_sessions(0)
    assert live.engine.running() == frozenset()
    assert live.engine.engine_unfinished() == 0


async def test_url_source(live: Live, tmp_path: Path) -> None:
    """A video URL is fetched by the server, decoded as a stream and asked about."""
    path = clip(tmp_path, "mp4", "h264", seconds=3.0)
    async with serve_files(tmp_path) as files, connect(live.url, fps=1) as session:
        await session.send_url(f"{files}/{path.name}")
        status = await session.wait_ended(timeout=60)
        assert (status.state, status.frames) == ("ended", 3)
        answer = await session.ask("What happens?", max_tokens=8).result()
    assert answer.done is not None and answer.done.usage.frames == 3


async def test_unreachable_url_is_a_typed_error(live: Live, tmp_path: Path) -> None:
    async with serve_files(tmp_path) as files, connect(live.url) as session:
        await session.send_url(f"{files}/missing.webm")
        with pytest.raises(ServerError) as info:
            await session.wait_ended(timeout=60)
        assert info.value.code == "url_fetch_failed"


async def test_bad_input_keeps_the_session_and_its_frames(live: Live, tmp_path: Path) -> None:
    """Errors on the live server: typed, non-fatal, and frames already decoded stay."""
    async with connect(live.url, fps=2) as session:
        with pytest.raises(ServerError) as info:
            await session.ask("Anything?").result()
        assert info.value.code == "no_frames"
        await session.send_file(clip(tmp_path, seconds=2.0))
        await session.wait_ended(timeout=60)
        bad = corrupt_payloads(encode_video(container="webm", codec="vp8", seconds=6.0), first=8)
        (tmp_path / "bad.webm").write_bytes(bad)
        await session.send_file(tmp_path / "bad.webm")
        with pytest.raises(ServerError) as info:
            await session.wait_ended(timeout=60)
        assert info.value.code == "video_decode_failed" and not info.value.fatal
        answer = await session.ask("Still there?", max_tokens=4).result()
        assert answer.done is not None and answer.done.usage.frames >= 1


async def test_far_oversized_message_closes_with_1009(live: Live) -> None:
    """Past the transport limit the WebSocket layer closes with 'message too big'."""
    async with websockets.connect(live.url, max_size=None) as ws:
        await ws.send(msgpack.packb({"type": "hello"}))
        await ws.recv()
        await ws.send(b"\x00" * (E2E.transport_max_bytes + 1))
        with pytest.raises(websockets.ConnectionClosed) as info:
            await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009


async def test_health_reports_the_engine(live: Live) -> None:
    import httpx

    async with connect(live.url):
        async with httpx.AsyncClient() as http:
            body = (await http.get(f"{live.base}/health")).json()
    assert body["status"] == "ok" and body["sessions"] == 1
    assert body["model"] == live.engine.model_name


async def test_connect_ask_disconnect_cycles_leave_no_engine_requests(live: Live) -> None:
    """The real engine's side of the 1,000-cycle leak test (tests/endpoint): hanging up
    mid-answer, again and again, leaves nothing in vLLM."""
    image = encode_image(width=112, height=112)
    for cycle in range(60):
        session = await connect(live.url, fps=2)
        await session.send_image(image)
        await session.wait_frames(1, timeout=30)
        answer = session.ask("What is this?", max_tokens=64)
        if cycle % 2:
            await answer.result()
        else:
            await anext(aiter(answer))
        await session.close()
    async with asyncio.timeout(30):
        await live.state.wait_sessions(0)
    assert live.engine.running() == frozenset()
    assert live.engine.engine_unfinished() == 0
