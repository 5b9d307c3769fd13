"""Build a tiny, randomly initialised Qwen-VL model directory, fully offline.

The real engine tests (and a developer trying the server without a GPU or a
model download) need a model that vLLM loads like any Hugging Face checkpoint:
a config, safetensors weights, a tokenizer with the Qwen special tokens, the
model's own chat template and processor configs. Everything here is generated
locally in a few seconds and takes under 2 MB; nothing is downloaded.

The sizes follow what vLLM's CPU backend accepts (see
``shared/NOTES-vllm-cpu.md``): hidden size 128, 2 layers, 2 attention heads of
head_dim 64 (the CPU attention backend supports only some head sizes), one KV
head, a vision tower of width 64. The processors get small pixel limits so a
frame costs a handful of video tokens.

The weights are random, so the answers are gibberish; they are made to be
*long* gibberish: the output rows of the special tokens (end of turn, end of
text, vision placeholders) and of byte tokens that are not printable ASCII
are zeroed, so greedy decoding never ends a turn early and every token decodes
to visible text. Tests can therefore rely on ``max_tokens`` deltas.

Usage: ``python -m streamchat.tiny_model OUT_DIR [--family qwen2_vl|qwen2_5_vl|qwen3_vl]
[--max-position-embeddings N]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CHAT_TEMPLATE",
    "FAMILIES",
    "MAX_POSITIONS",
    "SPECIAL_TOKENS",
    "build_tiny_model",
    "is_complete",
    "main",
]

logger = logging.getLogger("streamchat.tiny_model")

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
"""Qwen's special tokens, in the order of their ids (0..6) in the tiny vocab."""

VOCAB_SIZE = 640
"""Rows of the embedding; the trained tokenizer has at most this many tokens."""

MAX_POSITIONS = 4096
"""The default ``max_position_embeddings``: the longest context vLLM may give the model."""

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2-VL-Instruct's chat template (Qwen2.5-VL ships the same one)."""

_WEIGHTS = "model.safetensors"
_MARKER = ".streamchat-tiny-model.json"
"""Written last: its presence means a previous build finished."""

_WORDS = (
    "the a an of to in on at for with from by and or but not is are was were be this that "
    "these those it its video frame frames stream second seconds minute red green blue white "
    "black person people car cars dog cat ball table chair door window street room light dark "
    "moves walks runs stands sits opens closes left right top bottom center background front "
    "what where when who how why which many much one two three four five six seven eight nine "
    "ten yes no there here time start end first last before after during answer question see "
    "shows looks appears image picture scene camera slowly quickly near far small large"
).split()


@dataclass(frozen=True, slots=True)
class _Ids:
    """Token ids of the special tokens, as the configs need them."""

    endoftext: int
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int


def build_tiny_model(
    path: Path,
    *,
    family: str = "qwen2_vl",
    seed: int = 0,
    max_position_embeddings: int = MAX_POSITIONS,
) -> Path:
    """Write a tiny random ``family`` model into ``path`` and return ``path``.

    Idempotent: a directory that already holds a complete build of the same
    family, seed and ``max_position_embeddings`` is returned untouched (a build
    interrupted half-way is redone). ``max_position_embeddings`` only changes
    the config (rotary positions have no weights): a larger one lets vLLM run
    the model with a longer ``max_model_len``. Imports torch and transformers
    lazily: they are heavy and only needed here.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    if max_position_embeddings < 1:
        raise ValueError("max_position_embeddings must be positive")
    path = Path(path)
    if is_complete(path, family=family, seed=seed, max_position_embeddings=max_position_embeddings):
        return path
    path.mkdir(parents=True, exist_ok=True)
    (path / _MARKER).unlink(missing_ok=True)

    from .engine import cpu_compat

    cpu_compat.install()  # the Qwen video processors import torchvision

    tokenizer = _train_tokenizer(seed)
    ids = _Ids(*(tokenizer.token_to_id(token) for token in SPECIAL_TOKENS))
    config = _model_config(family, ids, max_position_embeddings)
    _save_weights(path, config, tokenizer, seed)
    _save_processor(path, family, tokenizer)
    _write_json(path / "generation_config.json", _generation_config(ids))
    _write_json(path / _MARKER, _marker(family, seed, max_position_embeddings))
    logger.info("built tiny %s model in %s", family, path)
    return path


def is_complete(
    path: Path,
    *,
    family: str = "qwen2_vl",
    seed: int = 0,
    max_position_embeddings: int = MAX_POSITIONS,
) -> bool:
    """Whether ``path`` holds a finished build of ``family`` with ``seed`` (and context)."""
    try:
        marker = json.loads((Path(path) / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    expected = _marker(family, seed, max_position_embeddings)
    return bool(marker == expected and (Path(path) / _WEIGHTS).is_file())


def _marker(family: str, seed: int, max_position_embeddings: int) -> dict[str, Any]:
    # The default context is left out: builds made before it was a parameter stay complete.
    marker: dict[str, Any] = {"family": family, "seed": seed}
    if max_position_embeddings != MAX_POSITIONS:
        marker["max_position_embeddings"] = max_position_embeddings
    return marker


# -- tokenizer ---------------------------------------------------------------


def _corpus(seed: int, lines: int = 4000) -> Iterator[str]:
    """Deterministic English-ish text with digits and punctuation to train BPE on."""
    rng = random.Random(seed)
    for _ in range(lines):
        words = rng.choices(_WORDS, k=rng.randint(3, 14))
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), f"{rng.uniform(0, 99):.1f}s")
        sentence = " ".join(words)
        yield sentence[0].upper() + sentence[1:] + rng.choice(".?!,:;")


def _train_tokenizer(seed: int) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` with the special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(seed), trainer=trainer)
    if tokenizer.get_vocab_size() > VOCAB_SIZE:
        raise AssertionError("the trained vocabulary exceeds the embedding")
    return tokenizer


def _fast_tokenizer(tokenizer: Any) -> Any:
    """The trained tokenizer as transformers saves it, with the chat template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
        model_max_length=32768,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


# -- configs -----------------------------------------------------------------

_MROPE: dict[str, dict[str, Any]] = {
    "qwen2_vl": {"rope_theta": 1_000_000.0, "mrope_section": [8, 12, 12]},
    "qwen2_5_vl": {"rope_theta": 1_000_000.0, "mrope_section": [8, 12, 12]},
    "qwen3_vl": {
        "rope_theta": 5_000_000.0,
        "mrope_section": [12, 10, 10],
        "mrope_interleaved": True,
    },
}
"""Multimodal rotary sections; they sum to head_dim / 2 = 32."""

_TEXT_EXTRA: dict[str, dict[str, Any]] = {"qwen3_vl": {"head_dim": 64}}

_VISION: dict[str, dict[str, Any]] = {
    "qwen2_vl": {"embed_dim": 64, "hidden_size": 128, "mlp_ratio": 4, "patch_size": 14},
    "qwen2_5_vl": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "out_hidden_size": 128,
        "patch_size": 14,
        "window_size": 56,
        "fullatt_block_indexes": [0],
        "tokens_per_second": 2,
    },
    "qwen3_vl": {
        "depth": 2,  # deepstack taps the first block; the last one feeds the merger
        "hidden_size": 64,
        "intermediate_size": 128,
        "out_hidden_size": 128,
        "patch_size": 16,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0],
    },
}
"""Vision towers of width 64 whose output matches the text hidden size (128)."""


def _model_config(family: str, ids: _Ids, max_position_embeddings: int) -> Any:
    """The transformers config of the tiny ``family`` model."""
    from transformers import AutoConfig

    text: dict[str, Any] = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "bos_token_id": ids.endoftext,
        "eos_token_id": ids.im_end,
        "pad_token_id": ids.endoftext,
        "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", **_MROPE[family]},
        **_TEXT_EXTRA.get(family, {}),
    }
    vision = {"depth": 1, "num_heads": 2, "in_channels": 3, **_VISION[family]}
    return AutoConfig.for_model(
        family,
        text_config=text,
        vision_config=vision,
        image_token_id=ids.image_pad,
        video_token_id=ids.video_pad,
        vision_start_token_id=ids.vision_start,
        vision_end_token_id=ids.vision_end,
        tie_word_embeddings=False,
    )


def _generation_config(ids: _Ids) -> dict[str, Any]:
    return {
        "bos_token_id": ids.endoftext,
        "eos_token_id": [ids.im_end, ids.endoftext],
        "pad_token_id": ids.endoftext,
    }


# -- weights -----------------------------------------------------------------


def _save_weights(path: Path, config: Any, tokenizer: Any, seed: int) -> None:
    """Random weights in bfloat16, with the output rows of unwanted tokens zeroed."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(  # type: ignore[no-untyped-call]
            config, dtype=torch.float32
        )
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        silent = list(_silent_token_ids(tokenizer))
        head[silent] = 0.0
    model.to(torch.bfloat16)
    for sub in (model.config.text_config, model.config.vision_config):
        sub.dtype = torch.bfloat16
    model.save_pretrained(path)


def _silent_token_ids(tokenizer: Any) -> Iterator[int]:
    """Ids greedy decoding must never pick: special tokens and non-ASCII bytes.

    A zero output row gives logit 0 while the max over hundreds of random rows
    is positive, so these tokens are never the argmax. Unused embedding rows
    beyond the vocabulary are silenced too.
    """
    vocab = tokenizer.get_vocab_size()
    for token_id in range(VOCAB_SIZE):
        if token_id >= vocab:
            yield token_id
            continue
        token = tokenizer.id_to_token(token_id)
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        if token in SPECIAL_TOKENS or not (text.isascii() and text.isprintable() and text):
            yield token_id


# -- processor ---------------------------------------------------------------


def _save_processor(path: Path, family: str, tokenizer: Any) -> None:
    """Tokenizer, chat template, image and video processor configs.

    The pixel limits keep a frame to a few patches: the server resizes frames
    to its own budget before they get here, and tests want few tokens.
    """
    patch = 16 if family == "qwen3_vl" else 14
    factor = patch * 2  # two patches merge into one token per side
    size = {"shortest_edge": (2 * factor) ** 2, "longest_edge": (4 * factor) ** 2}
    image = _image_processor(size, patch)
    video = _video_processor(family, size)
    _processor(family, image, _fast_tokenizer(tokenizer), video).save_pretrained(path)


def _image_processor(size: dict[str, int], patch: int) -> Any:
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2)


def _video_processor(family: str, size: dict[str, int]) -> Any:
    """The family's video processor; it never samples frames (we do)."""
    import transformers

    name = "Qwen3VLVideoProcessor" if family == "qwen3_vl" else "Qwen2VLVideoProcessor"
    cls = getattr(transformers, name)
    return cls(size=size, do_sample_frames=False, cap_pixels_per_frame=True)


def _processor(family: str, image: Any, tokenizer: Any, video: Any) -> Any:
    import transformers

    name = {
        "qwen2_vl": "Qwen2VLProcessor",
        "qwen2_5_vl": "Qwen2_5_VLProcessor",
        "qwen3_vl": "Qwen3VLProcessor",
    }[family]
    cls = getattr(transformers, name)
    return cls(
        image_processor=image,
        tokenizer=tokenizer,
        video_processor=video,
        chat_template=CHAT_TEMPLATE,
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# -- command line ------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m streamchat.tiny_model OUT_DIR [--family F] [--seed N]``.

    ``--max-position-embeddings N`` builds a model for a context longer than 4096.
    """
    parser = argparse.ArgumentParser(prog="python -m streamchat.tiny_model", description=__doc__)
    parser.add_argument("out_dir", type=Path, help="directory to write the model into")
    parser.add_argument("--family", choices=FAMILIES, default="qwen2_vl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-position-embeddings", type=int, default=MAX_POSITIONS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model = build_tiny_model(
        args.out_dir,
        family=args.family,
        seed=args.seed,
        max_position_embeddings=args.max_position_embeddings,
    )
    print(model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
