"""Debian's Chromium, headless, with a fake camera: the browser the page's tests drive.

Driven by Playwright's bundled driver; Playwright's own browser downloads are
never used. A missing Chromium fails the tests that need it: it is part of the
test setup (``.ci/run``).
"""

from __future__ import annotations

from pathlib import Path

from playwright.async_api import Browser, Playwright

__all__ = ["CHROMIUM", "launch"]

CHROMIUM = Path("/usr/bin/chromium")

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


async def launch(driver: Playwright, *, camera_prompt_granted: bool) -> Browser:
    """Debian's Chromium, headless, fake camera; a new temporary profile per launch."""
    args = [*CHROMIUM_ARGS, FAKE_UI] if camera_prompt_granted else CHROMIUM_ARGS
    return await driver.chromium.launch(executable_path=str(CHROMIUM), args=args)
