"""One engine and one live server for every end-to-end test (``tests/support``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from streamchat.engine.vllm import VllmEngine
from tests.support.engines import tiny_engine
from tests.support.live import Live, live_server
from tests.support.settings import E2E


@pytest.fixture(scope="package")
async def vllm_engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[VllmEngine]:
    async with tiny_engine(tmp_path_factory.mktemp("e2e") / "tiny-qwen2-vl") as engine:
        yield engine


@pytest.fixture(scope="package")
async def live(vllm_engine: VllmEngine) -> AsyncIterator[Live[Any]]:
    async with live_server(E2E, vllm_engine) as server:
        yield server
