"""The browser page on a server that requires an API key (scripted engine).

The page learns that a key is needed from the server's ``unauthorized`` error,
asks for it, and sends it as a WebSocket subprotocol; a wrong key is refused at
the handshake and the page asks again. The real engine behind the same page is
covered by ``test_browser_page.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, Page, expect

from streamchat.engine.fake import FakeEngine
from tests.support.live import live_server
from tests.support.settings import BROWSER

KEY = "page-key_1.x~"


@pytest.fixture
async def base() -> AsyncIterator[str]:
    settings = dataclasses.replace(BROWSER, api_keys=frozenset({KEY}))
    async with live_server(settings, FakeEngine(model_name="fake")) as server:
        yield server.base


@pytest.fixture
async def page(chromium: Browser) -> AsyncIterator[Page]:
    context = await chromium.new_context()
    try:
        yield await context.new_page()
    finally:
        await context.close()


async def test_the_page_asks_for_a_key_and_connects_with_it(page: Page, base: str) -> None:
    await page.goto(base + "/")
    await expect(page.locator("#key-form")).to_be_visible()
    await expect(page.get_by_role("alert")).to_contain_text("This server needs an API key")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "closed")

    await page.fill("#api-key", "wrong-key")
    await page.click("#key-form button")
    await expect(page.get_by_role("alert")).to_contain_text("check the API key")
    await expect(page.locator("#key-form")).to_be_visible()

    await page.fill("#api-key", KEY)
    await page.click("#key-form button")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "ready")
    await expect(page.locator("#model")).to_have_text("fake")
    await expect(page.locator("#key-form")).to_be_hidden()


async def test_a_key_in_the_address_fragment_connects_and_leaves_the_address(
    page: Page, base: str
) -> None:
    await page.goto(base + "/#key=" + KEY)
    await expect(page.locator("#connection")).to_have_attribute("data-state", "ready")
    assert "key" not in page.url
