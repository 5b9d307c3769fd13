"""``POST /v1/chat/completions`` and ``GET /v1/models``: the OpenAI-compatible door.

A request goes through the same gates as a WebSocket session, in the same
order: the origin and API key (a Bearer token, :func:`~streamchat.access.admit`),
a place among the server's sessions (:meth:`ServerState.reserve`, held until
the answer ends, so requests and sessions share ``max_sessions`` and the
per-client limit), then a body of at most ``max_request_bytes`` read and
parsed (:mod:`.request`, in a worker thread: a large ``data:`` URL takes
tens of milliseconds to parse, which the event loop must not wait for).

Media come from the server's :class:`~streamchat.videocache.VideoCache`
(fetched with the WebSocket's URL policy, decoded in decoder threads, kept
decoded for the next request) or, for ``streamchat://sessions/<id>``, from a
live session's window, then go to the engine as one conversation
(:class:`~streamchat.engine.base.ChatRequest`) through the same seam as a
session's questions.

A client that goes away stops everything at once: its media fetches, its
decodes (unless another request shares them) and its engine request, which
vLLM aborts. The body of a streamed answer is sent by :class:`_EventStream`,
which watches for the disconnect itself: Starlette's ``StreamingResponse``
stops listening for it under ASGI 2.4 (uvicorn's), and would let an answer
nobody reads run to its end.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..engine.base import ChatRequest, Delta, EngineError, Image, Message, Usage, Video
from ..errors import AccessError, EngineFailure, NoFrames, ServerShutdown, StreamchatError
from ..server import ServerState
from ..videocache import Sampling
from .request import ChatCall, LiveRef, MediaRef, Part, parse_chat
from .wire import OpenAIError, dump, error_body, from_streamchat, models

__all__ = ["CHAT_PATH", "MODELS_PATH", "routes"]

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"

_REFUSALS = frozenset({"unauthorized", "origin_not_allowed", "server_busy", "server_shutdown"})
"""Codes of requests refused at the door, before any work (counted as refused too)."""

logger = logging.getLogger("streamchat.openai")

T = TypeVar("T")


def routes() -> list[Route]:
    """The door's routes, for :func:`~streamchat.app.create_app`."""
    return [
        Route(CHAT_PATH, chat_completions, methods=["POST"]),
        Route(MODELS_PATH, list_models, methods=["GET"]),
    ]


async def list_models(request: Request) -> Response:
    """The one model this server serves, as vLLM's server lists it."""
    state: ServerState = request.app.state.streamchat
    try:
        _identity(request, state)
    except OpenAIError as exc:
        return _error(state, exc)
    m = await asyncio.to_thread(models)
    costs = state.engine.vision_costs
    card = m.ModelCard(
        id=state.engine.model_name,
        owned_by="streamchat",
        root=state.engine.model_name,
        max_model_len=costs.max_model_len if costs else None,
    )
    return Response(dump(m.ModelList(data=[card])), media_type="application/json")


async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.streamchat
    reserved: str | None = None  # the place to give back when this returns
    try:
        identity = _identity(request, state)
        if state.closing:
            raise ServerShutdown("the server is shutting down")
        if not state.request_rates.take(identity, asyncio.get_running_loop().time()):
            s = state.settings
            raise OpenAIError(
                429,
                f"more than {s.requests_per_second:g} requests a second (bursts of "
                f"{s.request_burst}): slow down",
                "rate_limited",
                "rate_limit_error",
            )
        state.reserve(identity)
        reserved = identity
        body = await _body(request, state.settings.max_request_bytes)
        call = await asyncio.to_thread(
            parse_chat, body, state.settings, model=state.engine.model_name
        )
        messages = await _unless_gone(request.receive, _media(call, state, identity))
        if messages is None:  # the client left while its media were fetched
            return Response(status_code=499)
        request_id = f"chatcmpl-{secrets.token_hex(12)}"
        reply = _Reply(
            call,
            state,
            ChatRequest(request_id=request_id, messages=messages, sampling=call.sampling),
        )
        if call.stream:
            begun = await _unless_gone(request.receive, reply.begin())
            if begun is None:
                await reply.close()
                return Response(status_code=499)
            reserved = None  # the stream gives the place back when it ends
            return _EventStream(reply, release=lambda: state.release(identity))
        answer = await _unless_gone(request.receive, reply.complete())
        if answer is None:
            return Response(status_code=499)
        return Response(answer, media_type="application/json")
    except (OpenAIError, StreamchatError) as exc:
        return _error(state, from_streamchat(exc))
    finally:
        if reserved is not None:
            state.release(reserved)


def _identity(request: Request, state: ServerState) -> str:
    """Who is asking (its key, else its address), after the origin and key checks."""
    client = request.client.host if request.client else None
    try:
        grant = state.admit(request.headers, client)
    except AccessError as exc:
        raise from_streamchat(exc) from None
    if grant.needs_token:
        raise OpenAIError(
            401,
            "this server needs an API key: Authorization: Bearer <key>",
            "unauthorized",
            "authentication_error",
        )
    return grant.identity


async def _body(request: Request, limit: int) -> bytes:
    """The request's body, refused (413) as soon as it is over ``limit`` bytes."""
    too_large = OpenAIError(
        413, f"the request body is larger than {limit} bytes", "request_too_large"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _unless_gone(receive: Receive, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None if the client disconnects first: ``work`` is then
    cancelled and awaited, so nothing it started outlives the request."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return None
    return task.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _media(call: ChatCall, state: ServerState, identity: str) -> list[Message]:
    """The conversation with every video and image in place (fetched, decoded, or live)."""
    s, v = state.settings, call.video
    sampling = Sampling(
        fps=v.fps,
        max_frames=v.max_frames,
        min_pixels=v.min_pixels,
        max_pixels=v.max_pixels,
        factor=s.factor,
    )
    refs = [part for turn in call.turns for part in turn.content if not isinstance(part, str)]
    found: dict[int, Video | Image] = {}

    async def one(ref: MediaRef | LiveRef) -> None:
        found[id(ref)] = await _one(ref, state, identity, sampling)

    try:
        async with asyncio.TaskGroup() as group:  # the first failure cancels the others
            for ref in refs:
                group.create_task(one(ref))
    except BaseExceptionGroup as failed:
        first = failed.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return [
        Message(turn.role, tuple(_placed(part, found) for part in turn.content))
        for turn in call.turns
    ]


def _placed(part: Part, found: dict[int, Video | Image]) -> str | Video | Image:
    return part if isinstance(part, str) else found[id(part)]


async def _one(
    ref: MediaRef | LiveRef, state: ServerState, identity: str, sampling: Sampling
) -> Video | Image:
    try:
        if isinstance(ref, LiveRef):
            return _live(ref, state, identity, sampling.max_frames)
        if ref.kind == "image":
            return Image(await state.videos.image(ref.url, sampling))
        decoded = await state.videos.video(ref.url, sampling)
    except StreamchatError as exc:
        error = from_streamchat(exc)
        error.param = error.param or ref.param
        raise error from None
    if not decoded.frames:
        raise OpenAIError(
            400, f"{ref.param}: the video has no frames", "no_frames", param=ref.param
        )
    return Video(decoded.frames, decoded.fps)


def _live(ref: LiveRef, state: ServerState, identity: str, max_frames: int) -> Video:
    """A live session's window now, if ``identity`` opened it (else: no such session)."""
    session = state.find_session(ref.session_id)
    if session is None or session.identity != identity:
        raise OpenAIError(
            404,
            f"{ref.param}: no live session {ref.session_id!r} of yours",
            "session_not_found",
            param=ref.param,
        )
    frames = session.protocol.window.select(last_seconds=ref.last_seconds, max_frames=max_frames)
    if not frames:
        raise NoFrames(f"{ref.param}: the session has no frames in that range yet")
    return Video(tuple(frames), session.protocol.options.fps)


class _Reply:
    """One request's answer from the engine, as OpenAI's objects."""

    def __init__(self, call: ChatCall, state: ServerState, request: ChatRequest) -> None:
        self.call = call
        self.state = state
        self.request = request
        self.created = int(time.time())
        self._stream: AsyncGenerator[Delta, None] | None = None
        self._first: Delta | None = None

    async def begin(self) -> bool:
        """Start the answer and wait for its first delta, so that a prompt the engine refuses
        (``context_too_long``) is an HTTP error, not an event after a 200, as with vLLM."""
        self._stream = self._deltas()
        self._first = await anext(self._stream)
        return True

    async def close(self) -> None:
        """Close the answer (vLLM aborts it if it is still running); again is harmless."""
        if self._stream is not None:
            await self._stream.aclose()

    async def complete(self) -> bytes:
        """The whole answer as a ``chat.completion``."""
        m = models()
        parts, last = [], None
        async for delta in self._deltas():
            parts.append(delta.text)
            last = delta
        assert last is not None and last.usage is not None
        message = m.ChatMessage(role="assistant", content="".join(parts))
        choice = m.ChatCompletionResponseChoice(
            index=0, message=message, finish_reason=_finish(last)
        )
        response = m.ChatCompletionResponse(
            id=self.request.request_id,
            created=self.created,
            model=self.call.model,
            choices=[choice],
            usage=_usage(last.usage),
        )
        return dump(response)

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The answer as server-sent ``chat.completion.chunk`` events, then ``[DONE]``."""
        m = models()
        yield self._chunk(m.DeltaMessage(role="assistant", content=""))
        try:
            async for delta in self._begun():
                if delta.text:
                    yield self._chunk(m.DeltaMessage(content=delta.text))
                if delta.finish_reason is not None:
                    yield self._chunk(m.DeltaMessage(), finish=_finish(delta))
                    if self.call.include_usage and delta.usage is not None:
                        yield _event(dump(self._stream_response([], usage=_usage(delta.usage))))
        except (OpenAIError, StreamchatError) as exc:
            error = from_streamchat(exc)
            self.state.metrics.error("openai", error.code)
            yield _event(error_body(error))
        yield b"data: [DONE]\n\n"

    async def _begun(self) -> AsyncGenerator[Delta, None]:
        """The deltas of the answer :meth:`begin` started, its first one included."""
        assert self._stream is not None and self._first is not None
        yield self._first
        async for delta in self._stream:
            yield delta

    def _chunk(self, delta: Any, *, finish: str | None = None) -> bytes:
        choice = models().ChatCompletionResponseStreamChoice(
            index=0, delta=delta, finish_reason=finish
        )
        return _event(dump(self._stream_response([choice])))

    def _stream_response(self, choices: list[Any], usage: Any = None) -> Any:
        return models().ChatCompletionStreamResponse(
            id=self.request.request_id,
            created=self.created,
            model=self.call.model,
            choices=choices,
            usage=usage,
        )

    async def _deltas(self) -> AsyncGenerator[Delta, None]:
        """The engine's deltas; its failures as typed errors. Closing this aborts the request.

        Counted as the WebSocket's answers are: how it ended (``cancelled`` when it was
        closed early, ``error`` when it failed), time to the first token, tokens.
        """
        stream = self.state.engine.generate(self.request)
        loop = asyncio.get_running_loop()
        start, ttft, finish, usage = loop.time(), None, "error", None
        try:
            async for delta in stream:
                if delta.text and ttft is None:
                    ttft = loop.time() - start
                if delta.finish_reason is not None:
                    finish, usage = delta.finish_reason, delta.usage
                yield delta
        except EngineError as exc:
            logger.warning("request %s failed in the engine: %s", self.request.request_id, exc)
            raise EngineFailure("the model failed while answering") from exc
        except (GeneratorExit, asyncio.CancelledError):
            finish = "cancelled" if usage is None else finish  # closed before its end
            raise
        finally:
            await stream.aclose()
            seconds = loop.time() - start
            self.state.metrics.answered("openai", finish, usage, ttft=ttft, seconds=seconds)


class _EventStream(Response):
    """A ``text/event-stream`` response that stops its answer when the client goes away."""

    media_type = "text/event-stream"

    def __init__(self, reply: _Reply, *, release: Callable[[], None]) -> None:
        # Not Response.__init__: it would set a Content-Length for an empty body.
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache"})
        self.reply = reply
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await _unless_gone(receive, self._send_all(send))
        finally:
            await self.reply.close()
            self.release()

    async def _send_all(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        chunks = self.reply.chunks()
        try:
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            await chunks.aclose()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _event(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


def _finish(delta: Delta) -> str:
    return "length" if delta.finish_reason == "length" else "stop"


def _usage(usage: Usage) -> Any:
    """OpenAI's usage, ``prompt_tokens_details`` as vLLM's server fills it (prefix-cached and
    video tokens), so a client reads streamchat's reuse where it reads OpenAI's or vLLM's."""
    m = models()
    details = m.PromptTokenUsageInfo(
        cached_tokens=usage.cached_tokens, multimodal_tokens={"video": usage.video_tokens}
    )
    return m.UsageInfo(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details=details,
    )


def _error(state: ServerState, error: OpenAIError) -> Response:
    state.metrics.error("openai", error.code)
    if error.code in _REFUSALS:
        state.metrics.refused("openai", error.code)
    return Response(error_body(error), status_code=error.status, media_type="application/json")
