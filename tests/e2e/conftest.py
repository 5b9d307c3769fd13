"""A live streamchat server on the real vLLM engine (CPU) with the tiny model.

One engine (15-60 s to start here) serves every test of this package; each
test opens its own sessions. The server runs in the test's event loop, so a
test can also look at the server's state and at the engine directly: that is
how tests prove that nothing is left running, without timing anything.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from streamchat.app import create_app  # noqa: E402
from streamchat.engine.vllm import VllmEngine, make_engine_args, open_vllm_engine  # noqa: E402
from streamchat.tiny_model import build_tiny_model  # noqa: E402
from tests.e2e.live import SETTINGS, Live  # noqa: E402
from tests.servers import serve, ws_url  # noqa: E402


@pytest.fixture(scope="package")
async def vllm_engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[VllmEngine]:
    model = build_tiny_model(tmp_path_factory.mktemp("e2e") / "tiny-qwen2-vl")
    async with open_vllm_engine(make_engine_args(model)) as engine:
        yield engine


@pytest.fixture(scope="package")
async def live(vllm_engine: VllmEngine) -> AsyncIterator[Live]:
    app = create_app(SETTINGS, engine=vllm_engine)
    async with serve(app, ws_max_size=SETTINGS.transport_max_bytes) as base:
        yield Live(ws_url(base), base, vllm_engine, app)
