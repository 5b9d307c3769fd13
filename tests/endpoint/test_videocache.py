"""The decoded-video cache with real PyAV, real HTTP on loopback, real files and ``data:`` URLs.

Every claim is proven by counters, never by timing: the cache's own
(:class:`~streamchat.videocache.CacheStats`) and the file server's log of what
it answered (:class:`~tests.support.httpfiles.FileServer`: ``200``, ``304``, the
bodies it sent). Generated frames carry their frame numbers
(:func:`tests.support.media.frame_index`), so the frames chosen are read back
from the pictures. A flight is held in place by a DNS resolver that answers
only when the test says, never by sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest

from streamchat.config import Settings
from streamchat.errors import (
    MediaInvalid,
    UrlFetchFailed,
    UrlNotAllowed,
    VideoDecodeError,
    VideoTooLarge,
    VideoTooLong,
)
from streamchat.videocache import DecodedVideo, Sampling, VideoCache
from tests.support.httpfiles import FileServer
from tests.support.media import encode_image, encode_video, frame_index

SAMPLING = Sampling(fps=30.0, max_frames=8, min_pixels=28 * 28, max_pixels=112 * 112, factor=28)


def data_url(media_type: str, *payloads: bytes) -> str:
    return f"data:{media_type};base64," + ",".join(base64.b64encode(p).decode() for p in payloads)


def indices(video: DecodedVideo, fps: float = 10) -> list[int]:
    """The frame numbers drawn in the frames, checked against their times (numbers wrap at 256)."""
    numbers = [frame_index(frame.image) for frame in video.frames]
    assert numbers == [round(frame.pts * fps) % 256 for frame in video.frames]
    return [round(frame.pts * fps) for frame in video.frames]


@pytest.fixture(scope="module")
def long_clip() -> bytes:
    """10 s at 30 fps: 300 numbered frames."""
    return encode_video(container="webm", codec="vp8", fps=30, seconds=10.0)


@pytest.fixture
def media(tmp_path: Path) -> Path:
    directory = tmp_path / "media"
    directory.mkdir()
    encode_video(directory / "clip.webm", fps=10, seconds=2.0)
    return directory


@pytest.fixture
def server(media: Path) -> Iterator[FileServer]:
    with FileServer(media) as files:
        yield files


@pytest.fixture
def settings(media: Path) -> Settings:
    return Settings(fetch_allow_private=True, allowed_file_dir=media)


@pytest.fixture
async def cache(settings: Settings) -> AsyncIterator[VideoCache]:
    videos = VideoCache(settings, max_bytes=64 << 20)
    yield videos
    await videos.aclose()


class GatedDns:
    """Answers ``127.0.0.1`` for any name, but only once :attr:`gate` is set; counts questions."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.asked = 0

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.asked += 1
        await self.gate.wait()
        return ["127.0.0.1"]


@pytest.fixture
async def gated(
    settings: Settings, server: FileServer
) -> AsyncIterator[tuple[VideoCache, GatedDns, str]]:
    """A cache whose fetches of ``url`` wait in DNS until the test sets ``dns.gate``."""
    dns = GatedDns()
    videos = VideoCache(settings, max_bytes=1 << 24, resolver=dns)
    yield videos, dns, f"http://media.test:{server.port}/clip.webm"
    await videos.aclose()


async def until(condition: object) -> None:
    """Let the loop run until ``condition()`` holds (bounded: a test fails, it never hangs)."""
    async with asyncio.timeout(10):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0)


# -- frames ------------------------------------------------------------------------


async def test_max_frames_are_spread_over_the_whole_video(
    cache: VideoCache, long_clip: bytes
) -> None:
    """10 s at 30 fps into 8 frames: the first, the last and evenly between, at their true times."""
    video = await cache.video(data_url("video/webm", long_clip), SAMPLING)
    numbers = indices(video, fps=30)
    assert len(numbers) == 8
    assert numbers[0] == 0 and numbers[-1] == 299
    assert max(b - a for a, b in zip(numbers, numbers[1:], strict=False)) <= 64  # linspace: 43
    assert video.frames[0].image.shape == (84, 112, 3)
    assert video.nbytes == 8 * 84 * 112 * 3
    assert video.fps == pytest.approx(7 / (299 / 30), rel=1e-3)  # WebM times: milliseconds


async def test_a_low_rate_gives_floor_duration_times_fps(
    cache: VideoCache, long_clip: bytes
) -> None:
    """At 0.5 fps a 10 s video gives floor(10 * 0.5) = 5 frames, every 2 s, fewer than allowed."""
    sampling = Sampling(fps=0.5, max_frames=8, min_pixels=28 * 28, max_pixels=112 * 112, factor=28)
    video = await cache.video(data_url("video/webm", long_clip), sampling)
    assert indices(video, fps=30) == [0, 60, 120, 180, 240]
    assert video.fps == pytest.approx(0.5)


# -- http(s): revalidation -----------------------------------------------------------


async def test_a_repeated_url_is_revalidated_not_fetched(
    cache: VideoCache, server: FileServer
) -> None:
    """With an ETag: the second request is a 304, with no body and no decode."""
    first = await cache.video(server.url("clip.webm"), SAMPLING)
    second = await cache.video(server.url("clip.webm"), SAMPLING)
    assert second is first
    server.wait_idle()
    assert server.statuses() == [200, 304]
    assert server.bodies() == 1
    s = cache.stats
    assert (s.body_fetches, s.not_modified, s.decodes, s.hits) == (1, 1, 1, 1)
    assert (s.entries, s.bytes) == (1, first.nbytes)


async def test_only_last_modified_is_enough(cache: VideoCache, server: FileServer) -> None:
    """A server that sends only Last-Modified is asked If-Modified-Since, and answers 304."""
    server.etag = False
    await cache.video(server.url("clip.webm"), SAMPLING)
    await cache.video(server.url("clip.webm"), SAMPLING)
    server.wait_idle()
    assert server.statuses() == [200, 304]
    assert (cache.stats.body_fetches, cache.stats.decodes, cache.stats.not_modified) == (1, 1, 1)


@pytest.mark.parametrize("validator", ["etag", "last_modified"])
async def test_a_changed_file_is_fetched_and_decoded_again(
    cache: VideoCache, server: FileServer, media: Path, validator: str
) -> None:
    """New contents (a new ETag, a later Last-Modified): a 200, a new decode, the entry replaced."""
    server.etag = validator == "etag"
    path = media / "clip.webm"
    first = await cache.video(server.url("clip.webm"), SAMPLING)
    encode_video(path, fps=10, seconds=2.0, first_index=100)
    later = path.stat().st_mtime_ns + 2_000_000_000  # Last-Modified counts whole seconds
    os.utime(path, ns=(later, later))
    second = await cache.video(server.url("clip.webm"), SAMPLING)
    server.wait_idle()
    assert server.statuses() == [200, 200]
    assert frame_index(first.frames[0].image) == 0
    assert frame_index(second.frames[0].image) == 100
    assert (cache.stats.decodes, cache.stats.not_modified, cache.stats.entries) == (2, 0, 1)
    assert await cache.video(server.url("clip.webm"), SAMPLING) is second
    assert cache.stats.not_modified == 1


async def test_without_validators_every_request_fetches_and_decodes(
    cache: VideoCache, server: FileServer
) -> None:
    """A response without ETag or Last-Modified cannot be revalidated: nothing is kept."""
    server.etag = server.last_modified = False
    await cache.video(server.url("clip.webm"), SAMPLING)
    await cache.video(server.url("clip.webm"), SAMPLING)
    server.wait_idle()
    assert server.statuses() == [200, 200]
    assert (cache.stats.decodes, cache.stats.hits, cache.stats.entries) == (2, 0, 0)


async def test_a_server_ignoring_conditions_is_not_decoded_again(
    cache: VideoCache, server: FileServer
) -> None:
    """A 200 with the entry's validators is known: its body is left unread and not decoded."""
    server.ignore_conditions = True
    first = await cache.video(server.url("clip.webm"), SAMPLING)
    assert await cache.video(server.url("clip.webm"), SAMPLING) is first
    server.wait_idle()
    assert server.statuses() == [200, 200]
    s = cache.stats
    assert (s.body_fetches, s.decodes, s.hits, s.not_modified) == (1, 1, 1, 0)


async def test_each_sampling_has_its_own_entry(cache: VideoCache, server: FileServer) -> None:
    """Another rate is another decode; both stay, each revalidated on its own."""
    slow = Sampling(fps=2.0, max_frames=8, min_pixels=28 * 28, max_pixels=112 * 112, factor=28)
    fast = await cache.video(server.url("clip.webm"), SAMPLING)
    assert len((await cache.video(server.url("clip.webm"), slow)).frames) == 4
    assert await cache.video(server.url("clip.webm"), SAMPLING) is fast
    server.wait_idle()
    assert server.statuses() == [200, 200, 304]
    assert (cache.stats.decodes, cache.stats.entries) == (2, 2)


async def test_an_image_by_url(cache: VideoCache, server: FileServer, media: Path) -> None:
    """An image is fetched, decoded to one frame at time 0 and revalidated like a video."""
    (media / "picture.png").write_bytes(encode_image("png", index=77))
    frame = await cache.image(server.url("picture.png"), SAMPLING)
    assert (frame.pts, frame_index(frame.image), frame.image.shape) == (0.0, 77, (84, 112, 3))
    other_rate = Sampling(
        fps=1.0, max_frames=1, min_pixels=28 * 28, max_pixels=112 * 112, factor=28
    )
    assert await cache.image(server.url("picture.png"), other_rate) is frame  # same pixel budget
    server.wait_idle()
    assert server.statuses() == [200, 304]


# -- file: ------------------------------------------------------------------------------


async def test_an_unchanged_file_is_not_read_again(cache: VideoCache, media: Path) -> None:
    """``file:``: same path, size, mtime and inode answer from the entry; a touch reads again."""
    url = (media / "clip.webm").as_uri()
    first = await cache.video(url, SAMPLING)
    assert await cache.video(url, SAMPLING) is first
    assert (cache.stats.body_fetches, cache.stats.decodes, cache.stats.hits) == (1, 1, 1)
    os.utime(media / "clip.webm")
    await cache.video(url, SAMPLING)
    assert (cache.stats.body_fetches, cache.stats.decodes, cache.stats.entries) == (2, 2, 1)


async def test_a_file_outside_the_directory_is_refused(cache: VideoCache, tmp_path: Path) -> None:
    """``file:`` URLs go through the same policy as ``video.url``."""
    encode_video(tmp_path / "outside.webm")
    with pytest.raises(UrlNotAllowed):
        await cache.video((tmp_path / "outside.webm").as_uri(), SAMPLING)
    with pytest.raises(UrlNotAllowed):
        await cache.video("ftp://example.com/clip.webm", SAMPLING)


# -- data: --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("container", "codec", "media_type"),
    [
        ("mp4-faststart", "h264", "video/mp4"),
        ("mp4-plain", "h264", "video/mp4"),  # index at the end: moved first, in memory
        ("webm", "vp8", "video/webm"),
        ("webm", "vp8", "video/mp4"),  # mislabelled: FFmpeg probes the container
    ],
)
async def test_data_video(cache: VideoCache, container: str, codec: str, media_type: str) -> None:
    """A ``data:`` video decodes like a fetched one; the same bytes again are a hit."""
    clip = encode_video(container=container, codec=codec, fps=10, seconds=2.0)  # type: ignore[arg-type]
    video = await cache.video(data_url(media_type, clip), SAMPLING)
    numbers = indices(video)
    assert len(numbers) == 8 and numbers[0] == 0 and numbers[-1] == 19
    assert await cache.video(data_url(media_type, clip), SAMPLING) is video
    assert (cache.stats.decodes, cache.stats.hits, cache.stats.body_fetches) == (1, 1, 0)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
async def test_data_image(cache: VideoCache, fmt: str) -> None:
    """``data:image/png`` and ``data:image/jpeg``: one frame, the picture's number read back."""
    url = data_url(f"image/{fmt}", encode_image(fmt, index=42))  # type: ignore[arg-type]
    frame = await cache.image(url, SAMPLING)
    assert frame_index(frame.image) == 42
    assert await cache.image(url, SAMPLING) is frame
    assert (cache.stats.decodes, cache.stats.hits) == (1, 1)


async def test_data_image_webp(cache: VideoCache) -> None:
    """``data:image/webp`` decodes with FFmpeg's WebP decoder."""
    import io

    import av

    from tests.support.media import pattern_frame

    out = io.BytesIO()
    with av.open(out, "w", format="webp") as container:
        stream = container.add_stream("libwebp", rate=1, options={"lossless": "1"})
        stream.width, stream.height, stream.pix_fmt = 160, 120, "bgra"  # type: ignore[attr-defined]
        picture = av.VideoFrame.from_ndarray(pattern_frame(9, 160, 120), format="rgb24")
        container.mux(stream.encode(picture.reformat(format="bgra")))  # type: ignore[attr-defined]
        container.mux(stream.encode(None))  # type: ignore[attr-defined]
    frame = await cache.image(data_url("image/webp", out.getvalue()), SAMPLING)
    assert frame_index(frame.image) == 9


async def test_multi_frame_jpeg_url(cache: VideoCache) -> None:
    """``data:video/jpeg;base64,f1,f2,...``: frame i at i / fps; more than max_frames spread."""
    jpegs = [encode_image("jpeg", index=10 + i) for i in range(5)]
    two_fps = Sampling(fps=2.0, max_frames=8, min_pixels=28 * 28, max_pixels=112 * 112, factor=28)
    video = await cache.video(data_url("video/jpeg", *jpegs), two_fps)
    assert [f.pts for f in video.frames] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert [frame_index(f.image) for f in video.frames] == [10, 11, 12, 13, 14]
    assert video.fps == pytest.approx(2.0)
    three = Sampling(fps=2.0, max_frames=3, min_pixels=28 * 28, max_pixels=112 * 112, factor=28)
    video = await cache.video(data_url("video/jpeg", *jpegs), three)
    assert [frame_index(f.image) for f in video.frames] == [10, 12, 14]
    assert cache.stats.decodes == 2


async def test_bad_data_urls_are_typed_errors(settings: Settings) -> None:
    """Not base64, a lying media type, too many frames, too many bytes: each its own error."""
    import dataclasses

    small = dataclasses.replace(settings, max_data_url_frames=3, max_image_bytes=1000)
    cache = VideoCache(small, max_bytes=1 << 20)
    png = encode_image("png")
    jpeg = encode_image("jpeg")
    with pytest.raises(MediaInvalid):
        await cache.video("data:video/mp4;base64,not base64!", SAMPLING)
    with pytest.raises(MediaInvalid, match="says video/mp4 but holds a PNG image"):
        await cache.video(data_url("video/mp4", png), SAMPLING)
    with pytest.raises(MediaInvalid, match="holds no image"):
        await cache.image(data_url("image/png", encode_video(seconds=0.2)), SAMPLING)
    with pytest.raises(VideoTooLong):
        await cache.video(data_url("video/jpeg", *[jpeg] * 4), SAMPLING)
    with pytest.raises(VideoTooLarge):
        await cache.image(data_url("image/png", png + bytes(1000)), SAMPLING)
    assert (cache.stats.decodes, cache.stats.entries) == (1, 0)  # only the last got that far
    await cache.aclose()


# -- flights ------------------------------------------------------------------------------


async def test_identical_concurrent_requests_share_one_fetch_and_decode(
    cache: VideoCache, server: FileServer
) -> None:
    """Two requests at once: one body, one decode; the second joined the first."""
    one, two = await asyncio.gather(
        cache.video(server.url("clip.webm"), SAMPLING),
        cache.video(server.url("clip.webm"), SAMPLING),
    )
    assert one is two
    server.wait_idle()
    assert server.statuses() == [200]
    assert (cache.stats.decodes, cache.stats.shared, cache.stats.body_fetches) == (1, 1, 1)


async def test_a_cancelled_waiter_leaves_the_other_its_result(
    gated: tuple[VideoCache, GatedDns, str],
) -> None:
    """One of two waiters gives up mid-flight: the work goes on, and the other gets the video."""
    cache, dns, url = gated
    leaving = asyncio.create_task(cache.video(url, SAMPLING))
    staying = asyncio.create_task(cache.video(url, SAMPLING))
    await until(lambda: cache.stats.shared == 1 and dns.asked == 1)
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)
    dns.gate.set()
    video = await staying
    assert leaving.cancelled() and len(video.frames) == 8
    assert (cache.stats.decodes, cache.stats.entries) == (1, 1)


async def test_the_work_ends_when_its_last_waiter_leaves(
    gated: tuple[VideoCache, GatedDns, str], server: FileServer
) -> None:
    """The only waiter leaves: the flight is cancelled, nothing fetched, the next starts anew."""
    cache, dns, url = gated
    waiter = asyncio.create_task(cache.video(url, SAMPLING))
    await until(lambda: dns.asked == 1)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert not cache._flights
    dns.gate.set()
    assert len((await cache.video(url, SAMPLING)).frames) == 8
    server.wait_idle()
    assert server.statuses() == [200]
    assert (cache.stats.decodes, cache.stats.shared) == (1, 0)


async def test_a_failure_reaches_every_waiter_and_is_not_kept(
    cache: VideoCache, server: FileServer, media: Path
) -> None:
    """Two waiters on a missing file both fail; once the file is there it is fetched and decoded."""
    url = server.url("later.webm")
    outcomes = await asyncio.gather(
        cache.video(url, SAMPLING), cache.video(url, SAMPLING), return_exceptions=True
    )
    assert [type(o) for o in outcomes] == [UrlFetchFailed, UrlFetchFailed]
    assert (cache.stats.shared, cache.stats.entries) == (1, 0)
    encode_video(media / "later.webm", fps=10, seconds=1.0)
    assert len((await cache.video(url, SAMPLING)).frames) == 8
    server.wait_idle()
    assert server.statuses() == [404, 200]


async def test_a_video_that_does_not_decode_is_not_kept(cache: VideoCache) -> None:
    """A corrupt ``data:`` video fails each time it is asked for: decoded twice, kept never."""
    url = data_url("video/webm", encode_video(seconds=1.0)[:300])
    for _ in range(2):
        with pytest.raises(VideoDecodeError):
            await cache.video(url, SAMPLING)
    assert (cache.stats.decodes, cache.stats.entries) == (2, 0)


# -- the byte bound ----------------------------------------------------------------------


async def test_the_byte_bound_evicts_the_least_recently_used(settings: Settings) -> None:
    """Room for two images: a third evicts the one used longest ago; one too large is not kept."""
    frame_bytes = 84 * 112 * 3
    cache = VideoCache(settings, max_bytes=2 * frame_bytes)
    urls = [data_url("image/png", encode_image("png", index=i)) for i in range(3)]
    await cache.image(urls[0], SAMPLING)
    await cache.image(urls[1], SAMPLING)
    await cache.image(urls[0], SAMPLING)  # 0 is now the most recently used
    await cache.image(urls[2], SAMPLING)  # evicts 1
    assert (cache.stats.evictions, cache.stats.entries, cache.stats.bytes) == (
        1,
        2,
        2 * frame_bytes,
    )
    decodes = cache.stats.decodes
    await cache.image(urls[0], SAMPLING)
    assert cache.stats.decodes == decodes  # still there
    await cache.image(urls[1], SAMPLING)
    assert cache.stats.decodes == decodes + 1  # evicted before: decoded again
    big = Sampling(fps=1.0, max_frames=1, min_pixels=224 * 224, max_pixels=448 * 448, factor=28)
    frame = await cache.image(urls[0], big)
    assert frame.nbytes > cache.max_bytes
    assert (cache.stats.entries, cache.stats.bytes) == (2, 2 * frame_bytes)  # returned, not kept
    await cache.aclose()
