"""One engine and one live server for every end-to-end test (``tests/support``).

Also one ``vllm serve`` process on the same tiny model (``tests/support/vllm_server.py``),
started by the first test that needs it: the engine of a remote deployment.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from streamchat.engine.tiny_model import build_tiny_model
from streamchat.engine.vllm import VllmEngine
from tests.support.engines import tiny_engine
from tests.support.live import Live, live_server
from tests.support.settings import E2E
from tests.support.vllm_server import VllmServer, vllm_server

ENGINE_KEY = "e2e-engine-key"
"""The ``--api-key`` of :func:`vllm_serve` (what ``--engine-key`` names)."""


@pytest.fixture(scope="package")
def tiny_qwen2_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2-VL model both engines load: the same files, so the same tokens."""
    return build_tiny_model(tmp_path_factory.mktemp("e2e") / "tiny-qwen2-vl")


@pytest.fixture(scope="package")
async def vllm_engine(tiny_qwen2_vl: Path) -> AsyncIterator[VllmEngine]:
    async with tiny_engine(tiny_qwen2_vl) as engine:
        yield engine


@pytest.fixture(scope="package")
async def live(vllm_engine: VllmEngine) -> AsyncIterator[Live[Any]]:
    async with live_server(E2E, vllm_engine) as server:
        yield server


@pytest.fixture(scope="package")
async def vllm_serve(tiny_qwen2_vl: Path) -> AsyncIterator[VllmServer]:
    """``vllm serve`` on :func:`tiny_qwen2_vl` with the local engine's settings and a key.

    Its start-up costs 1-3 minutes of both cores: one per package, and
    checked on exit to leave no process behind.
    """
    async with vllm_server(tiny_qwen2_vl, api_key=ENGINE_KEY) as server:
        yield server
