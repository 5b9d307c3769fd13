"""OpenAI's wire shapes, as vLLM's server speaks them, and the errors of this door.

Requests are validated and responses built with vLLM's own protocol models
(``vllm.entrypoints.openai``), so every field vLLM's clients send is read with
vLLM's defaults and aliases (``max_tokens`` / ``max_completion_tokens``,
``stream_options``, ``media_io_kwargs``, ``mm_processor_kwargs``) and every
response has the fields vLLM's has. Those models live in the module tree of
vLLM's server, which imports vLLM's configuration code (transformers,
torchvision): 10-20 s on a server that runs a fake engine, nothing extra
beside a vLLM engine that has imported it already. :func:`models` therefore
loads them once, when first needed.

Errors are OpenAI's error object, ``{"error": {"message", "type", "param",
"code"}}``, with a stable string ``code``: the error tree's wire code
(:mod:`streamchat.errors`) or one of this door's. (vLLM's own ``ErrorInfo``
puts the HTTP status in ``code``; OpenAI's clients read a string there.)
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from ..errors import (
    ContextTooLong,
    DecoderBusy,
    EngineFailure,
    EngineTimeout,
    EngineUnavailable,
    OriginNotAllowed,
    ServerBusy,
    ServerShutdown,
    StreamchatError,
    Unauthorized,
)

__all__ = ["OpenAIError", "dump", "error_body", "from_streamchat", "models"]


@functools.cache
def models() -> SimpleNamespace:
    """vLLM's OpenAI protocol models (imported on first use; see the module docstring)."""
    from ..engine import cpu_compat

    cpu_compat.install()  # vLLM's config code imports torchvision
    from vllm.entrypoints.generate.base.protocol import DeltaMessage
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionRequest,
        ChatCompletionResponse,
        ChatCompletionResponseChoice,
        ChatCompletionResponseStreamChoice,
        ChatCompletionStreamResponse,
        ChatMessage,
    )
    from vllm.entrypoints.serve.engine.protocol import (
        ModelCard,
        ModelList,
        PromptTokenUsageInfo,
        UsageInfo,
    )

    return SimpleNamespace(
        ChatCompletionRequest=ChatCompletionRequest,
        ChatCompletionResponse=ChatCompletionResponse,
        ChatCompletionResponseChoice=ChatCompletionResponseChoice,
        ChatCompletionResponseStreamChoice=ChatCompletionResponseStreamChoice,
        ChatCompletionStreamResponse=ChatCompletionStreamResponse,
        ChatMessage=ChatMessage,
        DeltaMessage=DeltaMessage,
        ModelCard=ModelCard,
        ModelList=ModelList,
        PromptTokenUsageInfo=PromptTokenUsageInfo,
        UsageInfo=UsageInfo,
    )


@dataclass
class OpenAIError(Exception):
    """An error this door answers with: HTTP status, OpenAI ``type``, stable ``code``, ``param``."""

    status: int
    message: str
    code: str
    type: str = "invalid_request_error"
    param: str | None = None

    def __str__(self) -> str:
        return self.message


def error_body(error: OpenAIError) -> bytes:
    """The JSON body of ``error``."""
    fields = {"message": error.message, "type": error.type, "param": error.param}
    return json.dumps({"error": {**fields, "code": error.code}}).encode()


def from_streamchat(exc: BaseException) -> OpenAIError:
    """What a request is told of one of the server's own errors (others: internal, no details)."""
    if isinstance(exc, OpenAIError):
        return exc
    if not isinstance(exc, StreamchatError) or type(exc) is StreamchatError:
        return OpenAIError(500, "internal server error", "internal_error", "server_error")
    status, kind = _STATUS.get(type(exc), (400, "invalid_request_error"))
    return OpenAIError(status, exc.message, exc.code, kind, _PARAMS.get(type(exc)))


_STATUS: dict[type[StreamchatError], tuple[int, str]] = {
    Unauthorized: (401, "authentication_error"),
    OriginNotAllowed: (403, "permission_error"),
    ServerBusy: (429, "rate_limit_error"),
    ServerShutdown: (503, "server_error"),
    DecoderBusy: (503, "server_error"),
    EngineFailure: (500, "server_error"),
    EngineUnavailable: (503, "server_error"),
    EngineTimeout: (504, "server_error"),
}
"""Statuses other than 400 (the request's own fault: its media, its size, its context)."""
_PARAMS: dict[type[StreamchatError], str] = {ContextTooLong: "messages"}


def dump(model: Any) -> bytes:
    """A vLLM protocol model as compact JSON, as vLLM's server writes it."""
    text: str = model.model_dump_json()
    return text.encode()
