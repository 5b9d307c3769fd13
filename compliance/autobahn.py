"""Autobahn|Testsuite compliance run of the server's WebSocket stack, beside uvicorn's own.

Starts one echo server per agent, each built by
:func:`streamchat.serving.server_config`, the configuration ``streamchat
serve`` runs, with ``Settings()``:

* ``streamchat``: exactly what is served (``streamchat.transport``'s bounded
  HTTP and WebSocket protocols, per-message deflate off). No override: cases
  1-10 stay within its bounds. A case sends at most 10 pings (2.10, 2.11)
  where the bucket allows a burst of 20; the largest message (9.1.6, 9.2.6) is
  16 MiB, exactly ``ws_max_size``; a connection is aborted only if its client
  leaves over 64 KiB unread for ``send_timeout`` (10 s), and wstest (with
  ``wsaccel``) reads a 16 MiB echo in well under that on loopback; the deflate
  cases (12, 13) are not run.
* ``websockets``, ``websockets-sansio``, ``wsproto``: uvicorn's own
  implementations in place of ``BoundedWebSocket`` (the overrides ``ws=`` and,
  uvicorn's default, ``ws_per_message_deflate=True``), behind the same HTTP
  protocol: the comparison ``websockets-sansio`` was chosen on
  (docs/security.md).

It runs the Autobahn fuzzingclient (``wstest -m fuzzingclient``, cases 1-10)
against all of them, then probes what the suite does not cover: the ASGI
denial response (HTTP 403 at the handshake), keepalive pings and their
timeout, the max-size close (1009), whether per-message deflate is negotiated
and what it costs on incompressible data. Writes everything under
``artifacts/autobahn/`` and prints a Markdown summary.

wstest is Python 2 only, so it lives in its own virtualenv (not in the
project's dependencies)::

    .venv/bin/python compliance/autobahn.py setup --python2 /path/to/python2.7
    .venv/bin/python compliance/autobahn.py run

Not part of pytest: a full run takes minutes and needs the external tool.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "artifacts" / "autobahn"
DEFAULT_VENV = DEFAULT_OUT / "venv2"
REQUIREMENTS = Path(__file__).resolve().parent / "wstest-requirements.txt"
SERVED = "streamchat"
"""The agent that is the server's own stack, exactly as ``streamchat serve`` configures it."""
IMPLEMENTATIONS = (SERVED, "websockets", "websockets-sansio", "wsproto")
CASES = [f"{n}.*" for n in range(1, 11)]
BEHAVIOURS = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")
DENIED_BODY = b"denied by the compliance app"


# --------------------------------------------------------------------------- echo server


def build_app() -> Any:
    """Echo every message at ``/``; refuse the handshake with HTTP 403 at ``/deny``."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await websocket.send_text(message["text"])
            else:
                await websocket.send_bytes(message.get("bytes") or b"")

    async def deny(websocket: WebSocket) -> None:
        await websocket.send_denial_response(Response(DENIED_BODY, status_code=403))

    return Starlette(routes=[WebSocketRoute("/", echo), WebSocketRoute("/deny", deny)])


def serve(
    ws: str,
    port: int,
    ping_interval: float | None,
    ping_timeout: float | None,
    per_message_deflate: bool | None = None,
) -> None:
    """Serve the echo app with ``streamchat serve``'s configuration, ``ws`` as it says.

    The pings are given as ``streamchat serve --ping-interval/--ping-timeout``
    would give them; ``per_message_deflate`` None keeps the agent's own choice.
    """
    import dataclasses

    import uvicorn

    sys.path.insert(0, str(ROOT))
    from streamchat.config import Settings
    from streamchat.serving import server_config

    settings = Settings()
    if ping_interval is not None:
        settings = dataclasses.replace(settings, ping_interval=ping_interval)
    if ping_timeout is not None:
        settings = dataclasses.replace(settings, ping_timeout=ping_timeout)
    overrides: dict[str, Any] = {}
    if ws != SERVED:  # one of uvicorn's, with uvicorn's default deflate: the comparison
        overrides = {"ws": ws, "ws_per_message_deflate": True}
    if per_message_deflate is not None:
        overrides["ws_per_message_deflate"] = per_message_deflate
    app = build_app()
    config = server_config(
        app, settings, host="127.0.0.1", port=port, log_level="warning", **overrides
    )
    uvicorn.Server(config).run()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def echo_server(
    ws: str,
    log: Path,
    ping_interval: float | None = None,
    ping_timeout: float | None = None,
    per_message_deflate: bool | None = None,
) -> Iterator[int]:
    """Run ``serve`` in a child process; yield its port once it accepts connections."""
    port = free_port()
    command = [sys.executable, str(Path(__file__).resolve()), "serve", "--ws", ws]
    command += ["--port", str(port)]
    if ping_interval is not None:
        command += ["--ping-interval", str(ping_interval)]
    if ping_timeout is not None:
        command += ["--ping-timeout", str(ping_timeout)]
    if per_message_deflate is False:
        command.append("--no-per-message-deflate")
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"echo server {ws} exited with {process.returncode}; see {log}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"echo server {ws} did not start; see {log}")
            time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def available(ws: str) -> bool:
    module = {
        SERVED: "websockets",
        "websockets": "websockets",
        "websockets-sansio": "websockets",
        "wsproto": "wsproto",
    }
    try:
        __import__(module[ws])
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- probes


@dataclass
class Probes:
    denial_status: int | None = None
    denial_body_ok: bool = False
    deflate_negotiated: str | None = None
    deflate_when_disabled: str | None = None
    max_size_close: int | None = None
    server_ping_seen: bool = False
    ping_timeout_close: str = ""
    echo_seconds_deflate: float = 0.0
    echo_seconds_plain: float = 0.0
    errors: list[str] = field(default_factory=list)


async def extensions(url: str) -> str | None:
    """The ``Sec-WebSocket-Extensions`` answer to a client offering permessage-deflate."""
    from websockets.asyncio.client import connect

    async with connect(url, proxy=None) as conn:
        assert conn.response is not None
        return conn.response.headers.get("Sec-WebSocket-Extensions")


async def probe_handshake(url: str, probes: Probes) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    try:
        async with connect(url + "deny", proxy=None):
            probes.errors.append("/deny accepted the WebSocket")
    except InvalidStatus as error:
        probes.denial_status = error.response.status_code
        probes.denial_body_ok = error.response.body == DENIED_BODY
    probes.deflate_negotiated = await extensions(url)


async def probe_max_size(url: str, max_size: int, probes: Probes) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    async with connect(url, proxy=None, max_size=None, compression=None) as conn:
        try:
            await conn.send(b"\0" * (max_size + 1))
            await asyncio.wait_for(conn.recv(), 30)
            probes.errors.append(f"a {max_size + 1}-byte message was echoed")
        except ConnectionClosed as closed:
            probes.max_size_close = closed.rcvd.code if closed.rcvd else None


async def probe_echo_cost(url: str, probes: Probes, rounds: int = 8) -> None:
    """Echo incompressible 4 MiB messages, with and without per-message deflate."""
    from websockets.asyncio.client import connect

    payload = os.urandom(4 * 1024 * 1024)
    for compression in ("deflate", None):
        async with connect(url, proxy=None, max_size=None, compression=compression) as conn:
            start = time.perf_counter()
            for _ in range(rounds):
                await conn.send(payload)
                assert await conn.recv() == payload
            elapsed = time.perf_counter() - start
        if compression:
            probes.echo_seconds_deflate = elapsed
        else:
            probes.echo_seconds_plain = elapsed


async def probe_keepalive(port: int, interval: float, timeout: float, probes: Probes) -> None:
    """A raw client that never answers pings: is it pinged, and is it then dropped?"""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    await reader.readuntil(b"\r\n\r\n")
    start = time.monotonic()
    deadline = start + interval + timeout + 5
    try:
        while True:
            head = await asyncio.wait_for(reader.readexactly(2), deadline - time.monotonic())
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                length = int.from_bytes(await reader.readexactly(2), "big")
            elif length == 127:
                length = int.from_bytes(await reader.readexactly(8), "big")
            body = await reader.readexactly(length)
            if opcode == 0x9:
                probes.server_ping_seen = True
            elif opcode == 0x8:
                code = int.from_bytes(body[:2], "big") if len(body) >= 2 else None
                probes.ping_timeout_close = (
                    f"close {code} after {time.monotonic() - start:.1f}s"
                    f" ({body[2:].decode(errors='replace')})"
                )
                return
    except asyncio.IncompleteReadError:
        probes.ping_timeout_close = f"TCP closed after {time.monotonic() - start:.1f}s"
    except TimeoutError:
        probes.ping_timeout_close = "still open"
    finally:
        writer.close()


def run_probes(ws: str, out: Path) -> Probes:
    sys.path.insert(0, str(ROOT))
    from streamchat.config import Settings

    probes = Probes()
    log = out / f"server-{ws}.log"
    with echo_server(ws, log) as port:
        url = f"ws://127.0.0.1:{port}/"
        for name, coro in (
            ("handshake", probe_handshake(url, probes)),
            ("max size", probe_max_size(url, Settings().transport_max_bytes, probes)),
            ("echo cost", probe_echo_cost(url, probes)),
        ):
            try:
                asyncio.run(coro)
            except Exception as error:  # noqa: BLE001 - reported, not raised
                probes.errors.append(f"{name}: {type(error).__name__}: {error}")
    with echo_server(ws, log, ping_interval=1.0, ping_timeout=1.0) as port:
        try:
            asyncio.run(probe_keepalive(port, 1.0, 1.0, probes))
        except Exception as error:  # noqa: BLE001
            probes.errors.append(f"keepalive: {type(error).__name__}: {error}")
    with echo_server(ws, log, per_message_deflate=False) as port:
        try:
            probes.deflate_when_disabled = asyncio.run(extensions(f"ws://127.0.0.1:{port}/"))
        except Exception as error:  # noqa: BLE001
            probes.errors.append(f"deflate off: {type(error).__name__}: {error}")
    return probes


# --------------------------------------------------------------------------- wstest


def agent(ws: str) -> str:
    return SERVED if ws == SERVED else f"uvicorn-{ws}"


def find_wstest(explicit: str | None) -> str:
    for candidate in (explicit, os.environ.get("WSTEST"), str(DEFAULT_VENV / "bin" / "wstest")):
        if candidate and Path(candidate).exists():
            return candidate
    found = shutil.which("wstest")
    if found:
        return found
    raise SystemExit("wstest not found: run `compliance/autobahn.py setup` or pass --wstest")


def run_fuzzingclient(wstest: str, ports: dict[str, int], cases: Sequence[str], out: Path) -> Path:
    reports = out / "reports"
    if reports.exists():
        shutil.rmtree(reports)
    spec = {
        "outdir": str(reports),
        "servers": [
            {"agent": agent(ws), "url": f"ws://127.0.0.1:{port}/"} for ws, port in ports.items()
        ],
        "cases": list(cases),
        "exclude-cases": [],
        "exclude-agent-cases": {},
    }
    spec_path = out / "fuzzingclient.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    with (out / "wstest.log").open("wb") as log:
        subprocess.run(
            [wstest, "-m", "fuzzingclient", "-s", str(spec_path)],
            cwd=out,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
        )
    return reports


def case_key(case: str) -> tuple[int, ...]:
    return tuple(int(part) for part in case.split("."))


def summarise(reports: Path, probes: dict[str, Probes]) -> str:
    index: dict[str, dict[str, dict[str, Any]]] = json.loads((reports / "index.json").read_text())
    lines = [
        "| implementation | cases | " + " | ".join(BEHAVIOURS) + " | close not OK | 9.* seconds |",
        "| --- | --- | " + " | ".join("---" for _ in BEHAVIOURS) + " | --- | --- |",
    ]
    details: list[str] = []
    for name, results in index.items():
        counts = Counter(result["behavior"] for result in results.values())
        bad_close = [
            c for c, r in results.items() if r["behaviorClose"] not in ("OK", "INFORMATIONAL")
        ]
        perf = {c: r for c, r in results.items() if c.startswith("9.")}
        perf_seconds = sum(r["duration"] for r in perf.values()) / 1000
        unknown = set(counts) - set(BEHAVIOURS)
        lines.append(
            f"| {name} | {len(results)} | "
            + " | ".join(str(counts.get(b, 0)) for b in BEHAVIOURS)
            + f" | {len(bad_close)} | {perf_seconds:.1f} |"
        )
        if unknown:
            details.append(f"- {name}: other behaviours {dict((u, counts[u]) for u in unknown)}")
        for case in sorted(results, key=case_key):
            result = results[case]
            if result["behavior"] in ("OK", "INFORMATIONAL") and case not in bad_close:
                continue
            report = json.loads((reports / result["reportfile"]).read_text())
            details.append(
                f"- {name} {case}: {result['behavior']} / close {result['behaviorClose']}"
                f" (remote close {result.get('remoteCloseCode')}): {report.get('result', '')}"
                f" | {report.get('resultClose', '')}"
            )
        informational = [c for c, r in results.items() if r["behavior"] == "INFORMATIONAL"]
        if informational:
            details.append(
                f"- {name} INFORMATIONAL: {', '.join(sorted(informational, key=case_key))}"
            )
        slowest = sorted(perf.items(), key=lambda item: -item[1]["duration"])[:3]
        if slowest:
            details.append(
                f"- {name} slowest 9.*: "
                + ", ".join(f"{c} {r['duration']} ms ({r['behavior']})" for c, r in slowest)
            )
    text = "\n".join(lines) + "\n\n" + "\n".join(details) + "\n"
    if probes:
        text += (
            "\n| implementation | denial (403 + body) | permessage-deflate (default) "
            "| with ws_per_message_deflate=False | over max size | server ping "
            "| unanswered ping | 8x4 MiB echo deflate / plain |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
        )
        for ws, p in probes.items():
            denial = f"{p.denial_status} {'body ok' if p.denial_body_ok else 'body lost'}"
            text += (
                f"| {agent(ws)} | {denial} | {p.deflate_negotiated or 'not negotiated'} "
                f"| {p.deflate_when_disabled or 'not negotiated'} "
                f"| close {p.max_size_close} | {'yes' if p.server_ping_seen else 'no'} "
                f"| {p.ping_timeout_close} "
                f"| {p.echo_seconds_deflate:.2f}s / {p.echo_seconds_plain:.2f}s |\n"
            )
            text += "".join(f"\n- {agent(ws)} probe error: {e}" for e in p.errors)
    return text


# --------------------------------------------------------------------------- CLI


def setup(python2: str, venv: Path) -> None:
    """Make the Python 2 virtualenv holding wstest and its pinned dependencies."""
    subprocess.run([python2, "-m", "pip", "install", "--user", "virtualenv<20.22"], check=True)
    subprocess.run([python2, "-m", "virtualenv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install"]
    subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
    subprocess.run([str(venv / "bin" / "wstest"), "--autobahnversion"], check=True)


def run(args: argparse.Namespace) -> int:
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    wstest = find_wstest(args.wstest)
    impls = [ws for ws in args.ws if available(ws)]
    for ws in set(args.ws) - set(impls):
        print(f"skipping {ws}: not installed", file=sys.stderr)
    probes = {} if args.no_probes else {ws: run_probes(ws, out) for ws in impls}
    with contextlib.ExitStack() as stack:
        ports = {ws: stack.enter_context(echo_server(ws, out / f"server-{ws}.log")) for ws in impls}
        start = time.monotonic()
        reports = run_fuzzingclient(wstest, ports, args.cases, out)
        print(f"fuzzingclient took {time.monotonic() - start:.0f}s", file=sys.stderr)
    saved = {ws: asdict(p) for ws, p in probes.items()}
    (out / "probes.json").write_text(json.dumps(saved, indent=2))
    summary = summarise(reports, probes)
    (out / "summary.md").write_text(summary)
    print(summary)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    setup_cmd = commands.add_parser("setup", help="make the Python 2 virtualenv with wstest")
    setup_cmd.add_argument("--python2", default="python2.7", help="a Python 2.7 interpreter")
    setup_cmd.add_argument("--venv", type=Path, default=DEFAULT_VENV)

    run_cmd = commands.add_parser("run", help="start echo servers and run the fuzzingclient")
    run_cmd.add_argument("--ws", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    run_cmd.add_argument("--cases", nargs="+", default=CASES, help="default: 1.* to 10.*")
    run_cmd.add_argument("--wstest", default=None, help="default: $WSTEST, the setup venv, PATH")
    run_cmd.add_argument("--out", type=Path, default=DEFAULT_OUT)
    run_cmd.add_argument("--no-probes", action="store_true", help="only the Autobahn cases")

    serve_cmd = commands.add_parser("serve", help="one echo server (used by run)")
    serve_cmd.add_argument("--ws", choices=IMPLEMENTATIONS, required=True)
    serve_cmd.add_argument("--port", type=int, required=True)
    serve_cmd.add_argument("--ping-interval", type=float, default=None)
    serve_cmd.add_argument("--ping-timeout", type=float, default=None)
    serve_cmd.add_argument("--no-per-message-deflate", action="store_true")

    summary_cmd = commands.add_parser("summarise", help="summarise an earlier run")
    summary_cmd.add_argument("--out", type=Path, default=DEFAULT_OUT)

    args = parser.parse_args(argv)
    if args.command == "setup":
        setup(args.python2, args.venv)
    elif args.command == "run":
        return run(args)
    elif args.command == "serve":
        serve(
            args.ws,
            args.port,
            args.ping_interval,
            args.ping_timeout,
            per_message_deflate=False if args.no_per_message_deflate else None,
        )
    else:
        saved = json.loads((args.out / "probes.json").read_text())
        probes = {ws: Probes(**values) for ws, values in saved.items()}
        print(summarise(args.out / "reports", probes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
