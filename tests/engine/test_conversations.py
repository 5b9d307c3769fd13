"""Whole conversations (OpenAI-style requests) through the real engine, per model family.

A conversation carries its media where its messages put them: a video in each
user turn, an image, text around them. What the model is given must be what
the official processor makes of the same conversation, so the prompt's length
is compared with the Hugging Face processor's own count for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from streamchat.engine.base import ChatRequest, Delta, Image, Message, SamplingOptions, Video
from streamchat.engine.prompt import clip_frames, hf_messages, video_metadata
from streamchat.errors import ContextTooLong
from streamchat.window import Frame
from tests.support.engines import hf_processor, make_frames

if TYPE_CHECKING:
    from streamchat.engine.vllm import VllmEngine

pytestmark = pytest.mark.engine


def _conversation(first: list[Frame], second: list[Frame], picture: Frame) -> list[Message]:
    return [
        Message("system", ("You watch videos.",)),
        Message("user", (Video(first, 2.0), "What happens here?")),
        Message("assistant", ("A ball rolls.",)),
        Message("user", ("And next to the picture?", Image(picture), Video(second, 4.0))),
    ]


def _official(processor: Any, family: str, messages: list[Message]) -> Any:
    """The processor's output for ``messages`` with their media, as vLLM would preprocess it."""
    text = processor.tokenizer.apply_chat_template(
        hf_messages(messages), tokenize=False, add_generation_prompt=True
    )
    videos, metadata, images = [], [], []
    for part in (part for message in messages for part in message.content):
        if isinstance(part, Video):
            frames = clip_frames(part.frames)
            videos.append(np.stack([frame.image for frame in frames]))
            meta = video_metadata(frames, part.fps, family=family)
            if meta is not None:
                meta.pop("do_sample_frames")
                metadata.append(meta)
        elif isinstance(part, Image):
            images.append(part.frame.image)
    kwargs: dict[str, Any] = {"do_sample_frames": False, "video_metadata": metadata}
    if not metadata:
        kwargs = {}
    return processor(text=[text], videos=videos, images=images, return_tensors="np", **kwargs)


async def test_a_conversation_with_a_video_in_each_turn_and_an_image(
    vllm_engine: VllmEngine,
) -> None:
    """Two videos in two turns and an image: answered, every frame counted, and the prompt is
    exactly as long as the official processor makes the same conversation."""
    first = make_frames(4, seed=1)
    second = make_frames(3, seed=2, fps=4.0)
    picture = Frame(pts=0.0, image=make_frames(1, seed=3, size=(112, 84))[0].image)
    messages = _conversation(first, second, picture)
    request = ChatRequest(
        request_id="conversation",
        messages=messages,
        sampling=SamplingOptions(max_tokens=8, temperature=0.0),
    )
    deltas: list[Delta] = [d async for d in vllm_engine.generate(request)]
    usage = deltas[-1].usage
    assert usage is not None and deltas[-1].finish_reason == "length"
    assert usage.frames == 4 + 3 + 1
    assert usage.completion_tokens == 8

    processor = hf_processor(Path(vllm_engine.model_name))
    family = vllm_engine.llm.model_config.hf_config.model_type
    official = _official(processor, family, messages)
    pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert usage.prompt_tokens == official["input_ids"].shape[1]
    assert usage.video_tokens == int((official["input_ids"][0] == pad).sum())
    assert vllm_engine.running() == frozenset() and vllm_engine.engine_unfinished() == 0


async def test_a_conversation_is_never_cut_to_fit(vllm_engine: VllmEngine) -> None:
    """A conversation over the context is refused whole (its turns are the client's own)."""
    long_turn = "word " * 3000
    messages = [
        Message("user", (long_turn,)),
        Message("assistant", ("ok",)),
        Message("user", (Video(make_frames(2), 2.0), "and now?")),
    ]
    request = ChatRequest(request_id="too-long", messages=messages)
    with pytest.raises(ContextTooLong):
        async for _ in vllm_engine.generate(request):
            pass
    assert vllm_engine.running() == frozenset() and vllm_engine.engine_unfinished() == 0


async def test_stop_strings_end_the_answer(vllm_engine: VllmEngine) -> None:
    """A stop string cuts the answer where the model writes it (finish reason ``stop``)."""
    messages = [Message("user", (Video(make_frames(2), 2.0), "Describe it."))]
    greedy = SamplingOptions(max_tokens=24, temperature=0.0)
    full = "".join(
        [
            d.text
            async for d in vllm_engine.generate(
                ChatRequest(request_id="free", messages=messages, sampling=greedy)
            )
        ]
    )
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip()
    cut = ChatRequest(
        request_id="stopped",
        messages=messages,
        sampling=SamplingOptions(max_tokens=24, temperature=0.0, stop=(stop,)),
    )
    deltas = [d async for d in vllm_engine.generate(cut)]
    text = "".join(d.text for d in deltas)
    assert deltas[-1].finish_reason == "stop"
    assert stop not in text and full.startswith(text)
