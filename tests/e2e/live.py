"""The settings of the end-to-end server (the server itself: ``tests/live.py``)."""

from __future__ import annotations

from streamchat.config import Settings

SETTINGS = Settings(
    fps=2.0,
    window_frames=16,
    min_pixels=28 * 28,
    max_pixels=112 * 112,
    max_message_bytes=256 * 1024,
    max_tokens=16,
    fetch_allow_private=True,  # URL sources come from a loopback file server
)
