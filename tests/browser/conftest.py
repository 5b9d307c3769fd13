"""The browser page in real headless Chromium against a live server on the real engine.

One vLLM engine (tiny model) and one server serve every test of this package, as
in ``tests/e2e``; each test opens its own browser context (a fresh profile), so
each page is a new session. The browser: :mod:`tests.support.chromium`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from playwright.async_api import Browser, Playwright, async_playwright

from streamchat.engine.vllm import VllmEngine
from tests.support.chromium import CHROMIUM, launch
from tests.support.engines import tiny_engine
from tests.support.live import Live, live_server
from tests.support.settings import BROWSER


@pytest.fixture(scope="package")
async def vllm_engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[VllmEngine]:
    directory = tmp_path_factory.mktemp("browser") / "tiny-qwen2-vl"
    async with tiny_engine(directory, served_model_name="tiny-qwen2-vl") as engine:
        yield engine


@pytest.fixture(scope="package")
async def live(vllm_engine: VllmEngine) -> AsyncIterator[Live[Any]]:
    async with live_server(BROWSER, vllm_engine) as server:
        yield server


@pytest.fixture(scope="package")
async def playwright() -> AsyncIterator[Playwright]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run make system (or apt-get install chromium)")
    async with async_playwright() as driver:
        yield driver


@pytest.fixture(scope="package")
async def chromium(playwright: Playwright) -> AsyncIterator[Browser]:
    """A browser whose (fake) camera is allowed."""
    browser = await launch(playwright, camera_prompt_granted=True)
    yield browser
    await browser.close()
