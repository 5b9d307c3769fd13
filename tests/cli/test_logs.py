"""``streamchat serve``'s logs and start-up as an operator sees them: a process of its own.

JSON logs are only worth something if a collector can parse every line,
including vLLM's (its engine runs in processes of its own) and what no logger
wrote; keys must stay out of the log whichever way they came; and a port in
use must be said before the model loads, not after.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from streamchat.serving import listening_socket
from streamchat_client import ConnectError, ServerError, connect
from tests.support.media import encode_image, encode_video
from tests.support.process import ServerProcess, server_process
from tests.support.scripted_engine import Reply, scripted_vllm
from tests.support.wsclient import closed_code, open_ws, recv, send

LIVENESS = 60.0
"""Bounds a wait that should end in well under a second: a hang fails, not a slow machine."""


def records(log: list[str]) -> list[dict[str, Any]]:
    """Each line of ``log`` as the JSON object it must be (a line that is not one fails)."""
    parsed = []
    for line in log:
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"not JSON: {line!r}") from None
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= record.keys(), line
        parsed.append(record)
    return parsed


@pytest.mark.engine
async def test_every_line_of_a_tiny_model_server_is_json(tmp_path: Path) -> None:
    """With ``--log-format json`` every line the process and vLLM's engine processes write
    (start-up, a session that pushes video and asks, shutdown) is a JSON object, vLLM's and
    uvicorn's among them, and the session's lines carry its id as ``session``."""
    clip = tmp_path / "clip.webm"
    clip.write_bytes(encode_video(container="webm", codec="vp8", seconds=2.0))
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    args = ("--tiny-model", "--log-format", "json", "--max-pixels", "12544")
    async with server_process(*args, env=env) as srv:
        async with connect(srv.url, fps=2) as session, asyncio.timeout(180):
            await session.send_file(clip)
            await session.wait_ended(timeout=60)
            answer = await session.ask("What is moving?", max_tokens=8).result()
            assert answer.done is not None and answer.text
            session_id = session.ready.session
        await srv.wait_sessions_closed(1)
        await srv.stop()
    lines = records(srv.log)
    loggers = {record["logger"] for record in lines}
    assert any(name.startswith("vllm.v1.engine") for name in loggers), loggers  # engine process
    assert {"uvicorn.error", "streamchat.engine", "streamchat.cli"} <= loggers, loggers
    messages = [record["message"] for record in lines]
    assert any(m.startswith("loading model") or "; loading model" in m for m in messages)
    assert any(m.startswith("vLLM engine ready in") for m in messages), messages
    own = [r for r in lines if r.get("session") == session_id]
    assert any(r["message"] == "closed" for r in own), own
    assert any(r["logger"] == "streamchat.decoder" for r in own), own  # the decoder's thread
    assert not any(r["message"].startswith("session ") for r in own), own  # no prefix in JSON


async def _use_every_way(srv: ServerProcess, keys: list[str], wrong: str) -> None:
    """Present each key each way a client can, and a wrong one each way, to ``srv``."""
    base = f"http://127.0.0.1:{srv.port}"
    for key in keys:
        async with connect(srv.url, api_key=key) as session:  # Authorization: Bearer
            await session.send_image(encode_image())
            await session.wait_frames(1, timeout=LIVENESS)
            await session.ask("what is there?", max_tokens=4).result()
        ws = await open_ws(srv.url, subprotocols=["streamchat.v1", f"streamchat.key.{key}"])
        await send(ws, type="hello")
        assert (await recv(ws))["type"] == "ready"
        await ws.close()
        ws = await open_ws(srv.url, subprotocols=["streamchat.v1"])
        await send(ws, type="hello", token=key)
        assert (await recv(ws))["type"] == "ready"
        await ws.close()
        for query in (f"key={key}", f"token={wrong}&api_key={key}"):
            ws = await open_ws(f"{srv.url}?{query}")  # refused: keys never come from a URL
            await send(ws, type="hello")
            assert (await recv(ws, "error"))["code"] == "unauthorized"
            await closed_code(ws)
        async with httpx.AsyncClient(base_url=base, timeout=LIVENESS) as http:
            for header in (key, wrong):
                got = await http.get("/v1/models", headers={"Authorization": f"Bearer {header}"})
                assert got.status_code == (200 if header == key else 401), got.text
            assert (await http.get(f"/health?key={key}")).status_code == 200
    with pytest.raises(ConnectError) as refused:
        async with connect(srv.url, api_key=wrong):
            pass
    assert refused.value.status == 401
    ws = await open_ws(srv.url, subprotocols=["streamchat.v1"])
    await send(ws, type="hello", token=wrong)
    assert (await recv(ws, "error"))["code"] == "unauthorized"
    await closed_code(ws)


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_api_keys_never_reach_the_log(tmp_path: Path, log_format: str) -> None:
    """A key given to the server in ``STREAMCHAT_API_KEYS`` and one in ``--api-keys-file``,
    each presented as a bearer header, a subprotocol, a ``hello`` token, in query strings and
    to the HTTP door, and a wrong key presented the same ways: at DEBUG, no key appears
    anywhere in the process's output, which did log each of those connections."""
    env_key, file_key, wrong = "env-k3y-5f1c0a9b7e", "file-k3y-3d8e2b6c41", "wr0ng-k3y-77aa01"
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# operators' keys\n{file_key}\n", "utf-8")
    args = ("--engine", "fake", "--log-level", "debug", "--log-format", log_format)
    async with server_process(
        *args, "--api-keys-file", str(keys_file), env={"STREAMCHAT_API_KEYS": env_key}
    ) as srv:
        await _use_every_way(srv, [env_key, file_key], wrong)
        await srv.stop()
    log = "\n".join(srv.log)
    for secret in (env_key, file_key, wrong):
        assert secret not in log, secret
    # The log did see all of it: DEBUG lines, the refusals, the queries (cut out).
    assert "DEBUG" in log and "refused" in log and "?[redacted]" in log, log
    assert "key:" in log, log  # sessions are named by the key's hash
    if log_format == "json":
        records(srv.log)


async def test_a_port_in_use_is_said_before_the_model_loads(tmp_path: Path) -> None:
    """``streamchat serve --tiny-model`` on a port another socket holds exits non-zero with
    a message naming the port, without building or loading the model."""
    with listening_socket() as taken:
        port = taken.getsockname()[1]
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "streamchat",
            "serve",
            "--tiny-model",
            "--port",
            str(port),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")},
        )
        async with asyncio.timeout(120):  # bounds the test only: loading would take as long
            out, _ = await process.communicate()
    text = out.decode()
    assert process.returncode == 1, text
    assert f"cannot listen on 127.0.0.1 port {port}" in text, text
    assert "Address already in use" in text, text
    assert "loading model" not in text and "tiny model" not in text, text
    assert not (tmp_path / "cache").exists()  # the model was not even built


@pytest.mark.parametrize("given", ["flag", "environment"])
async def test_the_remote_engines_key_never_reaches_the_log(tmp_path: Path, given: str) -> None:
    """``streamchat serve --engine-url`` with the engine's key as ``--engine-key`` or in
    ``STREAMCHAT_ENGINE_KEY``, at DEBUG, answering one question and failing one (the
    engine answers 503): the scripted engine got the key, the log never shows it."""
    key = "eng1ne-k3y-4b7d90e2"
    clip = encode_video(tmp_path / "clip.webm", fps=10, seconds=2.0)
    async with scripted_vllm() as engine:
        args = ["--engine-url", engine.url, "--log-level", "debug"]
        env = {"STREAMCHAT_ENGINE_KEY": key} if given == "environment" else {}
        args += ["--engine-key", key] if given == "flag" else []
        async with server_process(*args, env=env) as srv:
            async with connect(srv.url, fps=2) as session:
                await session.send_file(clip)
                await session.wait_frames(2, timeout=30)
                assert (await session.ask("What moves?").result()).text == "Hello world"
                engine.replies.append(Reply(status=503, error="down"))
                with pytest.raises(ServerError):
                    await session.ask("And now?").result()
            await srv.stop()
    assert {h["authorization"] for h in engine.headers} == {f"Bearer {key}"}
    log = "\n".join(srv.log)
    assert key not in log
    assert "DEBUG" in log and "HTTP Request: POST" in log and "HTTP 503" in log, log
