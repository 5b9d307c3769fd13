"""Flags map onto Settings and onto vLLM's own engine arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamchat.cli import build_parser, settings_from_args
from streamchat.config import DEFAULT_MAX_REQUEST_IMAGES, DEFAULT_MAX_REQUEST_VIDEOS, Settings
from streamchat.engine.prompt import MAX_CLIPS
from streamchat.engine.timeline import MAX_SEGMENTS
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
    # A live question's clips or timeline segments, or an OpenAI-style request's media.
    assert args.limit_mm_per_prompt == {
        "video": max(MAX_CLIPS, MAX_SEGMENTS, DEFAULT_MAX_REQUEST_VIDEOS),
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

    most = MAX_SEGMENTS + 6
    assert media_limits({"video": 4, "image": 4}, videos=most, images=2) == {
        "video": most,
        "image": 4,
    }
    assert media_limits(None, videos=1, images=3) == {"video": MAX_SEGMENTS, "image": 3}
    rich = {"count": 2, "num_frames": 8}
    assert media_limits({"video": rich}, videos=6, images=1) == {"video": rich, "image": 1}


def test_every_serve_flag_can_come_from_the_environment() -> None:
    """``STREAMCHAT_<FLAG>`` sets a flag's default, parsed as the flag; the command line wins."""
    environ = {
        "STREAMCHAT_MAX_SESSIONS": "12",
        "STREAMCHAT_FPS": "1.5",
        "STREAMCHAT_FETCH_ALLOW_PRIVATE": "true",
        "STREAMCHAT_ALLOW_ORIGIN": "https://a.example, https://b.example",
        "STREAMCHAT_ALLOWED_FILE_DIR": "/srv/media",
        "STREAMCHAT_LOG_FORMAT": "json",
        "STREAMCHAT_WINDOW_FRAMES": "16",
    }
    args, _ = build_parser(environ).parse_known_args(["serve", "--window-frames", "8"])
    settings = settings_from_args(args, "some/model", environ={})
    assert settings.max_sessions == 12 and settings.fps == 1.5
    assert settings.fetch_allow_private is True
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    assert settings.allowed_file_dir == Path("/srv/media")
    assert settings.window_frames == 8  # the command line's
    assert args.log_format == "json"
    assert args.unknown_environment == ()
    off, _ = build_parser({"STREAMCHAT_FETCH_ALLOW_PRIVATE": "off"}).parse_known_args(["serve"])
    assert off.fetch_allow_private is False


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("STREAMCHAT_MAX_SESSIONS", "many"),
        ("STREAMCHAT_FETCH_ALLOW_PRIVATE", "maybe"),
        ("STREAMCHAT_LOG_FORMAT", "xml"),
        ("STREAMCHAT_FETCH_ALLOWED_DOMAIN", "http://not-a-host/"),
    ],
)
def test_a_bad_value_in_the_environment_stops_the_command_naming_it(
    name: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A value the flag would refuse is refused from the environment too, naming the variable."""
    with pytest.raises(SystemExit) as exit_info:
        build_parser({name: value})
    assert exit_info.value.code == 2
    assert f"${name}" in capsys.readouterr().err


def test_a_streamchat_variable_that_names_no_flag_is_reported() -> None:
    """A typo is not ignored in silence: the serve command warns about it."""
    environ = {"STREAMCHAT_MAX_SESION": "3", "STREAMCHAT_API_KEYS": "k", "OTHER": "x"}
    args, _ = build_parser(environ).parse_known_args(["serve"])
    assert args.unknown_environment == ("STREAMCHAT_MAX_SESION",)
    assert build_parser().parse_known_args(["serve"])[0].max_sessions == Settings().max_sessions


def test_the_context_flags_become_settings_and_a_negative_slack_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--context and --timeline-slack (or their STREAMCHAT_* variables) set the settings; auto
    and no slack are the defaults; a context not offered or a negative slack is a usage error."""
    assert (Settings().context, Settings().timeline_slack) == ("auto", None)
    args, _ = build_parser().parse_known_args(["serve", "--context", "timeline"])
    assert settings_from_args(args, "m").context == "timeline"
    environ = {"STREAMCHAT_CONTEXT": "window", "STREAMCHAT_TIMELINE_SLACK": "0"}
    args, _ = build_parser(environ).parse_known_args(["serve"])
    settings = settings_from_args(args, "m", environ={})
    assert (settings.context, settings.timeline_slack) == ("window", 0)
    for wrong in (["--context", "video"], ["--timeline-slack", "-2"]):
        with pytest.raises(SystemExit):
            build_parser().parse_known_args(["serve", *wrong])
        assert wrong[0] in capsys.readouterr().err


def test_the_remote_engine_flags_and_their_environment() -> None:
    """``--engine-url`` and its options parse (from flags or ``STREAMCHAT_ENGINE_*``); a frame
    format other than ``ppm`` or ``jpeg:Q`` stops the command."""
    environ = {"STREAMCHAT_ENGINE_URL": "http://fleet:8100/v1", "STREAMCHAT_ENGINE_KEY": "k"}
    args, rest = build_parser(environ).parse_known_args(
        ["serve", "--engine-timeout", "30", "--engine-frame-format", "jpeg:095"]
    )
    assert (args.engine_url, args.engine_key, args.engine_timeout) == (
        "http://fleet:8100/v1",
        "k",
        30,
    )
    assert args.engine_frame_format == "jpeg:95" and args.engine_family is None and rest == []
    defaults, _ = build_parser().parse_known_args(["serve"])
    assert (defaults.engine_url, defaults.engine_frame_format) == (None, "ppm")
    for bad in ("png", "jpeg:0", "jpeg:101", "jpeg"):
        with pytest.raises(SystemExit) as info:
            build_parser().parse_known_args(["serve", "--engine-frame-format", bad])
        assert info.value.code == 2


def test_engine_url_refuses_local_engine_flags() -> None:
    """With ``--engine-url`` no vLLM runs here: its engine flags are a usage error."""
    from streamchat.cli import main

    assert main(["serve", "--engine-url", "http://x/v1", "--max-model-len", "1024"]) == 2
