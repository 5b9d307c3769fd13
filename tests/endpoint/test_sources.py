"""URL sources through the endpoint: allowed, refused and failing URLs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from starlette.testclient import TestClient

from streamchat.app import SESSION_PATH, create_app
from streamchat.config import Settings
from streamchat.engine.fake import FakeEngine
from tests.support.media import encode_video


@pytest.fixture
def media_dir(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    root.mkdir()
    (root / "clip.ts").write_bytes(encode_video(container="mpegts", codec="h264", seconds=2.0))
    (tmp_path / "secret.ts").write_bytes(b"outside the served directory")
    return root


@pytest.fixture
def session(media_dir: Path) -> Iterator[Any]:
    # The unreachable-host test below uses a loopback port: private addresses allowed.
    settings = Settings(allowed_file_dir=media_dir, fetch_timeout=5.0, fetch_allow_private=True)
    with (
        TestClient(create_app(settings, engine=FakeEngine())) as client,
        client.websocket_connect(SESSION_PATH) as ws,
    ):
        ws.send_bytes(msgpack.packb({"type": "hello"}))
        assert msgpack.unpackb(ws.receive_bytes())["type"] == "ready"
        yield ws


def send_url(ws: Any, url: str) -> dict[str, Any]:
    """Send ``video.url`` and return the first error, or the status that ended the source."""
    ws.send_bytes(msgpack.packb({"type": "video.url", "url": url}))
    while True:
        message: dict[str, Any] = msgpack.unpackb(ws.receive_bytes())
        if message["type"] == "error" or message.get("state") in ("ended", "failed"):
            return message


def test_file_url_under_the_allowed_directory(session: Any, media_dir: Path) -> None:
    status = send_url(session, (media_dir / "clip.ts").as_uri())
    assert (status["type"], status["state"], status["frames"]) == ("video.status", "ended", 4)


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "{media}/../secret.ts",
        "file://otherhost{media}/clip.ts",
        "gopher://127.0.0.1/x",
        "ftp://127.0.0.1/clip.ts",
        "clip.ts",
        "concat:{media}/clip.ts",
    ],
)
def test_refused_urls(session: Any, media_dir: Path, url: str) -> None:
    """Schemes other than http(s), and files outside the directory, are url_not_allowed."""
    media = media_dir.as_uri() if url.startswith("{media}") else str(media_dir)
    error = send_url(session, url.format(media=media))
    assert (error["type"], error["code"], error["fatal"]) == ("error", "url_not_allowed", False)


def test_file_urls_are_off_by_default(media_dir: Path) -> None:
    with (
        TestClient(create_app(Settings(), engine=FakeEngine())) as client,
        client.websocket_connect(SESSION_PATH) as ws,
    ):
        ws.send_bytes(msgpack.packb({"type": "hello"}))
        ws.receive_bytes()
        error = send_url(ws, (media_dir / "clip.ts").as_uri())
    assert error["code"] == "url_not_allowed"


def test_unreachable_host_is_url_fetch_failed(session: Any) -> None:
    error = send_url(session, "http://127.0.0.1:9/clip.webm")  # the discard port: refused
    assert (error["code"], error["fatal"]) == ("url_fetch_failed", False)


def test_missing_file_is_url_fetch_failed(session: Any, media_dir: Path) -> None:
    error = send_url(session, (media_dir / "nope.ts").as_uri())
    assert error["code"] == "url_fetch_failed"
