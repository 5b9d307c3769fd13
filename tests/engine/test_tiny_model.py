"""The tiny model builds offline, is small, and preprocesses like the real checkpoint."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from streamchat.engine.base import ChatTurn
from streamchat.engine.prompt import build_messages
from streamchat.engine.tiny_model import (
    CHECKPOINTS,
    SPECIAL_TOKENS,
    Scale,
    build_tiny_model,
    is_complete,
    main,
)
from streamchat.media.sampling import target_size
from tests.support.engines import hf_processor, make_frames, process_video

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
"""What every family's template writes for one video; the processor expands the pad."""


def _size(values: Any) -> dict[str, int]:
    """A config's pixel limits as ``size``: Qwen2-VL's files say ``min_pixels``/``max_pixels``."""
    if "size" in values:
        return dict(values["size"])
    return {"shortest_edge": values["min_pixels"], "longest_edge": values["max_pixels"]}


@pytest.mark.parametrize("family", FAMILIES)
def test_builds_a_small_complete_model_directory(
    tiny_model: Callable[[str], Path], family: str
) -> None:
    """The directory holds what a Hugging Face loader needs and stays under 5 MB."""
    path = tiny_model(family)
    names = {p.name for p in path.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "processor_config.json",
    } <= names
    assert sum(p.stat().st_size for p in path.iterdir()) < 5 * 1024 * 1024
    assert json.loads((path / "config.json").read_text())["model_type"] == family
    assert is_complete(path, family=family)


def test_build_is_idempotent(tiny_model: Callable[[str], Path]) -> None:
    """A complete build is returned as is, without rewriting the weights."""
    path = tiny_model("qwen2_vl")
    before = (path / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == before


def test_a_build_from_before_the_real_preprocessing_is_redone(
    tiny_model: Callable[[str], Path], tmp_path: Path
) -> None:
    """A cached build whose marker predates the build version is not taken as complete."""
    old = tmp_path / "old"
    shutil.copytree(tiny_model("qwen2_vl"), old)
    marker = old / ".streamchat-tiny-model.json"
    assert is_complete(old)
    marker.write_text(json.dumps({"family": "qwen2_vl", "seed": 0}))  # what builds wrote before
    assert not is_complete(old)


def test_a_scaled_build_is_larger_and_preprocesses_the_same(
    tiny_model: Callable[[str], Path], tmp_path: Path
) -> None:
    """A :class:`Scale` widens and deepens both towers; the processor files stay the default's."""
    scale = Scale(text_layers=3, text_heads=4, vision_depth=3, vision_heads=4)
    default = tiny_model("qwen3_vl")
    assert not is_complete(default, family="qwen3_vl", scale=scale)
    path = build_tiny_model(tmp_path / "scaled", family="qwen3_vl", scale=scale)
    assert is_complete(path, family="qwen3_vl", scale=scale)
    assert not is_complete(path, family="qwen3_vl")
    config = json.loads((path / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (
        256,
        3,
        4,
    )
    assert (vision["hidden_size"], vision["depth"], vision["out_hidden_size"]) == (128, 3, 256)
    for name in ("processor_config.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (path / name).read_text() == (default / name).read_text()
    with pytest.raises(ValueError, match="at least 1"):
        Scale(text_layers=0)


def test_unknown_family_is_refused(tmp_path: Path) -> None:
    """A typo in the family fails before anything is written."""
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny_model(tmp_path / "m", family="llama")
    assert not (tmp_path / "m").exists()


def test_command_line_builds_into_the_given_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m streamchat.engine.tiny_model OUT`` prints the directory it built."""
    assert main([str(tmp_path / "cli"), "--family", "qwen2_vl"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert is_complete(tmp_path / "cli")


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_has_the_checkpoints_added_tokens(
    tiny_model: Callable[[str], Path], family: str
) -> None:
    """Each added token of the real tokenizer is one token here, special where it is there."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model(family))
    added = CHECKPOINTS[family].added_tokens
    assert {token for token, _ in added} >= set(SPECIAL_TOKENS)
    for token, special in added:
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1, token
        assert tokenizer.decode(ids, skip_special_tokens=False) == token
        # Special tokens vanish from decoded answers; <tool_call>, <think>... stay text.
        assert tokenizer.decode(ids, skip_special_tokens=True) == ("" if special else token)
    text = "<|im_start|>user\nWhat is the red car doing?<|im_end|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_checkpoint_table_holds_the_published_values() -> None:
    """The table says what the checkpoints' processor files say (pinned here a second time)."""
    clip = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
    half = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    published = {
        # family: (checkpoint, image limits, video limits, patch, mean/std)
        "qwen2_vl": ("Qwen/Qwen2-VL-2B-Instruct", (3136, 12845056), (3136, 12845056), 14, clip),
        "qwen2_5_vl": ("Qwen/Qwen2.5-VL-3B-Instruct", (3136, 12845056), (3136, 12845056), 14, clip),
        "qwen3_vl": ("Qwen/Qwen3-VL-2B-Instruct", (65536, 16777216), (4096, 25165824), 16, half),
    }
    assert set(CHECKPOINTS) == set(FAMILIES)
    for family, (name, image, video, patch, (mean, std)) in published.items():
        checkpoint = CHECKPOINTS[family]
        assert checkpoint.name == name
        assert _size(checkpoint.image) == {"shortest_edge": image[0], "longest_edge": image[1]}
        assert _size(checkpoint.video) == {"shortest_edge": video[0], "longest_edge": video[1]}
        for values in (checkpoint.image, checkpoint.video):
            assert (values["patch_size"], values["temporal_patch_size"]) == (patch, 2)
            assert values["merge_size"] == 2
            assert (values["image_mean"], values["image_std"]) == (mean, std)
        assert checkpoint.factor == 2 * patch
    assert CHECKPOINTS["qwen2_vl"].chat_template == CHECKPOINTS["qwen2_5_vl"].chat_template
    assert CHECKPOINTS["qwen3_vl"].chat_template != CHECKPOINTS["qwen2_vl"].chat_template


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_loads_with_the_checkpoints_configs(
    tiny_model: Callable[[str], Path], family: str
) -> None:
    """AutoProcessor, offline, gives the checkpoint's limits, sizes, mean/std and chat template."""
    processor = hf_processor(tiny_model(family))
    checkpoint = CHECKPOINTS[family]
    for loaded, expected in (
        (processor.image_processor, checkpoint.image),
        (processor.video_processor, checkpoint.video),
    ):
        assert dict(loaded.size) == _size(expected)
        assert loaded.patch_size == expected["patch_size"]
        assert loaded.temporal_patch_size == expected["temporal_patch_size"]
        assert loaded.merge_size == expected["merge_size"]
        assert list(loaded.image_mean) == expected["image_mean"]
        assert list(loaded.image_std) == expected["image_std"]
    # Qwen3-VL's processor samples frames itself unless told not to, as the real one does.
    assert processor.video_processor.do_sample_frames == (family == "qwen3_vl")
    assert processor.chat_template == checkpoint.chat_template
    assert processor.tokenizer.chat_template == checkpoint.chat_template


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_renders_a_video_question_as_the_checkpoint_does(
    tiny_model: Callable[[str], Path], family: str
) -> None:
    """One video and a question render as the real templates render them.

    The expected texts follow from the templates themselves and match their
    published renderings: Qwen2-VL and Qwen2.5-VL add the default system prompt
    (the model cards' "<|im_start|>system\\nYou are a helpful assistant.<|im_end|>"),
    Qwen3-VL adds none (a printed Qwen3-VL-2B-Instruct prompt starts with the
    user turn). Both write the placeholder before the text.
    """
    processor = hf_processor(tiny_model(family))
    messages = build_messages("What happens?", make_frames(4, seed=4, size=(48, 64)), fps=2.0)
    question = messages[-1]["content"][-1]["text"]
    text = processor.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    user = f"<|im_start|>user\n{VIDEO}{question}<|im_end|>\n<|im_start|>assistant\n"
    assert text == (user if family == "qwen3_vl" else system + user)
    # The engine renders with the tokenizer; HF's processor path gives the same text.
    assert processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        text
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_replays_system_and_history_as_text(
    tiny_model: Callable[[str], Path], family: str
) -> None:
    """A system prompt and earlier turns render once each, in order, with one video at the end."""
    processor = hf_processor(tiny_model(family))
    history = [ChatTurn("Is the door open?", "It is closed."), ChatTurn("And now?", "Open.")]
    messages = build_messages(
        "What changed?",
        make_frames(2, seed=2, size=(48, 64)),
        history,
        fps=2.0,
        system="Answer briefly.",
    )
    text = processor.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n")
    assert "You are a helpful assistant." not in text  # the given system prompt replaces it
    turns = re.findall(r"<\|im_start\|>(\w+)\n", text)
    assert turns == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    for turn in history:
        assert text.count(f"\n{turn.question}<|im_end|>") == 1
        assert text.count(f"<|im_start|>assistant\n{turn.answer}<|im_end|>") == 1
    assert text.count(VIDEO) == 1
    assert text.index(VIDEO) > text.index("And now?")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_qwen3_timestamps_come_from_the_processor_not_the_template(
    tiny_model: Callable[[str], Path],
) -> None:
    """Qwen3-VL's template writes no time; its processor writes one timestamp per frame pair."""
    processor = hf_processor(tiny_model("qwen3_vl"))
    frames = make_frames(6, seed=6, size=(64, 64))
    text = processor.tokenizer.apply_chat_template(
        build_messages("When?", frames, fps=2.0), tokenize=False, add_generation_prompt=True
    )
    assert "seconds>" not in text
    out = process_video(processor, "qwen3_vl", text, frames, 2.0)
    expanded = processor.tokenizer.decode(out["input_ids"][0])
    stamps = [float(t) for t in re.findall(r"<(\d+\.\d) seconds>", expanded)]
    grid_t = int(out["video_grid_thw"][0][0])
    assert len(stamps) == grid_t == 3
    # Each pair is stamped with the mean of its two frames' times, to a tenth of a second.
    pairs = [(frames[i].pts + frames[i + 1].pts) / 2 for i in range(0, len(frames), 2)]
    assert stamps == pytest.approx(pairs, abs=0.051)


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_expands_an_odd_number_of_frames(
    tiny_model: Callable[[str], Path], family: str
) -> None:
    """The chat template places the video placeholder and the processor pads odd T."""
    processor = hf_processor(tiny_model(family))
    frames = make_frames(3, seed=3, size=(90, 120))
    text = processor.tokenizer.apply_chat_template(
        build_messages("What happens?", frames, fps=2.0),
        tokenize=False,
        add_generation_prompt=True,
    )
    assert VIDEO in text
    out = process_video(processor, family, text, frames, 2.0)
    grid = out["video_grid_thw"][0].tolist()
    assert grid[0] == 2  # 3 frames padded to 4, two frames per temporal patch
    video_pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int((out["input_ids"][0] == video_pad).sum()) == grid[0] * grid[1] * grid[2] // 4


@pytest.mark.parametrize("family", FAMILIES)
def test_real_size_frames_reach_the_model_unresized(
    tiny_model: Callable[[str], Path], family: str
) -> None:
    """A 32-frame window of 720p at the server's size costs what the real checkpoint counts.

    The server resizes 1280x720 frames by its own rule to the family's factor
    (patch times merge: 28, or 32 for Qwen3-VL) within 448x448 pixels; the
    official processor then keeps that size, so the prompt gets
    (h/factor)*(w/factor) video tokens per two frames: 4032 for the window on
    Qwen2/2.5-VL, 2880 on Qwen3-VL.
    """
    processor = hf_processor(tiny_model(family))
    factor = CHECKPOINTS[family].factor
    patch = CHECKPOINTS[family].video["patch_size"]
    width, height = target_size(1280, 720, factor=factor, max_pixels=448 * 448)
    frames = make_frames(32, seed=32, size=(height, width))
    text = processor.tokenizer.apply_chat_template(
        build_messages("What happens?", frames, fps=2.0), tokenize=False, add_generation_prompt=True
    )
    out = process_video(processor, family, text, frames, 2.0)
    assert out["video_grid_thw"].tolist() == [[16, height // patch, width // patch]]
    video_pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    tokens = int((out["input_ids"][0] == video_pad).sum())
    assert tokens == 16 * (height // factor) * (width // factor)
    assert out["pixel_values_videos"].shape[0] == 16 * (height // patch) * (width // patch)
