"""The bundled client (library and CLI) against a real uvicorn server on loopback.

The server runs the scripted :class:`FakeEngine`, which answers "I see N
frames (a-bs) after T turns; you asked: QUESTION" one word per delta, and the
real decoder, so these tests cover the client end to end without a model.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

import streamchat_client
import streamchat_client.messages
from streamchat.config import Settings
from streamchat_client import (
    Answer,
    ConnectError,
    ProtocolViolation,
    ServerError,
    SessionClosed,
    VideoStatus,
    connect,
)
from streamchat_client.cli import main
from streamchat_client.inbox import Inbox
from streamchat_client.messages import Done, Usage
from tests.support.live import Live, live_server, serve_files
from tests.support.media import CLIP_SECONDS, encode_image, encode_video

TIMEOUT = 20.0
"""Upper bound for anything a test awaits, so a bug fails the test instead of hanging it."""


async def _push_and_end(session: streamchat_client.Session, clip: Path) -> VideoStatus:
    await session.send_file(clip)
    return await session.wait_ended(timeout=TIMEOUT)


# --- library ----------------------------------------------------------------


async def test_connect_reports_ready_and_capped_limits(server: Live) -> None:
    """``connect`` sends hello and exposes the session id, model and the limits it chose."""
    async with connect(server.url, fps=2, window_frames=16, max_pixels=10**9) as session:
        assert session.session_id
        assert session.ready.model == "fake"
        assert session.ready.protocol == 1
        assert session.limits.fps == 2.0
        assert session.limits.window_frames == 16
        assert session.limits.max_pixels == Settings().max_pixels  # capped by the server
        assert session.limits.idle_timeout == Settings().idle_timeout
        assert session.limits.messages_per_second == Settings().messages_per_second
    assert session.closed


async def test_connect_sends_the_context_it_is_given(server: Live) -> None:
    """``connect(context="timeline")`` puts it in hello: the server (whose default is the
    window) tells it back in the limits, with the frames an ask may see; without it, the
    server's default."""
    async with connect(server.url, window_frames=16, context="timeline") as session:
        assert (session.limits.context, session.limits.context_frames) == ("timeline", 16 + 8)
    async with connect(server.url, window_frames=16) as session:
        assert (session.limits.context, session.limits.context_frames) == ("window", 16)


async def test_connect_to_nothing_raises_connect_error(dead_url: str) -> None:
    """A port with no server gives a typed ConnectError, not a raw OSError."""
    with pytest.raises(ConnectError):
        await connect(dead_url, open_timeout=5)


async def test_refused_hello_raises_server_error(server: Live) -> None:
    """A hello the server refuses surfaces its error code."""
    with pytest.raises(ServerError) as info:
        await connect(server.url, fps=1000)
    assert info.value.code == "invalid_field"


async def test_send_file_then_ask_streams_deltas_and_usage(server: Live, clip: Path) -> None:
    """A whole clip is decoded, and an answer streams word by word, then ends with usage."""
    async with connect(server.url, fps=2, window_frames=16) as session:
        sent = await session.send_file(clip)
        status = await session.wait_ended(timeout=TIMEOUT)
        assert sent == clip.stat().st_size == status.bytes_received
        assert status.state == "ended"
        assert status.frames == round(CLIP_SECONDS * 2)
        assert session.status == status

        answer = session.ask("What is moving?")
        deltas = [delta async for delta in answer]
        assert len(deltas) > 3
        assert "".join(deltas) == answer.text
        assert answer.text.endswith("you asked: What is moving?")
        assert answer.done is not None
        assert answer.done.finish_reason == "stop"
        assert answer.done.usage.completion_tokens == len(deltas)
        assert answer.done.usage.frames == status.frames
        assert answer.done.usage.time_to_first_token is not None
        assert session.errors == []


async def test_result_returns_the_whole_answer_and_ask_options_reach_the_server(
    server: Live, clip: Path
) -> None:
    """``result()`` waits for the whole text; frame selection, max_tokens and choices are sent."""
    async with connect(server.url, fps=2) as session:
        await _push_and_end(session, clip)
        answer = await session.ask("Count", id="mine", max_tokens=2, max_frames=1).result()
        chosen = await session.ask("Dark?", choices=["no", "yes"]).result()
    assert answer.id == "mine"
    assert answer.text == "I see"
    assert answer.done is not None
    assert answer.done.finish_reason == "length"
    assert answer.done.usage.completion_tokens == 2
    assert answer.done.usage.frames == 1
    assert server.engine.requests[-2].sampling.max_tokens == 2
    assert chosen.text == "no"
    assert server.engine.requests[-1].sampling.choices == ("no", "yes")


async def test_realtime_send_file_is_paced_and_questions_overlap_it(
    server: Live, clip: Path
) -> None:
    """Realtime pushing takes the clip's duration, and a question is answered meanwhile."""
    loop = asyncio.get_running_loop()
    async with connect(server.url, fps=2, window_frames=16) as session:
        started = loop.time()
        pusher = asyncio.create_task(session.send_file(clip, realtime=True))
        status = await session.wait_frames(1, timeout=TIMEOUT)
        assert status.state == "decoding"
        answer = await session.ask("What now?").result()
        assert not pusher.done(), "the answer should arrive while the video still streams"
        assert answer.done is not None and answer.done.finish_reason == "stop"
        await pusher
        elapsed = loop.time() - started
        final = await session.wait_ended(timeout=TIMEOUT)
    # The one legitimate wall-clock bound: pacing is the feature under test.
    assert elapsed >= CLIP_SECONDS * 0.95
    assert final.bytes_received == clip.stat().st_size


async def test_send_url_decodes_a_served_file(server: Live, clip: Path) -> None:
    """``send_url`` makes the server fetch the clip over HTTP."""
    async with serve_files(clip.parent) as files, connect(server.url, fps=2) as session:
        await session.send_url(f"{files}/{clip.name}")
        status = await session.wait_ended(timeout=TIMEOUT)
    assert status.state == "ended"
    assert status.frames == round(CLIP_SECONDS * 2)


async def test_send_file_after_a_url_source_replaces_it(server: Live, clip: Path) -> None:
    """A file pushed while a URL source may still play ends that source first, so its chunks
    are not refused with source_busy."""
    async with serve_files(clip.parent) as files, connect(server.url, fps=2) as session:
        await session.send_url(f"{files}/{clip.name}")
        await session.send_file(clip)
        status = await session.wait_ended(timeout=TIMEOUT)
        # The URL source may fail for having been ended before its first bytes; that is all.
        assert {e.code for e in session.errors} <= {"video_decode_failed"}
    assert (status.source, status.state) == (2, "ended")
    assert status.frames == round(CLIP_SECONDS * 2)
    assert status.bytes_received == clip.stat().st_size


async def test_wait_frames_returns_at_n_or_at_the_end(server: Live, clip: Path) -> None:
    """``wait_frames`` resolves on enough frames, or early with the ended status."""
    async with connect(server.url, fps=4, window_frames=32) as session:
        await session.send_file(clip)
        enough = await session.wait_frames(2, timeout=TIMEOUT)
        assert enough.frames >= 2
        final = await session.wait_frames(1000, timeout=TIMEOUT)
        assert final.state == "ended"
        assert final.frames == round(CLIP_SECONDS * 4)


async def test_wait_frames_times_out_without_video(server: Live) -> None:
    """Without video nothing arrives, and the timeout is honoured."""
    async with connect(server.url) as session:
        with pytest.raises(TimeoutError):
            await session.wait_frames(1, timeout=0.2)


async def test_ask_without_frames_raises_no_frames(server: Live) -> None:
    """The server's refusal of a question reaches that answer as a typed error."""
    async with connect(server.url) as session:
        answer = session.ask("Anything?", id="early")
        with pytest.raises(ServerError) as info:
            async for _ in answer:
                pass
        assert info.value.code == "no_frames"
        assert info.value.id == "early"
        assert info.value.fatal is False
        assert answer.error is info.value
        assert session.errors == []  # it belonged to the answer, not the session
        with pytest.raises(ServerError):
            await answer.result()


async def test_cancel_stops_the_answer_in_the_engine(server: Live, clip: Path) -> None:
    """A held answer is cancelled: it ends 'cancelled' and the engine request is gone."""
    async with connect(server.url) as session:
        await _push_and_end(session, clip)
        server.engine.gate.clear()
        answer = session.ask("Describe it in detail.")
        first = await anext(answer)
        await server.engine.wait_running(1)
        await session.cancel(answer.id)
        async with asyncio.timeout(TIMEOUT):
            await answer.result()
        assert answer.done is not None
        assert answer.done.finish_reason == "cancelled"
        assert answer.text == first
        assert server.engine.running() == frozenset()
        await answer.cancel()  # already finished: a no-op, not an unknown_id error
        assert session.errors == []


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
async def test_chunks_fit_a_small_message_limit_in_both_encodings(
    clip: Path, encoding: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks are cut to the server's max_message_bytes (base64 included), in either encoding,
    and the server answers in the encoding the client speaks."""
    received: list[bytes | str] = []
    decode = streamchat_client.messages.decode

    def recording_decode(frame: bytes | str) -> dict[str, Any]:
        received.append(frame)
        return decode(frame)

    monkeypatch.setattr("streamchat_client.client.decode", recording_decode)
    settings = Settings(max_message_bytes=2048)
    async with (
        live_server(settings) as server,
        connect(server.url, fps=2, encoding=encoding) as session,
    ):
        status = await _push_and_end(session, clip)
        answer = await session.ask("Still there?").result()
        assert session.errors == []
    assert status.frames > 0
    assert status.bytes_received == clip.stat().st_size
    assert answer.done is not None and answer.done.finish_reason == "stop"
    text_frames = {isinstance(frame, str) for frame in received}
    assert text_frames == {encoding == "json"}


async def test_engine_failure_raises_after_the_answers_done(server: Live, clip: Path) -> None:
    """An engine_error is raised after the text that arrived, with the answer's done attached."""
    server.engine.fail_with = "out of memory"
    async with connect(server.url) as session:
        await _push_and_end(session, clip)
        answer = session.ask("Try")
        deltas: list[str] = []
        with pytest.raises(ServerError) as info:
            async for delta in answer:
                deltas.append(delta)
        assert info.value.code == "engine_error"
        assert info.value.id == answer.id
        assert deltas == ["I"]
        assert answer.done is not None and answer.done.finish_reason == "error"
        server.engine.fail_with = None
        again = await session.ask("Again").result()  # the session goes on
        assert again.done is not None and again.done.finish_reason == "stop"


async def test_send_image_adds_a_frame(server: Live) -> None:
    """A still image becomes a frame a question can see."""
    async with connect(server.url, encoding="json") as session:
        await session.send_image(encode_image("png"), pts=3.0)
        answer = await session.ask("What is this?").result()
    assert answer.done is not None and answer.done.usage.frames == 1
    assert "(3.0-3.0s)" in answer.text


async def test_fast_push_waits_for_decoding_instead_of_overflowing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file larger than the server's video buffer is held back to the decoder's pace,
    so no chunk is refused with video_backlog_full."""
    big = encode_video(tmp_path / "big.webm", seconds=12.0, fps=10, gop=1)
    buffer = 16 * 1024  # a few dozen frames: room for FFmpeg's read-ahead and decoder delay
    assert big.stat().st_size > 3 * buffer
    # Only the status-based estimate may release chunks: the stall fallback would hang the test.
    monkeypatch.setattr("streamchat_client.client.FLOW_STALL_SECONDS", TIMEOUT * 10)
    settings = Settings(feed_bytes=buffer, status_interval=0.0)
    async with (
        live_server(settings) as server,
        connect(server.url, fps=10, window_frames=64) as session,
    ):
        async with asyncio.timeout(TIMEOUT):
            status = await _push_and_end(session, big)
        assert session.errors == []
    assert status.state == "ended"
    assert status.bytes_received == big.stat().st_size
    assert status.frames > 0


async def test_bad_video_is_a_session_error(server: Live) -> None:
    """Undecodable bytes end the source as failed, with the error in ``errors`` and callbacks."""
    seen: list[ServerError] = []
    async with connect(server.url, on_error=seen.append) as session:
        await session.send_bytes(b"\x00not a video" * 2000, format="webm")
        await session.end_video()
        with pytest.raises(ServerError) as ended:
            await session.wait_ended(timeout=TIMEOUT)
        assert session.status is not None and session.status.state == "failed"
        assert ended.value is seen[0]
        assert [e.code for e in session.errors] == [e.code for e in seen]
        assert seen and seen[0].code in ("video_unsupported", "video_decode_failed")
        assert seen[0].id is None
        with pytest.raises(ServerError) as info:
            await session.wait_frames(1, timeout=TIMEOUT)
        assert info.value is seen[0]


async def test_server_going_away_ends_pending_answers(clip: Path) -> None:
    """When the server closes the connection, a pending answer raises instead of hanging."""
    async with live_server() as server:
        session = await connect(server.url)
        await _push_and_end(session, clip)
        server.engine.gate.clear()
        answer = session.ask("Will you finish?")
        await server.engine.wait_running(1)
    # The server has shut down (with the answer held in the engine).
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(SessionClosed):
            async for _ in answer:
                pass
    assert session.closed
    with pytest.raises(SessionClosed):
        await session.send_file(clip)
    with pytest.raises(SessionClosed):
        session.ask("Anyone?")
    await session.close()  # idempotent after the server left


async def test_closing_the_session_ends_pending_answers(server: Live, clip: Path) -> None:
    """Closing from the client side also fails pending answers with SessionClosed."""
    session = await connect(server.url)
    await _push_and_end(session, clip)
    server.engine.gate.clear()
    answer = session.ask("Hold on")
    await server.engine.wait_running(1)
    await session.close()
    with pytest.raises(SessionClosed):
        await answer.result()


async def test_an_unread_answer_buffers_in_bounded_pieces() -> None:
    """Deltas nobody reads yet are merged, not queued without bound, and no text is lost."""

    async def never(id: str) -> None:
        raise AssertionError("not cancelled here")

    answer = Answer("a", "q", cancel=never, max_pieces=2)
    for word in ["one", " two", " three", " four"]:
        answer._delta(word)
    answer._done(
        Done(
            id="a",
            finish_reason="stop",
            usage=Usage(
                prompt_tokens=1,
                completion_tokens=4,
                video_tokens=0,
                frames=0,
                time_to_first_token=None,
            ),
        )
    )
    pieces = [piece async for piece in answer]
    assert pieces == ["one", " two three four"]
    assert answer.text == "one two three four"


def test_inbox_routes_errors_to_answers_or_the_session() -> None:
    """Refusals end their answer, engine errors wait for the done, the rest are session errors."""

    async def never(id: str) -> None:
        raise AssertionError("not cancelled here")

    seen: list[ServerError] = []
    inbox = Inbox(max_errors=2, on_error=seen.append)
    refused, failing = Answer("r", "q", cancel=never), Answer("f", "q", cancel=never)
    inbox.answers.update(r=refused, f=failing)

    def error(code: str, id: str | None = None) -> dict[str, Any]:
        return {"type": "error", "code": code, "message": "m", "id": id, "fatal": False}

    inbox.dispatch(error("no_frames", "r"))
    assert refused.finished and isinstance(refused.error, ServerError)
    inbox.dispatch(error("engine_error", "f"))
    assert not failing.finished and "f" in inbox.answers  # its answer.done is still to come
    inbox.dispatch(error("unknown_id", "f"))  # about a cancel, not the answer
    assert not failing.finished
    inbox.dispatch({"type": "answer.done", "id": "f", "finish_reason": "error", "usage": {
        "prompt_tokens": 0, "completion_tokens": 0, "video_tokens": 0, "frames": 0,
        "time_to_first_token": None}})  # fmt: skip
    assert failing.finished and failing.done is not None
    assert failing.error is not None and getattr(failing.error, "code", None) == "engine_error"
    inbox.dispatch(error("video_decode_failed"))
    inbox.dispatch(error("video_backlog_full"))
    assert [e.code for e in seen] == ["unknown_id", "video_decode_failed", "video_backlog_full"]
    assert [e.code for e in inbox.errors] == ["video_decode_failed", "video_backlog_full"]
    assert inbox.source_error is seen[1]
    inbox.dispatch({"type": "from.the.future", "x": 1})  # ignored, as the protocol promises
    with pytest.raises(ProtocolViolation):
        inbox.dispatch({"type": "answer.delta", "id": 7})


# --- CLI ----------------------------------------------------------------------


async def _cli(*argv: str) -> int:
    """Run the CLI in a worker thread: it runs its own event loop; the server stays in ours."""
    return await asyncio.wait_for(asyncio.to_thread(main, list(argv)), TIMEOUT)


async def test_cli_prints_the_answer(
    server: Live, clip: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default mode pushes the file, asks, and prints the answer to stdout."""
    code = await _cli(str(clip), "--url", server.url, "--ask", "What is moving?")
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip().endswith("you asked: What is moving?")
    assert "source 1 ended: 4 frames" in err


async def test_cli_json_lines(server: Live, clip: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--json`` prints one parsable object per line: deltas, statuses and a done per question."""
    code = await _cli(str(clip), "--url", server.url, "--json", "--ask", "one?", "--ask", "two?")
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    dones = [line for line in lines if line["type"] == "answer.done"]
    assert [d["question"] for d in dones] == ["one?", "two?"]
    assert all(d["finish_reason"] == "stop" for d in dones)
    for done in dones:
        deltas = [x["text"] for x in lines if x["type"] == "answer.delta" and x["id"] == done["id"]]
        assert "".join(deltas) == done["text"]
        assert done["usage"]["completion_tokens"] == len(deltas)
    assert any(x["type"] == "video.status" and x["state"] == "ended" for x in lines)
    assert "1 turns" in dones[1]["text"]  # the first answer was replayed as history


async def test_cli_realtime_and_max_tokens(
    server: Live, short_clip: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--realtime`` asks once frames are buffered; ``--max-tokens`` caps the answer."""
    code = await _cli(
        str(short_clip), "--url", server.url, "--realtime", "--json",
        "--max-tokens", "3", "--fps", "4", "--ask", "Go",
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    done = [json.loads(line) for line in out.splitlines() if '"answer.done"' in line]
    assert len(done) == 1
    assert done[0]["finish_reason"] == "length"
    assert done[0]["usage"]["completion_tokens"] == 3


async def test_cli_choices_bind_every_answer(
    server: Live, short_clip: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--choices`` reaches the server as the session's fixed choices: each answer is one."""
    code = await _cli(
        str(short_clip), "--url", server.url, "--json", "--choices", "yes, no",
        "--ask", "Dark?", "--ask", "Moving?",
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    done = [json.loads(line) for line in out.splitlines() if '"answer.done"' in line]
    assert [d["text"] for d in done] == ["yes", "yes"]
    assert [r.sampling.choices for r in server.engine.requests[-2:]] == [("yes", "no")] * 2


async def test_cli_url_source(server: Live, clip: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An http URL is sent as ``video.url`` and the server fetches it."""
    async with serve_files(clip.parent) as files:
        code = await _cli(f"{files}/{clip.name}", "--url", server.url, "--ask", "Seen?")
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "you asked: Seen?" in out


async def test_cli_undecodable_video_exits_4(
    server: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file PyAV cannot open is exit code 4, with the reason on stderr, before any push."""
    bad = tmp_path / "bad.webm"
    bad.write_bytes(b"\x00not a video" * 2000)
    code = await _cli(str(bad), "--url", server.url, "--ask", "What?")
    _, err = capsys.readouterr()
    assert code == 4
    assert f"cannot open {bad}" in err


async def test_cli_engine_failure_exits_1(
    server: Live, clip: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An answer the model fails is exit code 1, with the partial text and the error shown."""
    server.engine.fail_with = "out of memory"
    code = await _cli(str(clip), "--url", server.url, "--ask", "Try")
    out, err = capsys.readouterr()
    assert code == 1
    assert out.strip() == "I"
    assert "engine_error" in err


async def test_cli_cannot_connect_exits_3(
    dead_url: str, clip: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listening at --url is exit code 3."""
    code = await _cli(str(clip), "--url", dead_url, "--ask", "Hello?")
    _, err = capsys.readouterr()
    assert code == 3
    assert "cannot connect" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["/no/such/file.webm"],
        ["{clip}", "--realtime", "--fast"],
        ["{clip}", "--fps", "0"],
        [],
    ],
)
def test_cli_usage_errors_exit_2(
    argv: list[str], clip: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad arguments are exit code 2, before any connection is tried."""
    assert main([a.format(clip=clip) for a in argv]) == 2
    assert "usage:" in capsys.readouterr().err


async def test_cli_ctrl_c_exits_130_and_closes_the_session(server: Live, clip: Path) -> None:
    """SIGINT while an answer streams ends the process with 130 and the server sees it go."""
    server.engine.gate.clear()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamchat_client", str(clip), "--url", server.url,
        "--ask", "Take your time",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(TIMEOUT):
            await server.engine.wait_running(1)
            process.send_signal(signal.SIGINT)
            _, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 130, err.decode()
    assert b"interrupted" in err
