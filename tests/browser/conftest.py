"""The browser page in real headless Chromium against a live server on the real engine.

One vLLM engine (tiny model) and one server serve every test of this package, as
in ``tests/e2e``; each test opens its own browser context (a fresh profile), so
each page is a new session. Chromium is Debian's ``/usr/bin/chromium`` driven by
Playwright's bundled driver (Playwright's own browser downloads are never used).
A missing Chromium fails these tests: it is part of the test setup (``.ci/run``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Playwright, async_playwright

from streamchat.config import Settings
from streamchat.engine.vllm import VllmEngine
from tests.live import Live, live_server, tiny_engine

CHROMIUM = Path("/usr/bin/chromium")

# A small message limit, so the page must split MediaRecorder's chunks (keyframes are larger).
SETTINGS = Settings(
    fps=2.0,
    window_frames=16,
    min_pixels=28 * 28,
    max_pixels=112 * 112,
    max_message_bytes=24 * 1024,
    max_tokens=16,
)

CHROMIUM_ARGS = [
    "--use-fake-device-for-media-stream",
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FAKE_UI = "--use-fake-ui-for-media-stream"
"""Grants the camera prompt by itself; without it Playwright dismisses the prompt (denied)."""


@pytest.fixture(scope="package")
async def vllm_engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[VllmEngine]:
    directory = tmp_path_factory.mktemp("browser")
    async with tiny_engine(directory, served_model_name="tiny-qwen2-vl") as engine:
        yield engine


@pytest.fixture(scope="package")
async def live(vllm_engine: VllmEngine) -> AsyncIterator[Live]:
    async with live_server(SETTINGS, vllm_engine) as server:
        yield server


@pytest.fixture(scope="package")
async def playwright() -> AsyncIterator[Playwright]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run make system (or apt-get install chromium)")
    async with async_playwright() as driver:
        yield driver


async def launch(driver: Playwright, *, camera_prompt_granted: bool) -> Browser:
    """Debian's Chromium, headless, fake camera; a new temporary profile per launch."""
    args = [*CHROMIUM_ARGS, FAKE_UI] if camera_prompt_granted else CHROMIUM_ARGS
    return await driver.chromium.launch(executable_path=str(CHROMIUM), args=args)


@pytest.fixture(scope="package")
async def chromium(playwright: Playwright) -> AsyncIterator[Browser]:
    """A browser whose (fake) camera is allowed."""
    browser = await launch(playwright, camera_prompt_granted=True)
    yield browser
    await browser.close()
