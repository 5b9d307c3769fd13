"""Pushing video from the client: local files, and anything else through PyAV.

Two ways to feed a session's ``video.chunk`` stream, both independent of the
WebSocket (they write to a :class:`ChunkSink`, which the session provides):

* :func:`push_file` sends a local file: its bytes unchanged when the server
  can read them as a stream (:func:`~streamchat_client.media.plan_file`),
  else remuxed like a live source; as fast as the server decodes them or
  paced to the media's time.
* :func:`push_live` opens any input PyAV can (a file, an ``http(s)``/RTSP
  stream, a camera such as ``/dev/video0`` with ``input_format="v4l2"``) in a
  worker thread and remuxes its video stream without re-encoding into
  fragmented MP4, or Matroska for codecs MP4 cannot carry, keeping the
  display matrix (see :mod:`streamchat_client.remux`); only raw frames are
  re-encoded. The container is written to memory and its bytes are pushed
  as they are produced, paced by the packets' timestamps when the source
  does not pace itself (a file).

Either push stops at once when the sink refuses a chunk: the sink raises
:class:`~streamchat_client.errors.SourceError` when the server failed or
refused the source, and returns ``False`` when the server ended it by itself.

The worker thread (:mod:`streamchat_client.remux`) never touches the event
loop's objects: it hands bytes over through a bounded queue and wakes the
loop with ``call_soon_threadsafe``; when the queue is full it waits, so a
slow connection slows the demuxer down instead of growing memory. The event
loop never demuxes or encodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from . import remux
from .media import guess_format, plan_file, probe_duration
from .remux import END, Bridge, Failed, Opened, Piece

__all__ = [
    "PACE_SECONDS",
    "ChunkSink",
    "ProgressCallback",
    "PushStats",
    "push_file",
    "push_live",
]

PACE_SECONDS = 0.25
"""A paced file push sends chunks holding at most this much media, so the server sees a steady
stream."""
QUEUE_ITEMS = 64
"""Muxed pieces (about a packet each) the worker may get ahead of the sender."""
JOIN_SECONDS = 5.0
"""How long stopping waits for the worker thread to close its containers."""
DEFAULT_READ_TIMEOUT = 10.0
"""PyAV's open/read timeout for network and device sources."""


@dataclass(slots=True)
class PushStats:
    """What a push sent so far; passed to progress callbacks and returned at the end."""

    source: str
    container: str | None = None
    """The container format sent to the server (the ``format`` hint)."""
    codec: str | None = None
    """The source's video codec."""
    reencoded: bool = False
    """Whether the video was re-encoded because its codec fits no container the server reads."""
    remuxed: bool = False
    """Whether the bytes sent were written by the client's muxer (not a file's own bytes)."""
    packets: int = 0
    """Video packets sent (0 for a file pushed as it is)."""
    chunks: int = 0
    bytes_sent: int = 0
    media_seconds: float = 0.0
    """Media time covered by what was sent."""
    elapsed: float = 0.0
    """Wall-clock seconds since the push started."""

    def snapshot(self) -> PushStats:
        return replace(self)


ProgressCallback = Callable[[PushStats], object]


@dataclass(frozen=True, slots=True)
class ChunkSink:
    """Where a push writes: the session's chunk sender and its flow control."""

    send: Callable[[bytes, str | None], Awaitable[bool]]
    """Send the next ``video.chunk`` of the current source (the hint matters on the first).

    ``False`` when the server ended the source by itself (nothing more can go to it);
    raises :class:`~streamchat_client.errors.SourceError` when it failed or refused it."""
    wait_decoded: Callable[[int], Awaitable[None]]
    """Hold an unpaced push until the server has decoded enough of the given bytes sent."""
    chunk_bytes: int
    """The largest chunk to send."""
    buffer_bytes: int
    """The server's undecoded-byte buffer (``video_buffer_bytes``)."""


# --- local files -------------------------------------------------------------


async def push_file(
    sink: ChunkSink,
    path: str | Path,
    *,
    realtime: bool = False,
    format: str | None = None,
    remux: bool | None = None,
    on_progress: ProgressCallback | None = None,
) -> PushStats:
    """Send ``path`` as the current source, as it is or remuxed (see ``Session.send_file``)."""
    path = Path(path)
    if remux is None:
        plan = await asyncio.to_thread(plan_file, path)
        remux, container, codec = plan.remux, format or plan.container, plan.codec
    else:
        container, codec = format or guess_format(path), None
    if remux:
        # An absolute path: FFmpeg would take "name:..." for a protocol.
        stats = await push_live(
            sink, str(path.resolve()), pace=realtime, on_progress=on_progress, label=str(path)
        )
        return stats
    stats = PushStats(str(path), container=container, codec=codec)
    size = path.stat().st_size
    step = sink.chunk_bytes
    duration: float | None = None
    if realtime:
        duration = await asyncio.to_thread(probe_duration, path)
        if duration is None:
            raise ValueError(f"cannot pace {path}: PyAV found no duration")
        step = min(step, max(1, int(size * PACE_SECONDS / duration)))
    else:
        # Small steps, so one chunk cannot jump from the budget past the buffer's end.
        step = min(step, max(1, sink.buffer_bytes // 8))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with path.open("rb") as file:
        while piece := file.read(step):
            sent = stats.bytes_sent + len(piece)
            if duration is not None:
                delay = started + duration * sent / size - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing is the feature
            else:
                await sink.wait_decoded(sent)
            if not await sink.send(piece, stats.container):
                break
            stats.bytes_sent = sent
            stats.chunks += 1
            stats.elapsed = loop.time() - started
            if duration is not None:
                stats.media_seconds = duration * sent / size
            if on_progress is not None:
                on_progress(stats.snapshot())
    return stats


# --- anything PyAV opens, remuxed ----------------------------------------------


def is_local_file(source: str) -> bool:
    """Whether ``source`` names a regular local file (which must be paced to its timestamps)."""
    return os.path.isfile(source)


async def push_live(
    sink: ChunkSink,
    source: str,
    *,
    input_format: str | None = None,
    options: Mapping[str, str] | None = None,
    duration: float | None = None,
    pace: bool | None = None,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    on_progress: ProgressCallback | None = None,
    label: str | None = None,
) -> PushStats:
    """Open ``source`` with PyAV in a worker thread and push its video, remuxed, as it comes.

    ``input_format`` and ``options`` go to ``av.open`` (e.g. ``"v4l2"`` and
    ``{"video_size": "640x480", "framerate": "15"}``). ``pace`` sends each
    packet when its timestamp is due; it defaults to pacing a local file and
    not pacing anything else (a camera or a stream paces itself). An unpaced
    push still waits for the server's decoder rather than overflow its buffer.
    ``duration`` stops after that many seconds of media. Raises
    :class:`SourceError` if the source cannot be opened or read, or the
    server fails or refuses it; cancelling stops the worker and closes the
    source. ``label`` names the source in :class:`PushStats` (default: ``source``).
    """
    if pace is None:
        pace = input_format is None and is_local_file(source)
    loop = asyncio.get_running_loop()
    bridge = Bridge(loop, QUEUE_ITEMS)
    worker = threading.Thread(
        target=remux.run,
        args=(bridge, source, input_format, dict(options or {}), duration, pace, read_timeout),
        name=f"streamchat-source-{source}",
        daemon=True,  # a camera read that never returns must not keep the process alive
    )
    stats = PushStats(label or source, remuxed=True)
    started = loop.time()
    worker.start()
    try:
        pending: object | None = None
        while True:
            item = pending if pending is not None else await bridge.get()
            pending = None
            if item is END:
                return stats
            if isinstance(item, Failed):
                raise item.error
            if isinstance(item, Opened):
                stats.container, stats.codec = item.container, item.codec
                stats.reencoded = item.reencoded
                continue
            assert isinstance(item, Piece)
            batch, size = [item], len(item.data)
            # Whatever else is ready goes in the same chunk, up to the chunk size.
            while size < sink.chunk_bytes:
                more = bridge.get_nowait()
                if more is None:
                    break
                if not isinstance(more, Piece):
                    pending = more
                    break
                batch.append(more)
                size += len(more.data)
            if not await _send_pieces(sink, stats, batch, pace, started, loop, on_progress):
                return stats
    finally:
        bridge.stop.set()
        with contextlib.suppress(asyncio.CancelledError, Exception):  # a second cancel: go
            await asyncio.shield(asyncio.to_thread(worker.join, JOIN_SECONDS))


async def _send_pieces(
    sink: ChunkSink,
    stats: PushStats,
    pieces: list[Piece],
    pace: bool,
    started: float,
    loop: asyncio.AbstractEventLoop,
    on_progress: ProgressCallback | None,
) -> bool:
    """Send ``pieces``; ``False`` if the server ended the source meanwhile."""
    data = b"".join(piece.data for piece in pieces)
    for offset in range(0, len(data), sink.chunk_bytes):
        part = data[offset : offset + sink.chunk_bytes]
        if not pace:
            await sink.wait_decoded(stats.bytes_sent + len(part))
        if not await sink.send(part, stats.container):
            return False
        stats.bytes_sent += len(part)
        stats.chunks += 1
    stats.packets += sum(piece.packets for piece in pieces)
    stats.media_seconds = pieces[-1].media_seconds
    stats.elapsed = loop.time() - started
    if on_progress is not None:
        on_progress(stats.snapshot())
    return True
