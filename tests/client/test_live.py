"""Live sources, interactive mode and progress display of the bundled client.

Live sources are played from files generated with PyAV (Matroska H.264, WebM
VP8, Matroska MJPEG, raw frames in AVI), opened by the client's PyAV worker
exactly as a camera or an RTSP stream would be, against a real uvicorn server
with the scripted :class:`FakeEngine`. Interactive mode runs the CLI as a
subprocess with questions written to its stdin.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import av
import pytest

from streamchat.engine.base import GenerationRequest
from streamchat_client import PushStats, SourceError, VideoStatus, connect
from streamchat_client.cli import main
from streamchat_client.display import Display
from streamchat_client.remux import Bridge
from tests.support.live import Live, serve_files
from tests.support.media import CLIP_FPS, CLIP_SECONDS, encode_video, pattern_frame

TIMEOUT = 20.0
"""Upper bound for anything a test awaits, so a bug fails the test instead of hanging it."""


@pytest.fixture(scope="module")
def mkv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2 s Matroska H.264 clip: remuxed to fragmented MP4 without re-encoding."""
    path = tmp_path_factory.mktemp("live") / "clip.mkv"
    return encode_video(path, container="matroska", codec="h264", seconds=CLIP_SECONDS)


@pytest.fixture(scope="module")
def mjpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2 s Matroska MJPEG clip (what many webcams send): copied, the server decodes MJPEG."""
    path = tmp_path_factory.mktemp("live") / "mjpeg.mkv"
    with av.open(str(path), "w", format="matroska") as output:
        stream = output.add_stream("mjpeg", rate=CLIP_FPS)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuvj420p"
        for i in range(round(CLIP_SECONDS * CLIP_FPS)):
            frame = av.VideoFrame.from_ndarray(pattern_frame(i, 160, 120), format="rgb24")
            frame = frame.reformat(format="yuvj420p")
            frame.pts = i
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))
    return path


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2 s AVI of raw frames (what a v4l2 camera gives without MJPEG): must be re-encoded."""
    path = tmp_path_factory.mktemp("live") / "raw.avi"
    with av.open(str(path), "w", format="avi") as output:
        stream = output.add_stream("rawvideo", rate=CLIP_FPS)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for i in range(round(CLIP_SECONDS * CLIP_FPS)):
            frame = av.VideoFrame.from_ndarray(pattern_frame(i, 160, 120), format="rgb24")
            frame = frame.reformat(format="yuv420p")
            frame.pts = i
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))
    return path


def _source_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("streamchat-source-")]


# --- library: Session.stream_live -----------------------------------------------


async def test_stream_live_remuxes_h264_and_paces_to_packet_timestamps(
    server: Live, mkv: Path
) -> None:
    """A Matroska H.264 file played as a live source is remuxed to fragmented MP4 without
    re-encoding, takes its media duration while questions are answered, and every frame
    reaches the server."""
    loop = asyncio.get_running_loop()
    progress: list[PushStats] = []
    async with connect(server.url, fps=2, window_frames=16) as session:
        started = loop.time()
        pusher = asyncio.create_task(session.stream_live(str(mkv), on_progress=progress.append))
        await session.wait_frames(1, timeout=TIMEOUT)
        early = await session.ask("So far?").result()
        assert not pusher.done(), "the loop must stay free to answer while the source plays"
        stats = await pusher
        elapsed = loop.time() - started
        status = await session.wait_ended(timeout=TIMEOUT)
        answer = await session.ask("What now?").result()
        assert session.errors == []
    assert early.done is not None and 0 < early.done.usage.frames < 4
    assert (stats.container, stats.codec, stats.reencoded) == ("mp4", "h264", False)
    assert stats.packets == round(CLIP_SECONDS * CLIP_FPS)
    last_packet = CLIP_SECONDS - 1 / CLIP_FPS
    assert stats.media_seconds == pytest.approx(last_packet)
    # The one legitimate wall-clock bound: pacing by timestamps is the feature under test.
    assert elapsed >= last_packet * 0.95
    assert status.state == "ended"
    assert status.bytes_received == stats.bytes_sent
    assert status.frames == round(CLIP_SECONDS * 2)
    assert "I see 4 frames (0.0-1.5s)" in answer.text
    # Bytes left as the muxer produced them, in many chunks, not in one burst at the end.
    assert len(progress) >= 10
    assert [p.bytes_sent for p in progress] == sorted(p.bytes_sent for p in progress)
    assert progress[-1].bytes_sent == stats.bytes_sent


@pytest.mark.parametrize(
    ("fixture", "container", "reencoded"),
    [("clip", "matroska", False), ("mjpeg", "mp4", False), ("raw", "mp4", True)],
)
async def test_stream_live_picks_a_container_or_reencodes(
    server: Live, request: pytest.FixtureRequest, fixture: str, container: str,
    reencoded: bool,
) -> None:  # fmt: skip
    """VP8 fits no MP4 and travels in Matroska as it is; MJPEG is copied into fragmented MP4
    (the server decodes it); raw frames are re-encoded (to H.264); the server decodes every
    frame of each."""
    path: Path = request.getfixturevalue(fixture)
    async with connect(server.url, fps=2) as session:
        stats = await session.stream_live(str(path), pace=False)
        status = await session.wait_ended(timeout=TIMEOUT)
        assert session.errors == []
    assert (stats.container, stats.reencoded) == (container, reencoded)
    assert status.frames == round(CLIP_SECONDS * 2)
    assert status.bytes_received == stats.bytes_sent


async def test_stream_live_stops_after_duration(server: Live, mkv: Path) -> None:
    """``duration`` stops the push after that much media; the source then ends normally."""
    async with connect(server.url, fps=10, window_frames=64) as session:
        stats = await session.stream_live(str(mkv), duration=1.0, pace=False)
        status = await session.wait_ended(timeout=TIMEOUT)
    assert stats.packets == CLIP_FPS  # packets at 0.0 .. 0.9 s
    assert stats.media_seconds < 1.0
    assert status.state == "ended"
    assert 0 < status.frames <= CLIP_FPS


@pytest.mark.parametrize("kind", ["missing", "garbage", "format"])
async def test_stream_live_unopenable_source_raises_source_error(
    server: Live, tmp_path: Path, clip: Path, kind: str
) -> None:
    """A source PyAV cannot open is a typed SourceError, nothing is sent, the session goes on."""
    garbage = tmp_path / "garbage.mkv"
    garbage.write_bytes(b"\x00not a video" * 100)
    source, input_format = {
        "missing": (str(tmp_path / "missing.mkv"), None),
        "garbage": (str(garbage), None),
        "format": (str(clip), "no-such-format"),
    }[kind]
    async with connect(server.url) as session:
        with pytest.raises(SourceError, match="cannot open"):
            await session.stream_live(source, input_format=input_format)
        assert session.status is None  # no source was started on the server
        stats = await session.stream_live(str(clip), pace=False)
        assert stats.bytes_sent > 0
        assert (await session.wait_ended(timeout=TIMEOUT)).frames > 0
    assert _source_threads() == []


async def test_cancelling_stream_live_stops_its_worker(server: Live, mkv: Path) -> None:
    """Cancelling a live push closes the source in its worker thread before returning,
    and ends the server's source with the frames it got."""
    async with connect(server.url, fps=4) as session:
        pusher = asyncio.create_task(session.stream_live(str(mkv)))
        status = await session.wait_frames(1, timeout=TIMEOUT)
        assert status.state == "decoding"
        assert _source_threads() != []
        pusher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pusher
        assert _source_threads() == []
        final = await session.wait_ended(timeout=TIMEOUT)  # the source was ended, not left open
    assert final.state == "ended"
    assert 0 < final.frames < round(CLIP_SECONDS * 4)


def test_bridge_is_bounded_and_gives_up_once_stopped() -> None:
    """The worker-to-loop queue holds at most its size; a full put returns False on stop."""
    loop = asyncio.new_event_loop()
    try:
        bridge = Bridge(loop, 1)
        assert bridge.put("first") is True
        bridge.stop.set()
        assert bridge.put("second") is False
        assert bridge.get_nowait() == "first"
        assert bridge.get_nowait() is None
    finally:
        loop.close()


async def test_send_file_reports_progress(server: Live, clip: Path) -> None:
    """``send_file`` reports every chunk it sends, up to the whole file."""
    progress: list[PushStats] = []
    async with connect(server.url) as session:
        sent = await session.send_file(clip, chunk_bytes=1024, on_progress=progress.append)
    assert sent == clip.stat().st_size
    assert [p.bytes_sent for p in progress] == [
        min(sent, 1024 * n) for n in range(1, 1 + len(progress))
    ]
    assert progress[-1].bytes_sent == sent and progress[-1].container == "webm"


# --- progress display --------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _status(frames: int, state: str = "decoding") -> VideoStatus:
    return VideoStatus(
        source=1, state=state, frames=frames, span=frames / 2, first_pts=0.0,
        last_pts=frames / 2, decode_lag=0.25, backlog_bytes=2048, frames_decoded=frames,
        frames_dropped=0, bytes_received=4096,
    )  # fmt: skip


def test_progress_redraws_one_line_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a TTY progress is one line, cut to the terminal's width and redrawn in place
    (after one line telling how the video travels), and ended before an answer is printed."""
    monkeypatch.setenv("COLUMNS", "300")
    out, err = io.StringIO(), _Terminal()
    display = Display(out=out, err=err)
    display.pushed(
        PushStats("cam", container="mp4", codec="mjpeg", remuxed=True, packets=3, chunks=2,
                  bytes_sent=2500, media_seconds=1.5)
    )  # fmt: skip
    told, _ = err.getvalue().split("\n", 1)
    assert told == "pushing cam: mjpeg, remuxed into fragmented MP4 without re-encoding"
    err.seek(0)
    err.truncate()
    display.status(_status(3))
    display.status(_status(4, "ended"))
    assert "\n" not in err.getvalue()
    assert err.getvalue().count("\r\x1b[K") == 2
    last = err.getvalue().rsplit("\r\x1b[K", 1)[1]
    assert last == (
        "source 1 ended: 4 frames (2.0 s buffered), decode lag 0.25 s, 2.0 KB undecoded"
        " | sent 2.5 KB, 3 packets, 1.5 s of video"
    )
    monkeypatch.setenv("COLUMNS", "40")
    display.status(_status(5, "decoding"))
    assert len(err.getvalue().rsplit("\r\x1b[K", 1)[1]) == 39
    display.delta("q1", "Hello")
    assert err.getvalue().endswith("\n")
    assert out.getvalue() == "Hello"


def test_progress_is_plain_lines_without_a_terminal_and_silent_when_quiet() -> None:
    """Without a TTY each state change is a line of its own; ``quiet`` prints none."""
    err = io.StringIO()
    display = Display(out=io.StringIO(), err=err)
    display.status(_status(1))
    display.status(_status(2))  # same state, too soon: not repeated
    display.status(_status(4, "ended"))
    lines = err.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["source 1 decoding", "source 1 ended"]
    quiet_err = io.StringIO()
    quiet = Display(out=io.StringIO(), err=quiet_err, quiet=True)
    quiet.status(_status(4, "ended"))
    quiet.info("hello")
    assert quiet_err.getvalue() == ""


# --- CLI -------------------------------------------------------------------------------


async def _cli(*argv: str) -> int:
    """Run the CLI in a worker thread: it runs its own event loop; the server stays in ours."""
    return await asyncio.wait_for(asyncio.to_thread(main, list(argv)), TIMEOUT)


async def test_cli_live_source_answers_while_it_streams(
    server: Live, mkv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--live FILE`` plays the file at its pace and asks once a few frames are buffered."""
    code = await _cli(
        "--live", str(mkv), "--url", server.url, "--json", "--fps", "4",
        "--window-frames", "2", "--ask", "Seen?",
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    done = [line for line in lines if line["type"] == "answer.done"]
    assert len(done) == 1 and done[0]["finish_reason"] == "stop"
    assert done[0]["usage"]["frames"] == 2
    statuses = [line for line in lines if line["type"] == "video.status"]
    assert statuses and all(s["state"] == "decoding" for s in statuses)  # asked mid-stream


async def test_cli_context_is_asked_for_in_hello(
    server: Live, mkv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--context timeline`` puts the session's questions on its timeline (the engine sees it)."""
    code = await _cli(
        "--live", str(mkv), "--url", server.url, "--json", "--fps", "4",
        "--window-frames", "2", "--ask", "Seen?", "--context", "timeline",
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    (request,) = server.engine.requests
    assert isinstance(request, GenerationRequest) and request.timeline is not None


async def test_cli_push_reads_a_url_locally(
    server: Live, clip: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--push URL`` reads the URL with PyAV here and pushes it (the server fetches nothing)."""
    async with serve_files(clip.parent) as files:
        code = await _cli(f"{files}/{clip.name}", "--push", "--url", server.url, "--ask", "Hi?")
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "I see 4 frames" in out and "you asked: Hi?" in out
    assert "sent " in err  # the client's own push progress


@pytest.mark.parametrize(
    "argv",
    [
        ["--live", "{tmp}/missing.mkv"],
        ["--live", "{tmp}/garbage.mkv"],
        ["--device", "{tmp}/video9"],
        ["--live", "{clip}", "--input-format", "no-such-format"],
    ],
)
async def test_cli_unopenable_source_exits_4(
    server: Live, tmp_path: Path, clip: Path, argv: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """A live source PyAV cannot open is exit code 4, with the reason on stderr."""
    (tmp_path / "garbage.mkv").write_bytes(b"\x00not a video" * 100)
    args = [a.format(tmp=tmp_path, clip=clip) for a in argv]
    code = await _cli(*args, "--url", server.url, "--ask", "What?")
    _, err = capsys.readouterr()
    assert code == 4
    assert "cannot open" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["{clip}", "--live", "{clip}"],
        ["--device", "/dev/video0", "--live", "{clip}"],
        ["{clip}", "--push"],
        ["{clip}", "--duration", "1"],
        ["--live", "{clip}", "--input-option", "novalue"],
    ],
)
def test_cli_source_usage_errors_exit_2(
    argv: list[str], clip: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Contradictory source arguments are exit code 2, before any connection is tried."""
    assert main([a.format(clip=clip) for a in argv]) == 2
    assert "usage:" in capsys.readouterr().err


def test_cli_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` lists the sources, the interactive commands and every exit code."""
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for text in ("--device", "--live", "--push", "/cancel", "exit codes:", "130"):
        assert text in out
    for code in ("0", "1", "2", "3", "4"):
        assert f"\n  {code}    " in out


# --- interactive mode (a subprocess with a real stdin) ---------------------------------


@pytest.fixture
async def spawn() -> AsyncIterator[Any]:
    """Start the CLI as a subprocess with pipes; kills whatever is still running at the end."""
    processes: list[asyncio.subprocess.Process] = []

    async def start(*argv: str) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamchat_client", *argv,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _read_until(stream: asyncio.StreamReader, wanted: str) -> list[dict[str, Any]]:
    """JSON lines from ``stream`` up to and including the first whose ``type`` is ``wanted``."""
    seen = []
    while True:
        line = await stream.readline()
        assert line, f"the stream ended before a {wanted!r} line; got {seen}"
        seen.append(json.loads(line))
        if seen[-1]["type"] == wanted:
            return seen


async def test_interactive_answers_cancels_and_shows_status(
    server: Live, clip: Path, spawn: Any
) -> None:
    """Typed questions are answered as they come, ``/cancel`` stops the answer in flight,
    ``/status`` reports the buffer, and the end of input exits 0."""
    process = await spawn(str(clip), "--url", server.url, "-i", "--json")
    assert process.stdin is not None and process.stdout is not None
    async with asyncio.timeout(TIMEOUT):
        server.engine.gate.clear()
        process.stdin.write(b"What is moving?\n")
        await server.engine.wait_running(1)
        first = await _read_until(process.stdout, "answer.delta")
        process.stdin.write(b"/cancel\n")
        lines = await _read_until(process.stdout, "answer.done")
        cancelled = lines[-1]
        assert cancelled["finish_reason"] == "cancelled"
        assert cancelled["text"] == first[-1]["text"] == "I"
        assert server.engine.running() == frozenset()

        server.engine.gate.set()
        await process.stdin.drain()
        process.stdin.write(b"/status\n")
        status = (await _read_until(process.stdout, "video.status"))[-1]
        assert status["source"] == 1 and status["frames"] > 0
        process.stdin.write(b"And now?\n")
        done = (await _read_until(process.stdout, "answer.done"))[-1]
        assert done["finish_reason"] == "stop"
        assert done["text"].endswith("you asked: And now?")
        process.stdin.close()
        _, err = await process.communicate()
    assert process.returncode == 0, err.decode()


async def test_interactive_empty_line_cancels_and_quit_exits(
    server: Live, clip: Path, spawn: Any
) -> None:
    """In plain-text mode an empty line cancels the answer in flight and ``/quit`` leaves."""
    process = await spawn(str(clip), "--url", server.url, "-i")
    assert process.stdin is not None and process.stderr is not None
    async with asyncio.timeout(TIMEOUT):
        server.engine.gate.clear()
        process.stdin.write(b"Describe it\n")
        await server.engine.wait_running(1)
        process.stdin.write(b"\n")
        while b"[cancelled:" not in (line := await process.stderr.readline()):
            assert line, "no cancelled answer reported"
        process.stdin.write(b"/quit\n")
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    assert out.decode() == "I\n"
    assert len(server.engine.aborted) == 1


async def test_interactive_questions_piped_before_eof_are_all_answered(
    server: Live, clip: Path, spawn: Any
) -> None:
    """``--ask`` questions come first, questions piped with the end of input right behind
    them are still answered, all in order, and ``--quiet`` leaves stderr empty."""
    process = await spawn(str(clip), "--url", server.url, "-i", "--quiet", "--ask", "Zero?")
    async with asyncio.timeout(TIMEOUT):
        out, err = await process.communicate(b"One?\nTwo?\n")
    assert process.returncode == 0, err.decode()
    answers = out.decode().splitlines()
    assert [a.rsplit(": ", 1)[1] for a in answers] == ["Zero?", "One?", "Two?"]
    assert err == b""


async def test_interactive_with_an_unopenable_source_exits_4(
    server: Live, tmp_path: Path, spawn: Any
) -> None:
    """A live source that fails ends interactive mode at once (stdin still open), exit 4."""
    process = await spawn("--live", str(tmp_path / "missing.mkv"), "--url", server.url, "-i")
    assert process.stdin is not None and process.stderr is not None
    async with asyncio.timeout(TIMEOUT):
        err = await process.stderr.read()  # stdin stays open: no end of input
        await process.wait()
    assert process.returncode == 4, err.decode()
    assert b"cannot open" in err


async def test_ctrl_c_during_a_live_source_exits_130(server: Live, mkv: Path, spawn: Any) -> None:
    """SIGINT while a live source streams ends the process with 130."""
    process = await spawn("--live", str(mkv), "--url", server.url)
    assert process.stderr is not None
    async with asyncio.timeout(TIMEOUT):
        while b"sent " not in (line := await process.stderr.readline()):
            assert line, "the live source never started"
        process.send_signal(signal.SIGINT)
        _, err = await process.communicate()
    assert process.returncode == 130, err.decode()
    assert b"interrupted" in err
