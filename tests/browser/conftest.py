"""The browser page in real headless Chromium against a live server on the real engine.

One vLLM engine (tiny model) and one server serve every test of this package, as
in ``tests/e2e``; each test opens its own browser context (a fresh profile), so
each page is a new session. Chromium is Debian's ``/usr/bin/chromium`` driven by
Playwright's bundled driver (Playwright's own browser downloads are never used).
A missing Chromium fails these tests: it is part of the test setup (``.ci/run``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
from playwright.async_api import Browser, Playwright, async_playwright  # noqa: E402

from streamchat.app import create_app  # noqa: E402
from streamchat.config import Settings  # noqa: E402
from streamchat.engine.vllm import VllmEngine, make_engine_args, open_vllm_engine  # noqa: E402
from streamchat.tiny_model import build_tiny_model  # noqa: E402
from tests.e2e.live import Live  # noqa: E402
from tests.servers import serve, ws_url  # noqa: E402

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
    model = build_tiny_model(tmp_path_factory.mktemp("browser") / "tiny-qwen2-vl")
    args = make_engine_args(model, served_model_name="tiny-qwen2-vl")
    async with open_vllm_engine(args) as engine:
        yield engine


@pytest.fixture(scope="package")
async def live(vllm_engine: VllmEngine) -> AsyncIterator[Live]:
    app = create_app(SETTINGS, engine=vllm_engine)
    async with serve(app, ws_max_size=SETTINGS.transport_max_bytes) as base:
        yield Live(ws_url(base), base, vllm_engine, app)


@pytest.fixture(scope="package")
async def playwright() -> AsyncIterator[Playwright]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (see .ci/run)")
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
