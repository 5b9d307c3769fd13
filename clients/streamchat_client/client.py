"""The streamchat client session: connect, push video, ask, read answers.

A :class:`Session` owns one WebSocket and one background task that receives
everything the server sends and hands it to an
:class:`~streamchat_client.inbox.Inbox`, which routes it synchronously: answer
deltas to their :class:`~streamchat_client.answer.Answer` (by id),
``video.status`` to :attr:`Session.status` and whoever waits for frames,
``error`` messages to the answer they concern or to :attr:`Session.errors`.
Dispatch never waits on a reader, so a question nobody reads yet cannot stall
the rest of the session. When the connection closes, for whatever reason,
every pending answer and wait ends with
:class:`~streamchat_client.errors.SessionClosed` instead of hanging.

Everything held is bounded: the WebSocket's incoming queue and frame size,
each answer's buffer (see :mod:`streamchat_client.answer`) and the list of
session errors. Outgoing chunks are cut to the server's ``max_message_bytes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Generator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from .answer import DEFAULT_MAX_PIECES, Answer
from .errors import ClientError, ProtocolViolation, ServerError, SessionClosed, SourceError
from .handshake import open_session
from .inbox import ErrorCallback, Inbox, StatusCallback
from .messages import (
    ENCODINGS,
    Encoding,
    Limits,
    Ready,
    VideoStatus,
    ask_message,
    cancel_message,
    chunk_message,
    decode,
    encode,
    end_message,
    hello_message,
    image_message,
    url_message,
)
from .sources import ChunkSink, ProgressCallback, PushStats, push_file, push_live

__all__ = ["DEFAULT_CHUNK_BYTES", "DEFAULT_URL", "Session", "connect"]

logger = logging.getLogger("streamchat_client")

DEFAULT_URL = "ws://127.0.0.1:8000/v1/session"
DEFAULT_CHUNK_BYTES = 64 * 1024
DEFAULT_OPEN_TIMEOUT = 10.0
DEFAULT_MAX_ERRORS = 100
FLOW_STALL_SECONDS = 2.0
"""Fast mode stops waiting for decode progress after this long without a status."""
_ENVELOPE_BYTES = 256
"""Room for a chunk's ``type`` and ``format`` around its data, in either encoding."""


class Session:
    """One connected streamchat session; open it with :func:`connect`."""

    def __init__(
        self,
        websocket: ClientConnection,
        ready: Ready,
        *,
        encoding: Encoding = "msgpack",
        on_status: StatusCallback | None = None,
        on_error: ErrorCallback | None = None,
        max_pieces: int = DEFAULT_MAX_PIECES,
        max_errors: int = DEFAULT_MAX_ERRORS,
    ) -> None:
        self.ready = ready
        """The server's ``ready``: session id, model, protocol version, limits."""
        self.encoding: Encoding = encoding
        self._inbox = Inbox(max_errors=max_errors, on_status=on_status, on_error=on_error)
        self._ws = websocket
        self._max_pieces = max_pieces
        self._closing = False
        self._violation: ProtocolViolation | None = None
        self._sources_started = 0
        self._pushing = False  # a pushed source is open: the next chunk continues it
        self._source_open = False  # a pushed or URL source may still be playing on the server
        self._next_id = 0
        self._receiver = asyncio.create_task(self._receive(), name=f"receive-{ready.session}")

    @classmethod
    async def open(
        cls,
        url: str = DEFAULT_URL,
        *,
        fps: float | None = None,
        window_frames: int | None = None,
        max_pixels: int | None = None,
        keyframes_only: bool = False,
        generation: Mapping[str, Any] | None = None,
        context: str | None = None,
        encoding: Encoding = "msgpack",
        on_status: StatusCallback | None = None,
        on_error: ErrorCallback | None = None,
        open_timeout: float = DEFAULT_OPEN_TIMEOUT,
        max_pieces: int = DEFAULT_MAX_PIECES,
        max_errors: int = DEFAULT_MAX_ERRORS,
        api_key: str | None = None,
    ) -> Session:
        """Connect, send ``hello`` and wait for ``ready`` (see :func:`connect`)."""
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be 'msgpack' or 'json', not {encoding!r}")
        hello = hello_message(
            fps=fps,
            window_frames=window_frames,
            max_pixels=max_pixels,
            keyframes_only=keyframes_only,
            generation=generation,
            context=context,
        )
        websocket, ready = await open_session(
            url, hello, encoding=encoding, open_timeout=open_timeout, api_key=api_key
        )
        return cls(
            websocket,
            ready,
            encoding=encoding,
            on_status=on_status,
            on_error=on_error,
            max_pieces=max_pieces,
            max_errors=max_errors,
        )

    # -- state --------------------------------------------------------------

    @property
    def session_id(self) -> str:
        return self.ready.session

    @property
    def limits(self) -> Limits:
        return self.ready.limits

    @property
    def status(self) -> VideoStatus | None:
        """The latest ``video.status``."""
        return self._inbox.status

    @property
    def on_status(self) -> StatusCallback | None:
        """Called (synchronously, from the receive task) with every ``video.status``."""
        return self._inbox.on_status

    @on_status.setter
    def on_status(self, callback: StatusCallback | None) -> None:
        self._inbox.on_status = callback

    @property
    def on_error(self) -> ErrorCallback | None:
        """Called with every error not attached to a pending answer."""
        return self._inbox.on_error

    @on_error.setter
    def on_error(self, callback: ErrorCallback | None) -> None:
        self._inbox.on_error = callback

    @property
    def errors(self) -> list[ServerError]:
        """Errors not attached to a pending answer (e.g. ``video_decode_failed``), oldest first.

        Only the latest ``max_errors`` are kept.
        """
        return list(self._inbox.errors)

    @property
    def going_away(self) -> str | None:
        """Why the server said it is stopping (``None`` unless it did).

        Answers in flight may still finish; new questions are refused with
        ``server_shutdown``, and the connection then closes with 1001.
        """
        return self._inbox.going_away

    @property
    def closed(self) -> bool:
        return self._inbox.closed is not None

    # -- video --------------------------------------------------------------

    async def send_bytes(
        self, data: bytes, *, format: str | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> None:
        """Push ``data`` as the next bytes of the current source (starting one if none is open).

        ``data`` may be cut anywhere; it is sent as ``video.chunk`` messages of
        at most ``chunk_bytes`` (and never more than the server accepts).
        ``format`` is the demuxer hint, used when these bytes start a source.
        Raises :class:`SourceError` (with the server's ``code``) once the
        server has failed or refused the open source, and sends nothing more
        of it; stops early, without error, once the server ended it by itself.
        Call :meth:`end_video` to start another source after either.
        """
        step = self._chunk_size(chunk_bytes)
        view = memoryview(data)
        for offset in range(0, len(view), step):
            if not await self._send_chunk(bytes(view[offset : offset + step]), format):
                return

    async def end_video(self) -> None:
        """No more bytes for the current source; the next chunk starts a new one."""
        self._pushing = False
        self._source_open = False
        self._inbox.end_push()
        await self._send(end_message())

    async def send_file(
        self,
        path: str | Path,
        *,
        realtime: bool = False,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        format: str | None = None,
        remux: bool | None = None,
        end: bool = True,
        on_progress: ProgressCallback | None = None,
    ) -> int:
        """Push a local video file as a new source; return how many bytes were sent.

        A file the server can read as a stream (WebM/Matroska, MPEG-TS, an MP4
        that is fragmented or has its index first) goes as it is; any other
        (an MP4/MOV with its index at the end, AVI, ...) is remuxed here with
        PyAV, without re-encoding, into fragmented MP4 (Matroska for codecs
        MP4 cannot carry), keeping the display matrix, so a portrait phone
        video stays portrait. Only a codec no container carries (raw frames)
        is re-encoded. ``remux`` forces (``True``) or forbids (``False``) the
        remux; ``format`` is the demuxer hint for a file sent as it is
        (default: what PyAV found). Raises :class:`SourceError` if PyAV cannot
        open the file, and when the server fails or refuses the source: the
        push stops at once, with the server's ``code``.

        With ``realtime``, the push is paced to the media's timestamps, so a
        10 s file takes about 10 s, like a live camera. Otherwise it goes as
        fast as the server decodes it: once half the server's
        ``video_buffer_bytes`` are undecoded (told by ``video.status``), the
        client waits for decoding to catch up rather than overflow the buffer,
        which would drop a chunk and corrupt the stream. A source still open
        is ended first, since a file appended to it would not be a valid
        stream; this one is ended too (also after a failure) unless ``end`` is
        false. ``on_progress`` is called with a :class:`PushStats` after every
        chunk.
        """
        sink = self._sink(chunk_bytes)
        if self._source_open:  # a file is a source of its own
            await self.end_video()
        try:
            stats = await push_file(
                sink, path, realtime=realtime, format=format, remux=remux, on_progress=on_progress
            )
        finally:
            await self._end_push(end)
        return stats.bytes_sent

    async def stream_live(
        self,
        source: str,
        *,
        input_format: str | None = None,
        options: Mapping[str, str] | None = None,
        duration: float | None = None,
        pace: bool | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        end: bool = True,
        on_progress: ProgressCallback | None = None,
    ) -> PushStats:
        """Read ``source`` with PyAV and push its video as a new source, as it is produced.

        ``source`` is anything ``av.open`` takes: a camera (``"/dev/video0"``
        with ``input_format="v4l2"``), an RTSP or ``http(s)`` stream, a file.
        The video stream is remuxed in a worker thread without re-encoding
        into fragmented MP4 (Matroska for codecs MP4 cannot carry, e.g. VP8),
        keeping its display matrix; raw frames are re-encoded to H.264. It is
        sent as ``video.chunk`` messages as the muxer writes it.
        ``pace`` (default: only for a local file) holds each packet until its
        timestamp is due, so a file plays like a camera; unpaced pushes wait
        for the server's decoder instead of overflowing its buffer.
        ``options`` are PyAV/FFmpeg input options, ``duration`` stops after
        that many seconds of media; otherwise it runs until the source ends or
        the task is cancelled. Returns what was sent (a :class:`PushStats`);
        raises :class:`SourceError` if the source cannot be opened or read,
        or once the server fails or refuses it (then with the server's ``code``).
        The source is ended afterwards (also after a failure or cancellation)
        unless ``end`` is false.
        """
        sink = self._sink(chunk_bytes)
        if self._source_open:
            await self.end_video()
        try:
            return await push_live(
                sink,
                source,
                input_format=input_format,
                options=options,
                duration=duration,
                pace=pace,
                on_progress=on_progress,
            )
        finally:
            await self._end_push(end)

    async def _end_push(self, end: bool) -> None:
        # Also when the push fails or is cancelled: the server then decodes what it has
        # and ends the source instead of waiting for more. After the server failed or
        # refused the source, it must be ended anyway, so that no later chunk continues it.
        over = self._inbox.push_stop is not None or self._inbox.push_ended
        if self._pushing and not self.closed and (end or over):
            with contextlib.suppress(ClientError):
                await self.end_video()

    async def send_url(self, url: str, *, format: str | None = None) -> None:
        """Have the server fetch and decode ``url`` as a new source (replacing the current one)."""
        self._pushing = False
        self._inbox.end_push()
        self._sources_started += 1
        self._source_open = True
        await self._send(url_message(url, format=format))

    async def send_image(self, data: bytes, *, pts: float | None = None) -> None:
        """Append a JPEG or PNG image to the window as a frame.

        Images do not produce ``video.status``, so :meth:`wait_frames` does not
        count them; ``pts`` defaults (server side) to seconds since the
        session's first image.
        """
        await self._send(image_message(bytes(data), pts=pts))

    async def wait_frames(self, n: int, *, timeout: float | None = None) -> VideoStatus:
        """Wait for a ``video.status`` of the current source showing at least ``n`` frames.

        Returns early with that status if the source ended with fewer; raises
        :class:`ServerError` (the source's error) if it failed with fewer,
        ``TimeoutError`` after ``timeout`` seconds, and
        :class:`SessionClosed` if the connection closes first. Statuses of
        sources before the last one this client started are ignored.
        """

        def enough(status: VideoStatus) -> bool:
            return status.frames >= n or self._source_over(status)

        return await self._wait_status(enough, timeout)

    async def wait_ended(self, *, timeout: float | None = None) -> VideoStatus:
        """Wait until the current source has ended; return its last status.

        Raises :class:`ServerError` (the source's error) if it failed: frames
        decoded before the failure stay in the server's window.
        """
        return await self._wait_status(self._source_over, timeout)

    def _source_over(self, status: VideoStatus) -> bool:
        if status.state == "failed":
            raise self._inbox.source_error or ServerError(
                "video_failed", "the video source failed without an error message"
            )
        return status.state == "ended"

    # -- questions ----------------------------------------------------------

    def ask(
        self,
        text: str,
        *,
        id: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        choices: Sequence[str] | None = None,
        last_seconds: float | None = None,
        start: float | None = None,
        end: float | None = None,
        max_frames: int | None = None,
    ) -> Answer:
        """Ask about the frames in the window now; return the streaming :class:`Answer`.

        The ``ask`` is sent in the background at once (so it is not awaited
        here, and ``async for delta in session.ask(...)`` works); sending
        failures surface when the answer is read. ``id`` defaults to a fresh
        ``q<n>``; it must not be the id of an answer still in flight. The
        generation parameters override the session's defaults for this answer
        (``choices``: the answer is exactly one of these strings, e.g. ``("yes", "no")``);
        ``last_seconds``, ``start``/``end`` and ``max_frames`` choose frames.
        """
        if self._inbox.closed is not None:
            raise self._inbox.closed
        if id is None:
            id = self._new_id()
        if not 1 <= len(id) <= 128:
            raise ValueError("an answer id must have 1 to 128 characters")
        if id in self._inbox.answers:
            raise ValueError(f"an answer with id {id!r} is still in flight")
        message = ask_message(
            id,
            text,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            choices=choices,
            last_seconds=last_seconds,
            start=start,
            end=end,
            max_frames=max_frames,
        )
        payload = self._payload(message)
        answer = Answer(id, text, cancel=self.cancel, max_pieces=self._max_pieces)
        self._inbox.answers[id] = answer
        answer._sent = asyncio.create_task(self._send_ask(answer, payload), name=f"ask-{id}")
        return answer

    async def cancel(self, id: str) -> None:
        """Stop the answer ``id``; it ends with ``finish_reason`` ``cancelled``.

        An answer that already finished is left alone; an id the client does not
        know is still sent, and the server's ``unknown_id`` lands in :attr:`errors`.
        """
        answer = self._inbox.answers.get(id)
        if answer is not None:
            await answer.sent()  # the cancel must not overtake its ask
            if answer.finished:
                return
        await self._send(cancel_message(id))

    # -- lifecycle ----------------------------------------------------------

    async def wait_closed(self, *, timeout: float | None = None) -> SessionClosed:
        """Wait until the connection is closed (by either side), and say why.

        After :attr:`going_away`, this is how a client waits for its answers
        in flight and then the server's close (1001).
        """
        async with asyncio.timeout(timeout):
            await asyncio.shield(self._receiver)
        assert self._inbox.closed is not None
        return self._inbox.closed

    async def close(self) -> None:
        """Close the connection; pending answers and waits end with :class:`SessionClosed`."""
        self._closing = True
        try:
            if not self._receiver.done():
                await self._ws.close()
        finally:
            if not self._receiver.done():
                self._receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._receiver

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- sending ------------------------------------------------------------

    def _payload(self, message: Mapping[str, Any]) -> bytes | str:
        payload = encode(message, self.encoding)
        limit = self.limits.max_message_bytes
        if len(payload) > limit:
            raise ValueError(
                f"a {message['type']!r} message of {len(payload)} bytes exceeds "
                f"the server's limit of {limit}"
            )
        return payload

    async def _send(self, message: Mapping[str, Any]) -> None:
        await self._send_payload(self._payload(message))

    async def _send_payload(self, payload: bytes | str) -> None:
        if self._inbox.closed is not None:
            raise self._inbox.closed
        try:
            await self._ws.send(payload)
        except ConnectionClosed:
            raise self._inbox.closed or self._closed_error() from None

    async def _send_ask(self, answer: Answer, payload: bytes | str) -> None:
        try:
            await self._send_payload(payload)
        except ClientError as exc:
            if self._inbox.answers.get(answer.id) is answer:
                del self._inbox.answers[answer.id]
            answer._fail(exc)

    async def _send_chunk(self, data: bytes, format: str | None) -> bool:
        """Send the next chunk of the pushed source; ``False`` if the server ended it.

        Raises :class:`SourceError` once the server failed or refused the
        source: a chunk sent after that would be dropped, or would start a new
        source from the middle of the stream.
        """
        if self._pushing:
            stop = self._inbox.push_stop
            if stop is not None:
                raise SourceError(
                    f"the server stopped the video source: {stop.code}: {stop.message}",
                    code=stop.code,
                    error=stop,
                )
            if self._inbox.push_ended:
                return False
            await self._send(chunk_message(data))
            return True
        self._pushing = True
        self._source_open = True
        self._sources_started += 1
        self._inbox.start_push(self._sources_started)
        await self._send(chunk_message(data, format=format))
        return True

    def _sink(self, chunk_bytes: int) -> ChunkSink:
        return ChunkSink(
            send=self._send_chunk,
            wait_decoded=self._await_decoding,
            chunk_bytes=self._chunk_size(chunk_bytes),
            buffer_bytes=self.limits.video_buffer_bytes,
        )

    def _chunk_size(self, chunk_bytes: int) -> int:
        """The largest chunk data that fits ``max_message_bytes`` in this encoding."""
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be at least 1")
        room = self.limits.max_message_bytes - _ENVELOPE_BYTES
        if self.encoding == "json":
            room = room // 4 * 3  # base64
        return max(1, min(chunk_bytes, room))

    async def _await_decoding(self, sent: int) -> None:
        """Hold a fast push until ``sent`` bytes leave the server's backlog at most half full.

        The server reports what it has received and what it has not decoded
        yet in ``video.status``; what it has decoded is the difference. With
        no status for :data:`FLOW_STALL_SECONDS` it sends anyway: the server
        refuses what does not fit, which is no worse than not waiting.
        """
        budget = self.limits.video_buffer_bytes // 2
        while True:
            if self._inbox.push_stop is not None or self._inbox.push_ended:
                return  # the next send says so
            status = self.status
            decoded = 0
            if status is not None and status.source >= self._sources_started:
                if status.state != "decoding":
                    return
                decoded = status.bytes_received - status.backlog_bytes
            if sent - decoded <= budget:
                return
            try:
                async with asyncio.timeout(FLOW_STALL_SECONDS):
                    await self._inbox.next_status()
            except TimeoutError:
                return

    # -- receiving ----------------------------------------------------------

    async def _wait_status(
        self, done: Callable[[VideoStatus], bool], timeout: float | None
    ) -> VideoStatus:
        async with asyncio.timeout(timeout):
            while True:
                status = self.status
                if status is not None and status.source >= self._sources_started:
                    if done(status):
                        return status
                await self._inbox.next_status()

    async def _receive(self) -> None:
        try:
            async for frame in self._ws:
                self._inbox.dispatch(decode(frame))
        except ConnectionClosed:
            pass
        except ProtocolViolation as exc:
            logger.error("closing the session: %s", exc)
            self._violation = exc
            with contextlib.suppress(Exception):
                await self._ws.close(CloseCode.PROTOCOL_ERROR, "protocol violation")
        except Exception:  # a client bug must still end the session, not leave it hanging
            logger.exception("the receive task failed; closing the session")
            with contextlib.suppress(Exception):
                await self._ws.close(CloseCode.INTERNAL_ERROR, "client error")
        finally:
            self._inbox.shutdown(self._closed_error())

    def _closed_error(self) -> SessionClosed:
        code, reason = self._ws.close_code, self._ws.close_reason or ""
        if self._violation is not None:
            why = f"the server broke the protocol: {self._violation}"
        elif self._closing:
            why = "the session was closed by the client"
        elif self._inbox.going_away is not None and code == CloseCode.GOING_AWAY:
            why = f"the server went away: {self._inbox.going_away}"
        elif (fatal := self._inbox.fatal) is not None:
            why = f"the server closed the session after {fatal.code}: {fatal.message}"
        elif code is None:
            why = "the connection to the server was lost"
        else:
            why = f"the server closed the connection (code {code}{', ' + reason if reason else ''})"
        closed = SessionClosed(why, code=code, reason=reason, error=self._inbox.fatal)
        closed.__cause__ = self._violation
        return closed

    def _new_id(self) -> str:
        while True:
            self._next_id += 1
            id = f"q{self._next_id}"
            if id not in self._inbox.answers:
                return id


class _Connect:
    """What :func:`connect` returns: await it, or use it as ``async with``."""

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self._url = url
        self._options = options
        self._session: Session | None = None

    def __await__(self) -> Generator[Any, None, Session]:
        return Session.open(self._url, **self._options).__await__()

    async def __aenter__(self) -> Session:
        self._session = await Session.open(self._url, **self._options)
        return self._session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()


def connect(
    url: str = DEFAULT_URL,
    *,
    fps: float | None = None,
    window_frames: int | None = None,
    max_pixels: int | None = None,
    keyframes_only: bool = False,
    generation: Mapping[str, Any] | None = None,
    context: str | None = None,
    encoding: Encoding = "msgpack",
    on_status: StatusCallback | None = None,
    on_error: ErrorCallback | None = None,
    open_timeout: float = DEFAULT_OPEN_TIMEOUT,
    max_pieces: int = DEFAULT_MAX_PIECES,
    max_errors: int = DEFAULT_MAX_ERRORS,
    api_key: str | None = None,
) -> _Connect:
    """Open a session at ``url``: connect, send ``hello``, wait for ``ready``.

    ``fps``, ``window_frames``, ``max_pixels``, ``keyframes_only`` (decode
    keyframes only: many times faster, for low sampling rates) and
    ``generation`` (``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``choices``) are
    the ``hello`` fields, and so is ``context``: ``"window"`` (the window as one
    new video per question) or ``"timeline"`` (appended to the session's
    timeline: a question costs what is new), None for the server's default;
    the server caps them and reports what it chose in ``session.limits``.
    ``encoding`` picks msgpack (binary frames) or JSON (text frames, as a
    browser would). ``api_key`` is sent as a bearer token
    when the server requires one. Use as ``async with connect(...) as
    session:`` (closed on exit) or ``session = await connect(...)``. Raises
    :class:`ConnectError` if no session could be opened, :class:`ServerError`
    if the server refused the ``hello``.
    """
    options: dict[str, Any] = {
        "fps": fps,
        "window_frames": window_frames,
        "max_pixels": max_pixels,
        "keyframes_only": keyframes_only,
        "generation": generation,
        "context": context,
        "encoding": encoding,
        "on_status": on_status,
        "on_error": on_error,
        "open_timeout": open_timeout,
        "max_pieces": max_pieces,
        "max_errors": max_errors,
        "api_key": api_key,
    }
    return _Connect(url, options)
