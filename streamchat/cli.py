"""``streamchat serve``: flags -> Settings (+ vLLM engine args) -> uvicorn.

Each of streamchat's own ``serve`` flags can also come from the environment
as ``STREAMCHAT_<FLAG>`` (``--max-sessions`` is ``STREAMCHAT_MAX_SESSIONS``;
``true``/``false`` for switches, commas between the values of repeatable
flags), as a container image or a compose file sets them; a flag on the
command line wins (a repeatable one adds to the environment's values).

streamchat's own flags cover the session window and limits. Every other flag
is handed to vLLM's own engine-argument parser, so ``--model``,
``--max-model-len``, ``--tensor-parallel-size`` and the rest mean exactly
what they mean to ``vllm serve``. ``--tiny-model`` builds (once, offline) and
serves the small random test model: a smoke run that needs no download.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import CONTEXT_CHOICES, DEFAULT_MODEL, Settings
from .engine.remote import (
    DEFAULT_ENGINE_TIMEOUT,
    DEFAULT_FRAME_FORMAT,
    FAMILIES,
    parse_frame_format,
)
from .ingest import parse_allowed_domain
from .logformat import FORMATS, configure

__all__ = ["build_parser", "main", "settings_from_args"]

logger = logging.getLogger("streamchat.cli")

API_KEYS_ENV = "STREAMCHAT_API_KEYS"
ENV_PREFIX = "STREAMCHAT_"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}

DEFAULT_TINY_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / (
    "streamchat/tiny-qwen2-vl"
)


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The command line; with ``environ``, ``serve``'s defaults taken from its ``STREAMCHAT_*``."""
    parser = argparse.ArgumentParser(prog="streamchat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"streamchat {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="start the server",
        epilog="Any other flag is a vLLM engine argument (see --help-engine), e.g. "
        "--max-model-len 4096 --tensor-parallel-size 2.",
    )
    serve.add_argument("--model", default=None, help=f"model path or name ({DEFAULT_MODEL})")
    serve.add_argument(
        "--tiny-model",
        action="store_true",
        help="serve a tiny random model built offline (a smoke run, no download)",
    )
    serve.add_argument(
        "--engine",
        choices=("vllm", "fake"),
        default="vllm",
        help="'fake' answers from a script: protocol demos and ingest benchmarks",
    )
    serve.add_argument("--help-engine", action="store_true", help="list vLLM's engine flags")
    remote = serve.add_argument_group("remote engine (no local vLLM)")
    remote.add_argument(
        "--engine-url",
        default=None,
        metavar="URL",
        help="answer with the vLLM server (or router) whose OpenAI API is at URL "
        "(http://HOST:PORT/v1); --model then names its served model (default: its first)",
    )
    remote.add_argument(
        "--engine-key", default=None, metavar="KEY", help="the remote engine's API key"
    )
    remote.add_argument(
        "--engine-timeout",
        type=float,
        default=DEFAULT_ENGINE_TIMEOUT,
        metavar="S",
        help="seconds the remote engine may send nothing before an answer fails "
        "(default: %(default)s)",
    )
    remote.add_argument(
        "--engine-frame-format",
        type=_frame_format,
        default=DEFAULT_FRAME_FORMAT,
        metavar="ppm|jpeg:Q",
        help="how frames travel: lossless 'ppm', or 'jpeg:Q' (4:4:4, quality Q) for slow "
        "links (default: %(default)s)",
    )
    remote.add_argument(
        "--engine-family",
        choices=FAMILIES,
        default=None,
        help="the remote model's family, when its config is not readable here (default: "
        "from the served model's config.json, if its path is local)",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--log-level", default="info")
    serve.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text",
        help="'json': one JSON object a line (streamchat's, uvicorn's and vLLM's lines)",
    )
    group = serve.add_argument_group("session limits")
    defaults = Settings()
    for name, kind, help_text in (
        ("fps", float, "default frames sampled per second of video"),
        ("max_fps", float, "largest fps a client may ask for"),
        ("window_frames", int, "default frames kept per session"),
        ("max_window_frames", int, "largest window a client may ask for"),
        ("window_bytes", int, "pixel bytes kept per session"),
        ("max_pixels", int, "pixel budget per frame given to the model"),
        ("min_pixels", int, "smallest frame given to the model"),
        ("frame_factor", int, "frame sides are multiples of this; default: the model's"),
        ("max_decode_pixels", int, "refuse source video larger than this"),
        ("max_message_bytes", int, "largest client message"),
        ("feed_bytes", int, "undecoded bytes buffered per source"),
        ("video_read_timeout", float, "seconds a source may stall"),
        ("max_concurrent_asks", int, "answers in flight per session"),
        ("max_tokens", int, "default generated tokens per answer"),
        ("max_tokens_limit", int, "largest max_tokens a client may ask for"),
        ("history_turns", int, "earlier turns replayed with each question"),
        ("context_reserve", int, "context tokens kept for the question and history"),
        ("fetch_timeout", float, "seconds a URL fetch may wait for the server"),
        ("fetch_max_bytes", int, "largest video fetched from a URL"),
        ("fetch_max_redirects", int, "redirects followed per URL, each one checked"),
        ("max_source_seconds", float, "longest video per source, in video time"),
        ("max_source_frames", int, "most frames per source"),
        ("max_index_samples", int, "most MP4 index entries per source (all tracks)"),
        ("decoder_threads", int, "FFmpeg threads per video decoder"),
        ("decode_memory_bytes", int, "decoder memory of all decoders; default: 1/4 of RAM"),
        ("decode_memory_wait", float, "seconds a decoder waits for room in it"),
        ("max_dns_lookups", int, "DNS lookups running at once (one per session)"),
        ("max_sessions", int, "sessions open at once; more get HTTP 503"),
        ("max_sessions_per_client", int, "sessions open at once per API key or address"),
        ("max_pending_sessions", int, "connections yet to authenticate (not in max_sessions)"),
        ("max_pending_per_address", int, "of those, per address; more get HTTP 503"),
        ("hello_timeout", float, "seconds to send a valid hello (with the key if needed)"),
        ("messages_per_second", float, "sustained client messages per second per session"),
        ("message_burst", int, "client messages allowed at once"),
        ("video_bytes_per_second", int, "pushed video bytes per second per session"),
        ("idle_timeout", float, "seconds a session may sit with nothing to do"),
        ("send_timeout", float, "seconds a client may leave messages unread"),
        ("ping_interval", float, "seconds between WebSocket pings"),
        ("ping_timeout", float, "seconds a ping may wait for its pong"),
        ("shutdown_timeout", float, "seconds answers may finish after SIGTERM"),
        ("max_request_bytes", int, "largest OpenAI-compatible request body (HTTP 413)"),
        ("max_request_videos", int, "videos per OpenAI-compatible request"),
        ("max_request_images", int, "images per OpenAI-compatible request"),
        ("requests_per_second", float, "OpenAI-compatible requests per second per client"),
        ("request_burst", int, "OpenAI-compatible requests a client may send at once"),
        ("video_cache_bytes", int, "decoded videos kept for repeated requests"),
        ("max_media_decodes", int, "videos and images of requests decoded at once"),
        ("max_data_url_bytes", int, "largest data: URL, decoded"),
        ("max_data_url_frames", int, "most JPEG frames in a data:video/jpeg URL"),
        ("max_image_bytes", int, "largest image fetched or given"),
    ):
        group.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=getattr(defaults, name),
            help=f"{help_text} (default: %(default)s)",
        )
    group.add_argument(
        "--context",
        choices=CONTEXT_CHOICES,
        default=defaults.context,
        help="how a session's asks reach the model unless its hello chooses: 'window' (the "
        "window as one new video per ask), 'timeline' (appended to the session's timeline: an "
        "ask costs what is new) or 'auto', the model's own (default: %(default)s)",
    )
    group.add_argument(
        "--timeline-slack",
        type=_frames,
        default=defaults.timeline_slack,
        metavar="FRAMES",
        help="frames a timeline holds beyond the window before it is rebased (default: half "
        "the session's window, even, at least 4; 0: rebase whenever the window moved)",
    )
    group.add_argument(
        "--allowed-file-dir",
        type=Path,
        default=None,
        help="serve file: URLs from below this directory (off by default)",
    )
    group.add_argument(
        "--fetch-allow-private",
        action="store_true",
        help="let URLs reach loopback, private and other non-global addresses",
    )
    group.add_argument(
        "--fetch-allowed-domain",
        dest="fetch_allowed_domains",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        type=_allowed_domain,
        help="only fetch URLs from this host and its subdomains, on this port or else the "
        "scheme's default (repeatable)",
    )
    access = serve.add_argument_group("access")
    access.add_argument(
        "--api-keys-file",
        type=Path,
        default=None,
        help="require one of the keys in this file (one per line, re-read on change); "
        f"keys may also come from ${API_KEYS_ENV} (comma-separated)",
    )
    access.add_argument(
        "--allow-origin",
        dest="allowed_origins",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="browser origin allowed to open sessions, or '*' (repeatable; default: same origin)",
    )
    access.add_argument(
        "--metrics-auth",
        action="store_true",
        help="GET /metrics needs an API key as a Bearer token (default: open)",
    )

    if environ is not None:
        _defaults_from(environ, serve)

    tiny = commands.add_parser("build-tiny-model", help="build the tiny random test model")
    tiny.add_argument("path", type=Path, nargs="?", default=DEFAULT_TINY_DIR)
    return parser


def _defaults_from(environ: Mapping[str, str], serve: argparse.ArgumentParser) -> None:
    """``serve``'s flags given as ``STREAMCHAT_<FLAG>``, parsed and checked as the flag would be.

    A bad value stops the command at once, naming the variable. A ``STREAMCHAT_*``
    variable that names no flag (a typo would otherwise be ignored in silence) is
    kept in ``unknown_environment`` for :func:`_serve` to warn about.
    """
    known = {API_KEYS_ENV}
    for action in serve._actions:
        flags = [flag for flag in action.option_strings if flag.startswith("--")]
        if not flags or action.dest in ("help", "help_engine"):
            continue
        name = ENV_PREFIX + flags[0][2:].upper().replace("-", "_")
        known.add(name)
        if name in environ:
            try:
                value = _parse_value(action, environ[name])
            except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
                serve.error(f"${name}: {exc}")
            serve.set_defaults(**{action.dest: value})
    unknown = sorted(name for name in environ if name.startswith(ENV_PREFIX) and name not in known)
    serve.set_defaults(unknown_environment=tuple(unknown))


def _parse_value(action: argparse.Action, raw: str) -> Any:
    if isinstance(action, argparse._StoreTrueAction):
        if raw.strip().lower() not in _TRUE | _FALSE:
            raise ValueError(f"{raw!r} is not true or false")
        return raw.strip().lower() in _TRUE
    repeated = isinstance(action, argparse._AppendAction)
    raws = [part.strip() for part in raw.split(",") if part.strip()] if repeated else [raw]
    values = [action.type(part) if callable(action.type) else part for part in raws]
    if action.choices is not None:
        for value in values:
            if value not in action.choices:
                raise ValueError(f"{value!r} is not one of {', '.join(map(str, action.choices))}")
    return values if repeated else values[0]


def _frames(raw: str) -> int:
    """A count of frames, 0 or more."""
    count = int(raw)
    if count < 0:
        raise argparse.ArgumentTypeError(f"{raw} is not 0 or more frames")
    return count


def _frame_format(raw: str) -> str:
    try:
        return parse_frame_format(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _allowed_domain(entry: str) -> str:
    """An allowlist entry checked at start-up: a wrong one would silently allow nothing."""
    try:
        parse_allowed_domain(entry)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return entry


def settings_from_args(
    args: argparse.Namespace, model: str, environ: Mapping[str, str] = os.environ
) -> Settings:
    fields = {name for name in Settings.__dataclass_fields__ if name != "model"}
    values: dict[str, Any] = {k: v for k, v in vars(args).items() if k in fields}
    for name in ("fetch_allowed_domains", "allowed_origins"):
        values[name] = tuple(values.get(name, ()))
    keys = environ.get(API_KEYS_ENV, "")
    values["api_keys"] = frozenset(k.strip() for k in keys.split(",") if k.strip())
    return Settings(model=model, **values)


def _engine_factory(args: argparse.Namespace, settings: Settings, rest: Sequence[str]) -> Any:
    model = settings.model
    if args.engine == "fake":
        from .engine.fake import FakeEngine

        @contextlib.asynccontextmanager
        async def fake() -> AsyncIterator[FakeEngine]:
            yield FakeEngine(model_name=model)

        return fake
    if args.engine_url:
        from .engine.remote import open_remote_engine

        options = {
            "key": args.engine_key,
            "model": args.model,
            "family": args.engine_family,
            "timeout": args.engine_timeout,
            "frame_format": args.engine_frame_format,
        }
        return lambda: open_remote_engine(args.engine_url, **options)

    from .engine.vllm import engine_args_from_cli, media_limits, open_vllm_engine

    engine_args = engine_args_from_cli([*rest, "--model", model])
    engine_args.limit_mm_per_prompt = media_limits(
        engine_args.limit_mm_per_prompt,
        videos=settings.max_request_videos,
        images=settings.max_request_images,
    )
    return lambda: open_vllm_engine(engine_args)


def _serve(args: argparse.Namespace, rest: Sequence[str]) -> int:
    if args.help_engine:
        from .engine.vllm import engine_args_from_cli

        engine_args_from_cli(["--help"])
        return 0
    if (args.engine == "fake" or args.engine_url) and rest:
        print(f"streamchat: unknown flags {' '.join(rest)}", file=sys.stderr)
        return 2
    if args.engine_url and args.tiny_model:
        print("streamchat: --tiny-model is for a local engine, not --engine-url", file=sys.stderr)
        return 2
    from .serving import GracefulServer, listening_socket, server_config

    # Bound before anything slow (vLLM's import, the model, the engine: 20-60 s), so that a
    # port in use is said at once; clients that connect meanwhile wait in the kernel's queue.
    # The socket stays open until the process ends.
    try:
        sock = listening_socket(args.host, args.port)
    except OSError as exc:
        logger.error(
            "cannot listen on %s port %d: %s (another server there? choose one with --port)",
            args.host,
            args.port,
            exc.strerror or exc,
        )
        return 1
    model = args.model or ("remote" if args.engine_url else DEFAULT_MODEL)
    if args.tiny_model:
        from .engine.tiny_model import build_tiny_model

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        logger.info("tiny model: building it offline unless it is built already")
        model = str(build_tiny_model(DEFAULT_TINY_DIR))
    settings = settings_from_args(args, model)

    from .app import create_app
    from .media import map_large_blocks

    map_large_blocks()  # freed FFmpeg tables go back to the kernel, not to arenas
    logger.info(
        "listening on %s port %d; loading model %s (%s engine): sessions are served once "
        "it has loaded",
        args.host,
        sock.getsockname()[1],
        model,
        "remote" if args.engine_url else args.engine,
    )
    app = create_app(settings, engine_factory=_engine_factory(args, settings, rest))
    options: dict[str, Any] = {"log_config": None} if args.log_format == "json" else {}
    config = server_config(
        app, settings, host=args.host, port=args.port, log_level=args.log_level, **options
    )
    GracefulServer(config, app).run(sockets=[sock])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(os.environ)
    args, rest = parser.parse_known_args(argv)
    configure(getattr(args, "log_format", "text"), getattr(args, "log_level", "info"))
    for name in getattr(args, "unknown_environment", ()):
        logger.warning("$%s names no streamchat serve flag: ignored", name)
    if args.command == "build-tiny-model":
        from .engine.tiny_model import build_tiny_model

        print(build_tiny_model(args.path))
        return 0
    if args.command == "serve":
        return _serve(args, rest)
    parser.error(f"unknown command {args.command}")  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
