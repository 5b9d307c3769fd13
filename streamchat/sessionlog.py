"""Every line about a session names it, whichever layer logs it.

A server's log interleaves many sessions; a line that does not say which one
it is about is of little use. Two pieces see to it, both writing the prefix
``session <id>: `` into the message itself, so that every log format shows it
(the record's ``session`` attribute is there for structured handlers):

* :class:`SessionLog`, the adapter through which the endpoint and the session
  log their own lines;
* a filter on the loggers of the layers below them (decoding, fetching, the
  engine), which know nothing of sessions: it reads the id from a context
  variable that :meth:`SessionLog.tag_task` sets in the connection's task.
  Tasks copy their creator's context, and the session hands its context to
  each thread it starts, so one call tags everything the session runs.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import MutableMapping
from typing import Any

__all__ = ["TAGGED_LOGGERS", "SessionLog", "session_prefix"]

TAGGED_LOGGERS = ("streamchat.decoder", "streamchat.fetch", "streamchat.engine")
"""The loggers of the layers a session's work runs in, which know nothing of sessions."""

_RUNNING: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "streamchat_session", default=None
)
"""The id of the session whose task or thread this is (see :meth:`SessionLog.tag_task`)."""


def session_prefix(session_id: str) -> str:
    """What a session's line begins with in its message (a structured format leaves it out)."""
    return f"session {session_id}: "


class SessionLog(logging.LoggerAdapter[logging.Logger]):
    """One session's lines: each begins ``session <id>: `` and its record carries ``session``."""

    def __init__(self, base: logging.Logger, session_id: str) -> None:
        super().__init__(base, {"session": session_id})
        self.session_id = session_id

    def process(
        self, msg: object, kwargs: MutableMapping[str, Any]
    ) -> tuple[str, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return f"{session_prefix(self.session_id)}{msg}", kwargs

    def tag_task(self) -> None:
        """Tag what the layers below log from the calling task from now on (and from the
        tasks and threads it starts), until the task ends."""
        _RUNNING.set(self.session_id)


class _TagSessionLines(logging.Filter):
    """Prefixes a line of a layer below with the id of the session it runs for, if any."""

    def filter(self, record: logging.LogRecord) -> bool:
        session_id = _RUNNING.get()
        if session_id is not None and not hasattr(record, "session"):
            record.session = session_id
            record.msg = f"{session_prefix(session_id)}{record.msg}"
        return True


_TAG = _TagSessionLines()
for _name in TAGGED_LOGGERS:
    logging.getLogger(_name).addFilter(_TAG)
