"""Bytes to frames, in a decoder thread: PyAV demuxes, decodes, samples and resizes.

:func:`decode_stream` reads a live byte source (a
:class:`~streamchat.ingest.ByteFeed`) with a bounded reader, keeps frames at
the session's rate, resizes them inside FFmpeg to the model's pixel budget,
turns them upright as players would, and hands each to a callback; it never
runs on the event loop. :func:`decode_image` does the same for one picture;
:class:`FrameSpread` keeps a few frames spread over a whole video. The
session and the video cache are its callers; this is their door.

* ``decoder``: the PyAV side, with every size, time and CPU bound.
* ``reader``: what FFmpeg reads: a live source made safe for a demuxer, and
  the MP4 walker that checks an index before FFmpeg allocates for it.
* ``sampling``: which frames to keep, at what size, time and orientation, and
  how to spread a few over a whole video (pure).
* ``memory``: what a decoder costs in memory, and the server-wide account of
  it that every decoder draws from (pure); ``admission``: that account on the
  event loop, where decoders wait for room, bounded.
* ``gops``: which groups of pictures hold the few frames spread over a video
  whose length is declared, so that only those are decoded (pure).
"""

from __future__ import annotations

from .admission import DecodeMemory, Hold
from .decoder import DecoderOptions, MemoryNeed, decode_image, decode_stream, map_large_blocks
from .sampling import FrameSpread, check_budget, spread

__all__ = [
    "DecodeMemory",
    "DecoderOptions",
    "FrameSpread",
    "Hold",
    "MemoryNeed",
    "check_budget",
    "decode_image",
    "decode_stream",
    "map_large_blocks",
    "spread",
]
