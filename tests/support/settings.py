"""Settings of the live servers on the tiny engine (``tests/e2e``, ``tests/browser``).

Small frames (at most 112x112: a few video tokens each) and short answers
keep the tiny model's turns quick on a CPU; the window and the rate are the
ones a real client asks for.
"""

from __future__ import annotations

import dataclasses

from streamchat.config import Settings

__all__ = ["BROWSER", "E2E", "TINY"]

TINY = Settings(
    fps=2.0,
    window_frames=16,
    min_pixels=28 * 28,
    max_pixels=112 * 112,
    max_tokens=16,
)
"""What both share."""

E2E = dataclasses.replace(
    TINY,
    max_message_bytes=256 * 1024,
    fetch_allow_private=True,  # URL sources come from a loopback file server
)

BROWSER = dataclasses.replace(TINY, max_message_bytes=24 * 1024)
"""A small message limit, so the page must split MediaRecorder's chunks (keyframes are larger)."""
