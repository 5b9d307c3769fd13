"""``streamchat-client``: stream a video to a streamchat server and ask about it.

::

    streamchat-client clip.mp4 --ask "What is moving?" --ask "What colour is it?"
    streamchat-client https://example.com/v.webm --ask "What happens?" --json
    streamchat-client --device /dev/video0 -i
    streamchat-client --live rtsp://camera.local/stream --ask "Anyone at the door?"

Where the video comes from decides how it travels:

* a local file is pushed as it is when the server can read it as a stream,
  else remuxed here without re-encoding (an MP4 with its index at the end,
  AVI, ...); as fast as the server decodes, or with ``--realtime`` paced
  like a live camera;
* an ``http(s)``/``file:`` URL is fetched by the server (``video.url``), or,
  with ``--push``, read here with PyAV and pushed;
* ``--device DEV`` (a camera, ``v4l2`` by default on Linux) and ``--live SRC``
  (anything PyAV opens: RTSP, HLS, a file played at its own pace) are read
  here with PyAV, remuxed and pushed as they are produced.

Without ``--realtime`` a file's questions are asked once it is all decoded;
live sources, ``--realtime`` and ``-i/--interactive`` ask as soon as a
couple of seconds of frames are in the window, while the video streams.
Answers go to stdout, progress to stderr (``--quiet`` silences it);
``--json`` writes one JSON object per line to stdout instead. Exit codes are
listed in :data:`EPILOG`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sys
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import TypeVar

from .client import DEFAULT_URL, Session, connect
from .display import EXIT_CONNECT, EXIT_FAILED, EXIT_OK, EXIT_SOURCE, Display, print_answer
from .errors import ClientError, ServerError, SessionClosed, SourceError
from .interactive import LineReader, run_interactive

__all__ = ["EXIT_USAGE", "EXIT_INTERRUPTED", "build_parser", "main"]

API_KEY_ENV = "STREAMCHAT_API_KEY"

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
assert (EXIT_OK, EXIT_FAILED, EXIT_CONNECT, EXIT_SOURCE) == (0, 1, 3, 4)

BUFFER_SECONDS = 2.0
"""When asking while the video streams, questions wait for this much video in the window
(or the source's end)."""

EPILOG = """\
sources:
  FILE                  a local file, pushed as it is when the server can read it as a
                        stream, else remuxed here (MP4 index at the end, AVI, ...)
  http(s)://... file:   fetched by the server; with --push read here (PyAV) and pushed
  --device DEV          a camera (v4l2 on Linux unless --input-format says otherwise)
  --live SRC            anything PyAV opens (rtsp://, an HLS playlist, a file played at
                        its own pace), remuxed here and pushed as it is produced

interactive mode (-i): each line is a question, answered while the video streams;
  an empty line or /cancel stops the answer in flight, /status shows the video
  buffer, /quit or end of input ends.

exit codes:
  0    every answer finished
  1    a server error or a failed answer
  2    usage error (bad arguments, no such file)
  3    cannot connect to the server (or it refused the session)
  4    the video source failed: cannot be opened or read here, or the server
       could not fetch or decode it, or ended or refused it while it was pushed
  130  interrupted (Ctrl-C)
"""

_URL_SCHEMES = ("http://", "https://", "file:")
_PUSHABLE_SCHEMES = ("http://", "https://")

_T = TypeVar("_T")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamchat-client",
        description="Stream a video to a streamchat server and ask questions about it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "source", metavar="SOURCE", nargs="?", help="a local video file, or an http(s) URL"
    )
    live = parser.add_argument_group("live sources (read with PyAV)")
    live.add_argument("--device", metavar="DEV", help="a camera device, e.g. /dev/video0")
    live.add_argument("--live", metavar="SRC", help="any input PyAV opens, pushed as it plays")
    live.add_argument("--push", action="store_true", help="read an http(s) SOURCE here and push it")
    live.add_argument(
        "--input-format", metavar="FMT", help="PyAV/FFmpeg input format (v4l2, avfoundation, ...)"
    )
    live.add_argument(
        "--input-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=_key_value,
        help="PyAV/FFmpeg input option, e.g. video_size=640x480 (repeatable)",
    )
    live.add_argument(
        "--duration", type=_positive_float, metavar="SECONDS", help="stop after this much video"
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"session URL (default: {DEFAULT_URL})")
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help="API key for servers that require one (default: $STREAMCHAT_API_KEY)",
    )
    parser.add_argument(
        "--ask", action="append", default=[], metavar="QUESTION", help="a question (repeatable)"
    )
    parser.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="read questions from stdin while the video streams",
    )
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument(
        "--realtime",
        action="store_true",
        help="pace a file like a live camera and ask while it streams",
    )
    pace.add_argument(
        "--fast", action="store_true", help="push as fast as possible, ask at the end (default)"
    )
    parser.add_argument("--fps", type=_positive_float, help="frames sampled per second")
    parser.add_argument("--window-frames", type=_positive_int, help="frames kept in the window")
    parser.add_argument("--max-pixels", type=_positive_int, help="pixel budget per frame")
    parser.add_argument(
        "--keyframes-only",
        action="store_true",
        help="have the server decode keyframes only (much faster; about a frame per keyframe)",
    )
    parser.add_argument(
        "--context",
        choices=["window", "timeline"],
        help="how questions reach the model: the window as one new video each, or appended to "
        "the session's timeline (costs only what is new); default: the server's",
    )
    parser.add_argument("--max-tokens", type=_positive_int, help="tokens per answer at most")
    parser.add_argument(
        "--choices",
        type=_choices,
        metavar="A,B,...",
        help="every answer is exactly one of these comma-separated strings (e.g. yes,no)",
    )
    parser.add_argument(
        "--format",
        choices=["webm", "matroska", "mp4", "mpegts", "avi"],
        help="container hint for a file sent as it is, or a URL (default: what PyAV finds in "
        "a file, else probed)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        help="give up waiting for video after this many seconds (default: wait)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line on stdout")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return parser


def _choices(text: str) -> list[str]:
    choices = [choice.strip() for choice in text.split(",")]
    if len(choices) < 2 or not all(choices):
        raise argparse.ArgumentTypeError(f"give two or more comma-separated strings: {text!r}")
    return choices


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


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE: {text!r}")
    return key, value


def _default_device_format() -> str | None:
    if sys.platform.startswith("linux"):
        return "v4l2"
    if sys.platform == "darwin":
        return "avfoundation"
    if sys.platform == "win32":
        return "dshow"
    return None


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """Why ``args`` make no sense together, or ``None``; fills in what the source implies."""
    given = [name for name in ("source", "device", "live") if getattr(args, name)]
    if len(given) != 1:
        return "give exactly one of SOURCE, --device DEV or --live SRC"
    args.kind = "file"
    if args.device:
        args.kind, args.live_source = "live", args.device
        if args.input_format is None:
            args.input_format = _default_device_format()
    elif args.live:
        args.kind, args.live_source = "live", args.live
    elif args.source.startswith(_URL_SCHEMES):
        args.kind = "url"
        if args.push:
            if not args.source.startswith(_PUSHABLE_SCHEMES):
                return "--push takes an http(s) URL"
            args.kind, args.live_source = "live", args.source
    elif not Path(args.source).is_file():
        return f"no such file: {args.source}"
    if args.push and args.kind != "live":
        return "--push takes an http(s) URL"
    if args.kind != "live" and (args.input_format or args.input_option or args.duration):
        return "--input-format, --input-option and --duration are for --device, --live, --push"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line client; return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    problem = _check(parser, args)
    if problem is not None:
        parser.print_usage(sys.stderr)
        print(f"streamchat-client: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    display = Display(json_lines=args.json, quiet=args.quiet, redraw=not args.interactive)
    try:
        return asyncio.run(_run(args, display))
    except KeyboardInterrupt:
        # asyncio.run cancelled _run first, so the session was closed on the way out.
        print("streamchat-client: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


async def _run(args: argparse.Namespace, display: Display) -> int:
    given = {"max_tokens": args.max_tokens, "choices": args.choices}
    generation = {name: value for name, value in given.items() if value} or None
    try:
        session = await connect(
            args.url,
            fps=args.fps,
            window_frames=args.window_frames,
            max_pixels=args.max_pixels,
            keyframes_only=args.keyframes_only,
            context=args.context,
            generation=generation,
            on_status=display.status,
            on_error=display.error,
            api_key=args.api_key,
        )
    except ServerError as exc:
        display.error(exc)
        if exc.code == "unauthorized":
            display.problem(f"give the key with --api-key or ${API_KEY_ENV}", code=EXIT_CONNECT)
        display.fail(EXIT_CONNECT)
        return EXIT_CONNECT
    except ClientError as exc:
        display.problem(str(exc), code=EXIT_CONNECT)
        return EXIT_CONNECT
    async with session:
        display.ready(session.ready)
        try:
            await _stream_and_ask(session, args, display)
        except ServerError as exc:
            if any(exc is known for known in session.errors):
                pass  # already reported by the on_error callback
            else:
                display.error(exc)
        except SourceError as exc:
            if exc.error is not None and any(exc.error is known for known in session.errors):
                display.fail(EXIT_SOURCE)  # the server's reason is already on screen
            else:
                display.problem(str(exc), code=EXIT_SOURCE)
        except SessionClosed as exc:
            display.problem(str(exc))
        except TimeoutError:
            display.problem(f"no video after {args.timeout} s")
        except (OSError, ValueError) as exc:
            display.problem(str(exc))
    return display.exit_code


def _start_push(
    session: Session, args: argparse.Namespace, display: Display
) -> asyncio.Task[object]:
    if args.kind == "live":
        pace = True if args.realtime else False if args.fast else None
        return asyncio.create_task(
            session.stream_live(
                args.live_source,
                input_format=args.input_format,
                options=dict(args.input_option),
                duration=args.duration,
                pace=pace,
                on_progress=display.pushed,
            ),
            name="push-live",
        )
    return asyncio.create_task(
        session.send_file(
            args.source, realtime=args.realtime, format=args.format, on_progress=display.pushed
        ),
        name="push-file",
    )


async def _stream_and_ask(session: Session, args: argparse.Namespace, display: Display) -> None:
    pusher: asyncio.Task[object] | None = None
    if args.kind == "url":
        await session.send_url(args.source, format=args.format)
    else:
        pusher = _start_push(session, args, display)
    try:
        if args.interactive:
            reader = LineReader(sys.stdin)
            reader.start()
            await run_interactive(
                session, display, reader, pusher=pusher, timeout=args.timeout, questions=args.ask
            )
            if pusher is not None and pusher.done() and not pusher.cancelled():
                pusher.result()  # the source's failure, reported by the caller
            return
        # A pushed URL is treated like a file: asked about at its end unless --realtime.
        streaming = args.realtime or (args.kind == "live" and not args.push)
        if not args.ask:
            if pusher is not None:
                await pusher
            await session.wait_ended(timeout=args.timeout)
            return
        if streaming:
            limits = session.limits
            wanted = max(1, min(limits.window_frames, math.ceil(limits.fps * BUFFER_SECONDS)))
            status = await _alongside(session.wait_frames(wanted, timeout=args.timeout), pusher)
        else:
            if pusher is not None:
                await pusher
            status = await session.wait_ended(timeout=args.timeout)
        if status.frames == 0:
            display.problem("no frames were decoded: nothing to ask about")
            return
        for question in args.ask:
            await print_answer(session.ask(question), display)
        if pusher is not None and pusher.done() and not pusher.cancelled():
            pusher.result()
    finally:
        if pusher is not None and not pusher.done():
            pusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, ClientError):
                await pusher


async def _alongside(waiting: Awaitable[_T], pusher: asyncio.Task[object] | None) -> _T:
    """Await ``waiting``, but fail as soon as ``pusher`` does (its error would never be seen)."""
    waiter = asyncio.ensure_future(waiting)
    try:
        while pusher is not None and not pusher.done():
            await asyncio.wait({waiter, pusher}, return_when=asyncio.FIRST_COMPLETED)
            if waiter.done():
                break
        if pusher is not None and not pusher.cancelled():
            failure = pusher.exception() if pusher.done() else None
            if failure is not None:
                raise failure
        return await waiter
    finally:
        waiter.cancel()
