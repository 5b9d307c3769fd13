"""Loopback ports for servers the tests start.

An in-process server never needs one: it listens on port 0 before it starts
(:func:`streamchat.serving.listening_socket`). A process does: the port is
picked here, released, and handed to ``streamchat serve --port``.
"""

from __future__ import annotations

import socket

__all__ = ["dead_url", "free_port"]


def free_port() -> int:
    """A loopback port nobody listens on now (another process could take it before we do)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dead_url() -> str:
    """A session URL on a loopback port nobody listens on."""
    return f"ws://127.0.0.1:{free_port()}/v1/session"
