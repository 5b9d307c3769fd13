"""Display matrices: frames reach the model as players show them.

The pure part checks :func:`orientation` on the eight placements a display
matrix can give a picture; the real part writes rotation tags with the FFmpeg
command-line tool, as phones and editors do, and compares what the decoder
keeps with what ``ffmpeg`` itself shows (its autorotate) for the same file.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from streamchat.media.decoder import DecoderOptions, decode_stream
from streamchat.media.sampling import UPRIGHT, orientation
from streamchat.window import Frame

ONE = 1 << 16  # 1.0 in the matrix's 16.16 fixed point


def matrix(a: int, b: int, c: int, d: int) -> list[int]:
    """A display matrix with the 2x2 part ``[[a, b], [c, d]]`` (in units of 1.0)."""
    return [a * ONE, b * ONE, 0, c * ONE, d * ONE, 0, 0, 0, 1 << 30]


def labelled(rows: int = 2, cols: int = 3) -> npt.NDArray[np.uint8]:
    """An image whose every pixel is distinct: ``value = row * cols + col``."""
    return np.arange(rows * cols, dtype=np.uint8).reshape(rows, cols, 1)


@pytest.mark.parametrize(
    ("m", "expected"),
    [
        # A phone's portrait video: ffprobe says "rotation of -90": a quarter turn clockwise.
        (matrix(0, 1, -1, 0), np.rot90(labelled(), -1)),
        (matrix(0, -1, 1, 0), np.rot90(labelled(), 1)),
        (matrix(-1, 0, 0, -1), np.rot90(labelled(), 2)),
        (matrix(1, 0, 0, 1), labelled()),
        (matrix(-1, 0, 0, 1), labelled()[:, ::-1]),  # mirrored
        (matrix(1, 0, 0, -1), labelled()[::-1]),  # upside down
        (matrix(0, 1, 1, 0), labelled().transpose(1, 0, 2)),  # turned and mirrored
        (matrix(0, -1, -1, 0), labelled().transpose(1, 0, 2)[::-1, ::-1]),
    ],
)
def test_orientation_places_the_picture_as_ffmpeg_does(
    m: list[int], expected: npt.NDArray[np.uint8]
) -> None:
    """Each of the eight placements turns the stored picture as FFmpeg's autorotate does."""
    turn = orientation(m)
    shown = turn.apply(labelled())
    assert np.array_equal(shown, expected)
    assert turn.displayed(3, 2) == (shown.shape[1], shown.shape[0])


def test_odd_angles_round_to_the_nearest_quarter_turn() -> None:
    """A free rotation of 80 degrees is shown as the nearest quarter turn, not ignored."""
    import math

    theta = math.radians(80)
    m = [round(math.cos(theta) * ONE), round(math.sin(theta) * ONE), 0]
    m += [round(-math.sin(theta) * ONE), round(math.cos(theta) * ONE), 0, 0, 0, 1 << 30]
    assert orientation(m) == orientation(matrix(0, 1, -1, 0))


@pytest.mark.parametrize("m", [None, [0] * 9, [1, 2, 3]])
def test_missing_or_degenerate_matrices_leave_the_picture_alone(m: list[int] | None) -> None:
    """No matrix, a zero matrix or a short one: the picture is shown as stored."""
    assert orientation(m) == UPRIGHT


# -- against the FFmpeg command line --------------------------------------------------

# The upright picture: four coloured quarters, so every turn and mirror is visible.
QUARTERS = {"tl": (255, 0, 0), "tr": (0, 255, 0), "bl": (0, 0, 255), "br": (255, 255, 255)}


def _ffmpeg(*args: str) -> bytes:
    tool = shutil.which("ffmpeg")
    assert tool, "the FFmpeg command-line tool is needed: apt-get install ffmpeg"
    done = subprocess.run([tool, "-v", "error", "-y", *args], check=True, capture_output=True)
    return done.stdout


def _quarters(image: npt.NDArray[np.uint8]) -> dict[str, tuple[int, ...]]:
    """The mean colour at the middle of each quarter, rounded to a coarse grid."""
    h, w = image.shape[:2]
    spots = {"tl": (h // 4, w // 4), "tr": (h // 4, 3 * w // 4)}
    spots |= {"bl": (3 * h // 4, w // 4), "br": (3 * h // 4, 3 * w // 4)}
    return {
        name: tuple(int(round(v / 64)) for v in image[y - 2 : y + 2, x - 2 : x + 2].mean((0, 1)))
        for name, (y, x) in spots.items()
    }


@pytest.fixture(scope="module")
def upright(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An H.264 MP4 of the four-quarter picture, 320x176, written by the ffmpeg tool."""
    path = tmp_path_factory.mktemp("orientation") / "upright.mp4"
    w, h = 320, 176
    boxes = ",".join(
        f"drawbox=x={x}:y={y}:w={w // 2}:h={h // 2}:color=0x{r:02x}{g:02x}{b:02x}:t=fill"
        for (x, y), (r, g, b) in zip(
            [(0, 0), (w // 2, 0), (0, h // 2), (w // 2, h // 2)], QUARTERS.values(), strict=True
        )
    )
    _ffmpeg(
        "-f", "lavfi", "-i", f"color=c=black:s={w}x{h}:r=10,{boxes}", "-t", "1",
        "-c:v", "libx264", "-pix_fmt", "yuv444p", "-qp", "0", "-movflags", "+faststart",
        str(path),
    )  # fmt: skip
    return path


@pytest.mark.parametrize("rotate", [90, 180, 270])
def test_rotation_tags_written_by_ffmpeg_come_out_as_ffmpeg_shows_them(
    upright: Path, rotate: int
) -> None:
    """A file tagged by ``ffmpeg -metadata:s:v rotate=N`` decodes to the picture ffmpeg shows."""
    tagged = upright.with_name(f"rotate{rotate}.mp4")
    _ffmpeg("-i", str(upright), "-c", "copy", "-metadata:s:v", f"rotate={rotate}",
            "-movflags", "+faststart", str(tagged))  # fmt: skip
    frames: list[Frame] = []
    with tagged.open("rb") as source:
        decode_stream(source, DecoderOptions(fps=2), frames.append, threading.Event())
    image = frames[0].image
    height, width = image.shape[:2]
    shown = _ffmpeg("-i", str(tagged), "-frames:v", "1", "-vf", f"scale={width}:{height}",
                    "-f", "rawvideo", "-pix_fmt", "rgb24", "-")  # fmt: skip
    assert len(shown) == width * height * 3, "ffmpeg shows the picture at another shape"
    reference = np.frombuffer(shown, np.uint8).reshape(height, width, 3)
    assert _quarters(image) == _quarters(reference)
    assert (width < height) == (rotate != 180)
