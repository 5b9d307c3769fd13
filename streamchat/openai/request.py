"""A chat completion request's body -> what this server will do, or a clear refusal.

The body is read as vLLM's server reads it (:func:`~streamchat.openai.wire.models`'
``ChatCompletionRequest``: the same fields, defaults and aliases), then held
to what this server does, each refusal naming its ``param``:

* parameters: ``model``, ``max_tokens`` / ``max_completion_tokens``,
  ``temperature``, ``top_p``, ``seed``, ``stop``, ``n`` = 1, ``stream``,
  ``stream_options``, vLLM's ``media_io_kwargs`` (``{"video": {"fps",
  "num_frames"}}``) and ``mm_processor_kwargs`` (``min_pixels``,
  ``max_pixels``), vLLM's ``structured_outputs`` of one kind, ``{"choice":
  [...]}`` (2 to 16 strings), ``user``. Any other given a value other than its default
  is ``unsupported_parameter``; so is a field vLLM does not know.
* messages: ``system`` (or ``developer``), ``user`` and ``assistant``, the
  last one the user's; content a string or parts: ``text`` anywhere,
  ``image_url`` and ``video_url`` in user messages only, at most
  ``max_request_videos`` and ``max_request_images`` in all.
* media URLs are kept as given (the fetching policy is the video cache's);
  ``streamchat://sessions/<id>?last_seconds=S`` names a live session.

Pure apart from vLLM's model: bytes in, a :class:`ChatCall` or an
:class:`~streamchat.openai.wire.OpenAIError` out.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from ..config import Settings
from ..engine.base import SamplingOptions
from ..messages import parse_choices
from .wire import OpenAIError, models

__all__ = [
    "LIVE_SCHEME",
    "ChatCall",
    "LiveRef",
    "MediaRef",
    "Turn",
    "VideoOptions",
    "parse_chat",
]

LIVE_SCHEME = "streamchat"
"""``streamchat://sessions/<id>``: a live WebSocket session's window as a video."""

SUPPORTED = frozenset(
    {
        "messages",
        "model",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "n",
        "stream",
        "stream_options",
        "structured_outputs",
        "media_io_kwargs",
        "mm_processor_kwargs",
        "user",
    }
)
MAX_STOP = 8
"""Stop strings a request may give (each at most :data:`MAX_STOP_CHARS`)."""
MAX_STOP_CHARS = 200
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True, slots=True)
class MediaRef:
    """A video or image by URL (``http(s):``, ``data:``, ``file:``)."""

    kind: Literal["video", "image"]
    url: str
    param: str
    """Where it stands in the request, for errors: ``messages[1].content[0]``."""


@dataclass(frozen=True, slots=True)
class LiveRef:
    """A live session's window, as one video."""

    session_id: str
    last_seconds: float | None
    param: str


Part = str | MediaRef | LiveRef


@dataclass(frozen=True, slots=True)
class Turn:
    role: Literal["system", "user", "assistant"]
    content: tuple[Part, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class VideoOptions:
    """How the videos are sampled and sized (``media_io_kwargs``, ``mm_processor_kwargs``)."""

    fps: float
    """Frames per second of video at most."""
    max_frames: int
    """Frames per video at most, spread evenly over all of it (vLLM's ``num_frames``)."""
    min_pixels: int
    max_pixels: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatCall:
    """A request as this server will carry it out."""

    model: str
    turns: tuple[Turn, ...]
    sampling: SamplingOptions
    video: VideoOptions
    stream: bool
    include_usage: bool


def parse_chat(body: bytes, settings: Settings, *, model: str) -> ChatCall:
    """``body`` as a :class:`ChatCall` for a server serving ``model``, or :class:`OpenAIError`."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise OpenAIError(400, "the body is not valid JSON", "invalid_json") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "the body must be a JSON object", "invalid_json")
    request = _validated(data)
    _check_supported(request)
    if request.model not in (None, model):
        raise OpenAIError(
            404,
            f"the model {request.model!r} does not exist: this server serves {model!r}",
            "model_not_found",
            param="model",
        )
    if request.n not in (None, 1):
        raise OpenAIError(400, "only n=1 is supported", "unsupported_parameter", param="n")
    stream = bool(request.stream)
    options = request.stream_options
    if options is not None and not stream:
        raise OpenAIError(
            400,
            "stream_options is only allowed with stream=true",
            "invalid_request",
            param="stream_options",
        )
    include_usage = bool(options is not None and options.include_usage)
    return ChatCall(
        model=model,
        # As sent: vLLM's model leaves some contents as lazy iterators it checks when read.
        turns=_turns(data.get("messages"), settings),
        sampling=_sampling(request, settings),
        video=_video_options(request, settings),
        stream=stream,
        include_usage=include_usage,
    )


def _validated(data: dict[str, Any]) -> Any:
    from pydantic import ValidationError

    try:
        return models().ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise OpenAIError(
            400, f"{param or 'the request'}: {first['msg']}", "invalid_request", param=param
        ) from None
    except Exception as exc:  # vLLM's own checks: VLLMValidationError names the parameter
        if not hasattr(exc, "parameter"):
            raise
        message = str(exc).split(" (parameter=")[0]
        raise OpenAIError(400, message, "invalid_request", param=exc.parameter) from None


def _check_supported(request: Any) -> None:
    """Refuse a parameter this server does not carry out, set to anything but its default."""
    fields = type(request).model_fields
    for name in sorted(request.model_fields_set.intersection(fields) - SUPPORTED):
        if getattr(request, name) != fields[name].get_default(call_default_factory=True):
            raise OpenAIError(
                400,
                f"{name!r} is not supported by this server",
                "unsupported_parameter",
                param=name,
            )
    for name in sorted(request.model_extra or {}):
        raise OpenAIError(
            400,
            f"{name!r} is not a parameter this server knows",
            "unsupported_parameter",
            param=name,
        )


def _sampling(request: Any, settings: Settings) -> SamplingOptions:
    legacy = vars(request).get("max_tokens")  # not the attribute: it warns of its deprecation
    max_tokens = request.max_completion_tokens or legacy or settings.max_tokens
    name = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
    if not 1 <= max_tokens <= settings.max_tokens_limit:
        raise OpenAIError(
            400,
            f"{name} must be between 1 and {settings.max_tokens_limit}",
            "invalid_request",
            param=name,
        )
    temperature = 0.0 if request.temperature is None else float(request.temperature)
    if not (math.isfinite(temperature) and 0.0 <= temperature <= 2.0):
        raise OpenAIError(
            400, "temperature must be between 0 and 2", "invalid_request", param="temperature"
        )
    top_p = 1.0 if request.top_p is None else float(request.top_p)
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise OpenAIError(400, "top_p must be in (0, 1]", "invalid_request", param="top_p")
    stop = request.stop or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stop) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stop):
        raise OpenAIError(
            400,
            f"stop: at most {MAX_STOP} non-empty strings of {MAX_STOP_CHARS} characters",
            "invalid_request",
            param="stop",
        )
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=request.seed,
        stop=stop,
        choices=_choices(request.structured_outputs),
    )


def _choices(structured: Any) -> tuple[str, ...]:
    """vLLM's ``structured_outputs`` of the fixed-choice kind (the only one carried out here)."""
    if structured is None:
        return ()
    given = {
        name
        for name, value in vars(structured).items()
        if not name.startswith("_") and value not in (None, False)
    }
    if given != {"choice"}:
        raise OpenAIError(
            400,
            "structured_outputs: only 'choice' is supported",
            "unsupported_parameter",
            param="structured_outputs",
        )
    try:
        return parse_choices(structured.choice)
    except ValueError as exc:
        raise OpenAIError(
            400,
            f"structured_outputs.choice {exc}",
            "invalid_request",
            param="structured_outputs.choice",
        ) from None


def _only(given: Any, supported: tuple[str, ...], param: str) -> None:
    """Refuse the first key of ``given`` (sorted) that is not ``supported``, naming it."""
    for key in sorted(set(given) - set(supported)):
        raise OpenAIError(
            400,
            f"{param}: {key!r} is not supported ({', '.join(supported)})",
            "unsupported_parameter",
            param=f"{param}.{key}",
        )


def _video_options(request: Any, settings: Settings) -> VideoOptions:
    most = settings.max_ask_frames or settings.max_window_frames
    fps, frames = settings.max_fps, min(DEFAULT_NUM_FRAMES, most)
    io = request.media_io_kwargs or {}
    _only(io, ("video",), "media_io_kwargs")
    video = io.get("video") or {}
    _only(video, ("fps", "num_frames"), "media_io_kwargs.video")
    if "fps" in video:
        fps = _number(video["fps"], "media_io_kwargs.video.fps", 0.0, settings.max_fps)
    if "num_frames" in video:
        count = video["num_frames"]
        if count == -1:
            count = most
        frames = int(_number(count, "media_io_kwargs.video.num_frames", 0.0, most, whole=True))
    pixels = request.mm_processor_kwargs or {}
    _only(pixels, ("min_pixels", "max_pixels"), "mm_processor_kwargs")
    smallest = settings.factor * settings.factor
    max_pixels = int(
        _number(
            pixels.get("max_pixels", settings.max_pixels),
            "mm_processor_kwargs.max_pixels",
            smallest - 1,
            settings.max_pixels,
            whole=True,
        )
    )
    min_pixels = int(
        _number(
            pixels.get("min_pixels", min(settings.min_pixels, max_pixels)),
            "mm_processor_kwargs.min_pixels",
            0.0,
            max_pixels,
            whole=True,
        )
    )
    return VideoOptions(fps=fps, max_frames=frames, min_pixels=min_pixels, max_pixels=max_pixels)


DEFAULT_NUM_FRAMES = 32
"""Frames of a video when the request does not say (the ``num_frames`` default of vLLM's
generic video loader; its Qwen2-VL loader samples 2 fps instead: see docs/openai.md)."""


def _number(value: Any, param: str, above: float, most: float, *, whole: bool = False) -> float:
    """``value`` if it is a number in ``(above, most]`` (an integer when ``whole``)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and whole:
        ok = float(value).is_integer()
    if not ok or not (above < float(value) <= most):
        kind = "a whole number" if whole else "a number"
        raise OpenAIError(
            400,
            f"{param} must be {kind} above {above:g} and at most {most:g}",
            "invalid_request",
            param=param,
        )
    return float(value)


def _turns(messages: Any, settings: Settings) -> tuple[Turn, ...]:
    if not messages:
        raise OpenAIError(400, "messages must not be empty", "invalid_request", param="messages")
    turns = []
    counts = {"video": 0, "image": 0}
    limits = {"video": settings.max_request_videos, "image": settings.max_request_images}
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise OpenAIError(400, f"{where} must be an object", "invalid_request", param=where)
        role = _ROLES.get(message.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise OpenAIError(
                400,
                f"{where}.role must be system, developer, user or assistant",
                "unsupported_parameter",
                param=f"{where}.role",
            )
        content = tuple(_content(message.get("content"), where, media=role == "user"))
        for part in content:
            if isinstance(part, MediaRef | LiveRef):
                kind = part.kind if isinstance(part, MediaRef) else "video"
                counts[kind] += 1
                if counts[kind] > limits[kind]:
                    raise OpenAIError(
                        400,
                        f"at most {limits[kind]} {kind}s in a request",
                        "too_many_media",
                        param=part.param,
                    )
        turns.append(Turn(role, content))  # type: ignore[arg-type]
    if turns[-1].role != "user":
        raise OpenAIError(
            400, "the last message must be the user's", "invalid_request", param="messages"
        )
    return tuple(turns)


def _content(content: Any, where: str, *, media: bool) -> list[Part]:
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list) or not content:
        raise OpenAIError(
            400,
            f"{where}.content must be a string or a non-empty list of parts",
            "invalid_request",
            param=f"{where}.content",
        )
    parts: list[Part] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind in ("image_url", "video_url") and media:
            parts.append(_media(part, kind, at))
        elif kind in ("image_url", "video_url"):
            raise OpenAIError(
                400,
                f"{at}: images and videos go in user messages",
                "invalid_request",
                param=f"{at}.type",
            )
        elif kind == "text":
            raise OpenAIError(
                400, f"{at}.text must be a string", "invalid_request", param=f"{at}.text"
            )
        else:
            raise OpenAIError(
                400,
                f"{at}: content parts may be text, image_url or video_url, not {kind!r}",
                "unsupported_content",
                param=f"{at}.type",
            )
    return parts


def _media(part: dict[str, Any], kind: str, at: str) -> MediaRef | LiveRef:
    value = part.get(kind)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise OpenAIError(
            400,
            f"{at}.{kind}.url must be a non-empty string",
            "invalid_request",
            param=f"{at}.{kind}.url",
        )
    if url.startswith(f"{LIVE_SCHEME}:"):
        if kind != "video_url":
            raise OpenAIError(
                400, f"{at}: a live session is a video_url", "invalid_request", param=at
            )
        return _live(url, at)
    return MediaRef("video" if kind == "video_url" else "image", url, at)


def _live(url: str, at: str) -> LiveRef:
    """``streamchat://sessions/<id>[?last_seconds=S]``."""
    parts = urlsplit(url)
    session = parts.path.removeprefix("/")
    query = parse_qs(parts.query, keep_blank_values=True)
    if parts.netloc != "sessions" or not session or "/" in session or set(query) - {"last_seconds"}:
        raise OpenAIError(
            400,
            f"{at}: a live session is streamchat://sessions/<id>?last_seconds=S",
            "invalid_request",
            param=f"{at}.video_url.url",
        )
    last: float | None = None
    if "last_seconds" in query:
        try:
            last = float(query["last_seconds"][-1])
        except ValueError:
            last = -1.0
        if not (math.isfinite(last) and last > 0):
            raise OpenAIError(
                400,
                f"{at}: last_seconds must be a positive number",
                "invalid_request",
                param=f"{at}.video_url.url",
            )
    return LiveRef(session, last, at)
