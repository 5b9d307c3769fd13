"""The CPU image as an operator runs it: ``docker run`` with the tiny model, healthy, asked
through a published loopback port by the bundled client, drained by ``docker stop``.

The test does not build the image (minutes): ``make docker-test`` builds it, then runs this
file (marked ``docker``, which the plain test command leaves out: CI runs it after the suite,
once docker is installed). Without docker or the image it fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from streamchat_client import connect
from tests.support.media import encode_video
from tests.support.ports import free_port

DOCKER = os.environ.get("DOCKER", "docker")
IMAGE = os.environ.get("STREAMCHAT_DOCKER_IMAGE", "streamchat:cpu")
KEY = "image-test-key"
START_DEADLINE = 600.0  # the engine starts in 20-60 s here; a busy CI machine is slower

pytestmark = pytest.mark.docker


async def _docker(*args: str, check: bool = True) -> tuple[int, str]:
    """Run the docker CLI; its return code and its output (stdout and stderr)."""
    process = await asyncio.create_subprocess_exec(
        DOCKER,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(300):
        out, _ = await process.communicate()
    text = out.decode(errors="replace")
    assert process.returncode is not None
    if check:
        assert process.returncode == 0, f"docker {' '.join(args)}: {text}"
    return process.returncode, text


async def _unusable() -> str | None:
    """Why this machine cannot run the image, or None when it can."""
    if shutil.which(DOCKER) is None:
        return f"no {DOCKER} command"
    code, out = await _docker("info", "--format", "{{.ServerVersion}}", check=False)
    if code != 0:
        return f"the docker daemon does not answer: {out.strip()}"
    code, _ = await _docker("image", "inspect", IMAGE, check=False)
    if code != 0:
        return f"no image {IMAGE} (make docker-build)"
    return None


async def _inspect(container: str) -> dict[str, object]:
    _, out = await _docker("inspect", container)
    state = json.loads(out)[0]
    assert isinstance(state, dict)
    return state


async def _wait_healthy(container: str) -> None:
    """Until docker's own health check (/health in the image) says healthy, with a deadline."""
    deadline = time.monotonic() + START_DEADLINE
    while True:
        state = (await _inspect(container))["State"]
        assert isinstance(state, dict)
        assert state["Running"], f"the container stopped: {await _logs(container)}"
        if state["Health"]["Status"] == "healthy":
            return
        assert time.monotonic() < deadline, f"not healthy in time: {await _logs(container)}"
        await asyncio.sleep(2)  # polling docker's health state, bounded by the deadline


async def _logs(container: str) -> str:
    return (await _docker("logs", container, check=False))[1]


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, int]]:
    """The image serving the tiny model with an API key from the environment, on a loopback port."""
    reason = await _unusable()
    if reason is not None:
        pytest.fail(f"the image cannot be run: {reason} (make docker-test builds it)")
    name = f"streamchat-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    await _docker(
        "run",
        "--detach",
        "--name",
        name,
        "--shm-size",
        "1g",  # vLLM's engine wants more shared memory than docker's default 64 MiB
        "--publish",
        f"127.0.0.1:{port}:8000",
        "--env",
        f"STREAMCHAT_API_KEYS={KEY}",
        IMAGE,
        "--tiny-model",
        "--shutdown-timeout",
        "5",
    )
    try:
        yield name, port
    finally:
        await _docker("rm", "--force", name, check=False)


async def test_image_serves_answers_and_drains_on_docker_stop(
    server: tuple[str, int], tmp_path: Path
) -> None:
    """The image runs as a non-root user, turns healthy, answers the bundled client's question
    about a pushed video through the published port (with the key from STREAMCHAT_API_KEYS,
    and refuses it without), and on ``docker stop`` tells the open session it is going away,
    closes it with 1001 and exits 0 after the drain's log lines."""
    name, port = server
    url = f"ws://127.0.0.1:{port}/v1/session"
    config = (await _inspect(name))["Config"]
    assert isinstance(config, dict) and config["User"] == "10001:10001"
    await _wait_healthy(name)

    clip = encode_video(tmp_path / "clip.webm", container="webm", codec="vp8", seconds=2.0)
    client = [sys.executable, "-m", "streamchat_client", str(clip), "--url", url]
    asked = await asyncio.create_subprocess_exec(
        *client,
        "--api-key",
        KEY,
        "--ask",
        "What is moving?",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    refused = await asyncio.create_subprocess_exec(
        *client,
        "--ask",
        "What is moving?",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(180):
        (answer, asked_err), (_, refused_err) = await asyncio.gather(
            asked.communicate(), refused.communicate()
        )
    assert asked.returncode == 0, asked_err.decode()
    assert answer.strip(), "an answer on stdout"
    assert refused.returncode == 3, refused_err.decode()  # the handshake is refused
    assert b"needs an API key" in refused_err

    async with connect(url, fps=2, api_key=KEY) as session, asyncio.timeout(120):
        await _docker("stop", "--time", "60", name)
        closed = await session.wait_closed(timeout=30)
    assert closed.code == 1001, closed
    assert session.going_away is not None and "shutting down" in session.going_away
    state = (await _inspect(name))["State"]
    assert isinstance(state, dict)
    logs = await _logs(name)
    assert state["ExitCode"] == 0, logs
    assert "shutting down: 1 session(s) open" in logs, logs
    assert "Application shutdown complete" in logs, logs
