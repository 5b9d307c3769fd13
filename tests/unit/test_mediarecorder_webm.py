"""WebM as a browser's MediaRecorder produces it, decoded from arbitrary chunks.

MediaRecorder's first chunk carries the WebM header and later chunks are
cluster fragments cut anywhere; timestamps may start above zero and have
gaps; when the camera or the window changes size, the stream goes on in the
same VP8 track with a keyframe of the new size. The test builds such a
stream by muxing the packets of separately encoded segments into one track.
"""

from __future__ import annotations

import io
import threading

import av
import numpy as np

from streamchat.ingest.feed import ByteFeed
from streamchat.media.decoder import DecoderOptions, decode_stream
from streamchat.window import Frame
from tests.support.media import chunks, encode_video

FPS = 10


def recorder_stream() -> bytes:
    """3 s at 320x240 from t=5.0 s, a 1 s gap, then 2 s at 240x240, in one VP8 track."""
    segments = [
        (
            encode_video(
                container="webm", codec="vp8", width=320, height=240, fps=FPS, seconds=3.0
            ),
            5.0,
        ),
        (
            encode_video(
                container="webm",
                codec="vp8",
                width=240,
                height=240,
                fps=FPS,
                seconds=2.0,
                first_index=30,
            ),
            9.0,
        ),
    ]
    out = io.BytesIO()
    with av.open(out, "w", format="webm") as muxer:
        track = None
        for data, start in segments:
            with av.open(io.BytesIO(data)) as source:
                stream = source.streams.video[0]
                if track is None:
                    track = muxer.add_stream_from_template(stream)
                offset = round(start / stream.time_base)
                for packet in source.demux(stream):
                    if packet.size == 0:
                        continue
                    packet.pts = (packet.pts or 0) + offset
                    packet.dts = (packet.dts or 0) + offset
                    packet.stream = track
                    muxer.mux(packet)
    return out.getvalue()


def decode_chunked(data: bytes) -> list[Frame]:
    feed = ByteFeed(max_bytes=len(data) + 1, read_timeout=30.0)
    frames: list[Frame] = []
    options = DecoderOptions(fps=2.0, container="webm", min_pixels=28 * 28, max_pixels=112 * 112)
    for piece in chunks(data, 977, seed=7):  # cluster fragments cut at any byte
        feed.put_nowait(piece)
    feed.close()
    worker = threading.Thread(
        target=decode_stream, args=(feed, options, frames.append, threading.Event())
    )
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive()
    return frames


def test_recorder_like_webm_decodes_across_a_gap_and_a_size_change() -> None:
    """Chunks cut anywhere decode from a non-zero start, across a gap and a size change."""
    frames = decode_chunked(recorder_stream())
    pts = [frame.pts for frame in frames]
    assert pts[0] == 0.0, "timestamps start at zero whatever the recorder's start"
    assert pts == sorted(pts)
    # 3 s then 2 s at 2 fps; the 1 s gap stays a gap in the timeline.
    assert len(frames) == 10
    assert any(later - earlier > 1.0 for earlier, later in zip(pts, pts[1:], strict=False))
    sizes = [frame.size for frame in frames]
    assert sizes[0] == (112, 84) and sizes[-1] == (112, 112), "frames follow the new resolution"
    assert all(np.asarray(frame.image).flags.c_contiguous for frame in frames)
