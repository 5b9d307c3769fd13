"""Keys kept out of the server's logs, wherever a client put them.

A client may put a key in the query string (``?key=``, ``?token=``): the
server reads keys only from the ``Authorization`` header, a
``streamchat.key.`` subprotocol or ``hello``, so it refuses it, but uvicorn
logs every request's path with its query. :class:`RedactQuery` goes on
uvicorn's loggers (:class:`streamchat.transport.ServerConfig` puts it there)
and takes the query out of what they log.
"""

from __future__ import annotations

import logging

from .access import KEY_SUBPROTOCOL_PREFIX

__all__ = ["REDACTED", "REDACT_QUERY", "UVICORN_LOGGERS", "RedactQuery"]

REDACTED = "[redacted]"
UVICORN_LOGGERS = ("uvicorn.access", "uvicorn.error", "uvicorn.asgi")
"""Access lines; WebSocket lines (and websockets' own); the trace of each ASGI scope."""


class RedactQuery(logging.Filter):
    """Cuts query strings (and key subprotocols) out of the arguments of a log record.

    uvicorn passes a request's path as an argument, and at trace level the
    whole ASGI scope (headers already left out by uvicorn): a path keeps its
    ``?`` and loses the rest, a scope its ``query_string`` and the key of a
    ``streamchat.key.`` subprotocol. Arguments change, not the message:
    uvicorn's access formatter still finds its five.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_redact(arg) for arg in record.args)
        return True


REDACT_QUERY = RedactQuery()
"""The one instance: a logger given it twice (each configuration does) keeps one."""


def _redact(value: object) -> object:
    if isinstance(value, str) and value.startswith("/") and "?" in value:
        return value.partition("?")[0] + "?" + REDACTED
    if isinstance(value, dict) and "query_string" in value:  # an ASGI scope
        scope = dict(value)
        if scope["query_string"]:
            scope["query_string"] = REDACTED.encode()
        if "subprotocols" in scope:
            scope["subprotocols"] = [_subprotocol(name) for name in scope["subprotocols"]]
        return scope
    return value


def _subprotocol(name: str) -> str:
    return KEY_SUBPROTOCOL_PREFIX + REDACTED if name.startswith(KEY_SUBPROTOCOL_PREFIX) else name
