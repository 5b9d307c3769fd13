"""The OpenAI-compatible door: ``/v1/chat/completions`` with ``video_url``, and ``/v1/models``.

Beside the WebSocket endpoint, sharing its layers: the same keys, origins and
admission (:mod:`streamchat.access`, :class:`~streamchat.server.ServerState`),
the same URL policy and decoder (through the video cache), the same engine
seam. Any client that speaks OpenAI's chat API with vLLM's ``video_url``
extension can use it, and name a live WebSocket session as a video
(``streamchat://sessions/<id>``). See docs/openai.md.

* ``request``: a body -> what the server will do, or an error naming the field.
* ``routes``: the handlers: gates, media, the engine, streamed answers.
* ``wire``: vLLM's OpenAI models (loaded on first use), OpenAI's error object.
"""

from __future__ import annotations

import asyncio
import sys

from .routes import CHAT_PATH, MODELS_PATH, routes
from .wire import models

__all__ = ["CHAT_PATH", "MODELS_PATH", "routes", "warm"]


async def warm() -> None:
    """Load vLLM's OpenAI models now if vLLM is loaded already (then it costs well under a
    second), so that the first request does not wait for them; otherwise leave it to it."""
    if "vllm" in sys.modules:
        await asyncio.to_thread(models)
