"""Frames as a remote vLLM server reads them: data URLs of PPM or JPEG pieces (pure).

:class:`~streamchat.engine.remote.RemoteEngine` sends each clip as one
``video_url`` part whose URL is ``data:video/jpeg;base64,<f1>,<f2>,…``. vLLM
0.32 splits such a URL at its commas and opens each piece with Pillow whatever
the media type says, so a piece may be a PPM: the default, lossless and made
without Pillow, the pixels arriving bit-exact. ``jpeg:Q`` (4:4:4, quality Q)
is for links too slow for PPM's size. The format is chosen once, by
``--engine-frame-format`` (:func:`parse_frame_format`).

Kept apart from the adapter's HTTP so that clients of a vLLM server with no
engine of their own (the tests, the benchmarks) build the very parts the
adapter sends (:func:`video_part`).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_FRAME_FORMAT",
    "encode_base64",
    "encode_frame",
    "encoded_video_part",
    "parse_frame_format",
    "video_part",
]

DEFAULT_FRAME_FORMAT = "ppm"


def parse_frame_format(text: str) -> str:
    """``ppm`` or ``jpeg:Q`` (quality 1-100), checked; ``ValueError`` otherwise."""
    if text == "ppm":
        return text
    kind, _, quality = text.partition(":")
    if kind == "jpeg" and quality.isdigit() and 1 <= int(quality) <= 100:
        return f"jpeg:{int(quality)}"
    raise ValueError(f"{text!r} is not a frame format: 'ppm' or 'jpeg:Q' (Q from 1 to 100)")


def encode_frame(image: npt.NDArray[np.uint8], frame_format: str) -> bytes:
    """One RGB frame as a PPM (lossless, no Pillow) or a 4:4:4 JPEG (Pillow)."""
    if frame_format == "ppm":
        height, width = image.shape[:2]
        return b"P6\n%d %d\n255\n" % (width, height) + np.ascontiguousarray(image).tobytes()
    from PIL import Image as PILImage  # a dependency of vLLM's, not streamchat's: jpeg only

    out = io.BytesIO()
    quality = int(frame_format.partition(":")[2])
    PILImage.fromarray(image).save(out, "JPEG", quality=quality, subsampling=0)
    return out.getvalue()


def video_part(
    images: Sequence[npt.NDArray[np.uint8]], uuid: str, frame_format: str = DEFAULT_FRAME_FORMAT
) -> dict[str, Any]:
    """A ``video_url`` content part: ``images`` as one multi-frame data URL, named ``uuid``.

    The part :class:`~streamchat.engine.remote.RemoteEngine` sends for a clip,
    for a client of a vLLM server that has no engine of its own (the tests,
    the benchmarks).
    """
    return encoded_video_part([encode_base64(image, frame_format) for image in images], uuid)


def encode_base64(image: npt.NDArray[np.uint8], frame_format: str) -> str:
    """:func:`encode_frame` in base64, as a data URL carries it."""
    return base64.b64encode(encode_frame(image, frame_format)).decode("ascii")


def encoded_video_part(encoded: Sequence[str], uuid: str) -> dict[str, Any]:
    """Base64-encoded frames as one ``data:video/jpeg`` URL: vLLM 0.32 splits it at the commas
    and opens each piece with Pillow whatever the media type says (PPM too)."""
    url = "data:video/jpeg;base64," + ",".join(encoded)
    return {"type": "video_url", "video_url": {"url": url}, "uuid": uuid}
