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
import struct
import tempfile
import zlib
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, overload

import av
import numpy as np
import numpy.typing as npt
from av.video.codeccontext import VideoCodecContext
from av.video.stream import VideoStream

__all__ = [
    "CLIP_FPS",
    "CLIP_SECONDS",
    "INDEX_BITS",
    "chunks",
    "corrupt_payloads",
    "encode_image",
    "encode_video",
    "frame_index",
    "patch_h264_size",
    "patch_fmp4_largesize",
    "patch_fmp4_samples",
    "patch_jpeg_size",
    "patch_mp4_header",
    "patch_png_size",
    "patch_vp8_size",
    "pattern_frame",
]

Container = Literal["webm", "matroska", "mp4", "mp4-faststart", "mp4-plain", "mpegts"]
Codec = Literal["vp8", "vp9", "h264"]

INDEX_BITS = 8
"""Bits of frame number drawn in each frame (numbers wrap at 256)."""
CLIP_SECONDS = 2.0
CLIP_FPS = 10
"""The client tests' clip: 2 s at 10 fps (their ``clip`` fixture)."""

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


# -- hostile media: real streams with one field made to lie --------------------------------


def patch_vp8_size(data: bytes, width: int, height: int) -> bytes:
    """``data`` (VP8 in WebM/Matroska) with every keyframe declaring ``width`` x ``height``.

    A VP8 keyframe starts with a 3-byte tag (bit 0 clear), the start code
    ``9d 01 2a`` and the size as two little-endian 14-bit fields; the
    container's own size and the compressed picture stay as they were, so only
    the decoder sees the lie. Sides up to 16383.
    """
    if not (0 < width < 1 << 14 and 0 < height < 1 << 14):
        raise ValueError("VP8 sides are 14-bit")
    out = bytearray(data)
    start = 0
    while (found := out.find(b"\x9d\x01\x2a", start)) >= 0:
        start = found + 3
        if found >= 3 and not out[found - 3] & 1:
            out[found + 3 : found + 7] = width.to_bytes(2, "little") + height.to_bytes(2, "little")
    return bytes(out)


def patch_h264_size(data: bytes, width: int, height: int) -> bytes:
    """``data`` (H.264 in any container PyAV muxes) remuxed with every SPS declaring a new size.

    Each sequence parameter set is rewritten bit by bit: the size in
    macroblocks becomes ``width`` x ``height`` (multiples of 16; cropping is
    dropped), every other field is copied. The slices still describe the
    small picture: what a resolution bomb looks like to the decoder, which
    allocates frames for the declared size before it decodes anything.
    """
    if width % 16 or height % 16:
        raise ValueError("the size must be in whole macroblocks")
    out = io.BytesIO()
    with av.open(io.BytesIO(data), "r") as source:
        muxer = source.format.name.split(",")[0]
        with av.open(out, "w", format=muxer) as dest:
            stream = source.streams.video[0]
            copy = dest.add_stream_from_template(stream)
            for packet in source.demux(stream):
                if not packet.size:
                    continue
                patched = av.Packet(_patch_sps_nals(bytes(packet), width // 16, height // 16))
                patched.pts, patched.dts = packet.pts, packet.dts
                patched.time_base = packet.time_base
                patched.is_keyframe = packet.is_keyframe
                patched.stream = copy
                dest.mux(patched)
    return out.getvalue()


def _patch_sps_nals(annexb: bytes, mbs_wide: int, mbs_high: int) -> bytes:
    parts = annexb.split(b"\x00\x00\x01")
    for i, nal in enumerate(parts):
        if i and nal and nal[0] & 0x1F == 7:  # a sequence parameter set
            trailing = len(nal) - len(nal.rstrip(b"\x00"))  # the next start code's zero
            body = nal[: len(nal) - trailing]
            parts[i] = body[:1] + _sps_resized(body[1:], mbs_wide, mbs_high) + b"\x00" * trailing
    return b"\x00\x00\x01".join(parts)


def _sps_resized(escaped: bytes, mbs_wide: int, mbs_high: int) -> bytes:
    bits = _Bits(escaped.replace(b"\x00\x00\x03", b"\x00\x00"))
    out: list[int] = []

    def copy(n: int = 1) -> int:
        value = bits.read(n)
        out.extend((value >> (n - 1 - k)) & 1 for k in range(n))
        return value

    def copy_ue() -> int:
        value = bits.read_ue()
        _write_ue(out, value)
        return value

    profile = copy(8)
    copy(16)  # constraint flags, level
    copy_ue()  # seq_parameter_set_id
    if profile in (100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135):
        if copy_ue() == 3:  # chroma_format_idc
            copy()
        copy_ue()
        copy_ue()
        copy()
        if copy():
            raise ValueError("SPS scaling matrices are not supported")
    copy_ue()  # log2_max_frame_num_minus4
    poc_type = copy_ue()
    if poc_type == 0:
        copy_ue()
    elif poc_type == 1:
        copy()
        copy_ue()  # offsets are se(v): same bits as ue(v)
        copy_ue()
        for _ in range(copy_ue()):
            copy_ue()
    copy_ue()  # max_num_ref_frames
    copy()  # gaps_in_frame_num_value_allowed_flag
    bits.read_ue()
    bits.read_ue()
    frame_mbs_only = bits.read(1)
    _write_ue(out, mbs_wide - 1)
    _write_ue(out, (mbs_high if frame_mbs_only else mbs_high // 2) - 1)
    out.append(frame_mbs_only)
    if not frame_mbs_only:
        copy()
    copy()  # direct_8x8_inference_flag
    if bits.read(1):  # frame cropping: dropped
        for _ in range(4):
            bits.read_ue()
    out.append(0)
    out.extend(bits.rest_before_stop_bit())
    out.append(1)
    out.extend([0] * (-len(out) % 8))
    raw = bytes(int("".join(map(str, out[k : k + 8])), 2) for k in range(0, len(out), 8))
    result = bytearray()  # with emulation prevention bytes put back
    zeros = 0
    for byte in raw:
        if zeros >= 2 and byte <= 3:
            result.append(3)
            zeros = 0
        result.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(result)


def _write_ue(out: list[int], value: int) -> None:
    code = value + 1
    length = code.bit_length()
    out.extend([0] * (length - 1))
    out.extend((code >> (length - 1 - k)) & 1 for k in range(length))


class _Bits:
    def __init__(self, data: bytes) -> None:
        self._bits = [(byte >> (7 - k)) & 1 for byte in data for k in range(8)]
        self._pos = 0

    def read(self, n: int) -> int:
        value = 0
        for _ in range(n):
            value = (value << 1) | self._bits[self._pos]
            self._pos += 1
        return value

    def read_ue(self) -> int:
        zeros = 0
        while self.read(1) == 0:
            zeros += 1
        return (1 << zeros) - 1 + self.read(zeros)

    def rest_before_stop_bit(self) -> list[int]:
        stop = len(self._bits) - 1 - self._bits[::-1].index(1)
        return self._bits[self._pos : stop]


def patch_png_size(data: bytes, width: int, height: int) -> bytes:
    """A PNG file whose header (IHDR, CRC fixed) declares ``width`` x ``height``."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n") or data[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def patch_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """A JPEG file whose frame header (SOF0) declares ``width`` x ``height``."""
    sof = data.find(b"\xff\xc0")
    if sof < 0:
        raise ValueError("no baseline frame header")
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]


def patch_mp4_header(
    data: bytes, *, samples: int | None = None, seconds: float | None = None
) -> bytes:
    """An MP4 whose index lies: ``samples`` per track and/or a duration of ``seconds``.

    ``samples`` goes into every ``stsz`` with a constant sample size, so the
    header stays a few bytes while declaring any count (what makes FFmpeg
    build an index of that many entries); ``seconds`` into ``mvhd`` and every
    ``mdhd`` (version 0). Boxes are patched in place: sizes do not change.
    """
    out = bytearray(data)
    for kind, body in _mp4_boxes(data, 0, len(data)):
        if kind == b"stsz" and samples is not None:
            struct.pack_into(">II", out, body + 4, 1000, samples)
        elif kind in (b"mvhd", b"mdhd") and seconds is not None and data[body] == 0:
            (timescale,) = struct.unpack_from(">I", data, body + 12)
            struct.pack_into(">I", out, body + 16, round(seconds * timescale))
    return bytes(out)


def _mp4_boxes(data: bytes, start: int, end: int) -> list[tuple[bytes, int]]:
    """``(kind, body offset)`` of every box under ``moov``, depth first."""
    found = []
    offset = start
    while offset + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, offset)
        if size < 8:
            break
        found.append((kind, offset + 8))
        if kind in (b"moov", b"trak", b"mdia", b"minf", b"stbl"):
            found += _mp4_boxes(data, offset + 8, offset + size)
        offset += size
    return found


def _top_level_boxes(data: bytes) -> list[tuple[bytes, int, int]]:
    """``(kind, offset, size)`` of the top-level boxes of an MP4 file."""
    found = []
    offset = 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, offset)
        if size < 8:
            break
        found.append((kind, offset, size))
        offset += size
    return found


def _fragment_truns(data: bytes, fragment: int) -> tuple[int, list[int]]:
    """The offset of ``moof`` number ``fragment`` (from 0) and of the ``trun`` boxes in it."""
    moofs = [offset for kind, offset, _ in _top_level_boxes(data) if kind == b"moof"]
    if not 0 <= fragment < len(moofs):
        raise ValueError(f"the stream has {len(moofs)} fragments")
    moof = moofs[fragment]
    (size,) = struct.unpack_from(">I", data, moof)
    truns = []
    stack = [(moof + 8, moof + size)]
    while stack:
        offset, end = stack.pop()
        while offset + 8 <= end:
            box_size, kind = struct.unpack_from(">I4s", data, offset)
            if box_size < 8:
                break
            if kind == b"traf":
                stack.append((offset + 8, offset + box_size))
            elif kind == b"trun":
                truns.append(offset)
            offset += box_size
    return moof, truns


def patch_fmp4_samples(data: bytes, samples: int, *, fragment: int = 0) -> bytes:
    """A fragmented MP4 (``encode_video(container="mp4")``) whose fragment ``fragment`` lies.

    Every ``trun`` in that ``moof`` declares ``samples`` samples and loses its
    per-sample fields (flags ``0x100``-``0x800`` cleared), so the count costs no
    bytes: a demuxer that trusts it reserves an index entry per sample while
    the box stays as it was (patched in place; sizes do not change).
    """
    out = bytearray(data)
    _, truns = _fragment_truns(data, fragment)
    for trun in truns:
        out[trun + 10] &= 0xF0  # the middle byte of the 24-bit flags
        struct.pack_into(">I", out, trun + 12, samples)
    return bytes(out)


def patch_fmp4_largesize(data: bytes, size: int, *, fragment: int = 0) -> bytes:
    """A fragmented MP4 whose ``mdat`` after fragment ``fragment`` declares a 64-bit ``size``.

    The ``mdat`` header becomes the 16-byte form (size 1, then ``size``), and
    the fragment's ``trun`` data offsets (from the ``moof``, as
    ``default_base_moof`` writes them) move by the 8 bytes inserted, so its
    samples still decode; everything after lies inside the claimed ``mdat``.
    """
    moof, truns = _fragment_truns(data, fragment)
    boxes = _top_level_boxes(data)
    mdat = next(offset for kind, offset, _ in boxes if kind == b"mdat" and offset > moof)
    out = bytearray(data)
    for trun in truns:
        (flags,) = struct.unpack_from(">I", data, trun + 8)
        if flags & 0x001:  # a data offset follows the sample count
            (offset,) = struct.unpack_from(">i", data, trun + 16)
            struct.pack_into(">i", out, trun + 16, offset + 8)
    return bytes(out[:mdat]) + struct.pack(">I4sQ", 1, b"mdat", size) + bytes(out[mdat + 8 :])
