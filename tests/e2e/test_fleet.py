"""Two ``streamchat serve --engine-url`` front-ends on one real ``vllm serve`` (issue 15).

The deployment of docs/deploy.md on loopback: the package's ``vllm serve``
(:func:`~tests.e2e.conftest.vllm_serve`, the tiny Qwen2-VL, with a key) and two
front-end processes pointed at it, the bundled client streaming a clip to
each. What is asked of vLLM itself (its ``num_requests_running`` and
``num_requests_waiting`` gauges) shows that a cancel or a disconnect at a
front-end ends the request in the engine; what is asked of the front-ends
(``/metrics``, ``/health``) shows that they forget it too. The greedy answer
through a front-end is compared with the local engine's (the package's
in-process ``live`` server), asked one after the other.

The fault test starts an engine of its own (the shared one must live on),
kills it mid-answer and starts another on the same port: the front-end fails
the answer with ``engine_unavailable``, reports unhealthy, keeps the session,
and answers again once the engine is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from streamchat_client import Answer, ServerError, Session, connect
from tests.e2e.conftest import ENGINE_KEY
from tests.support.live import Live
from tests.support.media import encode_video
from tests.support.metrics import scrape
from tests.support.ports import free_port
from tests.support.process import ServerProcess, server_process
from tests.support.settings import E2E
from tests.support.vllm_server import VllmServer, vllm_server

pytestmark = pytest.mark.engine

LONG = 4000
"""``max_tokens`` of an answer to cancel: the tiny model writes that many (never an early
end), seconds of work, so it is still running when the cancel or disconnect comes."""
SHORT = 32
"""``max_tokens`` of an answer read to its end."""
FRAMES = 4
"""A 2-second clip at the sessions' 2 fps."""


def frontend_args(url: str) -> list[str]:
    """``streamchat serve``'s flags for a front-end on ``url``: the local ``live`` server's
    settings (:data:`~tests.support.settings.E2E`), so both see the same frames."""
    args = ["--engine-url", url, "--engine-key", ENGINE_KEY]
    for name in ("fps", "window_frames", "min_pixels", "max_pixels", "max_tokens"):
        args += ["--" + name.replace("_", "-"), str(getattr(E2E, name))]
    return [*args, "--max-message-bytes", str(E2E.max_message_bytes), "--max-tokens-limit", "4096"]


@contextlib.asynccontextmanager
async def frontend(url: str) -> AsyncIterator[ServerProcess]:
    """One front-end process on the engine at ``url``; it must shut down cleanly."""
    async with server_process(*frontend_args(url)) as process:
        yield process
        await process.stop()


@pytest.fixture(scope="module")
async def frontends(vllm_serve: VllmServer) -> AsyncIterator[tuple[ServerProcess, ServerProcess]]:
    """Two front-ends sharing the package's ``vllm serve``."""
    async with frontend(vllm_serve.url) as one, frontend(vllm_serve.url) as two:
        yield one, two


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fleet") / "clip.webm"
    return encode_video(path, container="webm", codec="vp8", seconds=FRAMES / E2E.fps)


@contextlib.asynccontextmanager
async def watching(url: str, clip: Path) -> AsyncIterator[Session]:
    """A session at ``url`` whose window holds the whole clip."""
    async with connect(url, fps=E2E.fps) as session:
        await session.send_file(clip)
        status = await session.wait_ended(timeout=60)
        assert status.frames == FRAMES
        yield session


async def first_delta(answer: Answer) -> str:
    """Until the answer's first text has arrived (the engine is generating it)."""
    async for delta in answer:
        return delta
    raise AssertionError(f"no text: {answer.error!r}")


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    """Polls ``check`` until it holds, with a deadline (a condition, not a timing)."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"{check.__name__} still false after {timeout} s"
        await asyncio.sleep(0.1)


async def health(front: ServerProcess) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(base_url=front.base, timeout=30) as http:
        response = await http.get("/health")
    return response.status_code, response.json()


async def forgotten(front: ServerProcess) -> bool:
    """The front-end's gauge and ``/health`` both count no engine request running."""
    running = (await scrape(front.base)).value("streamchat_engine_requests_running")
    return running == 0 and (await health(front))[1]["requests_running"] == 0


def answered(answer: Answer, max_tokens: int) -> None:
    """``answer`` streamed and ended with its usage, as the local engine's answers do."""
    done = answer.done
    assert done is not None and done.finish_reason in ("stop", "length"), answer
    usage = done.usage
    assert usage.frames == FRAMES and usage.video_tokens > 0
    assert usage.prompt_tokens > usage.video_tokens
    assert 0 < usage.completion_tokens <= max_tokens


async def test_both_frontends_answer_at_once(
    frontends: tuple[ServerProcess, ServerProcess], vllm_serve: VllmServer, clip: Path
) -> None:
    """A session on each front-end asks at once: the answers stream to the end with their
    usage, and two long ones are in vLLM at the same time (then cancelled)."""
    async with (
        watching(frontends[0].url, clip) as one,
        watching(frontends[1].url, clip) as two,
    ):
        sessions = (one, two)
        short = [session.ask("What is moving?", max_tokens=SHORT) for session in sessions]
        pieces = await asyncio.gather(*map(_deltas, short))
        long = [session.ask("Tell me everything.", max_tokens=LONG) for session in sessions]
        await asyncio.gather(*map(first_delta, long))
        assert await vllm_serve.wait_in_engine(lambda count: count == 2) == 2
        await asyncio.gather(*(answer.cancel() for answer in long))
        await asyncio.gather(*(answer.result() for answer in long))
    for answer, deltas in zip(short, pieces, strict=True):
        answered(answer, SHORT)
        assert deltas >= 2  # streamed, not one piece at the end
    for answer in long:
        assert answer.done is not None and answer.done.finish_reason == "cancelled"
        assert answer.text
    await vllm_serve.wait_idle()


async def _deltas(answer: Answer) -> int:
    return len([delta async for delta in answer])


async def test_cancel_leaves_nothing_running(
    frontends: tuple[ServerProcess, ServerProcess], vllm_serve: VllmServer, clip: Path
) -> None:
    """A cancelled answer ends ``cancelled`` early and vLLM's own gauges and the front-end's
    fall to 0; the session asks again."""
    front = frontends[0]
    async with watching(front.url, clip) as session:
        answer = session.ask("Tell me everything.", max_tokens=LONG)
        await first_delta(answer)
        assert await vllm_serve.wait_in_engine(lambda count: count >= 1) == 1
        assert (await health(front))[1]["requests_running"] == 1
        await answer.cancel()
        await answer.result()
        assert answer.done is not None and answer.done.finish_reason == "cancelled"
        await vllm_serve.wait_idle()
        await eventually(lambda: forgotten(front))
        again = await session.ask("And now?", max_tokens=8).result()
    answered(again, 8)


async def test_disconnect_leaves_nothing_running(
    frontends: tuple[ServerProcess, ServerProcess], vllm_serve: VllmServer, clip: Path
) -> None:
    """A client gone mid-answer: the front-end closes the session and vLLM's own gauges and
    the front-end's fall to 0."""
    front = frontends[1]
    closed = front.sessions_closed
    async with watching(front.url, clip) as session:
        answer = session.ask("Tell me everything.", max_tokens=LONG)
        await first_delta(answer)
        assert await vllm_serve.wait_in_engine(lambda count: count >= 1) == 1
        assert (await health(front))[1]["requests_running"] == 1
    # Leaving the block closed the connection with the answer still streaming.
    assert answer.done is None and answer.error is not None  # it never finished here
    await front.wait_sessions_closed(closed + 1)
    await vllm_serve.wait_idle()
    await eventually(lambda: forgotten(front))


async def test_greedy_answer_through_a_frontend_is_the_local_answer(
    live: Live[Any], frontends: tuple[ServerProcess, ServerProcess], clip: Path
) -> None:
    """The same clip and question at temperature 0 give the same text and token counts
    through a front-end on ``vllm serve`` as through the local engine."""
    results = []
    for url in (live.url, frontends[0].url):  # one engine after the other
        async with watching(url, clip) as session:
            answer = session.ask("What is moving?", max_tokens=24, temperature=0.0)
            results.append(await answer.result())
    local, remote = results
    assert local.done is not None and remote.done is not None
    assert remote.text == local.text != ""
    counts = [
        (u.prompt_tokens, u.video_tokens, u.frames, u.completion_tokens)
        for u in (local.done.usage, remote.done.usage)
    ]
    assert counts[0] == counts[1]


@pytest.mark.timeout(1200)  # two engine start-ups of up to READY_TIMEOUT each
async def test_engine_killed_mid_answer_then_back(tiny_qwen2_vl: Path, clip: Path) -> None:
    """vllm serve killed mid-answer: ``engine_unavailable`` on that answer (and the next),
    ``/health`` 503, the session kept; a new vllm serve on the port: healthy, answers again."""
    port = free_port()
    async with (
        vllm_server(tiny_qwen2_vl, api_key=ENGINE_KEY, port=port) as engine,
        frontend(engine.url) as front,
        watching(front.url, clip) as session,
    ):
        assert (await health(front))[0] == 200
        answer = session.ask("Tell me everything.", max_tokens=LONG)
        await first_delta(answer)
        await engine.kill()
        with pytest.raises(ServerError) as failed:
            await answer.result()
        assert failed.value.code == "engine_unavailable"
        status, body = await health(front)
        assert (status, body["status"], body["sessions"]) == (503, "engine_failed", 1)
        with pytest.raises(ServerError) as refused:  # nothing listens: at once, typed too
            await session.ask("Still there?", max_tokens=8).result()
        assert refused.value.code == "engine_unavailable"
        assert not session.closed

        async with vllm_server(tiny_qwen2_vl, api_key=ENGINE_KEY, port=port) as back:

            async def healthy() -> bool:
                return (await health(front))[0] == 200

            await eventually(healthy)
            again = await session.ask("And now?", max_tokens=8).result()
            answered(again, 8)
            await back.wait_idle()
