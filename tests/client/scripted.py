"""A scripted stand-in for a streamchat server, for what a real one cannot be made to do on cue.

It speaks just enough protocol v1 (msgpack frames): it answers ``hello`` with
a ``ready``, records every later client message in order, and lets the test
decide the replies to each one (:data:`React`). Tests use it to send an error
at an exact point of a push, or to refuse an ``ask``, and to count what the
client sends afterwards; :func:`sync` waits until the server has read
everything the client sent before it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
from websockets.asyncio.server import ServerConnection, serve

from streamchat_client import ServerError, Session

__all__ = ["LIMITS", "React", "Scripted", "error", "scripted_server", "sync"]

_SYNC = "scripted-sync"

LIMITS: dict[str, Any] = {
    "fps": 2.0,
    "window_frames": 32,
    "window_bytes": 64 << 20,
    "min_pixels": 3136,
    "max_pixels": 200704,
    "frame_factor": 28,
    "max_message_bytes": 4 << 20,
    "video_buffer_bytes": 16 << 20,
    "max_concurrent_asks": 4,
    "max_question_chars": 2000,
    "max_tokens": 64,
    "max_tokens_limit": 1024,
}
"""The limits of the ``ready`` it sends: only the fields every protocol v1 server sends."""

React = Callable[[dict[str, Any], "Scripted"], list[dict[str, Any]]]
"""Given a client message (after ``hello``) and the server, the messages to send back."""


def error(code: str, message: str = "scripted", *, id: str | None = None) -> dict[str, Any]:
    """A non-fatal ``error`` message."""
    return {"type": "error", "code": code, "message": message, "id": id, "fatal": False}


@dataclass
class Scripted:
    url: str
    received: list[dict[str, Any]] = field(default_factory=list)
    """Every client message after ``hello``, in the order it arrived."""
    marks: dict[str, int] = field(default_factory=dict)
    """Named positions in :attr:`received`, for the test's own bookkeeping."""

    def chunks_after(self, mark: str) -> int:
        """How many ``video.chunk`` messages arrived after the position named ``mark``."""
        return sum(m["type"] == "video.chunk" for m in self.received[self.marks[mark] :])


@contextlib.asynccontextmanager
async def scripted_server(
    react: React, *, limits: dict[str, Any] | None = None
) -> AsyncIterator[Scripted]:
    """Serve one scripted session at a time on a loopback port, for the duration of the block."""
    state = Scripted("")
    ready = {
        "type": "ready",
        "session": "scripted",
        "model": "scripted",
        "protocol": 1,
        "limits": {**LIMITS, **(limits or {})},
    }

    async def handler(websocket: ServerConnection) -> None:
        await websocket.recv()  # hello
        await websocket.send(msgpack.packb(ready))
        async for frame in websocket:
            message = msgpack.unpackb(frame, raw=False)
            if message.get("id") == _SYNC:
                await websocket.send(msgpack.packb(error("no_frames", "synced", id=_SYNC)))
                continue
            state.received.append(message)
            for reply in react(message, state):
                await websocket.send(msgpack.packb(reply))

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        state.url = f"ws://127.0.0.1:{port}/v1/session"
        yield state


async def sync(session: Session) -> None:
    """Return once the scripted server has read every message ``session`` sent before this.

    A round trip: the server answers an ``ask`` with this id at once, and it
    reads messages in order.
    """
    try:
        await session.ask("sync", id=_SYNC).result()
    except ServerError as exc:
        assert exc.id == _SYNC, exc
