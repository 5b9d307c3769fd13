"""WebSocket bytes by hand, for attackers: no client library gets to be polite for them.

An attacker does not use a WebSocket library: it sends a handshake, then
frames, as fast as the socket takes them, and reads (or does not read) what
it likes. These build the bytes; the tests own their sockets.
"""

from __future__ import annotations

import base64
import os
import struct

__all__ = ["client_frame", "upgrade_request"]


def upgrade_request(path: str = "/v1/session", protocol: str | None = None) -> bytes:
    """A WebSocket handshake request for ``path`` on ``127.0.0.1``, with a fresh key."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if protocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A final client frame with a zero mask (valid, and the payload goes as it is)."""
    size = len(payload)
    if size < 126:
        head = bytes([0x80 | opcode, 0x80 | size])
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack("!Q", size)
    return head + bytes(4) + payload
