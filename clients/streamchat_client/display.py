"""What the command line client prints: answers on stdout, everything else on stderr.

:class:`Display` is the CLI's only writer. Answers stream to stdout as plain
text, or with ``json_lines`` as one JSON object per line (the protocol's own
``answer.delta``, ``answer.done``, ``error`` and ``video.status`` maps).
Progress — what the client has pushed and what the server has decoded (from
``video.status``) — goes to stderr: one line redrawn in place when stderr is
a terminal, plain lines at changes (and every :data:`PLAIN_EVERY` seconds)
otherwise, nothing with ``quiet``. With ``redraw=False`` (interactive mode,
where a redrawn line would run over what the user types) only changes are
printed, as lines. It also remembers how the run went, for
the exit code.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict
from typing import Any, TextIO

from .answer import Answer
from .errors import ServerError
from .inbox import SOURCE_ENDING
from .messages import Ready, VideoStatus
from .sources import PushStats

__all__ = ["EXIT_CONNECT", "EXIT_FAILED", "EXIT_OK", "EXIT_SOURCE", "Display", "print_answer"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONNECT = 3
EXIT_SOURCE = 4

REDRAW_EVERY = 0.1
"""A terminal's progress line is redrawn at most this often (unless the state changes)."""
PLAIN_EVERY = 5.0
"""Without a terminal, a progress line is printed at most this often (and at every change)."""


class Display:
    """Where everything the client reports goes, and how the run went."""

    def __init__(
        self,
        *,
        json_lines: bool = False,
        quiet: bool = False,
        redraw: bool = True,
        out: TextIO | None = None,
        err: TextIO | None = None,
    ) -> None:
        self.json_lines = json_lines
        self.quiet = quiet
        self.out: TextIO = out or sys.stdout
        self.err: TextIO = err or sys.stderr
        self.exit_code = EXIT_OK
        self._live = redraw and self.err.isatty() and not json_lines and not quiet
        self._periodic = redraw
        self._progress = False  # a progress line is on screen, not yet ended by a newline
        self._answering = False  # an answer's text is on stdout without its final newline
        self._status: VideoStatus | None = None
        self._pushed: PushStats | None = None
        self._last_state: tuple[int, str] | None = None
        self._last_drawn = 0.0
        self._told: tuple[str, str | None] | None = None  # the push whose route was told

    # -- outcome ------------------------------------------------------------

    def fail(self, code: int = EXIT_FAILED) -> None:
        """Record a failure; a video source failure outranks other failures."""
        if self.exit_code in (EXIT_OK, EXIT_FAILED):
            self.exit_code = code

    # -- writing ------------------------------------------------------------

    def _end_progress(self) -> None:
        if self._progress:
            self.err.write("\n")
            self._progress = False

    def _line(self, stream: TextIO, text: str) -> None:
        self._end_progress()
        if self._answering and stream is self.err:
            self.out.write("\n")
            self.out.flush()
            self._answering = False
        stream.write(text + "\n")
        stream.flush()

    def emit(self, message: dict[str, Any]) -> None:
        self._line(self.out, json.dumps(message, ensure_ascii=False, separators=(",", ":")))

    def info(self, text: str) -> None:
        """A remark for people (suppressed by ``quiet`` and ``json_lines``)."""
        if not self.json_lines and not self.quiet:
            self._line(self.err, text)

    def problem(self, text: str, *, code: int = EXIT_FAILED) -> None:
        """Something went wrong on the client's side (not a server ``error``)."""
        self.fail(code)
        self._line(self.err, f"streamchat-client: {text}")

    def error(self, error: ServerError) -> None:
        self.fail(EXIT_SOURCE if error.code in SOURCE_ENDING else EXIT_FAILED)
        if self.json_lines:
            self.emit(
                {
                    "type": "error",
                    "code": error.code,
                    "message": error.message,
                    "id": error.id,
                    "fatal": error.fatal,
                }
            )
        else:
            about = f" (answer {error.id})" if error.id else ""
            self._line(self.err, f"server error{about}: {error.code}: {error.message}")

    def ready(self, ready: Ready) -> None:
        """The session is open: its model and the limits that matter for asking."""
        if self.json_lines:
            self.emit(
                {
                    "type": "ready",
                    "session": ready.session,
                    "model": ready.model,
                    "protocol": ready.protocol,
                    "limits": asdict(ready.limits),
                }
            )
            return
        limits = ready.limits
        text = (
            f"session {ready.session} on {ready.model}: "
            f"{limits.fps:g} fps, {limits.window_frames} frames in the window"
        )
        if limits.max_ask_frames:  # 0 or None: not told
            text += f", at most {limits.max_ask_frames} per question"
        if limits.tokens_per_frame:
            text += f", {limits.tokens_per_frame} tokens a frame"
        self.info(text)

    # -- answers ------------------------------------------------------------

    def delta(self, id: str, text: str) -> None:
        if self.json_lines:
            self.emit({"type": "answer.delta", "id": id, "text": text})
            return
        self._end_progress()
        self.out.write(text)
        self.out.flush()
        self._answering = True

    def end_answer(self) -> None:
        """The answer's text is complete: end its line."""
        if self._answering:
            self.out.write("\n")
            self.out.flush()
            self._answering = False

    # -- progress -----------------------------------------------------------

    def status(self, status: VideoStatus) -> None:
        """Take a ``video.status`` (the session's ``on_status`` callback)."""
        self._status = status
        if self.json_lines:
            self.emit({"type": "video.status", **asdict(status)})
            return
        changed = (status.source, status.state) != self._last_state
        self._last_state = (status.source, status.state)
        self._draw(changed)

    def pushed(self, stats: PushStats) -> None:
        """Take the client's own push progress (a push's ``on_progress`` callback)."""
        self._pushed = stats
        if self.json_lines:
            return
        if self._told != (stats.source, stats.container):
            self._told = (stats.source, stats.container)
            self.info(f"pushing {stats.source}: {route(stats)}")
        self._draw(False)

    def progress_text(self) -> str:
        """The progress line: what the server decoded, then what the client sent."""
        parts = []
        status = self._status
        if status is not None:
            size = ""
            if status.width is not None and status.height is not None:
                size = f", {status.width}x{status.height}"  # as the model gets them
            parts.append(
                f"source {status.source} {status.state}: {status.frames} frames "
                f"({status.span:.1f} s buffered{size}), decode lag {status.decode_lag:.2f} s, "
                f"{_size(status.backlog_bytes)} undecoded"
            )
        pushed = self._pushed
        if pushed is not None:
            sent = f"sent {_size(pushed.bytes_sent)}"
            if pushed.packets:
                sent += f", {pushed.packets} packets"
            else:
                sent += f" in {pushed.chunks} chunks"
            if pushed.media_seconds:
                sent += f", {pushed.media_seconds:.1f} s of video"
            parts.append(sent)
        return " | ".join(parts) or "no video yet"

    def show_status(self) -> None:
        """Print the progress line now, as a line of its own (the ``/status`` command)."""
        if self.json_lines:
            if self._status is not None:
                self.emit({"type": "video.status", **asdict(self._status)})
            return
        self._line(self.err, self.progress_text())

    def _draw(self, changed: bool) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if self._live:
            if not changed and now - self._last_drawn < REDRAW_EVERY:
                return
            if self._answering:
                return  # never draw into an answer's line; the next status redraws
            # One screen line: a wrapped line could not be redrawn in place.
            width = shutil.get_terminal_size().columns - 1
            self.err.write("\r\x1b[K" + self.progress_text()[:width])
            self.err.flush()
            self._progress = True
        else:
            if not changed and (not self._periodic or now - self._last_drawn < PLAIN_EVERY):
                return
            if self._answering:
                return
            self._line(self.err, self.progress_text())
        self._last_drawn = now


_CONTAINERS = {"mp4": "fragmented MP4", "matroska": "Matroska", "webm": "WebM", "mpegts": "MPEG-TS"}


def route(stats: PushStats) -> str:
    """How a push's video travels, for people: ``"h264, remuxed into fragmented MP4"``."""
    codec = stats.codec or "video"
    container = _CONTAINERS.get(stats.container or "", stats.container or "a probed container")
    if stats.reencoded:
        return f"{codec}, re-encoded into {container}"
    if stats.remuxed:
        return f"{codec}, remuxed into {container} without re-encoding"
    return f"{codec} in {container}, as it is"


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KB", "MB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


async def print_answer(answer: Answer, display: Display) -> None:
    """Stream ``answer`` to ``display`` as it arrives, then its outcome."""
    display.info(f"» {answer.question}")
    try:
        async for delta in answer:
            display.delta(answer.id, delta)
    except ServerError as exc:
        display.end_answer()
        display.error(exc)
        if answer.done is None:
            return
    if answer.done is None:
        return
    done, usage = answer.done, answer.done.usage
    if display.json_lines:
        display.emit(
            {
                "type": "answer.done",
                "id": answer.id,
                "question": answer.question,
                "text": answer.text,
                "finish_reason": done.finish_reason,
                "usage": asdict(usage),
            }
        )
    else:
        display.end_answer()
        ttft = usage.time_to_first_token
        display.info(
            f"[{done.finish_reason}: {usage.completion_tokens} tokens, {usage.frames} frames, "
            f"{usage.prompt_tokens} prompt tokens"
            + (f" ({usage.cached_tokens} cached)" if usage.cached_tokens else "")
            + (f", first token after {ttft:.2f} s]" if ttft is not None else "]")
        )
    if done.finish_reason not in ("stop", "length", "cancelled"):
        display.fail()
