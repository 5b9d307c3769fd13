"""``GET /metrics`` on a live server with the scripted engine, read with Prometheus' own parser.

Each test scrapes before and after doing something (a session pushing video
and asking, a refused handshake, an OpenAI-style request, a URL source) and
checks that the families move as they should; the real engine's counts are
in ``tests/e2e/test_metrics.py``.
"""

from __future__ import annotations

import base64
import dataclasses
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient
from websockets.exceptions import InvalidStatus

from streamchat.app import create_app
from streamchat.cli import build_parser, settings_from_args
from streamchat.config import Settings
from streamchat.engine.fake import FakeEngine
from streamchat_client import ServerError, connect
from tests.support.live import live_server, serve_files
from tests.support.media import encode_image, encode_video
from tests.support.metrics import scrape
from tests.support.wsclient import open_ws, recv, send

SETTINGS = Settings(
    fps=2.0,
    window_frames=2,
    min_pixels=28 * 28,
    max_pixels=56 * 56,
    max_sessions=1,
    status_interval=0.05,
)
KEY = "metrics-key-0123456789"
WEBM = encode_video(container="webm", codec="vp8", fps=10, seconds=3.0)
"""Three seconds: six frames at 2 fps, so a window of two evicts."""

FAMILIES = {
    "streamchat_sessions_open": "gauge",
    "streamchat_sessions_opened": "counter",
    "streamchat_sessions_refused": "counter",
    "streamchat_asks": "counter",
    "streamchat_time_to_first_token_seconds": "histogram",
    "streamchat_answer_seconds": "histogram",
    "streamchat_prompt_tokens": "counter",
    "streamchat_cached_prompt_tokens": "counter",
    "streamchat_video_tokens": "counter",
    "streamchat_completion_tokens": "counter",
    "streamchat_frames_decoded": "counter",
    "streamchat_frames_kept": "counter",
    "streamchat_frames_dropped": "counter",
    "streamchat_decode_lag_seconds": "histogram",
    "streamchat_media_received_bytes": "counter",
    "streamchat_fetch_failures": "counter",
    "streamchat_errors": "counter",
    "streamchat_engine_requests_running": "gauge",
    "streamchat_engine_requests_waiting": "gauge",
}


async def test_a_session_that_pushes_video_and_asks_moves_every_family() -> None:
    """Every family is there with its type; a session pushing video and asking opens and
    closes (open up, then down), decodes, keeps and evicts frames, counts its bytes, its
    answer (finish reason, TTFT, answer time, tokens) and the engine's running request."""
    async with live_server(SETTINGS) as live:
        before = await scrape(live.base)
        for name, kind in FAMILIES.items():
            assert before.types.get(name) == kind, name
        assert before.value("streamchat_sessions_open") == 0
        assert before.value("process_resident_memory_bytes") > 0

        async with connect(live.url) as session:
            await session.send_bytes(WEBM, format="webm")
            await session.end_video()
            status = await session.wait_ended(timeout=30)
            live.engine.gate.clear()  # the answer waits after its first word
            answer = session.ask("What moves?")
            await live.engine.wait_running(1)
            during = await scrape(live.base)
            live.engine.gate.set()
            await answer.result()
            after = await scrape(live.base)
            assert session.session_id not in after.text  # no label names a session

        await live.state.wait_sessions(0)
        closed = await scrape(live.base)

    assert during.value("streamchat_sessions_open") == 1
    assert during.value("streamchat_engine_requests_running") == 1
    assert during.value("streamchat_engine_requests_waiting") == 0
    assert after.value("streamchat_engine_requests_running") == 0
    assert closed.value("streamchat_sessions_open") == 0
    assert closed.value("streamchat_sessions_opened_total") == 1

    decoded = after.value("streamchat_frames_decoded_total", door="websocket")
    assert decoded == status.frames_decoded >= 6
    assert after.value("streamchat_frames_kept_total") == decoded
    assert after.value("streamchat_frames_dropped_total", reason="evicted") == decoded - 2
    assert after.value("streamchat_decode_lag_seconds_count") == decoded
    assert after.value("streamchat_media_received_bytes_total", kind="push") == len(WEBM)

    usage, reason = answer.done.usage, answer.done.finish_reason
    assert after.value("streamchat_asks_total", door="websocket", finish_reason=reason) == 1
    assert after.value("streamchat_time_to_first_token_seconds_count", door="websocket") == 1
    assert after.value("streamchat_answer_seconds_count", door="websocket") == 1
    assert after.value("streamchat_answer_seconds_sum", door="websocket") > 0
    for kind in ("prompt", "video", "completion"):
        counted = after.value(f"streamchat_{kind}_tokens_total", door="websocket")
        assert counted == getattr(usage, f"{kind}_tokens") > 0, kind
    assert usage.cached_tokens == 0  # a first prompt: nothing in the (fake's) cache
    assert after.value("streamchat_cached_prompt_tokens_total", door="websocket") == 0


async def test_refused_sessions_and_errors_are_counted_by_code() -> None:
    """A handshake over max_sessions is counted as refused (server_busy) and as an error told;
    a question with no frames counts as an error with its code, not as an ask."""
    async with live_server(SETTINGS) as live:
        ws = await open_ws(live.url)
        await send(ws, type="hello")
        await recv(ws, "ready")
        with pytest.raises(InvalidStatus) as refused:
            await open_ws(live.url)
        assert refused.value.response.status_code == 503
        await send(ws, type="ask", id="q1", text="anything?")
        assert (await recv(ws, "error"))["code"] == "no_frames"
        seen = await scrape(live.base)
        await ws.close()

    assert seen.value("streamchat_sessions_refused_total", door="websocket") == 1
    assert seen.value("streamchat_sessions_refused_total", reason="server_busy") == 1
    assert seen.value("streamchat_errors_total", door="websocket", code="server_busy") == 1
    assert seen.value("streamchat_errors_total", door="websocket", code="no_frames") == 1
    assert seen.value("streamchat_asks_total") == 0


async def test_metrics_auth_takes_the_api_keys_as_a_bearer_token() -> None:
    """With metrics_auth, /metrics answers 401 without a key or with a wrong one and 200 with
    one; a handshake with a wrong key is counted as refused (unauthorized)."""
    settings = dataclasses.replace(SETTINGS, api_keys=frozenset({KEY}), metrics_auth=True)
    async with live_server(settings) as live, httpx.AsyncClient(base_url=live.base) as http:
        bare = await http.get("/metrics")
        wrong = await http.get("/metrics", headers={"authorization": "Bearer nope"})
        with pytest.raises(InvalidStatus) as refused:
            await open_ws(live.url, additional_headers={"authorization": "Bearer nope"})
        assert refused.value.response.status_code == 401
        seen = await scrape(live.base, {"authorization": f"Bearer {KEY}"})

    assert bare.status_code == wrong.status_code == 401
    assert bare.headers["www-authenticate"] == "Bearer"
    assert bare.json()["code"] == "unauthorized"
    assert seen.value("streamchat_sessions_refused_total", reason="unauthorized") == 1
    assert KEY not in seen.text and "nope" not in seen.text


async def test_metrics_are_open_by_default_even_with_keys() -> None:
    """Without metrics_auth a server with keys serves /metrics to anyone (a scraper has none)."""
    settings = dataclasses.replace(SETTINGS, api_keys=frozenset({KEY}))
    async with live_server(settings) as live:
        seen = await scrape(live.base)
    assert seen.types["streamchat_sessions_open"] == "gauge"


def test_metrics_auth_without_keys_does_not_start() -> None:
    """metrics_auth with no API keys is a mistake said at start-up, not an open /metrics."""
    settings = dataclasses.replace(SETTINGS, metrics_auth=True)
    with pytest.raises(ValueError, match="metrics_auth"):
        with TestClient(create_app(settings, engine=FakeEngine())):
            pass


async def test_two_apps_in_one_process_count_apart() -> None:
    """Each app has a registry of its own: a session on one is not counted by the other."""
    async with live_server(SETTINGS) as one, live_server(SETTINGS) as other:
        async with connect(one.url):
            pass
        await one.state.wait_sessions(0)
        counted, elsewhere = await scrape(one.base), await scrape(other.base)
    assert counted.value("streamchat_sessions_opened_total") == 1
    assert elsewhere.value("streamchat_sessions_opened_total") == 0


async def test_a_scrape_is_rendered_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The text is made in a worker thread: a scrape never holds the loop the sessions run on."""
    async with live_server(SETTINGS) as live:
        await scrape(live.base)  # the app has started
        metrics = live.state.metrics
        threads: list[threading.Thread] = []
        render = metrics.exposition

        def recorded() -> bytes:
            threads.append(threading.current_thread())
            return render()

        monkeypatch.setattr(metrics, "exposition", recorded)
        await scrape(live.base)
    assert threads and threads[0] is not threading.main_thread()


async def test_url_sources_count_their_bytes_and_their_failures(tmp_path: Path) -> None:
    """A fetched URL counts its bytes as 'url'; a URL that answers an error and one the policy
    refuses count as fetch failures by code, and as errors told; no URL is a label."""
    (tmp_path / "clip.webm").write_bytes(WEBM)
    private = dataclasses.replace(SETTINGS, fetch_allow_private=True)
    async with serve_files(tmp_path) as files:
        async with live_server(private) as live:
            async with connect(live.url) as session:
                await session.send_url(f"{files}/clip.webm")
                await session.wait_ended(timeout=30)
                await session.send_url(f"{files}/missing.webm")
                with pytest.raises(ServerError) as missing:
                    await session.wait_ended(timeout=30)
                assert missing.value.code == "url_fetch_failed"
            fetched = await scrape(live.base)
        async with live_server(SETTINGS) as strict, connect(strict.url) as session:
            await session.send_url(f"{files}/clip.webm")  # loopback: not allowed here
            with pytest.raises(ServerError) as failed:
                await session.wait_ended(timeout=30)
            assert failed.value.code == "url_not_allowed"
            refused = await scrape(strict.base)

    assert fetched.value("streamchat_media_received_bytes_total", kind="url") == len(WEBM)
    assert fetched.value("streamchat_fetch_failures_total", code="url_fetch_failed") == 1
    assert fetched.value("streamchat_errors_total", code="url_fetch_failed") == 1
    assert refused.value("streamchat_fetch_failures_total", code="url_not_allowed") == 1
    assert "clip.webm" not in fetched.text and files not in fetched.text  # no URL as a label


def _data(kind: str, data: bytes) -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


async def test_the_openai_door_counts_its_asks_tokens_and_errors() -> None:
    """A chat completion about a data: image counts as an openai ask with TTFT, tokens, bytes
    received as 'data' and a frame decoded; a body that is no JSON counts as an error; the
    same request again counts the prompt tokens the (fake's) cache served, and the
    decoded-video cache's hit."""
    image = encode_image("png", width=64, height=48)
    body: dict[str, Any] = {
        "model": "fake",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _data("image/png", image)}},
                    {"type": "text", "text": "What is it?"},
                ],
            }
        ],
    }
    async with (
        live_server(SETTINGS) as live,
        httpx.AsyncClient(base_url=live.base, timeout=60) as http,
    ):
        reply = await http.post("/v1/chat/completions", json=body)
        broken = await http.post("/v1/chat/completions", content=b"{messages: [")
        seen = await scrape(live.base)
        again = await http.post("/v1/chat/completions", json=body)
        repeated = await scrape(live.base)

    assert reply.status_code == 200, reply.text
    assert broken.status_code == 400
    usage = reply.json()["usage"]
    finish = reply.json()["choices"][0]["finish_reason"]
    assert seen.value("streamchat_asks_total", door="openai", finish_reason=finish) == 1
    assert seen.value("streamchat_time_to_first_token_seconds_count", door="openai") == 1
    assert seen.value("streamchat_prompt_tokens_total", door="openai") == usage["prompt_tokens"]
    completion = seen.value("streamchat_completion_tokens_total", door="openai")
    assert completion == usage["completion_tokens"]
    assert seen.value("streamchat_media_received_bytes_total", kind="data") == len(image)
    assert seen.value("streamchat_frames_decoded_total", door="openai") == 1
    assert seen.value("streamchat_errors_total", door="openai", code="invalid_json") == 1
    assert seen.value("streamchat_asks_total", door="websocket") == 0
    cached = again.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0 and cached > 0
    assert seen.value("streamchat_cached_prompt_tokens_total", door="openai") == 0
    assert repeated.value("streamchat_cached_prompt_tokens_total", door="openai") == cached
    # The decoded-video cache: one decode, then a hit; the image's pixels held.
    assert seen.value("streamchat_video_cache_decodes_total") == 1
    assert seen.value("streamchat_video_cache_hits_total") == 0
    assert repeated.value("streamchat_video_cache_decodes_total") == 1
    assert repeated.value("streamchat_video_cache_hits_total") == 1
    assert repeated.value("streamchat_video_cache_entries") == 1
    assert repeated.value("streamchat_video_cache_bytes") > 0


def test_the_metrics_auth_flag_maps_onto_the_settings() -> None:
    """`streamchat serve --metrics-auth` turns metrics_auth on; without it, it stays off."""
    parser = build_parser()
    on, _ = parser.parse_known_args(["serve", "--metrics-auth"])
    off, _ = parser.parse_known_args(["serve"])
    assert settings_from_args(on, "m", environ={}).metrics_auth is True
    assert settings_from_args(off, "m", environ={}).metrics_auth is False
