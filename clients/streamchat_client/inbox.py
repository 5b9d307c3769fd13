"""The receiving half of a session: what the server said, routed to who waits for it.

:class:`Inbox` takes decoded server messages one at a time and updates the
session's view synchronously: answer deltas and ends go to their
:class:`~streamchat_client.answer.Answer` by id, ``video.status`` replaces the
latest status and wakes its waiters, and ``error`` messages go to the answer
they concern or, if none is pending, to the bounded list of session errors.
It owns no socket and never awaits while dispatching, so a slow reader of one
answer cannot hold up the others (see :mod:`streamchat_client.answer`), and it
can be driven by a test without a connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from .answer import Answer
from .errors import ServerError, SessionClosed
from .messages import PARSERS, AnswerDelta, Done, GoingAway, VideoStatus

__all__ = ["ErrorCallback", "Inbox", "StatusCallback"]

logger = logging.getLogger("streamchat_client")

StatusCallback = Callable[[VideoStatus], object]
ErrorCallback = Callable[[ServerError], object]

SOURCE_ENDING = frozenset(
    {
        "video_decode_failed",
        "video_unsupported",
        "video_too_large",
        "video_too_long",
        "video_timeout",
        "url_not_allowed",
        "url_fetch_failed",
        "decoder_busy",
    }
)
"""Session errors that end the current source (its status then says ``failed``)."""
PUSH_ENDING = SOURCE_ENDING | {"video_backlog_full", "source_busy"}
"""Session errors after which a push must stop: the source ended, or a chunk was refused and
the stream has a hole (what follows would only corrupt it, or start a new source mid-stream)."""
_ANSWER_CONTINUES = frozenset({"engine_error"})
"""Answer errors after which the server still sends that answer's ``answer.done``."""
_NOT_ABOUT_ANSWER = frozenset({"unknown_id", "duplicate_id"})
"""Errors whose id names a ``cancel`` or a clashing ``ask``, never the pending answer."""


class Inbox:
    """Routes server messages to answers, the latest status, and the session's errors."""

    def __init__(
        self,
        *,
        max_errors: int,
        on_status: StatusCallback | None = None,
        on_error: ErrorCallback | None = None,
    ) -> None:
        self.on_status = on_status
        self.on_error = on_error
        self.answers: dict[str, Answer] = {}
        """Answers in flight, by id; an answer leaves when it finishes."""
        self.status: VideoStatus | None = None
        self.errors: deque[ServerError] = deque(maxlen=max_errors)
        self.source_error: ServerError | None = None
        """The latest error that ended a source: why a ``failed`` status failed."""
        self.fatal: ServerError | None = None
        self.closed: SessionClosed | None = None
        self.going_away: str | None = None
        """The reason the server gave in ``going_away`` (it is shutting down)."""
        self.push_source: int | None = None
        """The number the current push's source gets on the server, while a push is open."""
        self.push_stop: ServerError | None = None
        """Why the server failed or refused the open push's source: the push must stop."""
        self.push_ended = False
        """The server ended the open push's source by itself (its demuxer reached the end of
        the stream, e.g. before an MP4's trailing boxes): the rest is not video; stop sending."""
        self._push_seen = False  # a status of the push's own source has arrived
        self._push_suspect: ServerError | None = None  # a source error not yet attributed
        self._status_event = asyncio.Event()

    def dispatch(self, message: Mapping[str, Any]) -> None:
        """Take one server message; a malformed one raises
        :class:`~streamchat_client.errors.ProtocolViolation`."""
        kind = message["type"]
        parse = None if kind == "ready" else PARSERS.get(kind)
        if parse is None:
            # A later protocol version's message (or a stray 'ready'): ignored, by design.
            logger.debug("ignoring a %r message", kind)
            return
        match parse(message):
            case AnswerDelta(id=id, text=text):
                if (answer := self.answers.get(id)) is not None:
                    answer._delta(text)
            case Done() as done:
                if (answer := self.answers.pop(done.id, None)) is not None:
                    answer._done(done)
            case VideoStatus() as status:
                self.status = status
                self._push_status(status)
                self._wake()
                _call(self.on_status, status)
            case ServerError() as error:
                self._error(error)
            case GoingAway(reason=reason):
                self.going_away = reason
                logger.info("the server is going away: %s", reason)

    def _error(self, error: ServerError) -> None:
        if error.fatal:
            self.fatal = error
        id = error.id
        if id is not None and error.code not in _NOT_ABOUT_ANSWER and id in self.answers:
            final = error.code not in _ANSWER_CONTINUES
            answer = self.answers.pop(id) if final else self.answers[id]
            answer._fail(error, final=final)
            return
        self.errors.append(error)
        if error.code in SOURCE_ENDING:
            self.source_error = error
        self._push_error(error)
        _call(self.on_error, error)

    # -- the open push ---------------------------------------------------------
    #
    # Errors carry no source number, so one that arrives just after a push has
    # started a new source may still be about the previous source (whose
    # decoder failed before the server saw the new chunk, or refused chunks
    # still in flight). The server reports errors only for its current source
    # and follows a source's failure with its ``failed`` status, which does
    # carry the number: once a status of the push's own source has arrived,
    # every later error is about it; before that, a source error waits for
    # the status that follows it. ``source_busy`` answers the chunk just sent.

    def start_push(self, source: int) -> None:
        """A push starts source ``source`` (the client's count of sources started)."""
        self.push_source = source
        self.push_stop = None
        self.push_ended = False
        self._push_seen = False
        self._push_suspect = None

    def end_push(self) -> None:
        """The push's source was ended (``video.end``): later errors are not about a push."""
        self.push_source = None
        self._push_suspect = None

    def _push_error(self, error: ServerError) -> None:
        if self.push_source is None or self.push_stop is not None:
            return
        if error.code == "source_busy" or (error.code in PUSH_ENDING and self._push_seen):
            self.push_stop = error
            self._wake()  # a push waiting for decoding progress must stop now
        elif error.code in SOURCE_ENDING:
            self._push_suspect = error

    def _push_status(self, status: VideoStatus) -> None:
        if self.push_source is None:
            return
        if status.source < self.push_source:
            self._push_suspect = None  # that error was about the previous source
            return
        self._push_seen = True
        if status.state == "failed" and self.push_stop is None:
            self.push_stop = (
                self._push_suspect
                or self.source_error
                or ServerError("video_failed", "the video source failed without an error message")
            )
        elif status.state == "ended":
            self.push_ended = True
        self._push_suspect = None

    def _wake(self) -> None:
        """Wake every waiter of :meth:`next_status`; later waiters get a fresh event."""
        event, self._status_event = self._status_event, asyncio.Event()
        event.set()

    async def next_status(self) -> None:
        """Return at the next ``video.status`` (or when a push must stop; waiters re-check
        what they wait for); raise :class:`SessionClosed` once closed."""
        if self.closed is not None:
            raise self.closed
        await self._status_event.wait()
        if self.closed is not None:
            raise self.closed

    def shutdown(self, closed: SessionClosed) -> None:
        """Nothing more will arrive: fail every pending answer and wake every waiter."""
        if self.closed is None:
            self.closed = closed
        for answer in self.answers.values():
            answer._fail(self.closed)
        self.answers.clear()
        self._status_event.set()


def _call(callback: Callable[[Any], object] | None, value: object) -> None:
    if callback is None:
        return
    try:
        callback(value)
    except Exception:  # a user's callback must not kill the receive task
        logger.exception("a streamchat client callback failed")
