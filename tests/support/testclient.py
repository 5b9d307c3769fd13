"""The WebSocket endpoint through Starlette's test client: no server, no port.

:class:`Peer` speaks msgpack (or JSON) over a test-client WebSocket, the way
the endpoint tests drive a session; :data:`SMALL` are their settings: small
messages, small frames.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack

from streamchat.config import Settings
from tests.support.media import chunks, encode_image

__all__ = ["SMALL", "Peer", "with_image"]

SMALL = Settings(max_message_bytes=64 * 1024, min_pixels=28 * 28, max_pixels=56 * 56)


class Peer:
    """A test-client WebSocket speaking msgpack (or JSON)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    def send(self, payload: dict[str, Any]) -> None:
        self.ws.send_bytes(msgpack.packb(payload, use_bin_type=True))

    def send_json(self, payload: dict[str, Any]) -> None:
        self.ws.send_text(json.dumps(payload))

    def recv(self) -> dict[str, Any]:
        message = self.ws.receive()
        if message.get("bytes") is not None:
            return dict(msgpack.unpackb(message["bytes"]))
        return dict(json.loads(message["text"]))

    def recv_type(self, *types: str) -> dict[str, Any]:
        """The next message of one of ``types``, skipping status updates."""
        while True:
            message = self.recv()
            if message["type"] in types:
                return message
            assert message["type"] == "video.status", message

    def answer(self, id: str) -> tuple[str, dict[str, Any]]:
        """The whole answer to ``id``: its text and its ``answer.done``."""
        text = ""
        while True:
            message = self.recv_type("answer.delta", "answer.done", "error")
            assert message.get("id") == id, message
            if message["type"] == "answer.delta":
                text += message["text"]
            elif message["type"] == "answer.done":
                return text, message
            else:
                raise AssertionError(message)


def with_image(peer: Peer, pts: float = 0.0) -> None:
    """Push a 64x48 PNG at ``pts``: a frame to ask about."""
    peer.send({"type": "image", "data": encode_image("png", width=64, height=48), "pts": pts})


def push_video(peer: Peer, data: bytes, *, size: int = 4096, fmt: str | None = None) -> None:
    """Push ``data`` as video chunks cut at random boundaries (``fmt``: the first's hint)."""
    for i, piece in enumerate(chunks(data, size, seed=1)):
        message: dict[str, Any] = {"type": "video.chunk", "data": piece}
        if i == 0 and fmt:
            message["format"] = fmt
        peer.send(message)


def until_source_ends(peer: Peer) -> dict[str, Any]:
    """The status that tells the source stopped decoding (ended or failed)."""
    while True:
        message = peer.recv()
        if message["type"] == "video.status" and message["state"] != "decoding":
            return message
        assert message["type"] == "video.status", message
