"""Benchmark input video, generated with PyAV: a textured pan that makes codecs work.

``tests/support/media.py`` draws flat colours, which every codec compresses to almost
nothing and decodes far faster than camera footage. Benchmarks need content
closer to a real scene: here a smooth noise texture with fine detail pans
diagonally under a moving bright square, so motion compensation, residuals and
the entropy decoder all have work to do. Encoders run at a fixed bitrate typical
of live streams (about 3 Mbit/s at 720p, 6 Mbit/s at 1080p) with a keyframe
every 2 s. H.264 uses x264 ``veryfast`` (CABAC, B-frames, deblocking: what a
camera or OBS sends), VP8/VP9 libvpx in realtime mode (what a browser's
MediaRecorder sends).

Clips are cached under ``<out>/media`` by their parameters: encoding 1080p VP9
costs more than decoding it, and reruns should not pay for it again.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import av
import numpy as np
import numpy.typing as npt
from av.video.stream import VideoStream

__all__ = ["Clip", "Codec", "as_mp4", "encode_clip", "looped_mpegts"]

Codec = Literal["h264", "vp8", "vp9"]

_VERSION = 1  # bump when the picture or the encoder settings change: invalidates the cache
_GOP_SECONDS = 2
_BITS_PER_PIXEL_SECOND = 3.2  # bits per pixel per second: 3 Mbit/s at 720p, 6.6 at 1080p

_ENCODERS: dict[str, tuple[str, str, str, dict[str, str]]] = {
    # codec -> (encoder, muxer, suffix, options)
    "h264": ("libx264", "mpegts", ".ts", {"preset": "veryfast"}),
    "vp8": ("libvpx", "webm", ".webm", {"deadline": "realtime", "cpu-used": "8"}),
    "vp9": (
        "libvpx-vp9",
        "webm",
        ".webm",
        {"deadline": "realtime", "cpu-used": "8", "row-mt": "1"},
    ),
}


@dataclass(frozen=True, slots=True)
class Clip:
    """A generated clip and what the benchmark needs to know about it."""

    path: Path
    codec: Codec
    container: str
    width: int
    height: int
    fps: int
    frames: int

    @property
    def seconds(self) -> float:
        return self.frames / self.fps

    @property
    def label(self) -> str:
        return f"{self.height}p {self.codec}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "codec": self.codec,
            "container": self.container,
            "width": self.width,
            "height": self.height,
            "fps": self.fps,
            "frames": self.frames,
            "seconds": self.seconds,
            "bytes": self.path.stat().st_size,
        }


class _Texture:
    """A picture twice the frame size; frame ``i`` is a window into it, shifted by ``i``."""

    def __init__(self, width: int, height: int, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        big_h, big_w = 2 * height, 2 * width
        # Smooth blobs (upsampled coarse noise) plus fine grain: both scales cost bits.
        coarse = rng.integers(0, 256, (big_h // 16 + 1, big_w // 16 + 1, 3), dtype=np.uint8)
        blobs = np.repeat(np.repeat(coarse, 16, axis=0), 16, axis=1)[:big_h, :big_w]
        grain = rng.integers(-24, 25, (big_h, big_w, 1), dtype=np.int16)
        self.image = np.clip(blobs.astype(np.int16) + grain, 0, 255).astype(np.uint8)
        self.width, self.height = width, height

    def frame(self, index: int) -> npt.NDArray[np.uint8]:
        x = (index * 4) % self.width
        y = (index * 2) % self.height
        image = np.array(self.image[y : y + self.height, x : x + self.width])
        side = self.height // 5
        left = (index * 9) % max(1, self.width - side)
        top = (self.height - side) // 2
        image[top : top + side, left : left + side] = 255
        return image


def encode_clip(
    out: Path,
    codec: Codec,
    *,
    width: int,
    height: int,
    fps: int = 30,
    seconds: float,
    seed: int = 1,
) -> Clip:
    """The clip for these parameters, encoded now or taken from the cache under ``out``.

    Clips of different ``seed`` show different textures: the engine benchmarks
    need windows that no cache has seen (vLLM caches by the frames' content).
    """
    encoder, muxer, suffix, options = _ENCODERS[codec]
    frames = round(seconds * fps)
    folder = out / "media"
    folder.mkdir(parents=True, exist_ok=True)
    variant = "" if seed == 1 else f"-s{seed}"
    path = folder / f"v{_VERSION}-{codec}-{width}x{height}-{fps}fps-{frames}f{variant}{suffix}"
    clip = Clip(path, codec, muxer, width, height, fps, frames)
    if path.exists():
        return clip
    texture = _Texture(width, height, seed)
    partial = path.with_suffix(".partial" + suffix)
    with av.open(str(partial), "w", format=muxer) as output:
        stream = output.add_stream(encoder, rate=fps, options=options)
        assert isinstance(stream, VideoStream)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = fps * _GOP_SECONDS
        stream.codec_context.bit_rate = int(width * height * _BITS_PER_PIXEL_SECOND)
        stream.thread_count = 0
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(texture.frame(index), format="rgb24")
            frame.pts = index
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))
    partial.rename(path)
    return clip


CLIP_LENGTHS = (10.0, 60.0, 120.0, 300.0)
"""Lengths in seconds of the clips asked about whole (``bench.peer``, ``bench.spread``)."""


def peer_clip(out: Path, seconds: float, seed: int = 1) -> Clip:
    """H.264 640x360 at 30 fps in an MP4 with its index first: the clip asked about whole."""
    return as_mp4(
        encode_clip(out, "h264", width=640, height=360, fps=30, seconds=seconds, seed=seed)
    )


def as_mp4(clip: Clip) -> Clip:
    """``clip`` (H.264) remuxed, not re-encoded, into an MP4 with its index first.

    The same pictures and packets in the container a file on disk usually is:
    vLLM's OpenCV reader finds no frames in an MPEG-TS given as bytes, and
    streamchat streams an MP4 whose index comes first (``faststart``).
    """
    if clip.codec != "h264":
        raise ValueError("as_mp4 needs an H.264 clip")
    path = clip.path.with_suffix(".mp4")
    result = Clip(path, clip.codec, "mp4", clip.width, clip.height, clip.fps, clip.frames)
    if path.exists():
        return result
    partial = path.with_suffix(".partial.mp4")
    with av.open(str(clip.path)) as source:
        stream = source.streams.video[0]
        with av.open(str(partial), "w", format="mp4", options={"movflags": "+faststart"}) as output:
            target = output.add_stream_from_template(stream)
            for packet in source.demux(stream):
                if packet.dts is None:
                    continue
                packet.stream = target
                output.mux(packet)
    partial.rename(path)
    return result


class _Sink(io.RawIOBase):
    """A write-only file for the muxer: bytes accumulate until taken."""

    def __init__(self) -> None:
        super().__init__()
        self._pieces: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        piece = bytes(data)
        self._pieces.append(piece)
        return len(piece)

    def take(self) -> bytes:
        data, self._pieces = b"".join(self._pieces), []
        return data


def looped_mpegts(clip: Clip, seconds: float) -> Iterator[bytes]:
    """``seconds`` of one continuous MPEG-TS stream: ``clip`` (H.264) repeated, timestamps rising.

    The clip's packets are demuxed once and remuxed again and again with their
    timestamps shifted by the clip's length, so the server sees one long
    recording (as from a camera), not concatenated files whose clocks restart.
    Yields the stream's bytes one repetition at a time: nothing of the whole
    stream is ever held.
    """
    if clip.codec != "h264":
        raise ValueError("looped_mpegts needs an H.264 clip")
    with av.open(str(clip.path)) as source:
        stream = source.streams.video[0]
        time_base = stream.time_base
        assert time_base is not None
        packets = [(bytes(p), p.pts, p.dts, p.is_keyframe) for p in source.demux(stream) if p.size]
        sink = _Sink()
        with av.open(sink, "w", format="mpegts") as output:
            target = output.add_stream_from_template(stream)
            span = round(clip.frames / clip.fps / time_base)
            repeats = max(1, round(seconds / clip.seconds))
            for repeat in range(repeats):
                shift = repeat * span
                for data, pts, dts, key in packets:
                    packet = av.Packet(data)
                    packet.pts = None if pts is None else pts + shift
                    packet.dts = None if dts is None else dts + shift
                    packet.time_base = time_base
                    packet.is_keyframe = key
                    packet.stream = target
                    output.mux(packet)
                yield sink.take()
        yield sink.take()
