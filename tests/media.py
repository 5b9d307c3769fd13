"""Test media made on the fly with PyAV: no binary fixtures in the repository.

Every generated video frame carries its own frame number, so a test can tell
which source frame a decoded (and resized) image came from:

* the bottom quarter is a row of :data:`INDEX_BITS` black/white blocks, the
  frame number in binary (most significant bit left), big enough to survive
  lossy coding and resizing;
* the top three quarters show a square moving left to right on a background
  whose colour depends on the frame number, so consecutive frames differ.

Read the number back with :func:`frame_index`. Encoders are tuned for speed
(x264 ``ultrafast``, libvpx ``realtime``/``cpu-used 8``) at small sizes.
"""

from __future__ import annotations

import io
import random
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, overload

import av
import numpy as np
import numpy.typing as npt
from av.video.codeccontext import VideoCodecContext
from av.video.stream import VideoStream

__all__ = [
    "INDEX_BITS",
    "chunks",
    "corrupt_payloads",
    "encode_image",
    "encode_video",
    "frame_index",
    "pattern_frame",
]

Container = Literal["webm", "matroska", "mp4", "mp4-faststart", "mp4-plain", "mpegts"]
Codec = Literal["vp8", "vp9", "h264"]

INDEX_BITS = 8
"""Bits of frame number drawn in each frame (numbers wrap at 256)."""

_FORMATS: dict[str, tuple[str, str, dict[str, str]]] = {
    # container -> (FFmpeg muxer, file suffix, muxer options)
    "webm": ("webm", ".webm", {}),
    "matroska": ("matroska", ".mkv", {}),
    "mp4": ("mp4", ".mp4", {"movflags": "frag_keyframe+empty_moov+default_base_moof"}),
    "mp4-faststart": ("mp4", ".mp4", {"movflags": "+faststart"}),
    "mp4-plain": ("mp4", ".mp4", {}),
    "mpegts": ("mpegts", ".ts", {}),
}

_ENCODERS: dict[str, tuple[str, dict[str, str]]] = {
    "h264": ("libx264", {"preset": "ultrafast"}),
    "vp8": ("libvpx", {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}),
    "vp9": (
        "libvpx-vp9",
        {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0", "row-mt": "1"},
    ),
}


def pattern_frame(index: int, width: int, height: int) -> npt.NDArray[np.uint8]:
    """The RGB image of frame ``index``: moving square, changing colour, binary index."""
    image = np.empty((height, width, 3), dtype=np.uint8)
    top = height * 3 // 4
    image[:top] = ((index * 40) % 256, (index * 15 + 60) % 256, 255 - (index * 25) % 256)
    side = max(4, min(width, top) // 3)
    x = (index * 7) % max(1, width - side)
    image[(top - side) // 2 : (top - side) // 2 + side, x : x + side] = (255, 255, 255)
    block = width // INDEX_BITS
    for bit in range(INDEX_BITS):
        on = (index >> (INDEX_BITS - 1 - bit)) & 1
        image[top:, bit * block : (bit + 1) * block] = 255 if on else 0
    image[top:, INDEX_BITS * block :] = 0
    return image


def frame_index(image: npt.NDArray[np.uint8]) -> int:
    """The frame number drawn by :func:`pattern_frame`, read back from ``image``.

    Each block is sampled in its central half (away from edges that coding and
    resizing blur) and thresholded at mid-grey.
    """
    height, width = image.shape[:2]
    top = height * 3 // 4
    band = image[top + (height - top) // 4 : height - (height - top) // 4]
    block = width / INDEX_BITS
    value = 0
    for bit in range(INDEX_BITS):
        left = int(bit * block + block / 4)
        right = int((bit + 1) * block - block / 4)
        value = (value << 1) | int(band[:, left:right].mean() > 128)
    return value


@overload
def encode_video(
    dest: None = None,
    *,
    container: Container = ...,
    codec: Codec = ...,
    width: int = ...,
    height: int = ...,
    fps: int = ...,
    seconds: float = ...,
    start_pts: float = ...,
    first_index: int = ...,
    gop: int | None = ...,
) -> bytes: ...
@overload
def encode_video(
    dest: Path,
    *,
    container: Container = ...,
    codec: Codec = ...,
    width: int = ...,
    height: int = ...,
    fps: int = ...,
    seconds: float = ...,
    start_pts: float = ...,
    first_index: int = ...,
    gop: int | None = ...,
) -> Path: ...
def encode_video(
    dest: Path | None = None,
    *,
    container: Container = "webm",
    codec: Codec = "vp8",
    width: int = 160,
    height: int = 120,
    fps: int = 10,
    seconds: float = 2.0,
    start_pts: float = 0.0,
    first_index: int = 0,
    gop: int | None = None,
) -> bytes | Path:
    """Encode ``seconds`` of :func:`pattern_frame` video at ``fps``.

    ``start_pts`` (seconds) shifts every timestamp, to imitate a stream that
    does not start at zero or to continue a previous segment; ``first_index``
    is the number drawn in the first frame. ``gop`` is the keyframe interval in
    frames (default: one keyframe per second). ``"mp4"`` is fragmented
    (``frag_keyframe+empty_moov``, as a live source sends it), ``"mp4-faststart"``
    a plain MP4 with its index moved to the front, ``"mp4-plain"`` one with its
    index at the end (not decodable as a stream).

    Returns the bytes, or ``dest`` after writing them there.
    """
    muxer, suffix, mux_options = _FORMATS[container]
    encoder, codec_options = _ENCODERS[codec]
    count = round(seconds * fps)
    first_pts = round(start_pts * fps)
    # A real file: the faststart pass re-opens the output by name to move the index.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"video{suffix}"
        with av.open(str(path), "w", format=muxer, options=mux_options) as output:
            stream = output.add_stream(encoder, rate=fps, options=codec_options)
            assert isinstance(stream, VideoStream)
            stream.width = width
            stream.height = height
            stream.pix_fmt = "yuv420p"
            stream.codec_context.gop_size = gop or fps
            for i in range(count):
                image = pattern_frame(first_index + i, width, height)
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = first_pts + i
                output.mux(stream.encode(frame))
            output.mux(stream.encode(None))
        data = path.read_bytes()
    if dest is None:
        return data
    dest.write_bytes(data)
    return dest


def encode_image(
    fmt: Literal["png", "jpeg"] = "png", *, width: int = 160, height: int = 120, index: int = 0
) -> bytes:
    """One :func:`pattern_frame` as a PNG or JPEG file's bytes."""
    codec = {"png": "png", "jpeg": "mjpeg"}[fmt]
    pix_fmt = {"png": "rgb24", "jpeg": "yuvj420p"}[fmt]
    context = av.CodecContext.create(codec, "w")
    assert isinstance(context, VideoCodecContext)
    context.width = width
    context.height = height
    context.pix_fmt = pix_fmt
    context.time_base = Fraction(1, 25)
    frame = av.VideoFrame.from_ndarray(pattern_frame(index, width, height), format="rgb24")
    if pix_fmt != "rgb24":
        frame = frame.reformat(format=pix_fmt)
    frame.pts = 0
    packets = context.encode(frame) + context.encode(None)
    return b"".join(bytes(packet) for packet in packets)


def corrupt_payloads(data: bytes, *, first: int, seed: int = 0) -> bytes:
    """``data`` remuxed into the same container with packets ``first``.. replaced by junk.

    The container structure stays valid, so the demuxer delivers every packet
    and only the decoder fails: what a broken encoder or a bit-flipping link
    produces, unlike cut or overwritten bytes, which demuxers resynchronise
    over.
    """
    rng = random.Random(seed)
    out = io.BytesIO()
    with av.open(io.BytesIO(data), "r") as source:
        muxer = source.format.name.split(",")[0]
        with av.open(out, "w", format=muxer) as dest:
            stream = source.streams.video[0]
            copy = dest.add_stream_from_template(stream)
            for i, packet in enumerate(p for p in source.demux(stream) if p.size):
                out_packet: av.Packet[Any] = packet
                if i >= first:
                    out_packet = av.Packet(rng.randbytes(packet.size))
                    out_packet.pts, out_packet.dts = packet.pts, packet.dts
                    out_packet.time_base = packet.time_base
                    out_packet.is_keyframe = packet.is_keyframe
                out_packet.stream = copy
                dest.mux(out_packet)
    return out.getvalue()


def chunks(data: bytes, size: int, *, seed: int | None = None) -> list[bytes]:
    """``data`` cut at arbitrary byte boundaries, ignoring any container structure.

    Fixed ``size`` pieces, or with ``seed`` pieces of random length in
    ``[1, size]``, to imitate a socket or MediaRecorder delivering odd slices.
    """
    if size < 1:
        raise ValueError("size must be at least 1")
    rng = random.Random(seed) if seed is not None else None
    pieces = []
    offset = 0
    while offset < len(data):
        step = rng.randint(1, size) if rng else size
        pieces.append(data[offset : offset + step])
        offset += step
    return pieces
