"""The async shell of one session: decoder threads, URL fetches, answers.

:class:`Session` feeds client messages and background events into the pure
:class:`~streamchat.protocol.SessionProtocol` and carries out the actions it
returns. It owns three kinds of background work, all stopped by
:meth:`Session.aclose`:

* per video source, a decoder thread (PyAV never runs on the event loop) fed
  by a bounded :class:`~streamchat.ingest.feed.ByteFeed`, plus a fetch task for URLs
  whose DNS lookups run one at a time in the server's
  :class:`~streamchat.ingest.netguard.Lookups`; per ``image``, a decoding thread,
  one at a time. These threads are the session's own, never a pool shared
  with other sessions (the loop's default executor was: six slow images held
  all of it), and closing waits for them (bounded: :data:`SOURCE_STOP_GRACE`);
* per question, an answer task streaming deltas from the shared engine;
* outgoing messages, queued in a bounded outbox that the endpoint drains; a
  :class:`Close` queued behind them ends the connection once they are sent.

Frames cross from the decoder thread to the loop with
``call_soon_threadsafe``; the window is only touched on the loop.

Every line about a session names it (:mod:`streamchat.sessionlog`): the
endpoint and the session log through :attr:`Session.log`, and each thread
the session starts gets its context, so that the lines the layers below log
there are tagged too.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from .config import Settings
from .engine.base import Engine, EngineError, GenerationRequest, Usage
from .errors import EngineFailure, StreamchatError, UrlFetchFailed, close_reason
from .ingest import ByteFeed, FeedClosed, Lookups, fetch_into, shared_lookups
from .media import DecodeMemory, DecoderOptions, Hold, decode_image, decode_stream
from .messages import AnswerDone, ClientMessage, ServerMessage, VideoStatus
from .metrics import Metrics
from .protocol import (
    Action,
    CancelAnswer,
    DecodeImage,
    EndSource,
    FeedChunk,
    FeedLevel,
    Send,
    SessionProtocol,
    SourceKind,
    StartAnswer,
    StartSource,
    StopSource,
)
from .sessionlog import SessionLog
from .window import Frame

__all__ = ["Close", "Session"]

logger = logging.getLogger("streamchat.session")

SOURCE_STOP_GRACE = 5.0
"""Seconds :meth:`Session.aclose` waits for its threads (decoders, an image, a lookup) to end."""

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Close:
    """Queued after the last message to send: then close with ``code``."""

    code: int
    reason: str


@dataclass(eq=False)
class _RunningSource:
    number: int
    feed: ByteFeed
    stop: threading.Event = field(default_factory=threading.Event)
    decoding: asyncio.Task[None] | None = None
    fetching: asyncio.Task[None] | None = None
    hold: Hold | None = None
    """Its decoder's share of the server's decoding memory."""

    def level(self) -> FeedLevel:
        return FeedLevel(lag=self.feed.lag, backlog_bytes=self.feed.backlog_bytes)

    def end(self) -> None:
        """No more bytes: a fetch stops where it is, the decoder drains the rest."""
        if self.fetching is not None:
            self.fetching.cancel()
        self.feed.close()

    def halt(self) -> None:
        """Stop now; the decoder thread notices at its next read or packet."""
        self.stop.set()
        self.feed.abort()
        if self.hold is not None:
            self.hold.cancel()  # a decoder waiting for memory stops waiting
        if self.fetching is not None:
            self.fetching.cancel()


class Session:
    """One connected client.

    ``lookups``: the server's DNS lookups, where this session's run one at a
    time; by default the running loop's (:func:`~streamchat.ingest.netguard.shared_lookups`).
    ``metrics``: the server's, where the session counts what it does.
    ``memory``: the server's decoding memory, where its decoders hold room
    (:mod:`streamchat.media.admission`); by default one of its own.
    """

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        session_id: str,
        lookups: Lookups | None = None,
        metrics: Metrics | None = None,
        memory: DecodeMemory | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.memory = memory or DecodeMemory.from_settings(settings)
        self.engine = engine
        self.id = session_id
        self.identity: str | None = None
        """Who opened it (its key, else its address) once authenticated: only they may
        name it as a video source (:mod:`streamchat.openai`)."""
        self.protocol = SessionProtocol(settings, session_id=session_id, model=engine.model_name)
        self.outbox: asyncio.Queue[ServerMessage | Close] = asyncio.Queue(settings.outbox_messages)
        self._loop = asyncio.get_running_loop()
        self._sources: dict[int, _RunningSource] = {}
        self._answers: dict[str, asyncio.Task[None]] = {}
        self._closing = False
        self._abort_reason = "cancelled"
        self._status_timer: asyncio.TimerHandle | None = None
        self._lookups = lookups or shared_lookups(settings.max_dns_lookups)
        self._threads: set[asyncio.Future[object]] = set()  # the end of each thread running
        self._images = asyncio.Lock()  # one image decoding at a time
        self.log = SessionLog(logger, session_id)

    # -- input --------------------------------------------------------------

    async def handle(self, message: ClientMessage) -> None:
        await self._run(self.protocol.receive(message, now=self._loop.time()))

    async def report(self, exc: BaseException, *, id: str | None = None) -> None:
        """Tell the client about an error the protocol did not report itself.

        ``id``: the ``ask`` or ``cancel`` it refuses, named unless ``exc`` names one.
        """
        await self._run([self.protocol.error(exc, id=id)])

    async def fail(self, exc: StreamchatError) -> None:
        """Tell the client about a fatal error, then close with the error's code."""
        await self._run([self.protocol.error(exc)])
        await self.close_soon(exc.close_code, exc.message)

    async def close_soon(self, code: int, reason: str) -> None:
        """Close once what is queued has been sent (given up if the client reads nothing)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.send_timeout):
                await self.outbox.put(Close(code, close_reason(reason)))

    @property
    def busy(self) -> bool:
        """Work is in flight (an answer, a source), so silence from the client is not idleness."""
        return bool(self._answers) or bool(self._sources)

    async def going_away(self, reason: str, timeout: float) -> None:
        """The server is stopping: tell the client and refuse new questions from now on."""
        for action in self.protocol.going_away(reason, timeout):
            assert isinstance(action, Send)
            with contextlib.suppress(TimeoutError):  # a client reading nothing is dropped anyway
                async with asyncio.timeout(self.settings.send_timeout):
                    await self.outbox.put(action.message)

    async def wait_answers(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the answers in flight to finish by themselves."""
        tasks = list(self._answers.values())
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def abort_answers(self, reason: str) -> None:
        """End the answers in flight now; each ends with ``finish_reason`` ``reason``."""
        self._abort_reason = reason
        tasks = list(self._answers.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- actions ------------------------------------------------------------

    async def _run(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case Send(message):
                    await self.outbox.put(message)
                case StartSource():
                    self._start_source(action)
                case StopSource(number):
                    self._halt_source(number)
                case FeedChunk(number, data):
                    await self._feed(number, data)
                case EndSource(number):
                    if (source := self._sources.get(number)) is not None:
                        source.end()
                case DecodeImage(data, pts):
                    await self._decode_image(data, pts)
                case StartAnswer(id, request):
                    self._answers[id] = asyncio.create_task(
                        self._answer(id, request), name=f"answer-{self.id}-{id}"
                    )
                case CancelAnswer(id):
                    task = self._answers.get(id)
                    if task is not None:
                        task.cancel()

    def _send_soon(self, actions: list[Action]) -> None:
        """Carry out actions from a synchronous callback.

        Only status updates arrive this way (``frame_decoded`` and
        ``flush_status`` return nothing else); when the outbox is full they are
        skipped, since the next one supersedes them, rather than queued unbounded.
        """
        for action in actions:
            assert isinstance(action, Send) and isinstance(action.message, VideoStatus)
            if not self.outbox.full():
                self.outbox.put_nowait(action.message)

    # -- video sources ------------------------------------------------------

    def _decoder_options(self, container: str | None) -> DecoderOptions:
        s, o = self.settings, self.protocol.options
        return DecoderOptions.from_settings(
            s,
            fps=o.fps,
            min_pixels=min(s.min_pixels, o.max_pixels),
            max_pixels=o.max_pixels,
            container=container,
            keyframes_only=o.keyframes_only,
        )

    def _start_source(self, action: StartSource) -> None:
        feed = ByteFeed(
            max_bytes=self.settings.feed_bytes, read_timeout=self.settings.video_read_timeout
        )
        source = _RunningSource(action.number, feed)
        self._sources[action.number] = source
        options = self._decoder_options(action.container)
        source.decoding = asyncio.create_task(
            self._decode(source, options), name=f"decode-{self.id}-{action.number}"
        )
        if action.kind is SourceKind.URL:
            assert action.url is not None
            source.fetching = asyncio.create_task(
                self._fetch(source, action.url), name=f"fetch-{self.id}-{action.number}"
            )

    def _halt_source(self, number: int) -> None:
        source = self._sources.get(number)
        if source is not None:
            source.halt()

    async def _feed(self, number: int, data: bytes) -> None:
        source = self._sources.get(number)
        if source is None:
            return
        try:
            source.feed.put_nowait(data)
        except StreamchatError as exc:
            await self._run([self.protocol.error(exc)])
            return
        self.metrics.bytes_received("push", len(data))

    async def _fetch(self, source: _RunningSource, url: str) -> None:
        """Fetch ``url`` into the source's feed; a failure ends the decoder with it.

        The fetcher names its failures (``url_not_allowed``, ``url_fetch_failed``);
        anything else it raises is a bug, still ``url_fetch_failed`` to the client
        and one WARNING line naming its class: the URL, which may carry a token,
        can be in its message, and a client must not be able to write tracebacks
        into the log at will.
        """
        try:
            await fetch_into(
                url,
                source.feed,
                self.settings,
                resolver=self._lookups.resolver(self),
                metrics=self.metrics,
            )
        except StreamchatError as exc:
            source.feed.abort(exc)
        except FeedClosed:
            pass  # the source was stopped under the fetch: its decoder reports how it ended
        except Exception as exc:
            self.log.warning("fetch failed unexpectedly: %s", exc.__class__.__name__)
            source.feed.abort(UrlFetchFailed("could not fetch the URL"))

    async def _decode(self, source: _RunningSource, options: DecoderOptions) -> None:
        """Run the decoder thread for ``source`` and report how it ended."""

        def on_frame(frame: Frame) -> None:
            now, level, window = self._loop.time(), source.level(), self.protocol.window
            current, evicted = self.protocol.source, window.evicted
            kept = current is not None and current.number == source.number
            self._send_soon(self.protocol.frame_decoded(source.number, frame, now=now, level=level))
            if kept:
                self._prefill()
            self.metrics.frame(kept=kept, evicted=window.evicted - evicted, lag=level.lag)
            if self.protocol.status_pending and self._status_timer is None:
                self._status_timer = self._loop.call_later(
                    self.settings.status_interval, self._flush_status
                )

        def emit(frame: Frame) -> None:  # decoder thread
            try:
                self._loop.call_soon_threadsafe(on_frame, frame)
            except RuntimeError:  # the loop is closed: nobody wants frames any more
                source.stop.set()

        error: BaseException | None = None
        name = f"decoder-{self.id}-{source.number}"
        hold = source.hold = self.memory.hold(source.stop, name)
        try:
            await self._in_thread(
                name,
                lambda: self.memory.holding(
                    hold,
                    lambda: decode_stream(
                        source.feed, options, emit, source.stop, memory=hold.need
                    ),
                ),
            )
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # reported below, never lost
            error = exc
        finally:
            self._sources.pop(source.number, None)
            # A decoder that ended first (refused or failed the source) leaves nobody to
            # read a fetch blocked on a full feed: it would hold its connection for good.
            if source.fetching is not None and not source.fetching.done():
                source.fetching.cancel()
                source.feed.abort()
        if source.stop.is_set():
            return
        if error is not None and not isinstance(error, StreamchatError):
            self.log.error("decoder failed", exc_info=error)
        await self._run(self.protocol.source_ended(source.number, error, level=source.level()))

    def _flush_status(self) -> None:
        self._status_timer = None
        self._send_soon(self.protocol.flush_status(now=self._loop.time()))

    async def _decode_image(self, data: bytes, pts: float) -> None:
        """Decode an image in a thread of the session's own, one image at a time.

        A session's images wait for each other, never for another session's:
        each costs at most one core (``decode_image`` decodes in one thread)
        for a bounded time (its size and scan limits).
        """
        s, o = self.settings, self.protocol.options
        self.metrics.bytes_received("image", len(data))
        try:
            async with self._images:
                image = await self._in_thread(
                    f"image-{self.id}",
                    lambda: decode_image(
                        data,
                        factor=s.factor,
                        min_pixels=min(s.min_pixels, o.max_pixels),
                        max_pixels=o.max_pixels,
                        max_decode_pixels=s.max_decode_pixels,
                    ),
                )
        except StreamchatError as exc:
            await self._run([self.protocol.error(exc)])
            return
        evicted = self.protocol.window.evicted
        actions = self.protocol.image_decoded(Frame(pts, image))
        self._prefill()  # before the status goes out: whoever reads it finds the call made
        await self._run(actions)
        self.metrics.frame(kept=True, evicted=self.protocol.window.evicted - evicted)

    def _prefill(self) -> None:
        """Hand the engine what it may compute before the next question: on a timeline,
        the new frames (``Engine.prefill``; it decides, and never blocks)."""
        if (ahead := self.protocol.ahead()) is not None:
            self.engine.prefill(*ahead)

    async def _in_thread(self, name: str, work: Callable[[], _T]) -> _T:
        """``work()`` in a new thread of this session's; :meth:`aclose` waits for its end.

        Cancelling the caller does not stop the thread (FFmpeg cannot be
        interrupted): it runs to its end, still counted until then.
        """
        ended: asyncio.Future[object] = self._loop.create_future()
        context = contextvars.copy_context()  # the thread's lines name the session too
        # Retrieved here, so an outcome nobody awaits any more is not logged as lost.
        ended.add_done_callback(lambda f: f.cancelled() or f.exception())

        def settle(result: object, error: BaseException | None) -> None:
            self._threads.discard(ended)
            if error is not None:
                ended.set_exception(error)
            else:
                ended.set_result(result)

        def run() -> None:  # the new thread
            result: object = None
            error: BaseException | None = None
            try:
                result = context.run(work)
            except BaseException as exc:  # handed to the loop, never lost
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(settle, result, error)

        threading.Thread(target=run, name=name, daemon=True).start()
        self._threads.add(ended)
        return cast(_T, await asyncio.shield(ended))

    # -- answers ------------------------------------------------------------

    async def _answer(self, id: str, request: GenerationRequest) -> None:
        start = self._loop.time()
        ttft: float | None = None
        parts: list[str] = []
        reason = "error"
        usage: Usage | None = None
        try:
            async with contextlib.aclosing(self.engine.generate(request)) as stream:
                async for delta in stream:
                    if delta.text:
                        if ttft is None:
                            ttft = round(self._loop.time() - start, 4)
                        parts.append(delta.text)
                        await self._run(self.protocol.answer_delta(id, delta.text))
                    if delta.finish_reason is not None:
                        reason, usage = delta.finish_reason, delta.usage
        except asyncio.CancelledError:
            if self._closing:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            reason = self._abort_reason
        except StreamchatError as exc:  # the engine's typed refusal (a prompt over the context)
            exc.id = id
            await self._run([self.protocol.error(exc)])
        except EngineError as exc:
            self.log.warning("engine failed on %s: %s", request.request_id, exc)
            await self._run([self.protocol.error(EngineFailure(f"the model failed: {exc}", id=id))])
        except Exception:
            self.log.exception("answer %s failed", request.request_id)
            await self._run([self.protocol.error(EngineFailure("the answer failed", id=id))])
        finally:
            self._answers.pop(id, None)
        # Bounded: once out of ``_answers`` nothing can cancel this task, and a client
        # that reads nothing would hold it (and a drain waiting for it) for ever.
        finished = self.protocol.answer_finished(id, "".join(parts), reason, usage, ttft)
        for action in finished:
            if isinstance(action, Send) and isinstance(action.message, AnswerDone):
                told, elapsed = action.message.finish_reason, self._loop.time() - start
                self.metrics.answered("websocket", told, usage, ttft=ttft, seconds=elapsed)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.send_timeout):
                await self._run(finished)

    # -- shutdown -----------------------------------------------------------

    async def aclose(self) -> None:
        """Stop everything: abort answers in the engine, end the session's context there
        (its timeline, a warm-up running for it), stop decoders and fetches.

        Everything the session runs, which is more than the protocol knows of
        (see :meth:`SessionProtocol.close`).

        Then wait, up to :data:`SOURCE_STOP_GRACE`, for the session's threads to
        end: its decoders (a stopped decoder ends at its next read or packet,
        closing its container, and with it FFmpeg's own threads), an image
        being decoded, a DNS lookup still running (the session keeps its place
        among the server's sessions meanwhile, so a client closing and
        reopening sessions cannot pile up hung lookups faster than that).
        """
        self._closing = True
        self.protocol.close()
        if self._status_timer is not None:
            self._status_timer.cancel()
        answers = list(self._answers.values())
        for task in answers:
            task.cancel()
        sources = list(self._sources.values())
        for source in sources:
            source.halt()
        await asyncio.gather(*answers, return_exceptions=True)
        # After the answers: none of them can commit to the timeline once it is dropped.
        self.engine.end_session(self.id)
        tasks = [t for s in sources for t in (s.decoding, s.fetching) if t is not None]
        threads = set(self._threads)
        lookup = asyncio.create_task(self._lookups.wait_idle(self))
        waits: set[asyncio.Future[Any]] = {*tasks, *threads, lookup}
        _, pending = await asyncio.wait(waits, timeout=SOURCE_STOP_GRACE)
        lookup.cancel()
        await asyncio.wait([lookup])
        late = len(pending & threads)
        if late:
            self.log.warning("%d thread(s) did not stop in time", late)
        for task in tasks:
            task.cancel()
