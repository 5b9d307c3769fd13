"""``keyframes_only``: asked for in ``hello``, told in ``ready``, honoured by the decoder."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamchat_client import connect
from tests.support.live import Live
from tests.support.media import encode_video


@pytest.fixture(scope="module")
def sparse_keyframes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 s at 10 fps with a keyframe every 2 s: 40 frames, 2 of them keyframes."""
    path = tmp_path_factory.mktemp("media") / "sparse.webm"
    path.write_bytes(encode_video(container="webm", codec="vp8", seconds=4.0, fps=10, gop=20))
    return path


@pytest.mark.parametrize(("keyframes_only", "frames"), [(False, 20), (True, 2)])
async def test_keyframes_only_decodes_one_frame_per_keyframe(
    server: Live, sparse_keyframes: Path, keyframes_only: bool, frames: int
) -> None:
    async with connect(
        server.url, fps=5, window_frames=64, keyframes_only=keyframes_only
    ) as session:
        assert session.limits.keyframes_only is keyframes_only
        await session.send_file(sparse_keyframes)
        status = await session.wait_ended(timeout=30)
    assert status.frames_decoded == frames
