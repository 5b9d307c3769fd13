"""The per-frame cache both engine adapters share (:mod:`streamchat.engine.frames`)."""

from __future__ import annotations

import gc
import threading

import numpy as np
import numpy.typing as npt

from streamchat.engine.encoding import encode_base64
from streamchat.engine.frames import FrameCache, frame_digest


def _image(seed: int, size: tuple[int, int] = (8, 12)) -> npt.NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


class _Counting:
    """A derive function that counts its calls (a recording fake)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, image: npt.NDArray[np.uint8]) -> str:
        self.calls += 1
        return encode_base64(image, "ppm")


def test_a_value_is_derived_once_per_array_and_follows_pixels() -> None:
    """The value is computed once while the array lives; an equal copy shares its digest."""
    derive = _Counting()
    cache = FrameCache(frame_digest, derive, size=len)
    image = _image(1)
    digest, value = cache.get(image)
    assert cache.get(image) == (digest, value) and derive.calls == 1
    assert cache.get(image.copy())[0] == digest and derive.calls == 2
    assert cache.digest(_image(2)) != digest
    assert value == encode_base64(image, "ppm")


def test_entries_go_with_their_frames() -> None:
    """An entry is dropped once its array is freed; a temporary array is never stored."""
    cache = FrameCache()
    images = [_image(n) for n in range(3)]
    for image in images:
        cache.digest(image)
    cache.get(_image(9), keep=False)
    assert len(cache) == 3
    del images, image
    gc.collect()
    assert len(cache) == 0


def test_the_least_recently_used_go_past_max_bytes() -> None:
    """Past ``max_bytes`` (digests and values counted) the least recently used entries go."""
    derive = _Counting()
    one = 16 + len(encode_base64(_image(0), "ppm"))
    cache = FrameCache(frame_digest, derive, size=len, max_bytes=2 * one)
    first, second, third = _image(1), _image(2), _image(3)
    cache.get(first)
    cache.get(second)
    cache.get(first)  # now the most recent
    cache.get(third)
    assert len(cache) == 2 and derive.calls == 3
    cache.get(first)
    cache.get(third)
    assert derive.calls == 3
    cache.get(second)
    assert derive.calls == 4


def test_threads_share_one_cache() -> None:
    """Worker threads asking about the same frames get the digests one thread computes."""
    cache = FrameCache(max_bytes=10 * 16)
    images = [_image(n) for n in range(20)]
    expected = [frame_digest(image) for image in images]
    results: list[list[bytes]] = []
    lock = threading.Lock()

    def work() -> None:
        got = [cache.digest(image) for _ in range(20) for image in images]
        with lock:
            results.append(got)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [expected * 20] * 4
    assert len(cache) <= 10
