"""One engine and one live server for every end-to-end test (see ``tests/live.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from streamchat.engine.vllm import VllmEngine
from tests.e2e.live import SETTINGS
from tests.live import Live, live_server, tiny_engine


@pytest.fixture(scope="package")
async def vllm_engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[VllmEngine]:
    async with tiny_engine(tmp_path_factory.mktemp("e2e")) as engine:
        yield engine


@pytest.fixture(scope="package")
async def live(vllm_engine: VllmEngine) -> AsyncIterator[Live]:
    async with live_server(SETTINGS, vllm_engine) as server:
        yield server
