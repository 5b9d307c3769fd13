"""Frames as a model's video, for every engine adapter: no vLLM here.

The local adapter (:mod:`streamchat.engine.vllm`) hands vLLM a ``(T, H, W, 3)``
array; the remote one (:mod:`streamchat.engine.remote`) sends the same frames
over HTTP. Both must give the model the same pixels, so the stacking (the
newest frame's size, nearest-neighbour resizing of frames of another size)
lives here once. So does a video's content id for a remote engine, taken with
the standard library's ``hashlib`` (vLLM's blake3 is not streamchat's
dependency): what identifies the pixels, their size and what the model is
told about them.

Both adapters ask about the same frames again and again (a window moves by a
frame or two between questions), so what they derive from a frame's pixels (a
digest; the remote adapter's encoding too) is kept per frame while the frame
lives, in one :class:`FrameCache`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar, overload

import numpy as np
import numpy.typing as npt

from ..window import Frame

__all__ = [
    "FrameCache",
    "content_id",
    "frame_digest",
    "newest_size",
    "resize_nearest",
    "stack_frames",
]

Image = npt.NDArray[np.uint8]
V = TypeVar("V")


def newest_size(frames: Sequence[Frame]) -> tuple[int, int]:
    """``(height, width)`` of the video :func:`stack_frames` makes of ``frames``."""
    height, width = frames[-1].image.shape[:2]
    return int(height), int(width)


def stack_frames(frames: Sequence[Frame]) -> npt.NDArray[np.uint8]:
    """Frames as one ``(T, H, W, 3)`` uint8 video, at the newest frame's size.

    A stream can change resolution mid-window; the few frames of another size
    are resized (nearest neighbour, cheap and good enough for patches of 14
    pixels) rather than refused.
    """
    height, width = newest_size(frames)
    return np.stack([resize_nearest(frame.image, height, width) for frame in frames])


def resize_nearest(image: npt.NDArray[np.uint8], height: int, width: int) -> npt.NDArray[np.uint8]:
    """``image`` at ``height`` x ``width`` by nearest neighbour (itself if already that size)."""
    if image.shape[:2] == (height, width):
        return image
    rows = np.arange(height) * image.shape[0] // height
    cols = np.arange(width) * image.shape[1] // width
    resized: npt.NDArray[np.uint8] = image[rows[:, None], cols]
    return resized


def content_id(
    digests: Sequence[bytes], *, size: tuple[int, int], metadata: Any, encoding: str
) -> str:
    """A video's id from its frames' ``digests``, its ``size``, ``metadata`` and ``encoding``.

    Everything that changes what the model sees goes in: the same frames told
    another rate, or sent lossily at another quality, are another video to the
    engine's caches. Deterministic, so front-ends sending the same video share
    the engine's caches.
    """
    digest = hashlib.blake2b(digest_size=20)
    header = {"size": list(size), "count": len(digests), "metadata": metadata, "enc": encoding}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for frame in digests:
        digest.update(frame)
    return "sc-" + digest.hexdigest()


def frame_digest(image: Image) -> bytes:
    """16 bytes identifying ``image``'s pixels, shape and type (``hashlib``'s blake2b)."""
    digest = hashlib.blake2b(f"{image.dtype.str}{image.shape}".encode(), digest_size=16)
    digest.update(np.ascontiguousarray(image).data)
    return digest.digest()


class FrameCache(Generic[V]):
    """A digest per frame image, and a value derived from the image, each computed once per array.

    Hashing a window's frames on every question costs 10-20 ms for a full
    window of 720p (about 19 MB), encoding them for a remote engine far more,
    although the window has changed by a frame or two since the last one. So
    both are done once, when an image is first asked about, and kept:

    * **by the array's identity.** An entry is keyed by ``id(image)`` and
      trusted only while a weak reference shows that very array alive (an id
      is reused once its object is gone). Frames own their images and nothing
      writes to them once decoded, so a digest stays true for the array's
      lifetime.
    * **while the array lives.** When it is freed, its weak reference's
      callback queues the entry, which is dropped at the cache's next use.
      The callback may run in any thread, at any allocation (a garbage
      collection), even while this cache holds its lock in the same thread: so
      it only appends to a list (atomic) and never takes the lock.
    * **within ``max_bytes``** (None: no bound but the frames' own), counting
      each entry's digest and ``size(value)``: the least recently used entries
      go first.
    * **thread-safe**: request bodies are built in worker threads; the
      digest and value are computed outside the lock (two threads may both
      compute one, and the second entry wins: the values are equal).

    ``FrameCache(digest)`` keeps digests only (its values are None);
    ``FrameCache(digest, derive, size=len)`` keeps ``derive(image)`` too.
    """

    @overload
    def __init__(
        self: FrameCache[None],
        digest: Callable[[Image], bytes] = ...,
        *,
        max_bytes: int | None = None,
    ) -> None: ...

    @overload
    def __init__(
        self,
        digest: Callable[[Image], bytes],
        derive: Callable[[Image], V],
        *,
        size: Callable[[V], int],
        max_bytes: int | None = None,
    ) -> None: ...

    def __init__(
        self,
        digest: Callable[[Image], bytes] = frame_digest,
        derive: Callable[[Image], Any] | None = None,
        *,
        size: Callable[[Any], int] | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self._digest = digest
        self._derive = derive
        self._size = size
        self._max_bytes = max_bytes
        self._bytes = 0
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, tuple[weakref.ref[Image], bytes, V, int]] = OrderedDict()
        self._freed: list[tuple[int, weakref.ref[Image]]] = []

    def __len__(self) -> int:
        with self._lock:
            self._drop_freed()
            return len(self._entries)

    def digest(self, image: Image) -> bytes:
        """``image``'s digest (computed at most once while the array lives)."""
        return self.get(image)[0]

    def get(self, image: Image, *, keep: bool = True) -> tuple[bytes, V]:
        """``image``'s digest and value; ``keep=False`` for a temporary array (not stored)."""
        key = id(image)
        with self._lock:
            self._drop_freed()
            entry = self._entries.get(key)
            if entry is not None and entry[0]() is image:
                self._entries.move_to_end(key)
                return entry[1], entry[2]
        digest = self._digest(image)
        value: V = self._derive(image) if self._derive is not None else None  # type: ignore[assignment]
        if keep:
            nbytes = len(digest) + (self._size(value) if self._size is not None else 0)
            ref = weakref.ref(image, functools.partial(_freed, self._freed, key))
            with self._lock:
                self._pop(key)
                self._entries[key] = (ref, digest, value, nbytes)
                self._bytes += nbytes
                while self._max_bytes is not None and self._bytes > self._max_bytes:
                    self._pop(next(iter(self._entries)))
        return digest, value

    def _drop_freed(self) -> None:
        """Drop the entries of freed arrays (under the lock)."""
        while self._freed:
            key, ref = self._freed.pop()
            entry = self._entries.get(key)
            if entry is not None and entry[0] is ref:  # not a new array at a reused id
                self._pop(key)

    def _pop(self, key: int) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[3]


def _freed(queue: list[tuple[int, weakref.ref[Image]]], key: int, ref: weakref.ref[Image]) -> None:
    """A cached array was freed: queue its entry (see :class:`FrameCache`; no lock here)."""
    queue.append((key, ref))
