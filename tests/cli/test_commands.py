"""The README's commands as processes: ``streamchat serve`` and ``streamchat-client``."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import psutil
import pytest

from streamchat_client import connect
from tests.support.media import encode_video
from tests.support.process import server_process


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    path = tmp_path / "clip.webm"
    path.write_bytes(encode_video(container="webm", codec="vp8", seconds=2.0))
    return path


@pytest.mark.engine
async def test_serve_tiny_model_answers_and_shuts_down_gracefully(
    tmp_path: Path, clip: Path
) -> None:
    """`streamchat serve --tiny-model` builds the model offline and answers; on SIGTERM
    with answers in flight every client hears ``going_away``, each answer completes or
    ends with ``shutdown``, the sessions close with 1001, and the process exits within
    its shutdown budget leaving no engine process behind."""
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    args = ("--tiny-model", "--max-pixels", "12544", "--shutdown-timeout", "1")
    async with server_process(*args, env=env) as srv:
        children = psutil.Process(srv.process.pid).children(recursive=True)
        assert children, "vLLM runs its engine core in child processes"
        async with (
            connect(srv.url, fps=2) as idle,
            connect(srv.url, fps=2) as busy,
            asyncio.timeout(180),
        ):
            assert "tiny-qwen2-vl" in busy.ready.model
            await busy.send_file(clip)
            await busy.wait_ended(timeout=60)
            answer = await busy.ask("What is moving?", max_tokens=8).result()
            assert answer.done is not None and answer.done.finish_reason in ("stop", "length")
            assert answer.text

            long = busy.ask("Describe every frame in detail.", max_tokens=1500)
            await anext(long)  # in flight now
            srv.process.send_signal(signal.SIGTERM)
            await long.result()
            assert long.done is not None
            assert long.done.finish_reason in ("stop", "length", "shutdown")
            for session in (idle, busy):
                closed = await session.wait_closed(timeout=30)
                assert closed.code == 1001, closed
                assert session.going_away is not None and "shutting down" in session.going_away
        # The process must exit by itself (a liveness bound, not a timing goal: 1 s for
        # answers, then vLLM's own shutdown, a few seconds here).
        async with asyncio.timeout(60):
            code = await srv.process.wait()
        log = "\n".join(srv.log)
        assert code == 0, log
        assert "Application shutdown complete" in log, log
    # Children exit once their parent is gone; wait for that (bounded), then none may remain.
    _, alive = await asyncio.to_thread(psutil.wait_procs, children, 30)
    assert not [c for c in alive if c.status() != psutil.STATUS_ZOMBIE], alive


async def test_client_command_against_a_served_fake_engine(clip: Path) -> None:
    """The README's client command streams a file and prints the answer."""
    async with server_process("--engine", "fake") as srv:
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "streamchat_client",
            str(clip),
            "--url",
            srv.url,
            "--ask",
            "What is moving?",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(60):
            out, err = await client.communicate()
        assert client.returncode == 0, err.decode()
        assert "you asked: What is moving?" in out.decode()
        await srv.stop()


async def test_unknown_flags_for_the_fake_engine_are_refused() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamchat",
        "serve",
        "--engine",
        "fake",
        "--no-such-flag",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        _, err = await process.communicate()
    assert process.returncode == 2 and b"--no-such-flag" in err
