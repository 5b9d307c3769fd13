"""Flags map onto Settings and onto vLLM's own engine arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamchat.cli import build_parser, settings_from_args
from streamchat.config import DEFAULT_MAX_REQUEST_IMAGES, DEFAULT_MAX_REQUEST_VIDEOS, Settings
from streamchat.engine.prompt import MAX_CLIPS
from streamchat.engine.vllm import engine_args_from_cli


def test_session_flags_become_settings() -> None:
    args, rest = build_parser().parse_known_args(
        [
            "serve",
            "--fps",
            "4",
            "--window-frames",
            "8",
            "--allowed-file-dir",
            "/srv/media",
            "--max-model-len",
            "1024",
        ]
    )
    settings = settings_from_args(args, "some/model")
    assert settings == Settings(
        model="some/model", fps=4.0, window_frames=8, allowed_file_dir=Path("/srv/media")
    )
    assert rest == ["--max-model-len", "1024"]


def test_engine_flags_are_vllms_own_with_our_defaults(tmp_path: Path) -> None:
    """vLLM's flags mean what they mean to `vllm serve`; unset ones take streamchat's defaults."""
    model = str(tmp_path)  # a local path: nothing is looked up on a model hub
    args = engine_args_from_cli(
        ["--model", model, "--max-model-len", "1024", "--tensor-parallel-size", "2"]
    )
    assert (args.model, args.max_model_len, args.tensor_parallel_size) == (model, 1024, 2)
    assert args.enforce_eager is True
    # A live question's clips, or an OpenAI-style request's videos and images.
    assert args.limit_mm_per_prompt == {
        "video": max(MAX_CLIPS, DEFAULT_MAX_REQUEST_VIDEOS),
        "image": DEFAULT_MAX_REQUEST_IMAGES,
    }


def test_unknown_engine_flag_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        engine_args_from_cli(["--model", str(tmp_path), "--no-such-flag"])
    assert info.value.code == 2


def test_the_engine_takes_as_many_videos_and_images_as_a_request_may_hold() -> None:
    """vLLM's per-prompt limits are raised to the request limits, never lowered, and a limit in
    vLLM's richer form is left as the operator wrote it."""
    from streamchat.engine.vllm import media_limits

    assert media_limits({"video": 4, "image": 4}, videos=6, images=2) == {"video": 6, "image": 4}
    assert media_limits(None, videos=1, images=3) == {"video": MAX_CLIPS, "image": 3}
    rich = {"count": 2, "num_frames": 8}
    assert media_limits({"video": rich}, videos=6, images=1) == {"video": rich, "image": 1}
