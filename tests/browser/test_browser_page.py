"""The page the server serves at ``/``, driven in headless Chromium with a fake camera.

Everything is real but the camera: Chromium's MediaRecorder encodes WebM, the
page pushes it as JSON ``video.chunk`` messages, PyAV decodes it on the server
and vLLM answers on the tiny model. Waits are on page state or server state,
never on time.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, Playwright, WebSocket, expect

from streamchat.engine.vllm import VllmEngine
from streamchat.session import Session
from tests.support.chromium import launch
from tests.support.live import Live, live_server
from tests.support.media import encode_video
from tests.support.settings import BROWSER

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[2]
# Every run saves its screenshot under artifacts/ (git-ignored); with
# STREAMCHAT_UPDATE_DOCS=1 it also replaces the one the README shows.
SCREENSHOT = ROOT / "artifacts" / "browser-page.png"
DOCS_SCREENSHOT = ROOT / "docs" / "images" / "browser-page.png"
TIMEOUT_MS = 120_000  # frames and answers on a busy 2-core machine; waits end on an event


@dataclass
class Wire:
    """The page's WebSocket traffic, as Chromium saw it."""

    sent: list[dict[str, Any]] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    def watch(self, socket: WebSocket) -> None:
        socket.on("framesent", self._sent)
        socket.on("framereceived", self._received)

    def _sent(self, payload: str | bytes) -> None:
        assert isinstance(payload, str), "the page speaks JSON text frames"
        self.sizes.append(len(payload.encode()))
        self.sent.append(json.loads(payload))

    def _received(self, payload: str | bytes) -> None:
        assert isinstance(payload, str), "the server answers JSON with JSON"
        self.received.append(json.loads(payload))

    def of_type(self, kind: str, *, sent: bool) -> list[dict[str, Any]]:
        return [m for m in (self.sent if sent else self.received) if m["type"] == kind]


@dataclass
class Opened:
    page: Page
    wire: Wire
    session: Session
    """The server's side of the page's session (found by the id the page shows)."""


@pytest.fixture
async def opened(chromium: Browser, live: Live) -> AsyncIterator[Opened]:
    """The page, connected: ``ready`` has arrived and is shown."""
    context = await chromium.new_context(viewport={"width": 1280, "height": 720})
    page = await context.new_page()
    wire = Wire()
    page.on("websocket", wire.watch)
    await page.goto(live.base + "/")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "ready")
    shown = await page.locator("#session").text_content()
    (session,) = [s for s in live.state.sessions if s.id == shown]
    yield Opened(page, wire, session)
    await context.close()


async def wait_frames(page: Page, count: int) -> None:
    await page.wait_for_function(
        "n => Number(document.getElementById('video-status').dataset.frames) >= n",
        arg=count,
        timeout=TIMEOUT_MS,
    )


async def test_serves_page_and_assets(opened: Opened, live: Live) -> None:
    """``/`` is the page, its assets come from ``/static``, and it shows the session it got."""
    page = opened.page
    await expect(page.locator("#model")).to_have_text(live.engine.model_name)
    for asset, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        response = await page.request.get(f"{live.base}/static/{asset}")
        assert response.ok and kind in response.headers["content-type"]
    assert opened.wire.sent[0] == {"type": "hello"}


async def test_camera_video_is_decoded_and_answer_streams(opened: Opened) -> None:
    """Camera WebM from MediaRecorder decodes on the server and the answer streams into the page."""
    page, wire = opened.page, opened.wire
    await page.get_by_role("button", name="Start camera").click()
    await wait_frames(page, 2)
    assert len(opened.session.protocol.window) >= 2  # decoded by the server, not just shown

    chunks = wire.of_type("video.chunk", sent=True)
    assert chunks[0]["format"] == "webm" and all("format" not in c for c in chunks[1:])
    # An EBML header: the stream's first bytes (under load, Chromium's first blob held one byte).
    assert b"".join(base64.b64decode(c["data"]) for c in chunks)[:4] == b"\x1a\x45\xdf\xa3"
    assert max(wire.sizes) <= BROWSER.max_message_bytes  # split to the limit from `ready`

    await page.get_by_label("Question").fill("What is moving?")
    await page.get_by_role("button", name="Ask").click()
    answer = page.locator("#answers .answer").first
    await expect(answer.locator(".answer-text")).not_to_be_empty(timeout=TIMEOUT_MS)
    await expect(answer).to_have_attribute("data-state", "done", timeout=TIMEOUT_MS)

    (ask,) = wire.of_type("ask", sent=True)
    assert ask["text"] == "What is moving?"
    deltas = [m["text"] for m in wire.of_type("answer.delta", sent=False) if m["id"] == ask["id"]]
    (done,) = [m for m in wire.of_type("answer.done", sent=False) if m["id"] == ask["id"]]
    assert len(deltas) >= 2  # token by token, not in one piece
    assert await answer.locator(".answer-text").text_content() == "".join(deltas)
    assert done["finish_reason"] in ("stop", "length") and done["usage"]["frames"] >= 2
    usage_words = f"{done['usage']['completion_tokens']} tokens · {done['usage']['frames']} frames"
    await expect(answer.locator(".answer-meta")).to_contain_text(usage_words)
    await expect(page.locator("#video-status")).to_contain_text("frames buffered")

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    await page.screenshot(path=SCREENSHOT)
    assert SCREENSHOT.stat().st_size > 0
    if os.environ.get("STREAMCHAT_UPDATE_DOCS") == "1":
        DOCS_SCREENSHOT.write_bytes(SCREENSHOT.read_bytes())

    await page.get_by_role("button", name="Stop video").click()
    await expect(page.locator("#video-status")).to_have_attribute(
        "data-state", "ended", timeout=TIMEOUT_MS
    )
    assert wire.sent[-1] == {"type": "video.end"}
    assert not wire.of_type("error", sent=False)
    pushed = sum(len(base64.b64decode(c["data"])) for c in wire.of_type("video.chunk", sent=True))
    assert wire.of_type("video.status", sent=False)[-1]["bytes_received"] == pushed


async def test_video_file_streams_like_the_camera(opened: Opened, tmp_path: Path) -> None:
    """A file from the picker is played, re-recorded as WebM and decoded to its end."""
    page, wire = opened.page, opened.wire
    clip = tmp_path / "clip.webm"
    encode_video(clip, container="webm", codec="vp8", seconds=2.0)
    await page.locator("#file-input").set_input_files(clip)
    await expect(page.locator("#video-status")).to_have_attribute(
        "data-state", "ended", timeout=TIMEOUT_MS
    )
    assert len(opened.session.protocol.window) >= 2
    assert wire.of_type("video.chunk", sent=True)[0]["format"] == "webm"
    assert wire.sent[-1] == {"type": "video.end"}


async def test_asking_before_video_says_to_start_the_camera(opened: Opened) -> None:
    """A question before any frames gets ``no_frames``, shown as words a person understands."""
    page = opened.page
    await page.get_by_label("Question").fill("What do you see?")
    await page.get_by_label("Question").press("Enter")
    await expect(page.get_by_role("alert")).to_contain_text("No video yet — start the camera first")
    answer = page.locator("#answers .answer").first
    await expect(answer).to_have_attribute("data-finish", "error")
    (error,) = opened.wire.of_type("error", sent=False)
    assert error["code"] == "no_frames"


async def test_denied_camera_says_how_to_allow_it(playwright: Playwright, live: Live) -> None:
    """With the camera prompt dismissed, the page explains the denial and what to do."""
    browser = await launch(playwright, camera_prompt_granted=False)
    try:
        page = await (await browser.new_context(permissions=[])).new_page()
        await page.goto(live.base + "/")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "ready")
        await page.get_by_role("button", name="Start camera").click()
        await expect(page.get_by_role("alert")).to_contain_text("Camera permission was denied")
        await expect(page.get_by_role("alert")).to_contain_text("Allow the camera for this site")
        await expect(page.get_by_role("button", name="Start camera")).to_be_enabled()
        await expect(page.locator("#video-status")).to_have_attribute("data-frames", "0")
    finally:
        await browser.close()


async def test_server_going_away_says_what_to_do(
    chromium: Browser, vllm_engine: VllmEngine
) -> None:
    """When the server stops, the page says the connection is lost and how to start again."""
    context = await chromium.new_context()
    try:
        page = await context.new_page()
        async with live_server(BROWSER, vllm_engine) as server:
            await page.goto(server.base + "/")
            await expect(page.locator("#connection")).to_have_attribute("data-state", "ready")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "closed")
        alert = page.get_by_role("alert")
        await expect(alert).to_contain_text("The connection to the server was lost")
        await expect(alert).to_contain_text("Reload the page")
        await expect(page.get_by_role("button", name="Ask")).to_be_disabled()
    finally:
        await context.close()
