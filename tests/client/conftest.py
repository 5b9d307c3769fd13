"""Fixtures for the bundled client's tests: a live server on loopback and test clips.

Every test gets its own uvicorn server and :class:`FakeEngine`, so a gated
engine or a closed server cannot leak into the next test; starting one costs
milliseconds. Clips are encoded once per test session, and so are the files
the ``ffmpeg`` tool writes the way cameras and phones do
(``tests/support/ffmpeg.py``), each on first use.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.client.live import (
    CLIP_FPS,
    CLIP_SECONDS,
    LiveServer,
    StartServer,
    start_live_server,
)
from tests.media import encode_video


@pytest.fixture
def start_server() -> StartServer:
    """``async with start_server(settings) as server:``, for tests that need their own
    settings or stop the server themselves."""
    return start_live_server


@pytest.fixture
async def server() -> AsyncIterator[LiveServer]:
    async with start_live_server() as live:
        yield live


@pytest.fixture(scope="session")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2 s WebM (VP8, 10 fps, 160x120) of the numbered test pattern."""
    path = tmp_path_factory.mktemp("media") / "clip.webm"
    return encode_video(path, seconds=CLIP_SECONDS, fps=CLIP_FPS)


@pytest.fixture(scope="session")
def short_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1 s fragmented MP4 (H.264), for tests that pace in real time but need not wait long."""
    path = tmp_path_factory.mktemp("media") / "short.mp4"
    return encode_video(path, container="mp4", codec="h264", seconds=1.0, fps=CLIP_FPS)


@pytest.fixture
def dead_url() -> str:
    """A session URL on a loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"ws://127.0.0.1:{port}/v1/session"
