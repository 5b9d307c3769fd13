"""A pretend internet for the SSRF tests: scripted DNS, recorded connections, a loopback server.

Nothing leaves the machine. :class:`FakeDns` answers what a test scripts (a
name may answer differently each time it is asked: DNS rebinding).
:class:`FakeInternet` is the network backend below the fetcher's pinning
layer: it records every TCP connection the fetcher asks for and delivers each
one to a loopback server, whatever the address. So an address the fetcher
should have refused and did not shows up twice: in ``dials``, and as a
request in the :class:`Canary`'s log.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import parse_qs

import httpcore
from starlette.types import Receive, Scope, Send

PUBLIC = "93.184.215.14"
"""A global unicast address (example.com's, once) that no test ever really reaches."""
PUBLIC_2 = "93.184.215.15"

SECRET_PATH = "/secret"


@dataclass
class Canary:
    """An ASGI app recording every request: ``(Host header, path)``.

    ``/clip`` serves ``body``; ``/redirect?to=URL`` answers 302 to ``URL``;
    ``/drip?n=N&every=S`` sends N bytes, one every S seconds; ``/gzip`` claims
    a compressed body; anything else (``/secret``) answers 200 "secret".
    """

    body: bytes = b"\x1a\x45\xdf\xa3" * 4096
    requests: list[tuple[str, str]] = field(default_factory=list)

    def hits(self, path: str) -> int:
        return sum(1 for _, p in self.requests if p == path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        headers = dict(scope["headers"])
        self.requests.append((headers.get(b"host", b"").decode(), scope["path"]))
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        path = scope["path"]
        if path == "/clip":
            await _respond(send, 200, self.body, [(b"content-length", b"%d" % len(self.body))])
        elif path == "/redirect":
            await _respond(send, 302, b"", [(b"location", query["to"].encode())])
        elif path == "/gzip":
            await _respond(send, 200, b"\x1f\x8b", [(b"content-encoding", b"gzip")])
        elif path == "/drip":
            await _drip(receive, send, int(query["n"]), float(query["every"]))
        else:
            await _respond(send, 200, b"secret", [])


async def _drip(receive: Receive, send: Send, n: int, every: float) -> None:
    """Send ``n`` bytes, one every ``every`` seconds, until done or the client is gone."""
    gone = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.create_task(watch())
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for _ in range(n):
        # The server's pace is the behaviour under test, not synchronisation.
        await asyncio.sleep(every)
        if gone.is_set():
            break
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
    await send({"type": "http.response.body", "body": b""})
    watcher.cancel()


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class FakeDns:
    """A resolver scripted per name; a list of answers is used in turn, the last one repeats."""

    def __init__(self, table: dict[str, list[list[str]]]) -> None:
        self._table = {name: list(answers) for name, answers in table.items()}
        self.queries: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.queries.append(host)
        answers = self._table.get(host.rstrip("."))
        if answers is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return answers.pop(0) if len(answers) > 1 else answers[0]


class FakeInternet(httpcore.AsyncNetworkBackend):
    """Records each ``(address, port)`` dialled and connects it to ``127.0.0.1:port_to``.

    Addresses in ``down`` refuse the connection instead.
    """

    def __init__(self, port_to: int, down: Iterable[str] = ()) -> None:
        self.port_to = port_to
        self.down = frozenset(down)
        self.dials: list[tuple[str, int]] = []
        self._real = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.dials.append((host, port))
        if host in self.down:
            raise httpcore.ConnectError(f"{host} refused the connection")
        return await self._real.connect_tcp("127.0.0.1", self.port_to, timeout=timeout)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise AssertionError("the fetcher must never open a Unix socket")

    async def sleep(self, seconds: float) -> None:
        await self._real.sleep(seconds)
