"""The server's log formats: today's text, or one JSON object a line for log collectors.

A collector (Loki, Elasticsearch, CloudWatch) can only index what it can
parse, and a server's stderr mixes three sources: streamchat's loggers,
uvicorn's (``uvicorn.error``, ``uvicorn.access``) and vLLM's, which configures
its own handler on stdout when it is imported, in this process and in each
engine process it starts. With ``json`` every one of them goes through
:class:`JsonFormatter` on one stderr handler:

* streamchat's and uvicorn's loggers through the root logger, configured by
  :func:`configure` (uvicorn is then given no ``log_config`` of its own);
* vLLM's through the same configuration written to a file named by
  ``VLLM_LOGGING_CONFIG_PATH``: vLLM applies that file, in place of its own
  handler, on import in every process, and its engine processes inherit the
  variable;
* what no logger writes (progress bars, warnings printed in the engine
  processes, torch's C++ warnings) through a pipe put in place of stdout and
  stderr, whose lines are wrapped as JSON (:func:`json_line`).

A line has ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, the
``session`` id when the line belongs to a session (:mod:`streamchat.sessionlog`
puts it on the record; the ``session <id>:`` prefix that text lines carry is
left out of ``message``), an ``exception`` with its traceback when there is
one, and any other field a caller gave in ``extra``.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import logging
import logging.config
import os
import sys
import tempfile
import threading
import time
from typing import Any

from .sessionlog import session_prefix

__all__ = [
    "FORMATS",
    "TEXT_FORMAT",
    "VLLM_CONFIG_ENV",
    "JsonFormatter",
    "configure",
    "json_config",
    "json_line",
]

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""streamchat's own lines in text (uvicorn's keep uvicorn's format)."""
VLLM_CONFIG_ENV = "VLLM_LOGGING_CONFIG_PATH"
TRACE = 5
"""uvicorn's level below DEBUG: the ASGI messages of every connection."""

# What every LogRecord has: anything else on a record came from ``extra``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "session",
    "color_message",  # uvicorn's coloured copy of the message
    "vllm_process_name",  # vLLM's record factory; "process" says the same
}


class JsonFormatter(logging.Formatter):
    """One log record as one line of JSON (see the module's docstring for the fields)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line: dict[str, Any] = {
            "time": _iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        session = getattr(record, "session", None)
        if session is not None:
            line["session"] = str(session)
            line["message"] = message.removeprefix(session_prefix(str(session)))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        for name, value in record.__dict__.items():
            if name not in _STANDARD and not name.startswith("_") and name not in line:
                line[name] = value
        # Never a newline inside a line; a value JSON cannot say is said as its str().
        return json.dumps(line, ensure_ascii=False, default=str)


def json_config(level: str | int) -> dict[str, Any]:
    """The ``logging.config.dictConfig`` of the JSON format, for this process and vLLM's.

    Every logger propagates to the root's one stderr handler; uvicorn's and
    vLLM's lose the handlers they set themselves. vLLM's level stays its own
    (``VLLM_LOGGING_LEVEL``, INFO by default), as in text, so that
    ``--log-level debug`` is about streamchat, not about vLLM's internals.
    """
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": _level_name(level)},
        "loggers": {
            name: {"handlers": [], "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
        }
        | {
            "vllm": {
                "handlers": [],
                "propagate": True,
                "level": os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper(),
            }
        },
    }


def configure(log_format: str, level: str | int) -> None:
    """Set up this process's logging in ``log_format`` (one of :data:`FORMATS`).

    For ``json``, also writes the configuration for vLLM to a temporary file
    (removed at exit) and names it in ``VLLM_LOGGING_CONFIG_PATH``, unless
    that names a file already: an operator's own configuration wins. Python's
    warnings become log records, which would otherwise be bare text lines.
    """
    logging.addLevelName(TRACE, "TRACE")  # uvicorn's level below DEBUG (--log-level trace)
    if log_format == "text":
        logging.basicConfig(level=_level_name(level), format=TEXT_FORMAT)
        return
    if log_format != "json":
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(FORMATS)}")
    config = json_config(level)
    logging.config.dictConfig(config)
    logging.captureWarnings(True)
    if not os.environ.get(VLLM_CONFIG_ENV):
        os.environ[VLLM_CONFIG_ENV] = _write_config(config)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        atexit.register(_Pump(fd, name).close)


def json_line(text: str, stream: str) -> str | None:
    """A line written to ``stream`` outside logging, as a line of JSON; None if blank.

    A line that is a JSON object already (a log record, through a child's
    handler) stays as it is. Anything else (a progress bar, a warning printed
    by C++ code, a child's traceback) is wrapped: ``logger`` names the stream,
    ``level`` is WARNING for stderr and INFO for stdout, since what wrote it
    said no level. Of a line a progress bar redrew with ``\r``, its last state.
    """
    text = text.rstrip("\r\n")
    if text.startswith("{"):
        try:
            if isinstance(json.loads(text), dict):
                return text
        except ValueError:
            pass
    shown = next((part for part in reversed(text.split("\r")) if part.strip()), None)
    if shown is None:
        return None
    return json.dumps(
        {
            "time": _iso_time(time.time()),
            "level": "WARNING" if stream == "stderr" else "INFO",
            "logger": stream,
            "message": shown.rstrip(),
        },
        ensure_ascii=False,
    )


class _Pump:
    """What is written to file descriptor ``fd``, by this process and the ones it starts,
    goes where it went before, each line as JSON (:func:`json_line`).

    Not everything that writes to stderr uses logging: vLLM's engine processes
    print progress bars and Python warnings, torch's C++ code writes to the
    descriptor itself. Only a pipe in its place sees all of it: ``fd`` becomes
    one, and a thread reads it. Children inherit the pipe when they start.
    """

    def __init__(self, fd: int, name: str) -> None:
        self._fd, self._name = fd, name
        self._original = os.dup(fd)
        read, write = os.pipe()
        os.dup2(write, fd)
        os.close(write)
        self._thread = threading.Thread(
            target=self._copy, args=(read,), name=f"streamchat-{name}", daemon=True
        )
        self._thread.start()

    def _copy(self, read: int) -> None:
        with open(read, "rb") as source, open(self._original, "wb", closefd=False) as sink:
            for raw in source:
                line = json_line(raw.decode("utf-8", "replace"), self._name)
                if line is not None:
                    sink.write(line.encode() + b"\n")
                    sink.flush()

    def close(self) -> None:
        """Put ``fd`` back, and let the thread copy what is left (bounded: a child still
        holding the pipe would keep it open)."""
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(self._original, self._fd)
        self._thread.join(timeout=2.0)


def _iso_time(created: float) -> str:
    moment = datetime.datetime.fromtimestamp(created, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _level_name(level: str | int) -> str:
    return logging.getLevelName(level) if isinstance(level, int) else level.upper()


def _write_config(config: dict[str, Any]) -> str:
    fd, path = tempfile.mkstemp(prefix="streamchat-logging-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        json.dump(config, file)
    atexit.register(_remove, path)
    return path


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
