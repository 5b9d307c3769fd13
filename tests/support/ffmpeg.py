"""Test media written by the ``ffmpeg`` command-line tool, the way cameras and phones write it.

PyAV-made media (:mod:`tests.support.media`) only covers what PyAV's muxers do when
driven by our own code. Real files come from other writers: an MP4 whose index
(``moov``) comes after the media (FFmpeg's default layout, and most cameras'),
HEVC tagged ``hvc1`` as Apple devices write it, a phone's portrait video stored
landscape with a display matrix, MJPEG in AVI, fragmented MP4 with B-frames,
open GOPs and audio, MPEG-TS, and variable frame rate with a gap. Each
``write_*`` function below writes one such file with the ``ffmpeg`` command
(Debian's 5.1 on CI) into a directory, checks with ``ffprobe`` that the file
really has the property it exists for (failing loudly if not), and returns a
:class:`Media` describing what a decoder must get out of it.

Pictures: the frames are :func:`tests.support.media.pattern_frame` images piped into
``ffmpeg`` as raw RGB, so every decoded frame still tells its source frame
number (:func:`tests.support.media.frame_index`), and a test can check that a frame
said to be at time *t* is the source frame that the file shows at *t*. The
portrait file also carries :data:`MARKER`, a solid block drawn by ``ffmpeg``'s
``drawbox`` in the top-left corner of the upright picture before it is turned
on its side; :func:`marker_corner` finds it again in a decoded frame.

``ffmpeg`` and ``ffprobe`` must be installed (CI installs them): without them
every function raises :class:`FfmpegMissing`, so the tests fail with that
message instead of being skipped. :class:`Corpus` writes each file once, on
first use, for a whole test session.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from tests.support.media import INDEX_BITS, pattern_frame

__all__ = [
    "CORPUS",
    "MARKER",
    "Corner",
    "Corpus",
    "CorpusError",
    "INDEX_AT_END",
    "FfmpegMissing",
    "Media",
    "SHORT_GOPS",
    "SOURCE_FPS",
    "marker_corner",
    "probe_frame_times",
    "probe_rotation",
    "require_ffmpeg",
    "top_level_boxes",
    "write_avi_mjpeg",
    "write_fragmented_mp4",
    "write_mkv",
    "write_mov",
    "write_mp4_h264",
    "write_mp4_hevc",
    "write_mpegts",
    "write_portrait",
    "write_short_gops",
    "write_vfr_gap",
    "write_webm",
]

Corner = Literal["top-left", "top-right", "bottom-left", "bottom-right"]

MARKER = (0, 255, 0)
"""The RGB colour of the block drawn in the top-left corner of the portrait file's upright picture.

Pure green: the pattern's background colours (frame numbers below 256) are
never greener than 149 on the ``G - max(R, B)`` scale, the index band is black
and white (0), and the marker is about 255 after coding.
"""
_MARKER_GREENNESS = 200
"""``G - max(R, B)`` above which a corner holds the marker (see :data:`MARKER`)."""

SOURCE_FPS = 25
"""The frame rate every file is written at, as cameras' PAL-ish default."""

INDEX_AT_END = frozenset({"mp4-h264", "mp4-hevc", "mov", "portrait"})
"""The items whose index follows their media (FFmpeg's default MP4/MOV layout): not streamable."""

_TIMEOUT = 120.0
"""Seconds one ``ffmpeg``/``ffprobe`` run may take: a hung tool fails the test, never stalls CI."""


class FfmpegMissing(RuntimeError):
    """The ``ffmpeg``/``ffprobe`` commands are not installed, so the corpus cannot be written."""


class CorpusError(RuntimeError):
    """``ffmpeg`` failed, or wrote a file without the property it was written for."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Media:
    """One file of the corpus and what decoding it must give.

    ``frame_times`` are the video frames' presentation times as ``ffprobe``
    reads them from the file (not as we meant to write them), in display
    order and in seconds from the first frame: the server's frame times also
    count from the first frame, so the two compare directly.
    """

    name: str
    path: Path
    format: str | None
    """The demuxer hint a client pushing these bytes would give (``None``: let the server probe)."""
    codec: str
    fps: float
    """The nominal source frame rate."""
    frame_times: tuple[float, ...]
    width: int
    """Width as displayed: after the display matrix, not as stored."""
    height: int
    rotation: int = 0
    """The display matrix's rotation as ``ffprobe`` prints it (``-90`` on a portrait phone file)."""
    streamable: bool = True
    """Decodable from its first byte as a stream; ``False`` when the index comes after the media."""
    marker: bool = False
    """Whether :data:`MARKER` is drawn in the top-left corner of the upright picture."""
    audio: bool = False

    @property
    def frame_interval(self) -> float:
        return 1.0 / self.fps

    @property
    def duration(self) -> float:
        """Seconds of video, from the first frame to the end of the last one."""
        return self.frame_times[-1] - self.frame_times[0] + self.frame_interval

    def segments(self) -> list[tuple[float, float]]:
        """``(start, duration)`` of each run of frames without a gap (more than 1.5 intervals)."""
        runs: list[tuple[float, float]] = []
        start = previous = self.frame_times[0]
        for time in self.frame_times[1:]:
            if time - previous > 1.5 * self.frame_interval:
                runs.append((start, previous - start + self.frame_interval))
                start = time
            previous = time
        runs.append((start, previous - start + self.frame_interval))
        return runs

    def expected_times(self, fps: float) -> list[float]:
        """The times a session sampling at ``fps`` keeps frames at, as the duration implies.

        Within each run of frames, one every ``1/fps`` seconds from the run's
        first frame, as many as fit its duration: a 3 s run at 2 fps gives 6
        frames, 0.0 to 2.5 s. After a gap the grid starts again at the first
        frame after it, which is where frames must be, not right after the
        frames before the gap. A kept frame is the first source frame in its
        slot, so it is at most one source frame interval later than its time.
        """
        times: list[float] = []
        for start, duration in self.segments():
            count = math.ceil(duration * fps - 1e-6)
            times += [start + k / fps for k in range(count)]
        return times

    def expected_frames(self, fps: float) -> int:
        """How many frames a session sampling at ``fps`` keeps from the whole file."""
        return len(self.expected_times(fps))

    def index_at(self, time: float) -> int:
        """The number drawn in the source frame shown at ``time`` (seconds from the first frame)."""
        position = int(np.argmin([abs(t - time) for t in self.frame_times]))
        return position % (1 << INDEX_BITS)  # frames are numbered from 0 in display order


# -- the tools --------------------------------------------------------------------------


def require_ffmpeg() -> None:
    """Raise :class:`FfmpegMissing`, naming the package, unless both commands are installed."""
    missing = [tool for tool in ("ffmpeg", "ffprobe") if shutil.which(tool) is None]
    if missing:
        raise FfmpegMissing(
            f"{' and '.join(missing)} not found: the real-media tests need FFmpeg's "
            "command-line tools (apt-get install ffmpeg; CI's .ci/run installs it)"
        )


def _run(args: list[str], *, stdin: bytes | None = None) -> bytes:
    """Run a tool to completion and return its stdout; any failure is a :class:`CorpusError`."""
    require_ffmpeg()
    try:
        done = subprocess.run(args, input=stdin, capture_output=True, check=False, timeout=_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise CorpusError(f"{args[0]} took more than {_TIMEOUT:.0f} s: {' '.join(args)}") from exc
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip()[-2000:]
        raise CorpusError(f"{' '.join(args)}\nexited with {done.returncode}:\n{tail}")
    return done.stdout


def _ffmpeg(*args: str, stdin: bytes | None = None) -> bytes:
    return _run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args], stdin=stdin)


def _ffprobe(path: Path, *args: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(
        _run(["ffprobe", "-v", "error", "-of", "json", *args, str(path)])
    )
    return result


def _probe(path: Path, stream: str, entries: str, key: str) -> list[dict[str, Any]]:
    """``ffprobe -select_streams stream -show_entries entries``: the list under ``key``."""
    found: list[dict[str, Any]] = _ffprobe(
        path, "-select_streams", stream, "-show_entries", entries
    ).get(key, [])
    return found


def _stream(path: Path, selector: str) -> dict[str, Any]:
    streams = _probe(path, selector, "stream=codec_name,codec_tag_string,width,height", "streams")
    return streams[0] if streams else {}


def probe_frame_times(path: Path) -> list[float]:
    """The presentation times of ``path``'s video frames in seconds, in display order.

    Read by decoding the first video stream with ``ffprobe``
    (``-show_entries frame=...``): the file's own timestamps, after its edit
    lists, which is what tests compare a decoder's output with.
    """
    times = []
    for frame in _probe(path, "v:0", "frame=best_effort_timestamp_time", "frames"):
        value = frame.get("best_effort_timestamp_time")
        if value is None or value == "N/A":
            raise CorpusError(f"{path.name}: ffprobe found a video frame without a timestamp")
        times.append(float(value))
    if not times:
        raise CorpusError(f"{path.name}: ffprobe found no video frames")
    return sorted(times)


def probe_rotation(path: Path) -> int:
    """The rotation of the first video stream's display matrix as ``ffprobe`` tells it (0: none)."""
    for stream in _probe(path, "v:0", "stream_side_data", "streams"):
        for side in stream.get("side_data_list", []):
            if side.get("side_data_type") == "Display Matrix":
                return round(float(side.get("rotation", 0)))
    return 0


def top_level_boxes(path: Path) -> list[str]:
    """The kinds of ``path``'s top-level MP4/MOV boxes in file order, read from their headers."""
    kinds = []
    end = path.stat().st_size
    with path.open("rb") as file:
        offset = 0
        while offset + 8 <= end:
            file.seek(offset)
            size, kind = struct.unpack(">I4s", file.read(8))
            if size == 1:
                (size,) = struct.unpack(">Q", file.read(8))
            elif size == 0:
                size = end - offset
            if size < 8:
                raise CorpusError(f"{path.name}: a box of {size} bytes at {offset}")
            kinds.append(kind.decode("latin-1"))
            offset += size
    return kinds


# -- pictures ---------------------------------------------------------------------------


def marker_corner(image: npt.NDArray[np.uint8]) -> Corner | None:
    """Which corner of ``image`` (height, width, RGB) shows :data:`MARKER`, or ``None``.

    The marker covers a quarter of each side of the upright picture; each
    corner is sampled in the middle of the region the marker would cover there
    (away from edges blurred by chroma subsampling and resizing). Exactly one
    corner must look like the marker, else ``None``.
    """
    height, width = image.shape[:2]
    top, bottom = slice(height // 16, height * 3 // 16), slice(-height * 3 // 16, -height // 16)
    left, right = slice(width // 16, width * 3 // 16), slice(-width * 3 // 16, -width // 16)
    corners: dict[Corner, tuple[slice, slice]] = {
        "top-left": (top, left),
        "top-right": (top, right),
        "bottom-left": (bottom, left),
        "bottom-right": (bottom, right),
    }
    found = []
    for corner, (rows, cols) in corners.items():
        r, g, b = image[rows, cols].reshape(-1, 3).mean(axis=0)
        if g - max(r, b) > _MARKER_GREENNESS:
            found.append(corner)
    return found[0] if len(found) == 1 else None


def _encode(
    path: Path,
    *args: str,
    seconds: float = 3.0,
    size: tuple[int, int] = (320, 240),
    audio: bool = False,
) -> int:
    """Encode ``seconds`` of numbered pattern frames with ``ffmpeg`` into ``path``.

    The frames (:func:`tests.support.media.pattern_frame`, numbered from 0) go to
    ``ffmpeg`` as raw RGB on stdin at :data:`SOURCE_FPS`; with ``audio``, a
    440 Hz tone from ``lavfi`` is its second input. ``args`` are the output
    options (codecs, filters, muxer). Returns how many frames were written.
    """
    width, height = size
    count = round(seconds * SOURCE_FPS)
    frames = b"".join(pattern_frame(i, width, height).tobytes() for i in range(count))
    inputs = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-video_size", f"{width}x{height}",
              "-framerate", str(SOURCE_FPS), "-i", "-"]  # fmt: skip
    if audio:
        tone = f"sine=frequency=440:sample_rate=48000:duration={seconds}"
        inputs += ["-f", "lavfi", "-i", tone]
    _ffmpeg(*inputs, *args, str(path), stdin=frames)
    return count


_X264 = ("-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", str(SOURCE_FPS))


# -- the corpus -------------------------------------------------------------------------


def _media(
    name: str,
    path: Path,
    *,
    format: str | None,
    frames: int,
    width: int = 320,
    height: int = 240,
    **extra: Any,
) -> Media:
    """Describe ``path`` from what ``ffprobe`` reads in it, which must be every frame written."""
    if name in INDEX_AT_END:
        boxes = top_level_boxes(path)
        if "moov" not in boxes or "mdat" not in boxes or boxes.index("moov") < boxes.index("mdat"):
            raise CorpusError(f"{path.name}: the index should follow the media, boxes are {boxes}")
    absolute = probe_frame_times(path)
    if len(absolute) != frames:
        raise CorpusError(f"{path.name}: ffprobe decodes {len(absolute)} frames, {frames} written")
    return Media(
        name=name,
        path=path,
        format=format,
        codec=str(_stream(path, "v:0").get("codec_name")),
        fps=SOURCE_FPS,
        frame_times=tuple(round(t - absolute[0], 6) for t in absolute),
        width=width,
        height=height,
        streamable=name not in INDEX_AT_END,
        **extra,
    )


def _require_audio(path: Path, codec: str) -> None:
    found = _stream(path, "a:0").get("codec_name")
    if found != codec:
        raise CorpusError(f"{path.name}: expected {codec} audio, ffprobe finds {found}")


def write_mp4_h264(directory: Path) -> Media:
    """An MP4 as FFmpeg writes it by default: H.264, ``moov`` after ``mdat``."""
    path = directory / "h264.mp4"
    count = _encode(path, *_X264)
    return _media("mp4-h264", path, format="mp4", frames=count)


def write_mp4_hevc(directory: Path) -> Media:
    """HEVC tagged ``hvc1`` (as Apple devices write it) in an MP4 with its index at the end."""
    path = directory / "hevc.mp4"
    count = _encode(
        path,
        "-c:v", "libx265", "-preset", "ultrafast", "-x265-params", "log-level=error",
        "-pix_fmt", "yuv420p", "-tag:v", "hvc1",
    )  # fmt: skip
    stream = _stream(path, "v:0")
    if (stream.get("codec_name"), stream.get("codec_tag_string")) != ("hevc", "hvc1"):
        raise CorpusError(f"{path.name}: expected HEVC tagged hvc1, ffprobe says {stream}")
    return _media("mp4-hevc", path, format="mp4", frames=count)


def write_mov(directory: Path) -> Media:
    """A QuickTime MOV as video cameras write it: H.264, stereo 16-bit PCM, index at the end.

    The uncompressed audio (192 kB/s) makes it the corpus's large file, over
    half a megabyte: more than a fetcher reads at once, so its index must be
    fetched by a range request.
    """
    path = directory / "camera.mov"
    count = _encode(path, *_X264, "-c:a", "pcm_s16le", "-ac", "2", "-f", "mov", audio=True)
    _require_audio(path, "pcm_s16le")
    return _media("mov", path, format="mp4", frames=count, audio=True)


def write_portrait(directory: Path) -> Media:
    """A phone's portrait video: stored 320x180 on its side, shown 180x320 by a -90° display matrix.

    FFmpeg 5.1 writes a display matrix only when it copies a stream, so the
    upright 180x320 picture (with :data:`MARKER` drawn in its top-left corner
    by ``drawbox``) is encoded turned a quarter counter-clockwise, then copied
    with ``rotate=270``, which 5.1 stores as a matrix that ``ffprobe`` reads
    as ``rotation -90``: turn the stored picture a quarter clockwise to show
    it. The MP4 keeps FFmpeg's default layout (index at the end), as phones
    do. ``ffmpeg`` itself, which applies the matrix, must show the marker
    top-left.
    """
    width, height = 180, 320  # upright
    stored = directory / "portrait-stored.mp4"
    colour = "0x{:02x}{:02x}{:02x}".format(*MARKER)
    count = _encode(
        stored,
        "-vf", f"drawbox=x=0:y=0:w=iw/4:h=ih/4:color={colour}:t=fill,transpose=cclock",
        *_X264,
        size=(width, height),
    )  # fmt: skip
    path = directory / "portrait.mp4"
    _ffmpeg("-i", str(stored), "-c", "copy", "-metadata:s:v", "rotate=270", str(path))
    stored.unlink()
    stream = _stream(path, "v:0")
    if (stream.get("width"), stream.get("height")) != (height, width):
        raise CorpusError(f"{path.name}: expected {height}x{width} stored, ffprobe says {stream}")
    rotation = probe_rotation(path)
    if rotation != -90:
        raise CorpusError(
            f"{path.name}: expected a display matrix with rotation -90, ffprobe reads {rotation} "
            "(this FFmpeg did not write the matrix on a stream copy with rotate=270)"
        )
    shown = _ffmpeg("-i", str(path), "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-")
    if len(shown) != width * height * 3:
        raise CorpusError(f"{path.name}: ffmpeg shows {len(shown)} bytes, not {width}x{height}")
    corner = marker_corner(np.frombuffer(shown, dtype=np.uint8).reshape(height, width, 3))
    if corner != "top-left":
        raise CorpusError(f"{path.name}: ffmpeg shows the marker at {corner}, not top-left")
    return _media("portrait", path, format="mp4", frames=count, width=width, height=height,
                  rotation=rotation, marker=True)  # fmt: skip


def write_avi_mjpeg(directory: Path) -> Media:
    """Motion JPEG in AVI, as webcams, dashcams and older cameras record."""
    path = directory / "mjpeg.avi"
    count = _encode(path, "-c:v", "mjpeg", "-q:v", "4", "-pix_fmt", "yuvj420p")
    if _stream(path, "v:0").get("codec_name") != "mjpeg":
        raise CorpusError(f"{path.name}: not MJPEG")
    return _media("avi-mjpeg", path, format="avi", frames=count)


def write_fragmented_mp4(directory: Path) -> Media:
    """Fragmented MP4 as live encoders write it: B-frames, open GOPs, AAC audio.

    ``frag_keyframe+empty_moov+default_base_moof``: an empty index first,
    then a fragment per keyframe. x264 with three B-frames and open GOPs,
    so frames are stored out of display order and B-frames before a
    non-IDR keyframe (in display order) refer to the previous GOP. Keyframes
    every 24 frames, where x264's fixed I-B-B-B-P pattern puts three B-frames
    before each one (every 25 would put none).
    """
    path = directory / "fragmented.mp4"
    count = _encode(
        path,
        "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-bf", "3",
        "-x264-params", "open-gop=1:b-adapt=0:keyint=24:min-keyint=24:scenecut=0",
        "-c:a", "aac", "-movflags", "frag_keyframe+empty_moov+default_base_moof",
        audio=True,
    )  # fmt: skip
    boxes = top_level_boxes(path)
    if boxes[:2] != ["ftyp", "moov"] or boxes.count("moof") < 2:
        raise CorpusError(f"{path.name}: not fragmented from an empty moov: {boxes}")
    if not _has_open_gop(path):
        raise CorpusError(f"{path.name}: no B-frames lead a later keyframe (open GOP)")
    _require_audio(path, "aac")
    return _media("mp4-fragmented", path, format="mp4", frames=count, audio=True)


def _has_open_gop(path: Path) -> bool:
    """Whether a keyframe after the first is followed, in decode order, by frames shown before it.

    Those are the leading B-frames of an open GOP: they refer to the
    previous GOP as well, so a closed-GOP encoder never writes them.
    """
    packets = [
        (int(p["pts"]), "K" in p["flags"])
        for p in _probe(path, "v:0", "packet=pts,flags", "packets")
    ]
    return any(
        key and any(later < pts for later, _ in packets[position + 1 : position + 4])
        for position, (pts, key) in enumerate(packets)
        if position
    )


def write_mpegts(directory: Path) -> Media:
    """MPEG-TS with H.264 and AAC, as broadcast gear and IP cameras send it (starts at 1.4 s)."""
    path = directory / "camera.ts"
    count = _encode(path, *_X264, "-c:a", "aac", "-f", "mpegts", audio=True)
    return _media("mpegts", path, format="mpegts", frames=count, audio=True)


def write_vfr_gap(directory: Path, *, seconds: float = 2.0, gap: float = 3.0) -> Media:
    """Variable frame rate with a hole: ``seconds`` of video, none for ``gap`` s, ``seconds`` more.

    What a stalled camera, a dropped link or a background browser tab
    leaves behind. Written as Matroska (H.264) with ``setpts`` moving every
    frame after the first ``seconds`` by ``gap`` and ``-fps_mode passthrough``
    so that no frames are duplicated into the hole; ``ffprobe`` must find the
    hole in the written timestamps.
    """
    path = directory / "vfr-gap.mkv"
    half = round(seconds * SOURCE_FPS)
    count = _encode(
        path,
        "-vf", f"setpts=PTS+gte(N\\,{half})*{gap}/TB", "-fps_mode", "passthrough", *_X264,
        seconds=2 * seconds,
    )  # fmt: skip
    media = _media("vfr-gap", path, format="matroska", frames=count)
    steps = np.diff(media.frame_times)
    jumps = [float(step) for step in steps if step > 1.5 / SOURCE_FPS]
    if len(jumps) != 1 or abs(jumps[0] - (gap + 1 / SOURCE_FPS)) > 0.5 / SOURCE_FPS:
        raise CorpusError(f"{path.name}: expected one {gap} s hole in the timestamps, got {jumps}")
    return media


def write_mkv(directory: Path) -> Media:
    """Matroska with H.264 and AAC, as OBS and screen recorders write it."""
    path = directory / "recording.mkv"
    count = _encode(path, *_X264, "-c:a", "aac", audio=True)
    return _media("mkv", path, format="matroska", frames=count, audio=True)


def write_webm(directory: Path) -> Media:
    """WebM with VP9 and Opus, as browsers and YouTube serve it."""
    path = directory / "clip.webm"
    count = _encode(
        path,
        "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-row-mt", "1",
        "-b:v", "1M", "-pix_fmt", "yuv420p", "-g", str(SOURCE_FPS), "-c:a", "libopus",
        audio=True,
    )  # fmt: skip
    return _media("webm", path, format="webm", frames=count, audio=True)


SHORT_GOPS = {
    "h264-b-frames": (
        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-bf", "2",
        "-x264-params", "keyint=10:min-keyint=10:scenecut=0:b-adapt=0",
    ),
    "h264-open-gop": (
        "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-bf", "3",
        "-x264-params", "open-gop=1:b-adapt=0:keyint=12:min-keyint=12:scenecut=0",
    ),
    "hevc": (
        "-c:v", "libx265", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-tag:v", "hvc1",
        "-x265-params", "log-level=error:keyint=10:min-keyint=10:scenecut=0:open-gop=0",
    ),
}  # fmt: skip
"""Encoder options of :func:`write_short_gops`: a keyframe every 10 or 12 frames."""


def write_short_gops(directory: Path, variant: str, *, seconds: float = 8.0) -> Media:
    """An MP4 with its index first and a keyframe every 10-12 frames (:data:`SHORT_GOPS`).

    What a request for a few frames of a long video meets, scaled down: many
    groups of pictures between the frames it wants. ``h264-open-gop`` puts
    B-frames shown before each later keyframe that refer to the group before.
    """
    path = directory / f"gops-{variant}.mp4"
    count = _encode(path, *SHORT_GOPS[variant], "-movflags", "+faststart", seconds=seconds)
    boxes = top_level_boxes(path)
    if "moov" not in boxes or boxes.index("moov") > boxes.index("mdat"):
        raise CorpusError(f"{path.name}: the index should come first, boxes are {boxes}")
    if (variant == "h264-open-gop") != _has_open_gop(path):
        raise CorpusError(f"{path.name}: open GOP should be {variant == 'h264-open-gop'}")
    return _media(f"gops-{variant}", path, format="mp4", frames=count)


CORPUS: dict[str, Callable[[Path], Media]] = {
    "mp4-h264": write_mp4_h264,
    "mp4-hevc": write_mp4_hevc,
    "mov": write_mov,
    "portrait": write_portrait,
    "avi-mjpeg": write_avi_mjpeg,
    "mp4-fragmented": write_fragmented_mp4,
    "mpegts": write_mpegts,
    "vfr-gap": write_vfr_gap,
    "mkv": write_mkv,
    "webm": write_webm,
}
"""Every corpus item by name, with its writer."""


class Corpus:
    """The corpus in one directory, each file written on first use and kept (one per session).

    Only the items a test run uses are written: selecting one test with
    ``-k`` costs one ``ffmpeg`` run, not ten.
    """

    def __init__(self, directory: Path) -> None:
        require_ffmpeg()
        self.directory = directory
        self._made: dict[str, Media] = {}

    def __getitem__(self, name: str) -> Media:
        if name not in self._made:
            self._made[name] = CORPUS[name](self.directory)
        return self._made[name]
