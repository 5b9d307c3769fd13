"""Frames as a model's video, for every engine adapter: no vLLM here.

The local adapter (:mod:`streamchat.engine.vllm`) hands vLLM a ``(T, H, W, 3)``
array; the remote one (:mod:`streamchat.engine.remote`) sends the same frames
over HTTP. Both must give the model the same pixels, so the stacking (the
newest frame's size, nearest-neighbour resizing of frames of another size)
lives here once. So does a video's content id for a remote engine, taken with
the standard library's ``hashlib`` (vLLM's blake3 is not streamchat's
dependency): what identifies the pixels, their size and what the model is
told about them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ..window import Frame

__all__ = ["content_id", "newest_size", "resize_nearest", "stack_frames"]


def newest_size(frames: Sequence[Frame]) -> tuple[int, int]:
    """``(height, width)`` of the video :func:`stack_frames` makes of ``frames``."""
    height, width = frames[-1].image.shape[:2]
    return int(height), int(width)


def stack_frames(frames: Sequence[Frame]) -> npt.NDArray[np.uint8]:
    """Frames as one ``(T, H, W, 3)`` uint8 video, at the newest frame's size.

    A stream can change resolution mid-window; the few frames of another size
    are resized (nearest neighbour, cheap and good enough for patches of 14
    pixels) rather than refused.
    """
    height, width = newest_size(frames)
    return np.stack([resize_nearest(frame.image, height, width) for frame in frames])


def resize_nearest(image: npt.NDArray[np.uint8], height: int, width: int) -> npt.NDArray[np.uint8]:
    """``image`` at ``height`` x ``width`` by nearest neighbour (itself if already that size)."""
    if image.shape[:2] == (height, width):
        return image
    rows = np.arange(height) * image.shape[0] // height
    cols = np.arange(width) * image.shape[1] // width
    resized: npt.NDArray[np.uint8] = image[rows[:, None], cols]
    return resized


def content_id(
    digests: Sequence[bytes], *, size: tuple[int, int], metadata: Any, encoding: str
) -> str:
    """A video's id from its frames' ``digests``, its ``size``, ``metadata`` and ``encoding``.

    Everything that changes what the model sees goes in: the same frames told
    another rate, or sent lossily at another quality, are another video to the
    engine's caches. Deterministic, so front-ends sending the same video share
    the engine's caches.
    """
    digest = hashlib.blake2b(digest_size=20)
    header = {"size": list(size), "count": len(digests), "metadata": metadata, "enc": encoding}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for frame in digests:
        digest.update(frame)
    return "sc-" + digest.hexdigest()
