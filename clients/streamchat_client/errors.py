"""The client's exceptions, one tree rooted at :class:`ClientError`.

::

    ClientError                 anything this package raises about a session
    ├── ConnectError            no session: refused, bad URL, handshake failed, no ``ready``
    ├── ServerError             the server sent an ``error``: code, message, id, fatal
    ├── SessionClosed           the connection is gone; pending answers and waits end with it
    ├── ProtocolViolation       the server sent something protocol v1 does not allow
    └── SourceError             a pushed video source failed: PyAV could not open or read it
                                here, or the server ended or refused it (``code``, ``error``)

Local misuse (an id that is too long, an image larger than the server takes)
raises :class:`ValueError` before anything is sent, because no server was
involved.
"""

from __future__ import annotations

__all__ = [
    "ClientError",
    "ConnectError",
    "ProtocolViolation",
    "ServerError",
    "SessionClosed",
    "SourceError",
]


class ClientError(Exception):
    """Base class of everything the streamchat client raises about a session."""


class ConnectError(ClientError):
    """The session could not be opened (nothing listening, bad URL, refused ``hello``).

    When the server refused the handshake, ``status`` is its HTTP status (401
    wrong key, 403 origin not allowed, 503 full or shutting down) and ``code``
    the error code from its answer (``unauthorized``, ``server_busy``, ...).
    """

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class ServerError(ClientError):
    """An ``error`` message from the server.

    ``code`` is the stable wire code (``no_frames``, ``video_decode_failed``,
    ...), ``id`` the ``ask``/``cancel`` id it concerns (``None`` for
    session-level errors) and ``fatal`` whether the server closes the session
    after it.
    """

    def __init__(self, code: str, message: str, *, id: str | None = None, fatal: bool = False):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.id = id
        self.fatal = fatal

    def __repr__(self) -> str:
        return (
            f"ServerError(code={self.code!r}, message={self.message!r}, "
            f"id={self.id!r}, fatal={self.fatal!r})"
        )


class SessionClosed(ClientError):
    """The WebSocket is closed, by either side; nothing more will arrive.

    ``code`` and ``reason`` are the close frame's (``None`` when the
    connection dropped without one). ``error`` is the fatal :class:`ServerError`
    that preceded the close, if the server sent one.
    """

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        reason: str = "",
        error: ServerError | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.error = error


class ProtocolViolation(ClientError):
    """The server sent a message that is not valid protocol v1."""


class SourceError(ClientError):
    """A video source the client pushes (a file, a camera, a stream) failed.

    Raised by ``Session.send_file``, ``Session.stream_live`` and
    ``Session.send_bytes``. Either PyAV could not open or read the source
    here (``code`` is ``None``), or the server ended or refused the source
    while it was being pushed: then ``code`` is the server's error code
    (``video_unsupported``, ``video_too_long``, ``video_backlog_full``, ...)
    and ``error`` the :class:`ServerError` it sent. The push stops at once in
    both cases: bytes sent after that would only start a new source from the
    middle of the stream.
    """

    def __init__(
        self, message: str, *, code: str | None = None, error: ServerError | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.error = error
