"""``streamchat-client --interactive``: type questions while the video streams.

Each line read from stdin is a question, asked about the frames in the window
when it is read and answered in turn while the video keeps streaming. A few
lines are commands instead (see :data:`HELP`). Stdin is read by a daemon
thread into a bounded queue — the event loop never blocks on it, and it works
the same for a terminal, a pipe or a file — so a slow answer never stops
``/cancel`` from being read.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Sequence
from typing import TextIO

from .answer import Answer
from .client import Session
from .display import EXIT_SOURCE, Display, print_answer
from .errors import ClientError, ServerError, SessionClosed

__all__ = ["HELP", "LineReader", "run_interactive"]

HELP = (
    "type a question and press Enter; while an answer streams, an empty line or /cancel "
    "stops it; /status shows the video buffer; /quit or end of input (Ctrl-D) ends"
)
QUEUE_LINES = 16
"""Lines read ahead of the command loop; the reader thread waits when they are not taken."""


class LineReader:
    """The lines of a text stream, read by a daemon thread; ``None`` at its end.

    A daemon thread, because a read from a terminal cannot be interrupted: at
    exit it is simply abandoned.
    """

    def __init__(self, stream: TextIO, *, maxsize: int = QUEUE_LINES) -> None:
        self._stream = stream
        self._queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self._read, args=(loop,), name="streamchat-stdin", daemon=True
        )
        self._thread.start()

    async def get(self) -> str | None:
        """The next line without its newline, or ``None`` once the stream has ended."""
        return await self._queue.get()

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        line: str | None
        while True:
            try:
                line = self._stream.readline()
            except (OSError, ValueError):  # closed under us
                line = ""
            item = line.rstrip("\r\n") if line else None
            try:
                # Blocks this thread while the queue is full: the bound holds.
                asyncio.run_coroutine_threadsafe(self._queue.put(item), loop).result()
            except (RuntimeError, asyncio.CancelledError, Exception):
                return  # the loop is gone
            if item is None:
                return


class _Interactive:
    def __init__(self, session: Session, display: Display, timeout: float | None) -> None:
        self.session = session
        self.display = display
        self.timeout = timeout
        self.questions: asyncio.Queue[str | None] = asyncio.Queue(QUEUE_LINES)
        self.current: Answer | None = None
        self.stop = asyncio.Event()
        """Set when the session can go on no longer (it closed, or the video source failed)."""

    async def answer_all(self) -> None:
        while (question := await self.questions.get()) is not None:
            try:
                status = await self.session.wait_frames(1, timeout=self.timeout)
            except ServerError:
                self.display.problem(f"no video to ask about: {question}", code=EXIT_SOURCE)
                continue
            except TimeoutError:
                self.display.problem(f"no video after {self.timeout} s: {question}")
                continue
            if status.frames == 0:
                self.display.problem(f"no frames were decoded to ask about: {question}")
                continue
            try:
                self.current = self.session.ask(question)
            except ValueError as exc:
                self.display.problem(str(exc))
                continue
            try:
                await print_answer(self.current, self.display)
            finally:
                self.current = None

    async def put(self, question: str | None) -> bool:
        """Queue ``question`` for the answerer, waiting for room; ``False`` if the session stops.

        Waiting holds up the command loop only once :data:`QUEUE_LINES` questions are
        waiting, which typing does not reach; a script piping more is slowed down, not lost.
        """
        put = asyncio.ensure_future(self.questions.put(question))
        stopped = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({put, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not put.done():
                put.cancel()
        return put.done() and not put.cancelled()

    async def cancel(self) -> None:
        answer = self.current
        if answer is not None and not answer.finished:
            await answer.cancel()

    async def next_line(self, reader: LineReader) -> str | None:
        """The next line, or ``None`` at the end of input or when the session must stop."""
        line = asyncio.ensure_future(reader.get())
        stopped = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({line, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not line.done():
            line.cancel()
            return None
        return line.result()


async def run_interactive(
    session: Session,
    display: Display,
    reader: LineReader,
    *,
    pusher: asyncio.Task[object] | None = None,
    timeout: float | None = None,
    questions: Sequence[str] = (),
) -> None:
    """Read questions and commands from ``reader`` until ``/quit``, its end, or a dead session.

    ``pusher`` is the task pushing the video, if the client pushes it: when it
    fails, the loop ends (its failure is the caller's to report). At the end
    of input, questions already typed are still answered; ``/quit`` cancels
    the answer in flight and leaves at once. ``questions`` are asked first,
    as if typed.
    """
    state = _Interactive(session, display, timeout)
    if pusher is not None:

        def pushed(task: asyncio.Task[object]) -> None:
            if task.cancelled() or task.exception() is not None:
                state.stop.set()

        pusher.add_done_callback(pushed)
    answerer = asyncio.create_task(state.answer_all(), name="interactive-answers")
    answerer.add_done_callback(lambda _: state.stop.set())
    display.info(HELP)
    quit = False
    try:
        for question in questions:
            await state.put(question)
        while True:
            line = await state.next_line(reader)
            if line is None:
                break
            command = line.strip()
            if command in ("", "/cancel"):
                if state.current is not None:
                    await state.cancel()
                elif command:
                    display.info("no answer to cancel")
            elif command == "/status":
                display.show_status()
            elif command in ("/quit", "/exit"):
                quit = True
                break
            elif command in ("/help", "/?"):
                display.info(HELP)
            elif command.startswith("/"):
                display.info(f"unknown command {command!r}; {HELP}")
            elif not await state.put(command):
                break
        if not quit and not answerer.done():
            # The end of input: answer what was asked, unless the session stops first.
            if await state.put(None):
                await _until(answerer, state.stop)
    except SessionClosed as exc:
        display.problem(str(exc))
    finally:
        if not answerer.done():
            with contextlib.suppress(ClientError):
                await state.cancel()
            answerer.cancel()
        try:
            await answerer
        except asyncio.CancelledError:
            pass
        except SessionClosed as exc:  # the answerer's own failure, reported once here
            display.problem(str(exc))


async def _until(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
