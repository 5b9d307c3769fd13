"""Bytes in: a source's bytes, bounded, on their way to the decoder thread.

A pushed stream arrives in ``video.chunk`` messages; a URL source is fetched
(http(s) with every address and redirect checked, or ``file:`` under the
allowed directory; an MP4 with its index at the end is read by offset and
streamed index first). Either way the bytes go into a :class:`ByteFeed`, the
bounded queue between the event loop and the decoder thread of
:mod:`streamchat.media`. The session is the one caller; this is its door.

* ``feed``: the bounded byte queue (high/low water marks, timeouts).
* ``fetch``: URL sources streamed into a feed.
* ``urlpolicy``, ``netguard``, ``pinning``: which URLs and addresses may be
  reached, and a transport that connects only to the addresses checked.
* ``relayout``, ``faststart``: an MP4's index moved before its media.
"""

from __future__ import annotations

from .feed import ByteFeed, FeedClosed
from .fetch import fetch_into
from .netguard import Lookups, shared_lookups
from .urlpolicy import parse_allowed_domain

__all__ = [
    "ByteFeed",
    "FeedClosed",
    "Lookups",
    "fetch_into",
    "parse_allowed_domain",
    "shared_lookups",
]
