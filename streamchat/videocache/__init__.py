"""Decoded media by URL, for requests that name their videos and images: fetched and decoded once.

An OpenAI-style request names each video or image by URL and says how to
sample it (:class:`Sampling`); :class:`VideoCache` answers with the sampled,
resized frames (:class:`DecodedVideo`, or one :class:`~streamchat.window.Frame`).

**Sources.** ``http(s)`` and ``file:`` URLs are fetched as a WebSocket
``video.url`` is (:func:`streamchat.ingest.fetch_into`: the URL policy, pinned
addresses, redirects checked again, size and time bounds, an MP4's index
moved first) and decoded *while* they are fetched: the fetch fills a bounded
:class:`~streamchat.ingest.ByteFeed` that a decoder thread reads, so a file is
never whole in memory. ``data:`` URLs (:mod:`streamchat.ingest.dataurl`:
strict base64, bounded, a media type that lies refused) are fed from memory
the same way; vLLM's multi-frame ``data:video/jpeg;base64,<jpeg>,<jpeg>,...``
is a video of those pictures, the ``i``-th at ``i / fps`` seconds. Decoding
runs in at most ``max_media_decodes`` threads of the cache's own, never on
the event loop; an image is at most ``max_image_bytes`` before decoding.
(A ``data:`` URL is parsed and digested in the loop's default executor: short,
bounded by ``max_data_url_bytes``.)

**Frames.** vLLM's default loader takes ``n = min(num_frames, total,
floor(duration * fps))`` frames at ``linspace(0, total - 1, n)``: the first,
the last and evenly between, over the whole video. Here the decoder keeps
frames at ``fps`` by presentation time (``FrameSampler``: about
``floor(duration * fps)`` of them) and :class:`~streamchat.media.FrameSpread`
keeps ``max_frames`` of those spread over the whole video without knowing its
length: at most ``2 * max_frames`` frames held, every other one dropped when
full, then the ones nearest to evenly spaced times from the first frame to
the last. How it differs: each frame is at most half of the final stride
(the spacing of the frames held at the end) from where ``linspace`` would
put it, times come from the frames' timestamps rather than their indices
(the same on a constant rate; truer on a variable one), and the whole video
is decoded even when the container declares its length (the interval is
not chosen up front). ``DecodedVideo.fps`` is the rate the frames stand
for: their count less one over the time they span.

**Identity.** An entry is kept per source and :class:`Sampling` (images: per
pixel budget) and used again only while the source is the same:

* ``data:``: the SHA-256 of its decoded bytes;
* ``file:``: the file's resolved path, size, ``mtime_ns``, inode and device,
  read with ``stat``: unchanged, it is not opened at all;
* ``http(s)``: the final URL after redirects and the response's validators
  (``ETag``, ``Last-Modified``). A repeated URL is revalidated with a
  conditional request (``If-None-Match``, ``If-Modified-Since``): a ``304``
  (from the same final URL) answers from the entry, with no body and no
  decode; a ``200`` is read and decoded again and replaces it, unless its
  validators are the entry's (a server ignoring the condition), when its
  body is left unread. A response without validators cannot be checked, so
  nothing is kept for it: the URL is fetched and decoded again every time.

**Bounds.** Entries are bounded by ``max_bytes`` of pixels, least recently
used evicted first; an entry larger than the whole bound is returned, not
kept. Identical requests at the same time share one fetch and one decode
(a flight): a failure reaches every waiter and is not kept; a waiter that
is cancelled leaves the others theirs, and the work is cancelled when its
last waiter leaves. Logs never name a URL (a query string may hold a token).

* ``decoding``: how one source becomes frames (the feed, the decoder thread,
  the frames kept): :class:`Sampling`, :class:`DecodedVideo`.
* ``cache``: entries by identity, the byte bound, flights: :class:`VideoCache`.

The door an OpenAI-style request crosses: import from here.
"""

from __future__ import annotations

from .cache import CacheStats, VideoCache
from .decoding import DecodedVideo, Sampling

__all__ = ["CacheStats", "DecodedVideo", "Sampling", "VideoCache"]
