"""The tiny model builds offline, is small, and loads with the model's own processor."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from streamchat.prompt import build_messages, video_metadata
from streamchat.tiny_model import SPECIAL_TOKENS, build_tiny_model, is_complete, main
from streamchat.window import Frame

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


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


def test_unknown_family_is_refused(tmp_path: Path) -> None:
    """A typo in the family fails before anything is written."""
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny_model(tmp_path / "m", family="llama")
    assert not (tmp_path / "m").exists()


def test_command_line_builds_into_the_given_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m streamchat.tiny_model OUT`` prints the directory it built."""
    assert main([str(tmp_path / "cli"), "--family", "qwen2_vl"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert is_complete(tmp_path / "cli")


def test_tokenizer_round_trips_the_special_tokens(tiny_model: Callable[[str], Path]) -> None:
    """Each Qwen special token is one token and decodes back to itself."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model("qwen2_vl"))
    for token in SPECIAL_TOKENS:
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1, token
        assert tokenizer.decode(ids, skip_special_tokens=False) == token
    text = "<|im_start|>user\nWhat is the red car doing?<|im_end|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_expands_an_odd_number_of_frames(
    tiny_model: Callable[[str], Path], family: str
) -> None:
    """The chat template places the video placeholder and the processor pads odd T."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model(family))
    rng = np.random.default_rng(0)
    frames = [Frame(i / 2, rng.integers(0, 256, (90, 120, 3), np.uint8)) for i in range(3)]
    text = processor.tokenizer.apply_chat_template(
        build_messages("What happens?", frames, fps=2.0),
        tokenize=False,
        add_generation_prompt=True,
    )
    assert "<|vision_start|><|video_pad|><|vision_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    video = np.stack([f.image for f in frames])
    kwargs = {}
    if family != "qwen2_vl":  # vLLM passes the rest of the metadata to the processor
        metadata = video_metadata(frames, 2.0)
        kwargs["do_sample_frames"] = metadata.pop("do_sample_frames")
        kwargs["video_metadata"] = [metadata]
    out = processor(text=[text], videos=[video], return_tensors="np", **kwargs)
    grid = out["video_grid_thw"][0].tolist()
    assert grid[0] == 2  # 3 frames padded to 4, two frames per temporal patch
    video_pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int((out["input_ids"][0] == video_pad).sum()) == grid[0] * grid[1] * grid[2] // 4
