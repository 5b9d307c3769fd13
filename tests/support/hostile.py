"""Hostile media written byte by byte: what no encoder writes, for the resource tests.

* :func:`mp4_with_index` rewrites a real MP4's sample tables to declare many
  more samples than it holds (FFmpeg indexes every one as it reads the count);
* :func:`mp4_with_edits` gives its track an edit list of thousands of edits
  (FFmpeg indexes the samples once per edit);
* :func:`scan_bomb_jpeg` writes a progressive JPEG of thousands of empty
  scans (each walks the whole picture).

Simpler lies (a size, a sample count) are :mod:`tests.support.media`'s ``patch_*``.
"""

from __future__ import annotations

import contextlib
import struct
from typing import Any

__all__ = ["mp4_with_edits", "mp4_with_index", "scan_bomb_jpeg"]

_MP4_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts"}
Box = list[Any]  # [kind, body bytes or list of boxes]


def _boxes(data: bytes, start: int, end: int) -> list[Box]:
    boxes: list[Box] = []
    while start + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, start)
        body = data[start + 8 : start + size]
        nested = kind in _MP4_CONTAINERS
        boxes.append([kind, _boxes(data, start + 8, start + size) if nested else body])
        start += size
    return boxes


def _write(boxes: list[Box]) -> bytes:
    out = b""
    for kind, body in boxes:
        payload = _write(body) if isinstance(body, list) else body
        out += struct.pack(">I4s", 8 + len(payload), kind) + payload
    return out


def _box(boxes: list[Box], kind: bytes) -> Box:
    for box in boxes:
        if box[0] == kind:
            return box
        if isinstance(box[1], list):
            with contextlib.suppress(LookupError):
                return _box(box[1], kind)
    raise LookupError(kind)


def mp4_with_index(data: bytes, samples: int) -> bytes:
    """A faststart MP4 (one track, one chunk) whose sample tables declare ``samples`` samples.

    The real samples keep their sizes and come first, so their frames decode;
    the others are 1-byte samples that never arrive, so a decoder fed the file
    without its end waits with the whole index built. ``stsz`` lists every
    size (4 bytes a sample: 1.9 MB at 500,000), ``stts`` and ``stsc`` declare
    them all, as a long recording's tables do; the chunk offset moves with
    the grown header.
    """
    top = _boxes(data, 0, len(data))
    moov = next(i for i, box in enumerate(top) if box[0] == b"moov")
    old_end = len(_write(top[: moov + 1]))
    stsz = _box(top, b"stsz")
    (count,) = struct.unpack_from(">I", stsz[1], 8)
    sizes = [*struct.unpack_from(f">{count}I", stsz[1], 12), *[1] * (samples - count)]
    stsz[1] = struct.pack(f">III{samples}I", 0, 0, samples, *sizes)
    stts = _box(top, b"stts")
    (delta,) = struct.unpack_from(">I", stts[1], 12)
    stts[1] = struct.pack(">IIII", 0, 1, samples, delta)
    _box(top, b"stsc")[1] = struct.pack(">IIIII", 0, 1, 1, samples, 1)
    stco = _box(top, b"stco")
    (first,) = struct.unpack_from(">I", stco[1], 8)
    new_end = len(_write(top[: moov + 1]))
    stco[1] = struct.pack(">III", 0, 1, first + new_end - old_end)
    return _write(top)


class _Bits:
    """JPEG entropy-coded bits, most significant first, with 0xFF bytes stuffed."""

    def __init__(self) -> None:
        self.out = bytearray()
        self._byte = self._count = 0

    def put(self, value: int, length: int) -> None:
        for shift in range(length - 1, -1, -1):
            self._byte = (self._byte << 1) | ((value >> shift) & 1)
            self._count += 1
            if self._count == 8:
                self.out += b"\xff\x00" if self._byte == 0xFF else bytes([self._byte])
                self._byte = self._count = 0

    def end(self) -> bytes:
        if self._count:
            self.put((1 << (8 - self._count)) - 1, 8 - self._count)  # pad with ones
        return bytes(self.out)


def _segment(marker: int, body: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(body) + 2) + body


def scan_bomb_jpeg(scans: int, width: int = 4096, height: int = 2304) -> bytes:
    """A progressive greyscale JPEG of ``scans`` scans: one DC scan, AC scans of end-of-band runs.

    An AC scan takes about 20 bytes, yet FFmpeg walks every block of the
    picture for it (0.3 ms at 4096x2304 on this machine): 200,000 of them in
    a 4 MiB message kept a core busy for about a minute. The DC scan codes
    every block as "no change" (its one Huffman code, ``0``, is category 0);
    the AC table has a 4-bit code for each EOBn (``n`` = 0..14), whose ``n``
    extra bits make a run of ``2**n`` to ``2**(n+1) - 1`` blocks.
    """
    blocks = -(-width // 8) * -(-height // 8)
    dc = _Bits()
    for _ in range(blocks):
        dc.put(0, 1)
    ac = _Bits()
    left = blocks
    while left:
        run = min(left, 32767)
        n = run.bit_length() - 1
        ac.put(n, 4)  # EOBn is the n-th symbol of the table: code n
        ac.put(run - (1 << n), n)
        left -= run
    dc_table = bytes([1] + [0] * 15) + b"\x00"
    ac_table = bytes([0, 0, 0, 15] + [0] * 12) + bytes(n << 4 for n in range(15))
    head = (
        b"\xff\xd8"
        + _segment(0xDB, b"\x00" + bytes([1] * 64))
        + _segment(0xC2, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
        + _segment(0xC4, b"\x00" + dc_table)
        + _segment(0xC4, b"\x10" + ac_table)
        + _segment(0xDA, b"\x01\x01\x00\x00\x00\x00")
        + dc.end()
    )
    scan = _segment(0xDA, b"\x01\x01\x00\x01\x3f\x00") + ac.end()
    return head + scan * (scans - 1) + b"\xff\xd9"


def mp4_with_edits(data: bytes, edits: int) -> bytes:
    """A faststart MP4 whose track's edit list has ``edits`` edits, each showing all its media.

    FFmpeg indexes the track's samples once per edit: 20 samples and 20,000
    edits (240 KB) made an index of 400,000 entries, and a decode that played
    the clip 20,000 times.
    """
    top = _boxes(data, 0, len(data))
    moov = next(i for i, box in enumerate(top) if box[0] == b"moov")
    old_end = len(_write(top[: moov + 1]))
    (duration,) = struct.unpack_from(">I", _box(top, b"mvhd")[1], 16)
    entry = struct.pack(">IiI", duration, 0, 0x10000)  # duration, media time 0, rate 1
    _box(top, b"elst")[1] = struct.pack(">II", 0, edits) + entry * edits
    stco = _box(top, b"stco")
    (count,) = struct.unpack_from(">I", stco[1], 4)
    offsets = struct.unpack_from(f">{count}I", stco[1], 8)
    shift = len(_write(top[: moov + 1])) - old_end
    stco[1] = struct.pack(f">II{count}I", 0, count, *(o + shift for o in offsets))
    return _write(top)
