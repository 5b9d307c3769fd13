"""``data:`` URLs (RFC 2397) as OpenAI clients send media: strict base64, bounded, digested.

``data:<media type>[;<parameter>...];base64,<data>``: only base64 URLs are
read (as vLLM does), decoded strictly (``validate=True``: no whitespace, no
characters outside the alphabet, correct padding), after their size is
checked from their length, so a URL over ``max_bytes`` costs no decoding.
vLLM's multi-frame form ``data:video/jpeg;base64,<jpeg>,<jpeg>,...`` holds one
base64 JPEG per frame; at most ``max_frames`` of them, counted before any is
decoded.

A source's identity is the SHA-256 of its decoded bytes (:attr:`DataUrl.digest`),
so the same media sent twice, however its base64 was written, is known again.

The media type is believed only as far as it can be checked: a URL that says
``video/...`` but holds a PNG, JPEG, GIF or WebP image, or says ``image/...``
but holds none of them, is :class:`~streamchat.errors.MediaInvalid`; so is a
frame of ``video/jpeg`` that is not a JPEG. Within images the subtype is not
held against the bytes (clients label PNGs ``image/jpeg`` often, and vLLM and
browsers read by content), nor within videos the container (FFmpeg probes it).
``application/octet-stream`` is taken for whatever is asked.

Pure: no I/O, unit-tested with plain strings.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from typing import Literal

from ..errors import MediaInvalid, VideoTooLarge, VideoTooLong

__all__ = ["DataUrl", "image_format", "is_data_url", "parse_data_url"]

_MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")
_ANY = "application/octet-stream"
_JPEG_FRAMES = "video/jpeg"


def is_data_url(url: str) -> bool:
    """Whether ``url`` is a ``data:`` URL (the scheme in any case)."""
    return url[:5].lower() == "data:"


def image_format(data: bytes) -> Literal["png", "jpeg", "webp", "gif"] | None:
    """The image format ``data`` starts like, from its signature; ``None`` for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


@dataclass(frozen=True, eq=False)
class DataUrl:
    """A ``data:`` URL, decoded.

    ``media_type`` is lower case without parameters; ``payloads`` hold one
    file, or one JPEG per frame for ``video/jpeg``; ``digest`` is the SHA-256
    (hex) of the payloads, each preceded by its length.
    """

    media_type: str
    payloads: tuple[bytes, ...]
    digest: str

    @property
    def jpeg_frames(self) -> bool:
        """vLLM's multi-frame form: each payload a JPEG, one frame each."""
        return self.media_type == _JPEG_FRAMES

    def check_video(self) -> None:
        """Raise ``MediaInvalid`` unless this can be a video, as its media type says."""
        if self.jpeg_frames:
            for number, payload in enumerate(self.payloads, 1):
                if image_format(payload) != "jpeg":
                    raise MediaInvalid(
                        f"frame {number} of the data:video/jpeg URL is not a JPEG image"
                    )
            return
        if not self.media_type.startswith("video/") and self.media_type != _ANY:
            raise MediaInvalid(f"a data: URL of type {self.media_type} is not a video")
        found = image_format(self.payloads[0])
        if found is not None:
            raise MediaInvalid(
                f"the data: URL says {self.media_type} but holds a {found.upper()} image"
            )

    def check_image(self) -> None:
        """Raise ``MediaInvalid`` unless this is an image, as its media type says."""
        if not self.media_type.startswith("image/") and self.media_type != _ANY:
            raise MediaInvalid(f"a data: URL of type {self.media_type} is not an image")
        if image_format(self.payloads[0]) is None:
            raise MediaInvalid(f"the data: URL says {self.media_type} but holds no image")


def parse_data_url(url: str, *, max_bytes: int, max_frames: int) -> DataUrl:
    """Decode ``url``; typed errors for what cannot be read or is too large.

    * ``MediaInvalid``: not a ``data:`` URL, no ``,``, no media type, not
      base64 (or not valid base64), or empty.
    * ``VideoTooLarge``: more than ``max_bytes`` once decoded (all frames together).
    * ``VideoTooLong``: a ``video/jpeg`` URL of more than ``max_frames`` frames.
    """
    if not is_data_url(url):
        raise MediaInvalid("not a data: URL")
    spec, comma, data = url[5:].partition(",")
    if not comma:
        raise MediaInvalid("a data: URL needs a ',' between its media type and its data")
    params = spec.split(";")
    media_type = params[0].strip().lower()
    if len(params) < 2 or params[-1].strip().lower() != "base64":
        raise MediaInvalid("only base64 data: URLs are read (data:<type>;base64,<data>)")
    if not _MEDIA_TYPE.fullmatch(media_type):
        raise MediaInvalid("the data: URL names no valid media type (such as video/mp4)")
    parts = data.split(",", max_frames) if media_type == _JPEG_FRAMES else [data]
    if len(parts) > max_frames:
        raise VideoTooLong(f"the data:video/jpeg URL has more than {max_frames} frames")
    if sum(len(part) for part in parts) // 4 * 3 > max_bytes:
        raise VideoTooLarge(f"the data: URL holds more than {max_bytes} bytes")
    payloads = tuple(_decode(part, len(parts)) for part in parts)
    digest = hashlib.sha256()
    for payload in payloads:
        digest.update(len(payload).to_bytes(8, "big"))
        digest.update(payload)
    return DataUrl(media_type, payloads, digest.hexdigest())


def _decode(part: str, parts: int) -> bytes:
    what = "a frame of the data: URL" if parts > 1 else "the data: URL's data"
    try:
        payload = base64.b64decode(part, validate=True)
    except (binascii.Error, ValueError):  # ValueError: characters beyond ASCII
        raise MediaInvalid(f"{what} is not valid base64") from None
    if not payload:
        raise MediaInvalid(f"{what} is empty")
    return payload
