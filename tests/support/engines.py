"""The real vLLM engine on the tiny model, and what tests feed it.

Starting vLLM takes 15-60 s here, so the packages that need it (``tests/e2e``,
``tests/browser``, ``tests/engine``) open one engine per package in a
package-scoped fixture, with :func:`tiny_engine`. The tiny model is random
weights with the real checkpoints' processors and chat templates, built
offline (:mod:`streamchat.engine.tiny_model`), so token counts are real.

Also the requests the engine tests make (:func:`make_frames`, :func:`ask`),
and the Hugging Face processor a server's prompt is checked against
(:func:`hf_processor`, :func:`process_video`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from streamchat.engine.base import ChatTurn, GenerationRequest, SamplingOptions
from streamchat.engine.prompt import video_metadata
from streamchat.engine.tiny_model import build_tiny_model
from streamchat.window import Frame

if TYPE_CHECKING:
    from streamchat.engine.vllm import VllmEngine

__all__ = [
    "QUESTION",
    "ask",
    "hf_processor",
    "make_frames",
    "process_video",
    "tiny_engine",
]

QUESTION = "What happens in the video?"


@contextlib.asynccontextmanager
async def tiny_engine(
    directory: Path, family: str = "qwen2_vl", **overrides: Any
) -> AsyncIterator[VllmEngine]:
    """A started vLLM engine on the tiny model of ``family``, built in ``directory``.

    The build is skipped when ``directory`` holds a complete one already.
    ``overrides`` are vLLM engine arguments (``max_model_len``,
    ``served_model_name``, ...). vLLM is imported here, not at collection.
    """
    from streamchat.engine.vllm import make_engine_args, open_vllm_engine

    model = build_tiny_model(directory, family=family)
    async with open_vllm_engine(make_engine_args(model, **overrides)) as engine:
        yield engine


def make_frames(
    count: int, *, seed: int = 0, size: tuple[int, int] = (84, 112), fps: float = 2.0
) -> list[Frame]:
    """``count`` frames of random pixels (``size`` is height, width), ``1 / fps`` s apart."""
    rng = np.random.default_rng(seed)
    return [
        Frame(pts=i / fps, image=rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        for i in range(count)
    ]


def ask(
    request_id: str,
    frames: Sequence[Frame],
    *,
    max_tokens: int = 16,
    question: str = QUESTION,
    history: Sequence[ChatTurn] = (),
) -> GenerationRequest:
    """A greedy question about ``frames``, as a session hands it to the engine."""
    return GenerationRequest(
        request_id=request_id,
        question=question,
        frames=frames,
        history=history,
        sampling=SamplingOptions(max_tokens=max_tokens, temperature=0.0),
    )


def hf_processor(path: Path) -> Any:
    """The model's own Hugging Face processor (what vLLM preprocesses with)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)  # type: ignore[no-untyped-call]


def process_video(processor: Any, family: str, text: str, frames: list[Frame], fps: float) -> Any:
    """The processor's output for ``text`` with ``frames`` as one video, as the server sends it."""
    kwargs: dict[str, Any] = {}
    metadata = video_metadata(frames, fps, family=family)
    if metadata is not None:  # vLLM hands the rest of the metadata to the processor
        kwargs["do_sample_frames"] = metadata.pop("do_sample_frames")
        kwargs["video_metadata"] = [metadata]
    video = np.stack([frame.image for frame in frames])
    return processor(text=[text], videos=[video], return_tensors="np", **kwargs)
