"""Fixtures for the bundled client's tests: a live server on loopback and test clips.

Every test gets its own uvicorn server and :class:`FakeEngine`, so a gated
engine or a closed server cannot leak into the next test; starting one costs
milliseconds (tests that need their own settings call
:func:`tests.support.live.live_server` themselves). Clips are encoded once per
test session, and so are the files the ``ffmpeg`` tool writes the way cameras
and phones do (``tests/support/ffmpeg.py``), each on first use.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from streamchat.config import Settings
from streamchat.engine.fake import FakeEngine
from tests.support import ports
from tests.support.live import Live, live_server
from tests.support.media import CLIP_FPS, CLIP_SECONDS, encode_video


@pytest.fixture
async def server() -> AsyncIterator[Live[FakeEngine]]:
    """A server that may fetch from private addresses: URL tests serve their clips on loopback."""
    async with live_server(Settings(fetch_allow_private=True)) as live:
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
    return ports.dead_url()
