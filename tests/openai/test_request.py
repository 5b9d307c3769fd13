"""Chat completion bodies -> what the server does, or an OpenAI error naming the field (pure)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from streamchat.config import Settings
from streamchat.openai.request import LiveRef, MediaRef, parse_chat
from streamchat.openai.wire import OpenAIError

SETTINGS = dataclasses.replace(Settings(), max_ask_frames=24)
MODEL = "tiny"


def _parse(body: dict[str, Any] | bytes, settings: Settings = SETTINGS) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_chat(raw, settings, model=MODEL)


def _refused(body: dict[str, Any] | bytes, settings: Settings = SETTINGS) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        _parse(body, settings)
    return caught.value


def _user(*content: Any) -> dict[str, Any]:
    return {"role": "user", "content": list(content)}


def _video(url: str) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url}}


def _image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def test_a_conversation_keeps_its_media_in_place() -> None:
    """Turns, roles and parts come out in order; media stay URLs with where they stood."""
    call = _parse(
        {
            "model": MODEL,
            "messages": [
                {"role": "developer", "content": "Be brief."},
                _user(_video("http://h/a.mp4"), _text("What happens?")),
                {"role": "assistant", "content": [_text("A ball rolls.")]},
                _user(_text("And here?"), _image("data:image/png;base64,AAAA")),
            ],
        }
    )
    assert [t.role for t in call.turns] == ["system", "user", "assistant", "user"]
    assert call.turns[0].content == ("Be brief.",)
    assert call.turns[1].content == (
        MediaRef("video", "http://h/a.mp4", "messages[1].content[0]"),
        "What happens?",
    )
    assert call.turns[3].content[1] == MediaRef(
        "image", "data:image/png;base64,AAAA", "messages[3].content[1]"
    )
    assert (call.stream, call.include_usage, call.model) == (False, False, MODEL)


def test_sampling_and_video_options_are_read_as_vllm_reads_them() -> None:
    """max_completion_tokens wins, stop becomes a tuple, media_io_kwargs and mm_processor_kwargs
    set the sampling; without them a video gets vLLM's 32 frames at most."""
    call = _parse(
        {
            "messages": [_user(_text("hi"))],
            "max_tokens": 5,
            "max_completion_tokens": 7,
            "temperature": 0.5,
            "top_p": 0.9,
            "seed": 3,
            "stop": "END",
            "stream": True,
            "stream_options": {"include_usage": True},
            "media_io_kwargs": {"video": {"fps": 1.5, "num_frames": 8}},
            "mm_processor_kwargs": {"max_pixels": 200_000, "min_pixels": 4000},
        }
    )
    s = call.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.seed, s.stop) == (7, 0.5, 0.9, 3, ("END",))
    assert (call.stream, call.include_usage) == (True, True)
    v = call.video
    assert (v.fps, v.max_frames, v.max_pixels, v.min_pixels) == (1.5, 8, 200_000, 4000)
    plain = _parse({"messages": [_user(_text("hi"))]})
    assert (plain.video.max_frames, plain.video.fps) == (24, SETTINGS.max_fps)  # 32 > max_ask
    assert plain.sampling.max_tokens == SETTINGS.max_tokens


def test_a_live_session_is_a_video() -> None:
    """streamchat://sessions/<id>?last_seconds=S names a live session's window."""
    call = _parse({"messages": [_user(_video("streamchat://sessions/abc?last_seconds=20"))]})
    assert call.turns[0].content == (LiveRef("abc", 20.0, "messages[0].content[0]"),)


def test_a_fixed_choice_structured_output_becomes_the_answers_choices() -> None:
    """vLLM's ``structured_outputs.choice`` reaches the engine as the sampling's choices."""
    call = _parse({"messages": [_user(_text("hi"))], "structured_outputs": {"choice": ["y", "n"]}})
    assert call.sampling.choices == ("y", "n")
    assert _parse({"messages": [_user(_text("hi"))]}).sampling.choices == ()


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (
            {"structured_outputs": {"regex": "a+"}, "messages": [_user(_text("x"))]},
            400,
            "unsupported_parameter",
            "structured_outputs",
        ),
        (
            {"structured_outputs": {"choice": ["one"]}, "messages": [_user(_text("x"))]},
            400,
            "invalid_request",
            "structured_outputs.choice",
        ),
        (
            {"structured_outputs": {"choice": ["a", "a"]}, "messages": [_user(_text("x"))]},
            400,
            "invalid_request",
            "structured_outputs.choice",
        ),
        (b"{not json", 400, "invalid_json", None),
        (b"[1, 2]", 400, "invalid_json", None),
        ({"messages": "hello"}, 400, "invalid_request", "messages"),
        ({"messages": []}, 400, "invalid_request", "messages"),
        ({"model": "other", "messages": [_user(_text("x"))]}, 404, "model_not_found", "model"),
        ({"n": 2, "messages": [_user(_text("x"))]}, 400, "unsupported_parameter", "n"),
        (
            {"logprobs": True, "messages": [_user(_text("x"))]},
            400,
            "unsupported_parameter",
            "logprobs",
        ),
        (
            {"frobnicate": 1, "messages": [_user(_text("x"))]},
            400,
            "unsupported_parameter",
            "frobnicate",
        ),
        (
            {"messages": [_user({"type": "input_audio", "input_audio": {}})]},
            400,
            "unsupported_content",
            "messages[0].content[0].type",
        ),
        (
            {"messages": [{"role": "tool", "content": "x"}]},
            400,
            "unsupported_parameter",
            "messages[0].role",
        ),
        (
            {
                "messages": [
                    {"role": "assistant", "content": [_video("http://h/a.mp4")]},
                    _user(_text("x")),
                ]
            },
            400,
            "invalid_request",
            "messages[0].content[0].type",
        ),
        (
            {"messages": [_user(_text("x")), {"role": "assistant", "content": "y"}]},
            400,
            "invalid_request",
            "messages",
        ),
        (
            {"messages": [_user(_video(""))]},
            400,
            "invalid_request",
            "messages[0].content[0].video_url.url",
        ),
        (
            {"messages": [_user(*[_video(f"http://h/{i}.mp4") for i in range(5)])]},
            400,
            "too_many_media",
            "messages[0].content[4]",
        ),
        (
            {"max_tokens": 100_000, "messages": [_user(_text("x"))]},
            400,
            "invalid_request",
            "max_tokens",
        ),
        (
            {"temperature": 3, "messages": [_user(_text("x"))]},
            400,
            "invalid_request",
            "temperature",
        ),
        (
            {"stream_options": {"include_usage": True}, "messages": [_user(_text("x"))]},
            400,
            "invalid_request",
            "stream_options",
        ),
        (
            {"media_io_kwargs": {"video": {"fps": 100}}, "messages": [_user(_text("x"))]},
            400,
            "invalid_request",
            "media_io_kwargs.video.fps",
        ),
        (
            {"media_io_kwargs": {"video": {"num_frames": 1.5}}, "messages": [_user(_text("x"))]},
            400,
            "invalid_request",
            "media_io_kwargs.video.num_frames",
        ),
        (
            {"media_io_kwargs": {"audio": {}}, "messages": [_user(_text("x"))]},
            400,
            "unsupported_parameter",
            "media_io_kwargs.audio",
        ),
        (
            {"mm_processor_kwargs": {"max_pixels": 10**9}, "messages": [_user(_text("x"))]},
            400,
            "invalid_request",
            "mm_processor_kwargs.max_pixels",
        ),
        (
            {"messages": [_user(_video("streamchat://sessions/a?last_seconds=-1"))]},
            400,
            "invalid_request",
            "messages[0].content[0].video_url.url",
        ),
        (
            {"messages": [_user(_image("streamchat://sessions/a"))]},
            400,
            "invalid_request",
            "messages[0].content[0]",
        ),
    ],
)
def test_bad_requests_are_refused_naming_the_field(
    body: dict[str, Any] | bytes, status: int, code: str, param: str | None
) -> None:
    """Each malformed or unsupported request is an OpenAI error with a stable code and param."""
    error = _refused(body)
    assert (error.status, error.code, error.param) == (status, code, param)
    assert error.message


def test_a_default_value_of_an_unsupported_parameter_is_accepted() -> None:
    """Clients that send unsupported parameters at their defaults (logprobs=false) still work."""
    call = _parse({"logprobs": False, "n": 1, "messages": [_user(_text("x"))]})
    assert call.turns[0].content == ("x",)
