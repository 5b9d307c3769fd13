"""``streamchat-client``: stream a video to a streamchat server and ask about it.

::

    streamchat-client clip.mp4 --ask "What is moving?" --ask "What colour is it?"
    streamchat-client https://example.com/v.webm --realtime --ask "What happens?" --json

A local file is pushed as chunks (as fast as the server decodes, or with
``--realtime`` paced like a live camera); an ``http(s)``/``file:`` URL is
fetched by the server. Without ``--realtime`` the questions are asked once
the whole video is decoded; with it, as soon as a couple of seconds of frames
are in the window, while the video keeps streaming. Answers stream to stdout,
progress goes to stderr; ``--json`` writes one JSON object per line to
stdout instead (the protocol's own ``answer.delta``, ``answer.done``,
``error`` and ``video.status`` maps, with ``answer.done`` also carrying the
question and the whole text).

Exit codes: 0 ok, 1 a server error or failed answer, 2 usage, 3 cannot
connect, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
from collections.abc import Awaitable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO, TypeVar

from .client import DEFAULT_URL, Session, connect
from .errors import ClientError, ConnectError, ServerError, SessionClosed
from .messages import VideoStatus

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3
EXIT_INTERRUPTED = 130

BUFFER_SECONDS = 2.0
"""With ``--realtime``, questions wait for this much video in the window (or the source's end)."""

_URL_SCHEMES = ("http://", "https://", "file:")

_T = TypeVar("_T")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamchat-client",
        description="Stream a video to a streamchat server and ask questions about it.",
    )
    parser.add_argument("source", metavar="SOURCE", help="a local video file, or an http(s) URL")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"session URL (default: {DEFAULT_URL})")
    parser.add_argument(
        "--ask", action="append", default=[], metavar="QUESTION", help="a question (repeatable)"
    )
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument(
        "--realtime",
        action="store_true",
        help="pace a local file like a live camera and ask while it streams",
    )
    pace.add_argument(
        "--fast", action="store_true", help="push as fast as possible, ask at the end (default)"
    )
    parser.add_argument("--fps", type=_positive_float, help="frames sampled per second")
    parser.add_argument("--window-frames", type=_positive_int, help="frames kept in the window")
    parser.add_argument("--max-pixels", type=_positive_int, help="pixel budget per frame")
    parser.add_argument("--max-tokens", type=_positive_int, help="tokens per answer at most")
    parser.add_argument(
        "--format",
        choices=["webm", "matroska", "mp4", "mpegts"],
        help="container hint (default: guessed from the file name, else probed)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        help="give up waiting for video after this many seconds (default: wait)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line on stdout")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line client; return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if not args.source.startswith(_URL_SCHEMES) and not Path(args.source).is_file():
        parser.print_usage(sys.stderr)
        print(f"streamchat-client: error: no such file: {args.source}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(_run(args, _Output(json_lines=args.json)))
    except KeyboardInterrupt:
        # asyncio.run cancelled _run first, so the session was closed on the way out.
        print("streamchat-client: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


class _Output:
    """Where everything the client reports goes: stdout for answers, stderr for the rest."""

    def __init__(self, *, json_lines: bool) -> None:
        self.json_lines = json_lines
        self.out: TextIO = sys.stdout
        self.err: TextIO = sys.stderr
        self.failed = False
        self._live = self.err.isatty() and not json_lines
        self._progress = False
        self._last_state: tuple[int, str] | None = None

    def _line(self, stream: TextIO, text: str) -> None:
        if self._progress:
            self.err.write("\n")
            self._progress = False
        stream.write(text + "\n")
        stream.flush()

    def emit(self, message: dict[str, Any]) -> None:
        self._line(self.out, json.dumps(message, ensure_ascii=False, separators=(",", ":")))

    def info(self, text: str) -> None:
        if not self.json_lines:
            self._line(self.err, text)

    def problem(self, text: str) -> None:
        """Something went wrong on the client's side (not a server ``error``)."""
        self.failed = True
        self._line(self.err, f"streamchat-client: {text}")

    def error(self, error: ServerError) -> None:
        self.failed = True
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

    def status(self, status: VideoStatus) -> None:
        if self.json_lines:
            self.emit({"type": "video.status", **asdict(status)})
            return
        text = (
            f"source {status.source} {status.state}: {status.frames} frames, "
            f"{status.span:.1f} s in the window, decode lag {status.decode_lag:.2f} s"
        )
        if self._live:
            self.err.write("\r\x1b[K" + text)
            self.err.flush()
            self._progress = True
        elif (status.source, status.state) != self._last_state:
            self._line(self.err, text)
        self._last_state = (status.source, status.state)

    def delta(self, id: str, text: str) -> None:
        if self.json_lines:
            self.emit({"type": "answer.delta", "id": id, "text": text})
        else:
            if self._progress:
                self.err.write("\n")
                self._progress = False
            self.out.write(text)
            self.out.flush()


async def _run(args: argparse.Namespace, out: _Output) -> int:
    generation = {"max_tokens": args.max_tokens} if args.max_tokens else None
    try:
        session = await connect(
            args.url,
            fps=args.fps,
            window_frames=args.window_frames,
            max_pixels=args.max_pixels,
            generation=generation,
            on_status=out.status,
            on_error=out.error,
        )
    except ConnectError as exc:
        out.problem(str(exc))
        return EXIT_CONNECT
    except ServerError as exc:
        out.error(exc)
        return EXIT_FAILED
    except ClientError as exc:
        out.problem(str(exc))
        return EXIT_CONNECT
    async with session:
        limits = session.limits
        out.info(
            f"session {session.session_id} on {session.ready.model}: "
            f"{limits.fps:g} fps, {limits.window_frames} frames in the window"
        )
        try:
            await _stream_and_ask(session, args, out)
        except ServerError as exc:
            if any(exc is known for known in session.errors):
                out.failed = True  # already reported by the on_error callback
            else:
                out.error(exc)
        except SessionClosed as exc:
            out.problem(str(exc))
        except TimeoutError:
            out.problem(f"no video after {args.timeout} s")
        except (OSError, ValueError) as exc:
            out.problem(str(exc))
    return EXIT_FAILED if out.failed else EXIT_OK


async def _stream_and_ask(session: Session, args: argparse.Namespace, out: _Output) -> None:
    is_url = args.source.startswith(_URL_SCHEMES)
    if is_url:
        await session.send_url(args.source, format=args.format)
        pusher: asyncio.Task[Any] | None = None
    else:
        pusher = asyncio.create_task(
            session.send_file(args.source, realtime=args.realtime, format=args.format)
        )
    try:
        if args.realtime and args.ask:
            limits = session.limits
            wanted = max(1, min(limits.window_frames, math.ceil(limits.fps * BUFFER_SECONDS)))
            status = await _alongside(session.wait_frames(wanted, timeout=args.timeout), pusher)
        else:
            if pusher is not None:
                await pusher
            status = await session.wait_ended(timeout=args.timeout)
        if status.frames == 0:
            if args.ask:
                out.problem("no frames were decoded: nothing to ask about")
            return
        for question in args.ask:
            await _answer(session, question, out)
    finally:
        if pusher is not None and not pusher.done():
            pusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, ClientError):
                await pusher


async def _alongside(waiting: Awaitable[_T], pusher: asyncio.Task[Any] | None) -> _T:
    """Await ``waiting``, but fail as soon as ``pusher`` does (its error would never be seen)."""
    waiter = asyncio.ensure_future(waiting)
    try:
        while pusher is not None and not pusher.done():
            await asyncio.wait({waiter, pusher}, return_when=asyncio.FIRST_COMPLETED)
            if waiter.done():
                break
        if pusher is not None and not pusher.cancelled():
            failure = pusher.exception()
            if failure is not None:
                raise failure
        return await waiter
    finally:
        waiter.cancel()


async def _answer(session: Session, question: str, out: _Output) -> None:
    answer = session.ask(question)
    out.info(f"» {question}")
    try:
        async for delta in answer:
            out.delta(answer.id, delta)
    except ServerError as exc:
        if not out.json_lines and answer.text:
            out.out.write("\n")
        out.error(exc)
        if answer.done is None:
            return
    if answer.done is None:
        return
    done, usage = answer.done, answer.done.usage
    if out.json_lines:
        out.emit(
            {
                "type": "answer.done",
                "id": answer.id,
                "question": question,
                "text": answer.text,
                "finish_reason": done.finish_reason,
                "usage": asdict(usage),
            }
        )
        return
    out.out.write("\n")
    out.out.flush()
    ttft = usage.time_to_first_token
    out.info(
        f"[{done.finish_reason}: {usage.completion_tokens} tokens, {usage.frames} frames, "
        f"{usage.prompt_tokens} prompt tokens"
        + (f", first token after {ttft:.2f} s]" if ttft is not None else "]")
    )
    if done.finish_reason not in ("stop", "length"):
        out.failed = True
