"""The streamchat client: push video to a streamchat server and ask about it.

::

    async with connect("ws://127.0.0.1:8000/v1/session", fps=2) as session:
        await session.send_file("clip.webm")
        await session.wait_frames(4)
        async for delta in session.ask("What is moving?"):
            print(delta, end="")

Standalone: it speaks protocol v1 (``docs/protocol.md``) with websockets and
msgpack; PyAV is loaded only to inspect, remux or pace local files and to
read live sources (cameras, streams) with :meth:`Session.stream_live`.
"""

from __future__ import annotations

from .answer import Answer
from .client import DEFAULT_CHUNK_BYTES, DEFAULT_URL, Session, connect
from .errors import (
    ClientError,
    ConnectError,
    ProtocolViolation,
    ServerError,
    SessionClosed,
    SourceError,
)
from .messages import Done, Encoding, Limits, Ready, Usage, VideoStatus
from .sources import PushStats

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_URL",
    "Answer",
    "ClientError",
    "ConnectError",
    "Done",
    "Encoding",
    "Limits",
    "ProtocolViolation",
    "PushStats",
    "Ready",
    "ServerError",
    "Session",
    "SessionClosed",
    "SourceError",
    "Usage",
    "VideoStatus",
    "connect",
]
