"""A small HTTP file server for tests: byte ranges, bad-server modes, and a log of what it sent.

Serves the files below one directory on ``127.0.0.1`` (a free port), from
threads, as a static web server does: HTTP/1.1 with keep-alive,
``Content-Length``, a strong ``ETag`` (from the file's ``mtime_ns`` and size),
``Last-Modified``, ``Accept-Ranges: bytes``, and a single
``Range`` (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``) answered ``206`` with
``Content-Range`` (``416`` when it starts past the end). Several ranges in one
header, or a malformed one, are ignored (``200``), as RFC 9110 allows.
Conditional requests are answered as RFC 9110 (13.2.2) says: ``304`` when
``If-None-Match`` names the file's ``ETag`` (or ``*``), or, without
``If-None-Match``, when the file was not modified after ``If-Modified-Since``
(to the second).

Validators, switchable as the bad-server modes below: ``etag`` and
``last_modified`` (each sent, and its condition honoured, only when on), and
``ignore_conditions`` (validators sent, conditions ignored: always the body).

Bad servers, switchable at any time between requests (plain attributes):

* ``ignore_ranges``: every request is answered ``200`` with the whole file,
  and no ``Accept-Ranges``, as a naive dynamic endpoint does;
* ``truncate_to``: every file is served as if it ended after that many bytes
  (length, ranges and ``416`` agree): a file cut short on the server;
* ``drop_after``: a response is cut off after that many body bytes by closing
  the connection, although ``Content-Length`` promised more: a server or
  network that dies in the middle of a transfer;
* ``max_range``: a ``206`` carries at most that many bytes, fewer than asked
  (its ``Content-Range`` says which), as some CDNs cap a range.

Every response is logged as a :class:`Served`: what was asked (path, ``Range``
header), what was answered (status, the file bytes ``[start, start + length)``
the response carries) and how many of those bytes were handed to the kernel
before the response ended or the client went away (``sent``). So a test can
assert which bytes were fetched, and how often (:meth:`FileServer.bodies`:
the responses that carried a body). Connections inherit a small
kernel send buffer (``send_buffer``, 64 KiB by default), so the bytes of a
response its client abandons are counted close to what the client took: at
most the send buffer and the client's receive window more.

Usage::

    with FileServer(directory) as server:
        url = server.url("clip.mp4")
        ...                      # fetch it
        server.wait_idle()       # every response finished (or abandoned) and logged
        assert [s.status for s in server.log] == [200, 206, 206]

No sleeps: :meth:`FileServer.wait_idle` waits on a condition that each
response's handler signals when it ends.
"""

from __future__ import annotations

import contextlib
import email.utils
import mimetypes
import os
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import BinaryIO
from urllib.parse import quote, unquote, urlsplit

__all__ = ["FileServer", "Served"]

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_PIECE = 64 * 1024


@dataclass(frozen=True, slots=True)
class Served:
    """One response: what was asked, what was answered, and how much of it left the server.

    ``start`` and ``length`` are the file bytes the response carries
    (``length`` is its ``Content-Length``: 0 for errors); ``sent`` counts
    those handed to the kernel, ``complete`` whether that was all of them.
    """

    path: str
    range: str | None
    status: int
    start: int
    length: int
    sent: int

    @property
    def complete(self) -> bool:
        return self.sent == self.length

    @property
    def end(self) -> int:
        """One past the last file byte sent."""
        return self.start + self.sent


class FileServer:
    """Serves ``root`` on ``127.0.0.1`` from the moment it is built until :meth:`close`.

    ``ignore_ranges``, ``truncate_to``, ``drop_after`` and ``max_range`` (see
    the module docstring) may be changed at any time; each request reads them
    as it starts, and so are ``etag``, ``last_modified`` and
    ``ignore_conditions``. ``send_buffer`` is the kernel send buffer of every
    connection.
    """

    def __init__(
        self,
        root: Path,
        *,
        ignore_ranges: bool = False,
        truncate_to: int | None = None,
        drop_after: int | None = None,
        max_range: int | None = None,
        etag: bool = True,
        last_modified: bool = True,
        ignore_conditions: bool = False,
        send_buffer: int = 64 * 1024,
    ) -> None:
        self.root = root.resolve()
        self.ignore_ranges = ignore_ranges
        self.truncate_to = truncate_to
        self.drop_after = drop_after
        self.max_range = max_range
        self.etag = etag
        self.last_modified = last_modified
        self.ignore_conditions = ignore_conditions
        self._log: list[Served] = []
        self._active = 0
        self._changed = threading.Condition()
        self._httpd = _Server(self, send_buffer)
        self.port: int = self._httpd.server_address[1]
        # serve_forever polls for shutdown(): a short interval makes close() quick.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="httpfiles", daemon=True
        )
        self._thread.start()

    # -- what tests use --------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, name: str) -> str:
        """The URL of ``name``, a path relative to ``root``."""
        return f"{self.base_url}/{quote(name)}"

    @property
    def log(self) -> list[Served]:
        """The responses finished so far, in the order they finished (a copy)."""
        with self._changed:
            return list(self._log)

    def clear_log(self) -> None:
        with self._changed:
            self._log.clear()

    def bodies(self, name: str | None = None) -> int:
        """Responses that carried file bytes (``200`` or ``206`` to a GET), for ``name`` or all."""
        return sum(
            1
            for s in self.log
            if s.status in (200, 206) and s.length and (name is None or s.path == "/" + name)
        )

    def statuses(self, name: str | None = None) -> list[int]:
        """The status of each response, in order, for ``name`` only or for every file."""
        return [s.status for s in self.log if name is None or s.path == "/" + name]

    def bytes_sent(self, name: str | None = None) -> int:
        """File bytes handed to the kernel, for ``name`` only or for every file."""
        return sum(s.sent for s in self.log if name is None or s.path == "/" + name)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Return once no response is in progress (each one is then in :attr:`log`).

        A response the client abandoned ends when the server's next write
        fails, soon after the client closed its connection. Raises
        ``TimeoutError`` if responses are still going after ``timeout`` s.
        """
        with self._changed:
            if not self._changed.wait_for(lambda: self._active == 0, timeout):
                raise TimeoutError(f"{self._active} responses still in progress")

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> FileServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- used by the handler ----------------------------------------------------------

    @contextlib.contextmanager
    def _response(self) -> Iterator[list[Served]]:
        """Count a response as in progress; the handler puts its :class:`Served` in the list."""
        with self._changed:
            self._active += 1
        done: list[Served] = []
        try:
            yield done
        finally:
            with self._changed:
                self._log += done
                self._active -= 1
                self._changed.notify_all()

    def _file(self, url_path: str) -> Path | None:
        path = (self.root / unquote(url_path).lstrip("/")).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            return None
        return path


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a keep-alive connection the client keeps must not block close()

    def __init__(self, files: FileServer, send_buffer: int) -> None:
        self.files = files
        self.send_buffer = send_buffer
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        # Accepted connections inherit the listening socket's send buffer.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer)
        super().server_bind()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base's name)
        pass  # the test reads FileServer.log instead

    def handle(self) -> None:
        # A client that closes a kept-alive connection with bytes unread resets it:
        # normal for a fetcher that abandons a response, not a server error.
        with contextlib.suppress(ConnectionError):
            super().handle()

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, *, body: bool) -> None:
        files = self.server.files
        url_path = urlsplit(self.path).path
        asked = self.headers.get("Range")
        with files._response() as done:
            path = files._file(url_path)
            if path is None:
                self._empty(HTTPStatus.NOT_FOUND)
                done.append(Served(url_path, asked, 404, 0, 0, 0))
                return
            status = path.stat()
            size = status.st_size
            if files.truncate_to is not None:
                size = min(size, files.truncate_to)
            validators = self._validators(status, size)
            if self._not_modified(validators):
                self._empty(HTTPStatus.NOT_MODIFIED, headers=validators)
                done.append(Served(url_path, asked, 304, 0, 0, 0))
                return
            try:
                wanted = None if files.ignore_ranges else _parse_range(asked, size)
            except _Unsatisfiable:
                self._empty(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, f"bytes */{size}")
                done.append(Served(url_path, asked, 416, 0, 0, 0))
                return
            start, length = (0, size) if wanted is None else wanted
            if wanted is not None and files.max_range is not None:
                length = min(length, files.max_range)
            status = HTTPStatus.OK if wanted is None else HTTPStatus.PARTIAL_CONTENT
            self.send_response(status)
            self.send_header("Content-Type", mimetypes.guess_type(path.name)[0] or "video/mp4")
            self.send_header("Content-Length", str(length))
            for header, value in validators.items():
                self.send_header(header, value)
            if not files.ignore_ranges:
                self.send_header("Accept-Ranges", "bytes")
            if wanted is not None:
                self.send_header("Content-Range", f"bytes {start}-{start + length - 1}/{size}")
            self.end_headers()
            sent = 0
            if body:
                with path.open("rb") as file:
                    sent = self._send(file, start, length, files.drop_after)
            done.append(Served(url_path, asked, int(status), start, length if body else 0, sent))

    def _send(self, file: BinaryIO, start: int, length: int, drop_after: int | None) -> int:
        """Write ``length`` bytes from ``start``; how many the kernel took before it ended."""
        file.seek(start)
        limit = length if drop_after is None else min(length, drop_after)
        sent = 0
        try:
            while sent < limit:
                piece = file.read(min(_PIECE, limit - sent))
                self.wfile.write(piece)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away
        if sent < length:
            self.close_connection = True  # cut off: the connection cannot carry on
        return sent

    def _validators(self, status: os.stat_result, size: int) -> dict[str, str]:
        files = self.server.files
        validators = {}
        if files.etag:
            validators["ETag"] = f'"{status.st_mtime_ns:x}-{size:x}"'
        if files.last_modified:
            validators["Last-Modified"] = email.utils.formatdate(status.st_mtime, usegmt=True)
        return validators

    def _not_modified(self, validators: dict[str, str]) -> bool:
        """Whether the request's conditions say the client has the file (RFC 9110, 13.2.2)."""
        if self.server.files.ignore_conditions:
            return False
        match = self.headers.get("If-None-Match")
        if match is not None:
            etag = validators.get("ETag")
            tags = [tag.strip().removeprefix("W/") for tag in match.split(",")]
            return etag is not None and ("*" in tags or etag in tags)
        since = self.headers.get("If-Modified-Since")
        modified = validators.get("Last-Modified")
        if since is None or modified is None:
            return False
        try:
            return email.utils.parsedate_to_datetime(modified) <= email.utils.parsedate_to_datetime(
                since
            )
        except (TypeError, ValueError):  # not a date: the condition is ignored
            return False

    def _empty(
        self,
        status: HTTPStatus,
        content_range: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        if status != HTTPStatus.NOT_MODIFIED:  # a 304 has no body, not even an empty one
            self.send_header("Content-Length", "0")
        if content_range is not None:
            self.send_header("Content-Range", content_range)
        for header, value in (headers or {}).items():
            self.send_header(header, value)
        self.end_headers()


class _Unsatisfiable(Exception):
    """The range starts past the end of the file: ``416``."""


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, length)`` of one satisfiable range, or ``None``: ignore the header.

    Raises :class:`_Unsatisfiable` for a range past the end of the file.
    """
    match = _RANGE.fullmatch(header.strip()) if header else None
    if match is None or match[1] == match[2] == "":
        return None
    if match[1] == "":  # the last n bytes
        length = min(int(match[2]), size)
        if not length:
            raise _Unsatisfiable
        return size - length, length
    start = int(match[1])
    last = size - 1 if match[2] == "" else min(int(match[2]), size - 1)
    if start >= size:
        raise _Unsatisfiable
    if last < start:
        return None
    return start, last - start + 1
