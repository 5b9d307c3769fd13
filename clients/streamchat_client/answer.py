"""One streaming answer: an async iterator of text deltas with its outcome.

The session's receive task feeds an :class:`Answer` synchronously and must
never wait on it: a caller that asks and does not read yet must not stall
status updates or other answers. So deltas go into a bounded buffer of
pieces, and when it is full the newest delta is appended to the last piece
instead of queueing another. The buffer never holds more than
``max_pieces`` items and never more text than the answer itself, which the
server caps at ``max_tokens_limit``; the reader still gets every character,
in order, only in fewer, larger pieces.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from .errors import ClientError
from .messages import Done

__all__ = ["Answer"]

DEFAULT_MAX_PIECES = 256


class Answer:
    """The answer to one ``ask``, streaming.

    Iterate it (``async for delta in answer``) to get the text as it arrives,
    or ``await answer.result()`` to wait for the whole of it. Once finished,
    :attr:`text` is the full answer and :attr:`done` the server's
    ``answer.done`` (``finish_reason`` and ``usage``). If the server refuses
    or fails the question, iteration and :meth:`result` raise
    :class:`~streamchat_client.errors.ServerError` (after any text that did
    arrive); if the connection closes first, they raise
    :class:`~streamchat_client.errors.SessionClosed`.
    """

    def __init__(
        self,
        id: str,
        question: str,
        *,
        cancel: Callable[[str], Awaitable[None]],
        max_pieces: int = DEFAULT_MAX_PIECES,
    ) -> None:
        if max_pieces < 1:
            raise ValueError("max_pieces must be at least 1")
        self.id = id
        self.question = question
        self.done: Done | None = None
        """The ``answer.done`` message, once it arrived."""
        self.error: ClientError | None = None
        """Why the answer failed, once it did."""
        self._cancel = cancel
        self._parts: list[str] = []
        self._pieces: deque[str] = deque()
        self._max_pieces = max_pieces
        self._changed = asyncio.Event()
        self._finished = asyncio.Event()
        self._sent: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        state = "finished" if self.finished else "streaming"
        return f"<Answer id={self.id!r} {state} chars={sum(map(len, self._parts))}>"

    @property
    def text(self) -> str:
        """Everything received so far (the whole answer once finished)."""
        return "".join(self._parts)

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    # -- reading ------------------------------------------------------------

    def __aiter__(self) -> Answer:
        return self

    async def __anext__(self) -> str:
        while True:
            if self._pieces:
                return self._pieces.popleft()
            if self._finished.is_set():
                if self.error is not None:
                    raise self.error
                raise StopAsyncIteration
            self._changed.clear()
            await self._changed.wait()

    async def result(self) -> Answer:
        """Wait until the answer is finished and return it; raises as iteration does."""
        await self._finished.wait()
        if self.error is not None:
            raise self.error
        return self

    async def cancel(self) -> None:
        """Ask the server to stop this answer; it then ends with ``finish_reason: cancelled``."""
        if not self.finished:
            await self._cancel(self.id)

    async def sent(self) -> None:
        """Wait until the ``ask`` has been written to the connection (or failed to be)."""
        if self._sent is not None:
            await asyncio.shield(self._sent)

    # -- fed by the session (synchronously, from its receive task) ----------

    def _delta(self, text: str) -> None:
        if self.finished or not text:
            return
        self._parts.append(text)
        if len(self._pieces) >= self._max_pieces:
            self._pieces[-1] += text
        else:
            self._pieces.append(text)
        self._changed.set()

    def _done(self, done: Done) -> None:
        """The ``answer.done`` arrived; a recorded error (``engine_error``) still stands."""
        if self.finished:
            return
        self.done = done
        self._finish()

    def _fail(self, error: ClientError, *, final: bool = True) -> None:
        """Record ``error``; with ``final=False`` an ``answer.done`` is still expected."""
        if self.finished:
            return
        if self.error is None:  # the first reason is the real one
            self.error = error
        if final:
            self._finish()

    def _finish(self) -> None:
        self._finished.set()
        self._changed.set()
