"""The :class:`~streamchat.engine.base.Engine` on a remote vLLM server's OpenAI-compatible API.

``streamchat serve --engine-url http://HOST:PORT/v1`` runs no vLLM of its own:
the front-end decodes, a vLLM fleet (or a router before it) generates. A
question goes as one streamed ``POST /chat/completions`` whose request gives
the model what the local adapter (:mod:`streamchat.engine.vllm`) gives it:

* each clip of the window as one ``video_url`` part, a multi-frame
  ``data:video/jpeg;base64,<f1>,<f2>,…`` URL whose frames are lossless PPM by
  default (vLLM 0.32 opens each piece with Pillow whatever the media type says:
  the pixels arrive bit-exact) or JPEG (``jpeg:Q``, 4:4:4) for slow links
  (:mod:`streamchat.engine.encoding`), each frame encoded once while it lives
  (:class:`~streamchat.engine.frames.FrameCache`);
  each part carries a ``uuid`` (:func:`~streamchat.engine.frames.content_id`),
  so front-ends sending the same video share the server's caches;
* the video metadata of :func:`~streamchat.engine.prompt.video_metadata` as
  ``media_io_kwargs`` with ``num_frames: -1`` (vLLM keeps only 32 frames
  otherwise; the server needs ``--trust-request-mm-kwargs``). vLLM applies them
  to every video of a request, so a prompt of several videos whose metadata
  differ (Qwen3-VL's clips at gaps, Qwen2.5-VL's clips of other rates) is told
  one rate: counted in :attr:`RemoteEngine.inexact`;
* every sampling field, so the server's ``generation_config`` fills none in;
* the history as text turns (:func:`~streamchat.engine.prompt.conversation`).

A session's timeline (``GenerationRequest.timeline``) is served as its window in
this version: the timeline over stock vLLM is exact only for Qwen2/2.5-VL, and
:attr:`RemoteEngine.default_context` is ``window``.

The answer streams back as server-sent events
(:class:`~streamchat.engine.sse.SseAnswer`, pure);
closing the generator closes the HTTP stream, which vLLM takes as an abort.
Failures are typed: :class:`~streamchat.errors.EngineUnavailable` (unreachable,
502/503/504, a body cut mid-answer), :class:`~streamchat.errors.EngineTimeout`
(no byte for ``timeout`` seconds), :class:`~streamchat.errors.ContextTooLong`
(a 400 about the context, once no history is left to drop), otherwise
:class:`~streamchat.errors.EngineFailure`. :meth:`RemoteEngine.healthy` follows
a ``GET /health`` probe and those failures. The engine key is sent, never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from ..budget import VisionCosts
from ..errors import ContextTooLong, EngineFailure, EngineTimeout, EngineUnavailable
from ..window import Frame
from .base import (
    ContextKind,
    Delta,
    EngineError,
    Image,
    Message,
    Request,
    TimelineContext,
    Video,
)
from .encoding import (
    DEFAULT_FRAME_FORMAT,
    encode_base64,
    encode_frame,
    encoded_video_part,
    parse_frame_format,
    video_part,
)
from .frames import FrameCache, content_id, frame_digest, newest_size, resize_nearest
from .prompt import clip_frames, conversation, media_frames, video_metadata
from .sse import MALFORMED, SseAnswer

__all__ = [
    "DEFAULT_ENGINE_TIMEOUT",
    "DEFAULT_FRAME_FORMAT",
    "FAMILIES",
    "SERVER_FLAGS",
    "RemoteEngine",
    "SseAnswer",
    "encode_frame",
    "open_remote_engine",
    "parse_frame_format",
    "video_part",
]

logger = logging.getLogger("streamchat.engine")

DEFAULT_ENGINE_TIMEOUT = 120.0
"""Seconds the engine may send no byte (queueing and prefill included) before an answer fails."""
HEALTH_INTERVAL = 2.0
"""Seconds between ``GET /health`` probes."""
ENCODED_BYTES = 256 * 1024 * 1024
"""Base64 of encoded frames kept for the next asks (a frame is encoded once while it lives)."""
_ERROR_BYTES = 64 * 1024
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
_MODEL_TYPES = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl"}
_MODEL_TYPES["qwen3_vl_moe"] = "qwen3_vl"
_FRAME_FACTORS = {"qwen2_vl": 28, "qwen2_5_vl": 28, "qwen3_vl": 32}
SERVER_FLAGS = (
    "--trust-request-mm-kwargs",
    "--media-io-kwargs",
    json.dumps({"video": {"num_frames": -1}}),
    "--generation-config",
    "vllm",
    "--enable-prompt-tokens-details",
)
"""What ``vllm serve`` needs besides its engine flags to be asked as this engine asks
(docs/deploy.md): each request's video metadata accepted and every frame of a data URL
kept (32 otherwise), no sampling defaults from the checkpoint, ``cached_tokens`` in usage."""


class _ContextFull(Exception):
    """The engine refused the prompt as longer than its context (a 400)."""


class _QuietHealth(logging.Filter):
    """Keeps httpx's line for every health probe (one each 2 s) out of the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not any(isinstance(a, httpx.URL) and a.path.endswith("/health") for a in args)


class RemoteEngine:
    """Adapter from a vLLM server's OpenAI-compatible API to streamchat's ``Engine``.

    Build it with :func:`open_remote_engine`. ``url`` is the API's base
    (``http://host:port/v1``); ``/health`` and ``/tokenize`` are at its root.
    """

    def __init__(
        self,
        url: str,
        *,
        key: str | None = None,
        model: str | None = None,
        family: str | None = None,
        timeout: float = DEFAULT_ENGINE_TIMEOUT,
        frame_format: str = DEFAULT_FRAME_FORMAT,
        health_interval: float = HEALTH_INTERVAL,
        encoded_bytes: int = ENCODED_BYTES,
    ) -> None:
        self._url = url.rstrip("/")
        self._root = self._url.removesuffix("/v1")
        self._wanted_model = model
        self._family = family
        self._frame_format = parse_frame_format(frame_format)
        self._frames = FrameCache(
            frame_digest,
            functools.partial(encode_base64, frame_format=self._frame_format),
            size=len,
            max_bytes=encoded_bytes,
        )
        self._health_interval = health_interval
        self._frontend = secrets.token_hex(4)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.AsyncClient(
            base_url=self._url + "/",
            headers=headers,
            timeout=httpx.Timeout(connect=5.0, write=60.0, read=timeout, pool=5.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=8),
            transport=httpx.AsyncHTTPTransport(retries=1),
        )
        self._model: str | None = None
        self._max_model_len: int | None = None
        self._video_token_id: int | None = None
        self._frame_factor: int | None = _FRAME_FACTORS.get(family or "")
        self._costs: VisionCosts | None = None
        self._healthy = False
        self._running: dict[str, httpx.Response | None] = {}
        self._aborted: set[str] = set()
        self._probe: asyncio.Task[None] | None = None
        self._closed = False
        self.inexact = 0
        """Prompts whose videos were told one shared metadata (see the module's docstring)."""

    def __repr__(self) -> str:  # never the key
        return f"RemoteEngine({self._url!r}, model={self._model!r})"

    @property
    def model_name(self) -> str:
        return self._model or self._wanted_model or "remote"

    @property
    def frame_factor(self) -> int | None:
        return self._frame_factor

    @property
    def vision_costs(self) -> VisionCosts | None:
        return self._costs

    @property
    def default_context(self) -> ContextKind:
        """The window: a timeline ask is served as its window by this adapter."""
        return "window"

    @property
    def family(self) -> str | None:
        return self._family

    def running(self) -> frozenset[str]:
        return frozenset(self._running)

    def healthy(self) -> bool:
        """The last probe or request reached a working engine."""
        return self._healthy and not self._closed

    def prefill(self, context: TimelineContext, frames: Sequence[Frame]) -> None:
        """Nothing to compute ahead: a remote engine keeps no timeline."""

    def end_session(self, session: str) -> None:
        """Nothing to forget: the engine keeps no session state for a window context."""

    async def start(self) -> None:
        """Learn the served model (unless unreachable: then unhealthy) and start probing."""
        try:
            await self._initialise()
            self._healthy = True
        except (httpx.HTTPError, EngineError, ValueError) as exc:
            logger.warning("engine at %s not usable yet (%s): probing", self._url, _why(exc))
        self._probe = asyncio.create_task(self._probe_health(), name="engine-health")

    async def abort(self, request_id: str) -> None:
        """Close the request's HTTP stream (vLLM aborts it); its answer ends ``cancelled``."""
        if request_id not in self._running:
            return
        self._aborted.add(request_id)
        response = self._running[request_id]
        if response is not None:
            await response.aclose()

    async def aclose(self) -> None:
        """Stop probing; close every stream (vLLM aborts them) and the client."""
        if self._closed:
            return
        self._closed = True
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        for request_id in list(self._running):
            await self.abort(request_id)
        await self._client.aclose()

    async def generate(self, request: Request) -> AsyncGenerator[Delta, None]:
        """Stream the answer; the last delta carries the finish and usage.

        The server never drops history to fit: a 400 about the context drops
        the older half of the turns that may go and asks again, until none is
        left (then ``ContextTooLong``). The server lowers ``max_tokens`` to
        the room left by itself.
        """
        if self._closed:
            raise EngineUnavailable("the engine is shut down")
        if request.request_id in self._running:
            raise ValueError(f"request {request.request_id!r} is already running")
        self._running[request.request_id] = None
        try:
            messages, droppable = conversation(request)
            while True:
                try:
                    async for delta in self._stream(request, messages):
                        yield delta
                    return
                except _ContextFull as exc:
                    if not droppable:
                        raise ContextTooLong(
                            f"the question with its {media_frames(messages)} frames does not "
                            f"fit the model's context ({exc}): ask about fewer frames "
                            "(max_frames, last_seconds) or a shorter question"
                        ) from None
                    drop = (droppable + 1) // 2
                    logger.info(
                        "request %s: %d of %d earlier turns dropped to fit the context",
                        request.request_id,
                        drop,
                        droppable,
                    )
                    messages, droppable = messages[2 * drop :], droppable - drop
        finally:
            self._running.pop(request.request_id, None)
            self._aborted.discard(request.request_id)

    # -- helpers --------------------------------------------------------------

    async def _stream(self, request: Request, messages: list[Message]) -> AsyncIterator[Delta]:
        if self._model is None:
            try:
                await self._initialise()
            except (httpx.HTTPError, EngineError, ValueError) as exc:
                self._healthy = False
                raise EngineUnavailable(f"the engine is unreachable: {_why(exc)}") from None
        body, frames = await asyncio.to_thread(self._body, request, messages)
        answer = SseAnswer(self._video_token_id, frames)
        headers = {
            "Content-Type": "application/json",
            "X-Request-Id": f"{self._frontend}-{request.request_id}",
        }
        rid = request.request_id
        try:
            async with self._client.stream(
                "POST", "chat/completions", content=body, headers=headers
            ) as response:
                self._running[rid] = response
                if response.status_code != 200:
                    await self._refused(response)
                async for line in response.aiter_lines():
                    delta = answer.line(line)
                    if delta is not None:
                        yield delta
                    if answer.done:
                        return
                if rid not in self._aborted:  # a whole body, but no [DONE]
                    raise EngineFailure(f"{MALFORMED}: it ended without [DONE]")
        except httpx.TimeoutException:
            self._healthy = False
            raise EngineTimeout(
                f"the engine sent nothing for {self._client.timeout.read} s: answer abandoned"
            ) from None
        except (httpx.TransportError, httpx.StreamError) as exc:
            if rid not in self._aborted:
                self._healthy = False
                what = "the answer was cut off" if answer.started else "no answer"
                message = f"the engine is unreachable ({what}): {_why(exc)}"
                raise EngineUnavailable(message) from None
        if rid in self._aborted:
            yield Delta(text="", finish_reason="cancelled", usage=answer.usage())

    async def _refused(self, response: httpx.Response) -> None:
        """Raise what a status other than 200 means (its error body read, 64 kB at most)."""
        raw = b""
        async for chunk in response.aiter_bytes():
            raw += chunk
            if len(raw) >= _ERROR_BYTES:
                break
        message = raw[:_ERROR_BYTES].decode(errors="replace")
        with contextlib.suppress(ValueError, AttributeError):
            message = str(json.loads(message)["error"]["message"])
        message, status = message[:300], response.status_code
        logger.warning("the engine refused a request: HTTP %d: %s", status, message)
        if status == 400 and "maximum context length" in message:
            raise _ContextFull(message)
        if status >= 500 or status in (401, 403, 404):
            self._healthy = False  # dead, or misconfigured (key, model)
        if status in (502, 503, 504):
            raise EngineUnavailable(f"the engine is unavailable (HTTP {status})")
        raise EngineFailure(f"the model failed: HTTP {status}: {message}")

    def _body(self, request: Request, messages: Sequence[Message]) -> tuple[bytes, int]:
        """The JSON body of the request (in a worker thread), and the frames it shows."""
        options = request.sampling
        rendered, kwargs = self._messages(messages)
        payload: dict[str, Any] = {
            "model": self._model,
            "messages": rendered,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
            "max_tokens": options.max_tokens,
            "temperature": options.temperature,
            "top_p": options.top_p,
            "seed": options.seed,
            "stop": list(options.stop),
            "top_k": 0,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
        }
        if options.choices:
            payload["structured_outputs"] = {"choice": list(options.choices)}
        if kwargs is not None:
            payload["media_io_kwargs"] = {"video": kwargs}
        return json.dumps(payload).encode(), media_frames(messages)

    def _messages(
        self, messages: Sequence[Message]
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """The messages in OpenAI's chat shape, and the videos' ``media_io_kwargs`` (None: none)."""
        rendered: list[dict[str, Any]] = []
        told: list[tuple[dict[str, Any] | None, float]] = []
        for message in messages:
            if message.role == "assistant":
                text = "".join(p for p in message.content if isinstance(p, str))
                rendered.append({"role": "assistant", "content": text})
                continue
            parts: list[dict[str, Any]] = []
            for part in message.content:
                if isinstance(part, str):
                    parts.append({"type": "text", "text": part})
                elif isinstance(part, Video):
                    parts.append(self._video(part, told))
                elif isinstance(part, Image):
                    parts.append(self._image(part))
            rendered.append({"role": message.role, "content": parts})
        return rendered, (self._video_kwargs(told) if told else None)

    def _video(self, video: Video, told: list[tuple[dict[str, Any] | None, float]]) -> Any:
        frames = clip_frames(video.frames)
        metadata = video_metadata(
            frames, video.fps, family=self._family or "", measured=video.measured
        )
        if metadata is not None:
            metadata.pop("video_backend")  # informational; vLLM names its own
        told.append((metadata, video.fps))
        height, width = newest_size(frames)
        encoded = []
        for frame in frames:
            image = resize_nearest(frame.image, height, width)
            encoded.append(self._frames.get(image, keep=image is frame.image))
        uuid = content_id(
            [digest for digest, _ in encoded],
            size=(height, width),
            metadata=metadata,
            encoding=self._frame_format,
        )
        return encoded_video_part([data for _, data in encoded], uuid)

    def _image(self, image: Image) -> Any:
        digest, data = self._frames.get(image.frame.image)
        ppm = self._frame_format == "ppm"
        mime = "image/x-portable-pixmap" if ppm else "image/jpeg"
        uuid = f"sc-{digest.hex()}-{self._frame_format.replace(':', '')}"
        url = f"data:{mime};base64,{data}"
        return {"type": "image_url", "image_url": {"url": url}, "uuid": uuid}

    def _video_kwargs(self, told: list[tuple[dict[str, Any] | None, float]]) -> dict[str, Any]:
        """``media_io_kwargs["video"]``: one video's metadata, or what several share."""
        kwargs: dict[str, Any] = {"num_frames": -1}
        given = [metadata for metadata, _ in told if metadata is not None]
        if not given:
            return kwargs
        if len(given) == 1:
            return kwargs | given[0]
        # Several videos: indices and totals default per video; one rate for all.
        rates = {metadata["fps"] for metadata in given}
        if self._family == "qwen3_vl" or len(rates) > 1:
            self.inexact += 1
            logger.debug("a prompt of %d videos told one rate: not exact", len(given))
        rate = told[0][1] if self._family == "qwen3_vl" else given[0]["fps"]
        return kwargs | {"fps": rate, "do_sample_frames": False}

    async def _initialise(self) -> None:
        """The served model (``GET /v1/models``), its family and costs, the video token's id."""
        response = await self._client.get("models")
        response.raise_for_status()
        models = response.json()["data"]
        chosen = next((m for m in models if m["id"] == self._wanted_model), None)
        if chosen is None:
            if self._wanted_model is not None:
                raise EngineFailure(f"the engine serves no model {self._wanted_model!r}")
            chosen = models[0]
        config = _local_config(chosen.get("root"))
        family = self._family or _MODEL_TYPES.get(str(config.get("model_type")))
        tokens = await self._tokenize("<|video_pad|>")
        self._video_token_id = tokens[0] if len(tokens) == 1 else None
        costs = None
        max_len = chosen.get("max_model_len")
        vision = config.get("vision_config") or {}
        patch, merge = vision.get("patch_size"), vision.get("spatial_merge_size")
        if isinstance(max_len, int) and isinstance(patch, int) and isinstance(merge, int):
            pair_text = 0
            if family == "qwen3_vl":
                pair_text = len(await self._tokenize("<14400.0 seconds>")) + 2
            costs = VisionCosts(
                max_model_len=max_len,
                factor=patch * merge,
                temporal_patch=int(vision.get("temporal_patch_size", 2)),
                min_frame_pixels=_min_frame_pixels(config, family or ""),
                pair_text_tokens=pair_text,
            )
        self._model, self._family, self._costs = str(chosen["id"]), family, costs
        self._max_model_len = max_len if isinstance(max_len, int) else None
        self._frame_factor = costs.factor if costs else _FRAME_FACTORS.get(family or "")
        logger.info(
            "engine at %s serves %s (family %s, context %s)",
            self._url,
            self._model,
            family or "unknown",
            self._max_model_len,
        )

    async def _tokenize(self, text: str) -> list[int]:
        response = await self._client.post(
            self._root + "/tokenize", json={"prompt": text, "add_special_tokens": False}
        )
        response.raise_for_status()
        return [int(t) for t in response.json()["tokens"]]

    async def _probe_health(self) -> None:
        """``GET /health`` every ``health_interval`` s: healthy again on a 200 (once usable)."""
        quiet = _QuietHealth()
        logging.getLogger("httpx").addFilter(quiet)
        try:
            while True:
                await asyncio.sleep(self._health_interval)
                try:
                    response = await self._client.get(self._root + "/health", timeout=2.0)
                    up = response.status_code == 200
                    if up and self._model is None:
                        await self._initialise()
                except (httpx.HTTPError, EngineError, ValueError):
                    up = False
                if up != self._healthy:
                    logger.warning("engine at %s is %s", self._url, "back" if up else "down")
                self._healthy = up
        finally:
            logging.getLogger("httpx").removeFilter(quiet)


@contextlib.asynccontextmanager
async def open_remote_engine(url: str, **options: Any) -> AsyncIterator[RemoteEngine]:
    """A :class:`RemoteEngine` on ``url`` (``options`` are its own), closed on exit.

    An engine unreachable at start does not stop the server: it starts
    unhealthy (``/health`` 503) and is probed until it answers.
    """
    engine = RemoteEngine(url, **options)
    try:
        await engine.start()
        yield engine
    finally:
        await engine.aclose()


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _local_config(root: object) -> dict[str, Any]:
    """The served model's ``config.json`` and processor config, if ``root`` is a local directory."""
    if not isinstance(root, str) or not Path(root, "config.json").is_file():
        return {}
    try:
        config: dict[str, Any] = json.loads(Path(root, "config.json").read_text("utf-8"))
        for name in ("processor_config.json", "video_preprocessor_config.json"):
            path = Path(root, name)
            if path.is_file():
                processor = json.loads(path.read_text("utf-8"))
                config["_video_processor"] = processor.get("video_processor", processor)
                break
    except (OSError, ValueError):
        return {}
    return config


def _min_frame_pixels(config: dict[str, Any], family: str) -> int:
    """As :func:`streamchat.engine.vllm._min_frame_pixels`, from the processor's JSON."""
    size = (config.get("_video_processor") or {}).get("size") or {}
    shortest = size.get("shortest_edge") if isinstance(size, dict) else None
    if not isinstance(shortest, int):
        return 0
    return shortest // 2 if family == "qwen3_vl" else shortest
