"""The session timeline against the official single-video prompt, per model family.

A timeline shows the window as short videos (segments) where the official
processing (qwen-vl-utils and the checkpoint's Hugging Face processor) shows
the same frames as one video told its nominal rate. These tests compare the
two at the processor level, with no engine: the timeline prompt is made as
the engine makes it (its template, :meth:`VllmEngine._media`, vLLM's own
multimodal processor) and the 3-D positions (M-RoPE) with vLLM's own
``get_mrope_input_positions``, so every figure is what vLLM would compute.
docs/timeline.md ("Fidelity per family") tabulates what they prove:

* video tokens: equal for frames as the server sizes them, as long as each
  run of frames between gaps is even; an odd run before a gap shows its last
  frame twice; Qwen3-VL's processor shrinks one long video of large frames
  (its pixel budget is per video item) and never a 4-frame segment;
* time: Qwen2/2.5-VL segments are labelled with their frames' stream times,
  Qwen3-VL writes the official timestamps (the mean of each pair's times);
* positions: within a segment identical to the official video's for those
  frames; Qwen2/2.5-VL's temporal index restarts at each segment, Qwen3-VL's
  pairs are positioned as in the official video, a few tokens later.
"""

from __future__ import annotations

import functools
import re
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamchat.config import DEFAULT_FPS, DEFAULT_MAX_PIXELS
from streamchat.engine.base import Message, Video
from streamchat.engine.timeline import Segment, Timeline
from streamchat.media.sampling import target_size
from streamchat.window import Frame
from tests.support.engines import hf_processor

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
FPS = DEFAULT_FPS
BUDGET = DEFAULT_MAX_PIXELS
"""The server's pixel budget per frame (448 x 448)."""
QUESTION = "What happens?"
LONGEST_EDGE = 25165824
"""Qwen3-VL-2B's ``video_preprocessor_config.json``: pixels of one video item at most."""


@dataclass(frozen=True)
class Family:
    """One family's tiny model: vLLM's processor for it and the checkpoint's own."""

    name: str
    factor: int
    vllm: Any
    """vLLM's multimodal processor (what the engine runs)."""
    hf: Any
    """The Hugging Face processor (what qwen-vl-utils users run)."""
    config: Any
    engine: Any
    """A stand-in for the engine with what its prompt methods read."""

    @property
    def pad(self) -> int:
        return int(self.config.video_token_id)


@dataclass(frozen=True)
class Prompt:
    """A processed prompt: its tokens, text, 3-D positions and per-video grids."""

    ids: list[int]
    text: str
    positions: np.ndarray[Any, Any]
    grids: list[tuple[int, int, int]]
    """``(t, h, w)`` of each video item, in merged tokens."""
    seconds_per_grid: list[float]
    """Qwen2.5-VL's ``second_per_grid_ts`` of each video item (empty for the others)."""

    def pads(self, pad: int) -> np.ndarray[Any, Any]:
        """Indices of the video tokens, in order."""
        return np.flatnonzero(np.asarray(self.ids) == pad)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, tiny_model: Callable[[str], Path]) -> Family:
    """The family's processors, built in-process from its tiny model (no engine started)."""
    from streamchat.engine import cpu_compat

    cpu_compat.install()  # before vLLM is imported
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from streamchat.engine.vllm import VllmEngine

    name: str = request.param
    path = tiny_model(name)
    model_config = ModelConfig(model=str(path), limit_mm_per_prompt={"video": 64})
    processor = MULTIMODAL_REGISTRY.create_processor(model_config)
    hf = hf_processor(path)
    config = model_config.hf_config
    engine = types.SimpleNamespace(
        _family=name,
        _digests=None,
        _tokenizer=processor.info.get_tokenizer(),
        _chat_template=hf.chat_template,
    )
    engine._media = functools.partial(VllmEngine._media, engine)
    engine._text = functools.partial(VllmEngine._text, engine)
    engine._timeline_messages = functools.partial(VllmEngine._timeline_messages, engine)
    factor = config.vision_config.patch_size * config.vision_config.spatial_merge_size
    return Family(name, factor, processor, hf, config, engine)


# -- frames and prompts ---------------------------------------------------------------


def stream(runs: Sequence[tuple[float, int]], size: tuple[int, int]) -> list[Frame]:
    """Frames of ``size`` (width, height) at :data:`FPS`: ``count`` from each ``start``."""
    rng = np.random.default_rng(7)
    width, height = size
    return [
        Frame(pts=start + i / FPS, image=rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        for start, count in runs
        for i in range(count)
    ]


def server_size(family: Family, width: int, height: int, budget: int = BUDGET) -> tuple[int, int]:
    """The size the server's decoder gives a ``width`` x ``height`` source for this family."""
    return target_size(width, height, factor=family.factor, max_pixels=budget)


def timeline_prompt(family: Family, window: Sequence[Frame]) -> tuple[Prompt, list[Segment]]:
    """The first ask's timeline prompt about ``window``, made as the engine makes it."""
    draft = Timeline(fps=FPS).draft(window, QUESTION)
    messages: list[Message] = family.engine._timeline_messages(draft)
    media = family.engine._media(messages)["multi_modal_data"]
    return process(family, family.engine._text(messages), media), draft.segments


def official_prompt(family: Family, frames: Sequence[Frame]) -> Prompt:
    """``frames`` as one video told the nominal rate, as qwen-vl-utils hands them over.

    qwen-vl-utils gives the processor the sampled frames with the source's
    rate and the frames' indices in it: a source sampled at :data:`FPS`.
    """
    video = np.stack([frame.image for frame in frames])
    indices = [round(frame.pts * FPS) for frame in frames]
    metadata = {
        "fps": FPS,
        "frames_indices": indices if family.name == "qwen3_vl" else list(range(len(frames))),
        "total_num_frames": indices[-1] + 1 if family.name == "qwen3_vl" else len(frames),
        "duration": len(frames) / FPS,
        "video_backend": "pyav",
        "do_sample_frames": False,
    }
    messages = [Message("user", (Video(frames, FPS), QUESTION))]
    item: Any = video if family.name == "qwen2_vl" else (video, metadata)
    return process(family, family.engine._text(messages), {"video": [item]})


def hf_official_video_tokens(family: Family, frames: Sequence[Frame]) -> tuple[int, str]:
    """Video tokens and text of the checkpoint's own processor for ``frames`` as one video."""
    video = np.stack([frame.image for frame in frames])
    messages = [Message("user", (Video(frames, FPS), QUESTION))]
    text = family.engine._text(messages)
    kwargs: dict[str, Any] = {}
    if family.name != "qwen2_vl":
        indices = [round(frame.pts * FPS) for frame in frames]
        qwen3 = family.name == "qwen3_vl"
        kwargs["do_sample_frames"] = False
        kwargs["video_metadata"] = [
            {
                "fps": FPS,
                "frames_indices": indices if qwen3 else list(range(len(frames))),
                "total_num_frames": indices[-1] + 1 if qwen3 else len(frames),
            }
        ]
    out = family.hf(text=[text], videos=[video], return_tensors="np", **kwargs)
    ids = out["input_ids"][0]
    return int((ids == family.pad).sum()), family.hf.tokenizer.decode(ids)


def process(family: Family, text: str, media: dict[str, Any]) -> Prompt:
    """``text`` and ``media`` through vLLM's processor; positions from vLLM's model code."""
    from vllm.multimodal.inputs import MultiModalFeatureSpec

    out = family.vllm(text, family.vllm.info.parse_mm_data(media))
    ids: list[int] = list(out["prompt_token_ids"])
    items, places = out["mm_kwargs"]["video"], out["mm_placeholders"]["video"]
    features = [
        MultiModalFeatureSpec(data=item, modality="video", identifier=f"v{n}", mm_position=place)
        for n, (item, place) in enumerate(zip(items, places, strict=True))
    ]
    merge = family.config.vision_config.spatial_merge_size
    grids = []
    for item in items:
        t, h, w = (int(x) for x in item["video_grid_thw"].data.tolist())
        grids.append((t, h // merge, w // merge))
    seconds = [float(i["second_per_grid_ts"].data) for i in items if "second_per_grid_ts" in i]
    positions = mrope_positions(family, ids, features)
    return Prompt(ids, family.vllm.info.get_tokenizer().decode(ids), positions, grids, seconds)


def mrope_positions(family: Family, ids: list[int], features: list[Any]) -> np.ndarray[Any, Any]:
    """The ``(3, len(ids))`` positions vLLM's model code computes for the prompt."""
    if family.name == "qwen3_vl":
        from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration

        positions, _ = Qwen3VLForConditionalGeneration._get_mrope_input_positions(
            ids, features, family.config
        )
        return np.asarray(positions)
    if family.name == "qwen2_vl":
        from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration as Model
    else:
        from vllm.model_executor.models.qwen2_5_vl import (
            Qwen2_5_VLForConditionalGeneration as Model,
        )
    # Both read only the model's config: a stand-in spares building the model.
    model = types.SimpleNamespace(config=family.config)
    model.iter_mm_grid_thw = functools.partial(Model.iter_mm_grid_thw, model)
    positions, _ = Model.get_mrope_input_positions(model, ids, features)
    return np.asarray(positions)


def pairs_of(segments: Sequence[Segment]) -> list[tuple[Frame, Frame]]:
    """The temporal patches the segments make: each segment's frames two by two (one doubled)."""
    pairs = []
    for segment in segments:
        frames = list(segment.frames)
        frames += frames[-1:] * (len(frames) % 2)
        pairs += [(frames[i], frames[i + 1]) for i in range(0, len(frames), 2)]
    return pairs


def timestamps(text: str) -> list[str]:
    return re.findall(r"<([0-9.]+) seconds>", text)


# -- the window as the server sees it -------------------------------------------------

GAPPED = ((10.0, 6), (30.0, 10))
"""A window that starts at t=10 s and has a 16.5 s gap: runs of 6 and 10 frames."""
SIZES = {"square": (448, 448), "16:9": (1280, 720)}


@pytest.mark.parametrize("shape", SIZES)
def test_video_tokens_equal_the_official_single_videos(family: Family, shape: str) -> None:
    """At the server's frame sizes the timeline's segments hold exactly as many video tokens
    as the official processor gives the same frames as one video, pair for pair."""
    size = server_size(family, *SIZES[shape])
    window = stream(GAPPED, size)
    ours, segments = timeline_prompt(family, window)
    official = official_prompt(family, window)
    assert [len(s.frames) for s in segments] == [4, 2, 4, 4, 2]
    hf_tokens, _ = hf_official_video_tokens(family, window)

    per_pair = (size[1] // family.factor) * (size[0] // family.factor)
    assert {(h, w) for _, h, w in ours.grids} == {
        (size[1] // family.factor, size[0] // family.factor)
    }
    assert sum(t for t, _, _ in ours.grids) == len(window) // 2
    assert len(ours.pads(family.pad)) == len(window) // 2 * per_pair
    assert len(ours.pads(family.pad)) == len(official.pads(family.pad)) == hf_tokens


def test_an_odd_run_before_a_gap_shows_its_last_frame_twice(family: Family) -> None:
    """Runs of 3, 3 and 2 frames: the timeline makes 5 temporal patches (each odd run padded
    on its own) where one official video pairs frames across the gaps and makes 4."""
    size = server_size(family, 448, 448)
    window = stream(((10.0, 3), (20.0, 3), (30.0, 2)), size)
    ours, segments = timeline_prompt(family, window)
    hf_tokens, _ = hf_official_video_tokens(family, window)
    per_pair = (size[1] // family.factor) ** 2
    assert [len(s.frames) for s in segments] == [3, 3, 2]
    assert len(ours.pads(family.pad)) == 5 * per_pair
    assert hf_tokens == 4 * per_pair


def test_an_odd_newest_frame_waits_for_the_next_ask(family: Family) -> None:
    """An odd window shows one frame fewer than the official video, which would pad the
    newest frame into a pair of its own: the same number of video tokens minus one pair."""
    size = server_size(family, 448, 448)
    window = stream(((10.0, 9),), size)
    ours, segments = timeline_prompt(family, window)
    hf_tokens, _ = hf_official_video_tokens(family, window)
    per_pair = (size[1] // family.factor) ** 2
    assert segments[-1].frames[-1] is window[-2]
    assert len(ours.pads(family.pad)) == 4 * per_pair and hf_tokens == 5 * per_pair


@pytest.mark.parametrize("family", ["qwen3_vl"], indirect=True)
@pytest.mark.parametrize("count", [16, 32])
def test_qwen3_vl_budgets_pixels_per_video_item(family: Family, count: int) -> None:
    """Qwen3-VL at 720p: one official video of more frames than its per-video pixel budget
    holds is shrunk by the processor, the timeline's 4-frame segments never are (they keep
    the server's size, as the server's token budget counts them)."""
    size = server_size(family, 1280, 720, budget=1280 * 720)
    window = stream(((10.0, count),), size)
    ours, _ = timeline_prompt(family, window)
    official = official_prompt(family, window)
    server_pair = (size[1] // 32) * (size[0] // 32)
    (official_grid,) = official.grids
    official_pair = official_grid[1] * official_grid[2]
    assert family.hf.video_processor.size["longest_edge"] == LONGEST_EDGE
    assert size == (1280, 704) and server_pair == 880
    assert {h * w for _, h, w in ours.grids} == {server_pair}
    assert len(ours.pads(family.pad)) == count // 2 * server_pair
    if count * size[0] * size[1] <= LONGEST_EDGE:
        assert official_pair == server_pair
    else:
        assert official_pair == 740  # 640x1184: shrunk to fit 25,165,824 pixels in all
        assert len(official.pads(family.pad)) == count // 2 * official_pair


def test_time_labels_are_the_frames_stream_times(family: Family) -> None:
    """Qwen2/2.5-VL read each segment's stream times in its label, Qwen3-VL the timestamps
    its processor writes, which are the official ones (mean of each pair's stream times)
    for a window that starts late and has a gap; segments never span the gap."""
    window = stream(GAPPED, server_size(family, 448, 448))
    ours, segments = timeline_prompt(family, window)
    assert [f for s in segments for f in s.frames] == window
    assert all(s.last - s.first <= 2.0 / FPS * (len(s.frames) - 1) for s in segments)
    if family.name == "qwen3_vl":
        means = [f"{(a.pts + b.pts) / 2:.1f}" for a, b in pairs_of(segments)]
        assert timestamps(ours.text) == means
        assert means[:3] == ["10.2", "11.2", "12.2"] and means[3] == "30.2"
        _, official_text = hf_official_video_tokens(family, window)
        assert timestamps(official_text) == means
        assert re.search(r"t=[0-9.]+-[0-9.]+s:", ours.text) is None  # no labels
        return
    labels = re.findall(r"t=([0-9.]+)-([0-9.]+)s:<\|vision_start\|>", ours.text)
    assert labels == [(f"{s.first:.1f}", f"{s.last:.1f}") for s in segments]
    assert labels[0] == ("10.0", "11.5") and labels[2] == ("30.0", "31.5")
    assert timestamps(ours.text) == []
    if family.name == "qwen2_5_vl":  # told the nominal rate, as the official video is
        official = official_prompt(family, window)
        assert ours.seconds_per_grid == [2 / FPS] * len(segments)
        assert official.seconds_per_grid == [2 / FPS]


def test_positions_within_a_segment_are_the_official_videos(family: Family) -> None:
    """vLLM's M-RoPE positions: each segment's video tokens sit relative to one another
    exactly as the same frames' tokens do in the official video; across segments
    Qwen2/2.5-VL's temporal index restarts, Qwen3-VL's pairs keep the official layout."""
    size = server_size(family, 1280, 720)
    window = stream(GAPPED, size)
    ours, segments = timeline_prompt(family, window)
    official = official_prompt(family, window)
    mine, theirs = ours.pads(family.pad), official.pads(family.pad)
    per_pair = (size[1] // family.factor) * (size[0] // family.factor)
    assert len(mine) == len(theirs) == len(window) // 2 * per_pair

    sizes = [len(s.frames) // 2 for s in segments]  # temporal patches per segment
    starts = np.cumsum([0, *sizes])  # each segment's first pair
    for first, last in zip(starts[:-1], starts[1:], strict=True):
        span = slice(first * per_pair, last * per_pair)
        ours_relative = ours.positions[:, mine[span]] - ours.positions[:, mine[span][:1]]
        theirs_relative = (
            official.positions[:, theirs[span]] - official.positions[:, theirs[span][:1]]
        )
        np.testing.assert_array_equal(ours_relative, theirs_relative)

    # Each pair's first video token, and its temporal position.
    ours_t = ours.positions[0, mine[::per_pair]]
    theirs_t = official.positions[0, theirs[::per_pair]]
    if family.name == "qwen3_vl":
        # Every pair is a grid of its own (temporal index 0); time is in its timestamp text.
        # Pairs follow one another as in the official video, but for the template's vision
        # start and end around each segment after the first (2 tokens more).
        boundary = np.isin(np.arange(1, len(ours_t)), starts[1:-1])
        np.testing.assert_array_equal(np.diff(ours_t), np.diff(theirs_t) + 2 * boundary)
        return
    # Qwen2.5-VL: second_per_grid_ts x tokens_per_second per pair (2 at 2 fps); Qwen2-VL: 1.
    spg = ours.seconds_per_grid[0] if ours.seconds_per_grid else 1.0
    step = spg * getattr(family.config.vision_config, "tokens_per_second", 1)
    video_of = np.repeat(starts[:-1], sizes)  # each pair's segment's first pair
    restarting = [k * step for size in sizes for k in range(size)]  # [0, 1, 0, 0, 1, 0, 1, 0]
    assert list(ours_t - ours_t[video_of]) == restarting
    assert list(theirs_t - theirs_t[0]) == [p * step for p in range(len(theirs_t))]
    # Segments still follow one another: each starts after everything before it.
    for first in starts[1:-1]:
        assert ours.positions[:, : mine[first * per_pair]].max() < ours_t[first]
