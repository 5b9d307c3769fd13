"""A scripted stand-in for ``vllm serve``'s OpenAI-compatible API, on a real loopback uvicorn.

For the remote engine's tests (:mod:`streamchat.engine.remote`) without vLLM:
it serves ``GET /v1/models``, ``POST /tokenize``, ``GET /health`` and a
streamed ``POST /v1/chat/completions``, records every chat request (its JSON
body and headers), and answers each as the next :class:`Reply` in
:attr:`ScriptedVllm.replies` says (a plain two-word answer when none is
queued), in vLLM 0.32's event format. A reply may hold its stream after its
first delta until :attr:`ScriptedVllm.release` is set, so a test can cancel,
abort or kill the server mid-answer; :attr:`ScriptedVllm.disconnected` is set
when a held stream's client went away. :meth:`ScriptedVllm.kill` ends the
server as a killed process would, cutting every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from streamchat.serving import listening_socket

__all__ = ["VIDEO_TOKEN", "Reply", "ScriptedVllm", "answer_events", "scripted_vllm"]

VIDEO_TOKEN = 6
"""The id ``/tokenize`` gives ``<|video_pad|>``."""
MODEL = "tiny"


def answer_events(
    words: tuple[str, ...] = ("Hello", " world"),
    *,
    prompt_ids: tuple[int, ...] = (1, VIDEO_TOKEN, VIDEO_TOKEN, VIDEO_TOKEN, 2),
    cached: int = 0,
    finish: str = "stop",
) -> list[str]:
    """The ``data:`` payloads of a whole answer, as vLLM streams it (usage last, then DONE)."""
    chunk = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "model": MODEL}
    first = chunk | {
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
        "prompt_token_ids": list(prompt_ids),
    }
    events = [first]
    for n, word in enumerate(words):
        last = n == len(words) - 1
        choice = {"index": 0, "delta": {"content": word}, "finish_reason": finish if last else None}
        events.append(chunk | {"choices": [choice]})
    usage = {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": len(words),
        "total_tokens": len(prompt_ids) + len(words),
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    events.append(chunk | {"choices": [], "usage": usage})
    return [json.dumps(event) for event in events] + ["[DONE]"]


@dataclass
class Reply:
    """How to answer one chat request."""

    status: int = 200
    error: str | None = None
    """For a status other than 200: the error object's message."""
    events: list[str] = field(default_factory=answer_events)
    """``data:`` payloads (``raw`` lines go as they are)."""
    raw: list[str] = field(default_factory=list)
    """Lines written before ``events`` exactly as given (a malformed stream)."""
    hold: bool = False
    """Hold the stream after its first content delta until :attr:`ScriptedVllm.release`."""
    hang: bool = False
    """Send the headers, then nothing at all (a hung engine)."""
    cut: bool = False
    """After the held part, drop the connection mid-body (a crash)."""


class ScriptedVllm:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.replies: deque[Reply] = deque()
        self.health = 200
        self.release = asyncio.Event()
        self.holding = asyncio.Event()
        """Set once a held stream has sent its first delta and waits."""
        self.disconnected = asyncio.Event()
        self.base = ""
        self.server: uvicorn.Server | None = None
        self._serving: asyncio.Task[None] | None = None
        self.app = Starlette(
            routes=[
                Route("/v1/models", self._models),
                Route("/tokenize", self._tokenize, methods=["POST"]),
                Route("/health", self._health),
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
            ]
        )

    @property
    def url(self) -> str:
        """The API's base, as ``--engine-url`` takes it."""
        return self.base + "/v1"

    async def _models(self, request: Request) -> Response:
        model = {"id": MODEL, "object": "model", "root": "/nonexistent/tiny", "max_model_len": 8192}
        return JSONResponse({"object": "list", "data": [model]})

    async def _tokenize(self, request: Request) -> Response:
        text = (await request.json())["prompt"]
        tokens = [VIDEO_TOKEN] if text == "<|video_pad|>" else list(range(len(text.split())))
        return JSONResponse({"count": len(tokens), "tokens": tokens, "max_model_len": 8192})

    async def _health(self, request: Request) -> Response:
        return Response(status_code=self.health)

    async def _chat(self, request: Request) -> Response:
        self.requests.append(await request.json())
        self.headers.append(dict(request.headers))
        reply = self.replies.popleft() if self.replies else Reply()
        if reply.status != 200:
            body = {"error": {"message": reply.error or "", "type": "x", "param": None}}
            return JSONResponse(body | {"code": reply.status}, reply.status)
        return StreamingResponse(self._events(reply), media_type="text/event-stream")

    async def _events(self, reply: Reply) -> AsyncIterator[bytes]:
        try:
            if reply.hang:
                yield b": hanging\n\n"  # the headers and a comment: then silence
                await asyncio.Event().wait()
            for line in reply.raw:
                yield (line + "\n").encode()
            for n, event in enumerate(reply.events):
                yield f"data: {event}\n\n".encode()
                if reply.hold and n == 1:
                    self.holding.set()
                    await self.release.wait()
                    if reply.cut:
                        raise ConnectionAbortedError("the scripted engine crashed mid-answer")
        except asyncio.CancelledError:
            self.disconnected.set()
            raise

    async def kill(self) -> None:
        """Cut every connection and stop listening, as a killed process would."""
        assert self.server is not None and self._serving is not None
        for connection in list(self.server.server_state.connections):
            connection.transport.abort()  # type: ignore[attr-defined]
        self.server.should_exit = self.server.force_exit = True
        await self._serving


@contextlib.asynccontextmanager
async def scripted_vllm(
    port: int = 0, engine: ScriptedVllm | None = None
) -> AsyncIterator[ScriptedVllm]:
    """A :class:`ScriptedVllm` served on loopback ``port`` (0: any) until the block ends."""
    scripted = engine or ScriptedVllm()
    sock = listening_socket(port=port)
    scripted.base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(scripted.app, log_level="warning", lifespan="off")
    scripted.server = uvicorn.Server(config)
    scripted._serving = asyncio.create_task(scripted.server.serve(sockets=[sock]))
    try:
        yield scripted
    finally:
        scripted.release.set()
        scripted.server.should_exit = scripted.server.force_exit = True
        await scripted._serving
        sock.close()
