"""Bytes in: a source's bytes, bounded, on their way to the decoder thread.

A pushed stream arrives in ``video.chunk`` messages; a URL source is fetched
(http(s) with every address and redirect checked, or ``file:`` under the
allowed directory; an MP4 with its index at the end is read by offset and
streamed index first). Either way the bytes go into a :class:`ByteFeed`, the
bounded queue between the event loop and the decoder thread of
:mod:`streamchat.media`. The session and the video cache are its callers;
this is their door.

* ``feed``: the bounded byte queue (high/low water marks, timeouts).
* ``fetch``: URL sources streamed into a feed, conditionally when validators
  are known; what was fetched (final URL, validators, a file's stamp).
* ``dataurl``: ``data:`` URLs decoded strictly, bounded, digested (pure).
* ``urlpolicy``, ``netguard``, ``pinning``: which URLs and addresses may be
  reached, and a transport that connects only to the addresses checked.
* ``relayout``, ``faststart``: an MP4's index moved before its media.
"""

from __future__ import annotations

from .dataurl import DataUrl, is_data_url, parse_data_url
from .feed import ByteFeed, FeedClosed
from .fetch import Fetched, FileStamp, Validators, bytes_into, fetch_into, stat_file
from .netguard import Lookups, Resolver, shared_lookups
from .urlpolicy import parse_allowed_domain, url_scheme

__all__ = [
    "ByteFeed",
    "DataUrl",
    "FeedClosed",
    "Fetched",
    "FileStamp",
    "Lookups",
    "Resolver",
    "Validators",
    "bytes_into",
    "fetch_into",
    "is_data_url",
    "parse_allowed_domain",
    "parse_data_url",
    "shared_lookups",
    "stat_file",
    "url_scheme",
]
