"""A push stops the moment the server ends or refuses its source, and a refused ask raises.

Before, the client kept pushing after the server had failed its source: every
further chunk was refused (``video_backlog_full``) or, worse, started a new
source from the middle of the file, until the server closed the session for
flooding. Now the push raises :class:`SourceError` with the server's code, and
sends at most the chunk already on its way.

A scripted server (:mod:`tests.client.scripted`) sends each error code at an
exact point of a push and counts what arrives after it; a real server fails a
source for its length (``video_too_long``) on its own. The pure part checks
how the :class:`Inbox` tells an error about the push's own source from a late
one about the previous source.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from streamchat.config import Settings
from streamchat_client import PushStats, ServerError, SourceError, connect
from streamchat_client.answer import Answer
from streamchat_client.cli import main
from streamchat_client.inbox import PUSH_ENDING, SOURCE_ENDING, Inbox
from tests.client.scripted import Scripted, error, scripted_server, sync
from tests.support.live import live_server
from tests.support.media import encode_video

TIMEOUT = 20.0
"""Upper bound for anything a test awaits, so a bug fails the test instead of hanging it."""

PUSH_STOPPING = sorted(PUSH_ENDING - {"url_not_allowed", "url_fetch_failed"})
"""Every error that ends or breaks a pushed source (the url_* codes concern URL sources)."""


def status(source: int, state: str = "decoding") -> dict[str, Any]:
    return {
        "type": "video.status", "source": source, "state": state, "frames": 1, "span": 0.0,
        "first_pts": 0.0, "last_pts": 0.0, "decode_lag": 0.0, "backlog_bytes": 0,
        "frames_decoded": 1, "frames_dropped": 0, "bytes_received": 1,
    }  # fmt: skip


def fail_on_second_chunk(code: str) -> Any:
    """A script: a status for the source's first chunk, ``code`` for its second, as the real
    server does (a failed source's error is followed by its ``failed`` status)."""

    def react(message: dict[str, Any], server: Scripted) -> list[dict[str, Any]]:
        if message["type"] != "video.chunk":
            return []
        chunks = sum(m["type"] == "video.chunk" for m in server.received)
        if chunks == 1:
            return [status(1)]
        if chunks == 2:
            server.marks["error"] = len(server.received)
            if code in SOURCE_ENDING:
                return [error(code), status(1, "failed")]
            return [error(code)]
        return []

    return react


SECONDS = 4.0
"""The clips' length: far longer than it takes a server to fail them, when pushed in real time."""


@pytest.fixture(scope="module")
def webm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A WebM (VP8): ``send_file`` sends it as it is."""
    return encode_video(tmp_path_factory.mktemp("push") / "clip.webm", seconds=SECONDS)


@pytest.fixture(scope="module")
def plain_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MP4 with its index at the end: ``send_file`` remuxes it."""
    path = tmp_path_factory.mktemp("push") / "plain.mp4"
    return encode_video(path, container="mp4-plain", codec="h264", seconds=SECONDS)


@pytest.mark.parametrize("how", ["file", "remuxed", "live"])
@pytest.mark.parametrize("code", PUSH_STOPPING)
async def test_push_stops_within_one_chunk_of_an_error_that_ends_its_source(
    webm: Path, plain_mp4: Path, code: str, how: str
) -> None:
    """For every error that ends or breaks a pushed source, a file sent as it is, a remuxed
    file and a live source stop at once: the push raises SourceError with the server's code,
    at most one more chunk leaves after the error arrives, and the source is ended."""
    events: list[str] = []
    async with (
        scripted_server(fail_on_second_chunk(code)) as server,
        connect(server.url, on_error=lambda e: events.append(e.code)) as session,
    ):

        def sent(stats: PushStats) -> None:
            events.append("chunk")

        async with asyncio.timeout(TIMEOUT):
            with pytest.raises(SourceError) as info:
                if how == "live":
                    await session.stream_live(str(plain_mp4), on_progress=sent)
                else:
                    path = webm if how == "file" else plain_mp4
                    await session.send_file(path, realtime=True, on_progress=sent)
            await sync(session)
        received = list(server.received)
    assert info.value.code == code
    assert info.value.error is not None and info.value.error.code == code
    assert code in str(info.value)
    assert events.count(code) == 1
    after = events[events.index(code) + 1 :]
    assert after.count("chunk") <= 1, events  # what the client sent once it knew
    assert server.chunks_after("error") <= 1, received  # what the server got after saying it
    assert received[-1]["type"] == "video.end"  # ended, not left open for a new source


def test_inbox_tells_the_push_s_own_errors_from_late_ones_of_the_previous_source() -> None:
    """An error that arrives before any status of the push's source stops the push only if
    the status after it names that source; once a status of it arrived, every error does."""
    inbox = Inbox(max_errors=10)

    def dispatch(message: dict[str, Any]) -> None:
        inbox.dispatch(message)

    # Source 2 starts; source 1's decoder failed just before the server saw it.
    inbox.start_push(2)
    dispatch(error("video_decode_failed"))
    assert inbox.push_stop is None
    dispatch(status(1, "failed"))
    assert inbox.push_stop is None  # it was about source 1
    dispatch(error("video_backlog_full"))  # a refused chunk of source 1, still in flight
    assert inbox.push_stop is None
    dispatch(status(2))
    dispatch(error("video_backlog_full"))  # now source 2's own
    assert inbox.push_stop is not None and inbox.push_stop.code == "video_backlog_full"

    # A source that fails before its first status: the failed status names it.
    inbox.start_push(3)
    dispatch(error("video_unsupported", "not a stream"))
    assert inbox.push_stop is None
    dispatch(status(3, "failed"))
    assert inbox.push_stop is not None and inbox.push_stop.message == "not a stream"

    # A URL source plays: the chunk is refused at once, whatever came before.
    inbox.start_push(4)
    dispatch(error("source_busy"))
    assert inbox.push_stop is not None and inbox.push_stop.code == "source_busy"

    # The server ended the source by itself (its demuxer was done): stop, without an error.
    inbox.start_push(5)
    dispatch(status(5, "ended"))
    assert inbox.push_ended and inbox.push_stop is None

    # Between pushes nothing stops anything.
    inbox.end_push()
    dispatch(error("video_too_long"))
    assert inbox.push_source is None


async def test_a_source_the_server_ends_by_itself_stops_the_push_quietly(webm: Path) -> None:
    """When the server ends the source before the file is over (its demuxer saw the end of
    the video), the rest is not sent as a new source, and the push is no failure."""

    def react(message: dict[str, Any], server: Scripted) -> list[dict[str, Any]]:
        if message["type"] == "video.chunk" and "ended" not in server.marks:
            server.marks["ended"] = len(server.received)
            return [status(1, "ended")]
        return []

    async with scripted_server(react) as server, connect(server.url) as session:
        async with asyncio.timeout(TIMEOUT):
            sent = await session.send_file(webm, realtime=True)
            await sync(session)
        received = list(server.received)
    assert 0 < sent < webm.stat().st_size
    assert server.chunks_after("ended") <= 1
    assert [m["type"] for m in received].count("video.end") == 1


@pytest.mark.parametrize("fixture", ["webm", "plain_mp4"])
async def test_a_real_server_failing_the_source_stops_the_push(
    request: pytest.FixtureRequest, fixture: str
) -> None:
    """A real server that fails a source for its length (video_too_long) stops a realtime push,
    as it is or remuxed, before its end (SourceError comes only from a chunk not sent), and no
    second source is started from what was left of the file."""
    path: Path = request.getfixturevalue(fixture)
    events: list[str] = []

    def sent(stats: PushStats) -> None:
        events.append("chunk")

    async with (
        live_server(Settings(max_source_seconds=0.5)) as server,
        connect(server.url, fps=4, on_error=lambda e: events.append(e.code)) as session,
    ):
        async with asyncio.timeout(TIMEOUT):
            with pytest.raises(SourceError) as info:
                await session.send_file(path, realtime=True, on_progress=sent)
            with pytest.raises(ServerError):
                await session.wait_ended()
        final = session.status
        assert [e.code for e in session.errors] == ["video_too_long"]
    assert info.value.code == "video_too_long"
    assert events[events.index("video_too_long") :].count("chunk") <= 1, events
    assert final is not None and (final.source, final.state) == (1, "failed")


async def test_cli_says_why_the_server_stopped_the_source_and_exits_4(
    webm: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command prints the server's reason once and exits with 4 (the video source failed)."""
    async with live_server(Settings(max_source_seconds=0.5)) as server:
        code = await asyncio.wait_for(
            asyncio.to_thread(
                main, [str(webm), "--url", server.url, "--realtime", "--ask", "What?"]
            ),
            TIMEOUT,
        )
    _, err = capsys.readouterr()
    assert code == 4, err
    assert err.count("video_too_long") == 1, err


async def test_cli_reports_a_refused_push_once_and_exits_4(
    webm: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A push the server refuses (a chunk dropped for the backlog: the stream has a hole) ends
    the command with 4 and the server's reason, printed once."""
    async with scripted_server(fail_on_second_chunk("video_backlog_full")) as server:
        code = await asyncio.wait_for(
            asyncio.to_thread(
                main, [str(webm), "--url", server.url, "--realtime", "--ask", "What?"]
            ),
            TIMEOUT,
        )
    _, err = capsys.readouterr()
    assert code == 4, err
    assert err.count("video_backlog_full") == 1, err


# --- questions that are refused ---------------------------------------------------------


@pytest.mark.parametrize(
    "code", ["rate_limited", "too_many_asks", "invalid_field", "server_shutdown", "no_frames"]
)
async def test_any_error_naming_an_ask_ends_its_answer(code: str) -> None:
    """Whatever the server refuses an ask for, the answer raises that error instead of
    waiting for deltas that never come."""

    def react(message: dict[str, Any], server: Scripted) -> list[dict[str, Any]]:
        if message["type"] == "ask":
            return [error(code, id=message["id"])]
        return []

    async with scripted_server(react) as server, connect(server.url) as session:
        answer: Answer = session.ask("Anyone?")
        async with asyncio.timeout(TIMEOUT):
            with pytest.raises(ServerError) as info:
                await answer.result()
        assert session.errors == []  # it was the answer's, not the session's
    assert (info.value.code, info.value.id) == (code, answer.id)
    assert answer.finished and answer.error is info.value


async def test_an_ask_over_the_message_rate_is_refused_with_its_id(clip: Path) -> None:
    """On a real server whose message allowance is spent, an ask gets rate_limited naming its
    id, and ask() raises it instead of hanging until the idle close."""
    settings = Settings(messages_per_second=0.01, message_burst=3)
    async with live_server(settings) as server, connect(server.url) as session:
        await session.send_file(clip)  # video is paced, never refused for the message rate
        await session.wait_ended(timeout=TIMEOUT)
        for n in range(settings.message_burst):
            await session.cancel(f"nothing-{n}")
        answer = session.ask("Still there?")
        async with asyncio.timeout(TIMEOUT):
            with pytest.raises(ServerError) as info:
                await answer.result()
    assert (info.value.code, info.value.id, info.value.fatal) == ("rate_limited", answer.id, False)
