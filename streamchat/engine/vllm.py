"""The :class:`~streamchat.engine.base.Engine` on vLLM's ``AsyncLLMEngine``.

One engine serves every session of a server. A request becomes the model's own
prompt (its chat template renders :func:`streamchat.engine.prompt.build_messages`, so
the video placeholder tokens are the model's) plus the frames as the prompt's
single video, and streams back as ``RequestOutputKind.DELTA`` outputs, each
forwarded at once. A generator closed early, or whose consumer is cancelled,
aborts its request in the engine before it returns: a session relies on that
for ``cancel`` and disconnects, and :meth:`VllmEngine.engine_unfinished` lets
tests check it through the engine itself. A session asking on its timeline is
prepared by :class:`~streamchat.engine.sessions.TimelineSessions`, to which
the adapter lends its renderer.

vLLM is imported here and only here; :mod:`.cpu_compat` is installed first so
the import works on CPU-only installs (and in vLLM's spawned processes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import numpy.typing as npt
from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric

from ..budget import VisionCosts
from ..config import DEFAULT_MAX_REQUEST_IMAGES, DEFAULT_MAX_REQUEST_VIDEOS
from ..errors import ContextTooLong
from ..window import Frame
from . import cpu_compat
from .base import (
    ContextKind,
    Delta,
    EngineError,
    FinishReason,
    GenerationRequest,
    Image,
    Message,
    Request,
    TimelineContext,
    Usage,
    Video,
)
from .frames import FrameCache
from .frames import newest_size as _newest_size
from .frames import stack_frames as _stack_frames
from .prompt import (
    MAX_CLIPS,
    clip_frames,
    conversation,
    hf_messages,
    media_frames,
    video_metadata,
)
from .sessions import Prepared, Rendered, TimelineSessions
from .timeline import MAX_SEGMENTS, Draft

cpu_compat.install()

from blake3 import blake3  # noqa: E402  # vLLM's own hash (a dependency of vLLM)
from vllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams  # noqa: E402
from vllm.v1.metrics.loggers import PrometheusStatLogger, StatLoggerBase  # noqa: E402

__all__ = [
    "DEFAULT_KV_CACHE_BYTES",
    "DEFAULT_MAX_MODEL_LEN",
    "DEFAULT_MAX_NUM_SEQS",
    "FrameDigests",
    "SchedulerLoad",
    "VllmEngine",
    "engine_args_from_cli",
    "engine_defaults",
    "make_engine_args",
    "open_vllm_engine",
]

logger = logging.getLogger("streamchat.engine")

DEFAULT_MAX_MODEL_LEN = 8192
"""Room for the default window of 720p (4,032 video tokens for Qwen2-VL), the history
and the longest answer; see :mod:`streamchat.budget`."""
DEFAULT_MAX_NUM_SEQS = 8
DEFAULT_KV_CACHE_BYTES = 512 * 1024 * 1024
"""Two full 8192-token contexts of Qwen2-VL-2B (28 KiB a token); more sessions want more
(``VLLM_CPU_KVCACHE_SPACE``, in whole GiB, overrides it on CPU)."""

_FAMILIES = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl"}
_FAMILIES["qwen3_vl_moe"] = "qwen3_vl"
"""Model types -> the family whose video metadata :func:`~streamchat.engine.prompt.video_metadata`
builds (Qwen2.5-VL and Qwen3-VL require it; Qwen2-VL takes none)."""

_FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "abort": "cancelled",
    "repetition": "stop",
}


def make_engine_args(model: str | os.PathLike[str], **overrides: Any) -> AsyncEngineArgs:
    """Engine arguments for ``model`` with :func:`engine_defaults`; ``overrides`` win."""
    return AsyncEngineArgs(**(engine_defaults() | {"model": os.fspath(model)} | overrides))


def engine_args_from_cli(argv: Sequence[str]) -> AsyncEngineArgs:
    """vLLM's own engine flags (those of ``vllm serve``) with :func:`engine_defaults`.

    ``["--help"]`` prints vLLM's help and exits, as argparse does.
    """
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(
        FlexibleArgumentParser(  # type: ignore[no-untyped-call]
            prog="streamchat serve", description="vLLM engine flags"
        )
    )
    parser.set_defaults(**engine_defaults())
    args: AsyncEngineArgs = AsyncEngineArgs.from_cli_args(parser.parse_args(list(argv)))
    return args


def media_limits(limits: dict[str, Any] | None, *, videos: int, images: int) -> dict[str, Any]:
    """vLLM's ``limit_mm_per_prompt`` raised to what the server lets a prompt hold.

    A live question holds up to :data:`MAX_CLIPS` videos (a timeline's
    :data:`~streamchat.engine.timeline.MAX_SEGMENTS`); an OpenAI-style
    request ``videos`` videos and ``images`` images (``max_request_videos``,
    ``max_request_images``). A limit given as a count is raised to that; one
    given in vLLM's richer form is left as the operator wrote it.
    """
    raised = dict(limits or {})
    for kind, wanted in (("video", max(MAX_CLIPS, MAX_SEGMENTS, videos)), ("image", images)):
        have = raised.get(kind, 0)
        if isinstance(have, int):
            raised[kind] = max(have, wanted)
    return raised


def engine_defaults() -> dict[str, Any]:
    """Settings that work on CPU as well as GPU for a video chat model.

    Eager mode (no graph capture or compilation: start-up dominates on CPU),
    the videos and image a prompt of :mod:`streamchat.engine.prompt` may hold (a
    window cut into clips at gaps),
    and a fixed KV cache size rather than a fraction of device memory, so the
    footprint is predictable.
    """
    return {
        "dtype": "bfloat16",
        "max_model_len": DEFAULT_MAX_MODEL_LEN,
        "max_num_seqs": DEFAULT_MAX_NUM_SEQS,
        "kv_cache_memory_bytes": DEFAULT_KV_CACHE_BYTES,
        "enforce_eager": True,
        # A live question's clips or timeline segments; an OpenAI-style conversation's media.
        "limit_mm_per_prompt": {
            "video": max(MAX_CLIPS, MAX_SEGMENTS, DEFAULT_MAX_REQUEST_VIDEOS),
            "image": DEFAULT_MAX_REQUEST_IMAGES,
        },
        "seed": 0,
        "disable_log_stats": True,
    }


@asynccontextmanager
async def open_vllm_engine(engine_args: AsyncEngineArgs) -> AsyncIterator[VllmEngine]:
    """Start vLLM (15-60 s on CPU), yield the adapter, shut vLLM down on exit.

    The engine is built in the running event loop, as vLLM's own API server
    does: start-up blocks the loop, which is fine during an app's lifespan
    start-up and keeps vLLM's loop-bound objects on this loop.
    """
    logger.info("starting vLLM engine for %s", engine_args.model)
    started = time.perf_counter()
    load = SchedulerLoad()
    try:
        # vLLM's own Prometheus families (into the global registry, in this process) and the
        # scheduler's counts: what vLLM's server exports, for streamchat's /metrics.
        loggers: list[Any] = [PrometheusStatLogger, load.logger]
        llm = AsyncLLMEngine.from_engine_args(engine_args, stat_loggers=loggers)
        engine = VllmEngine(llm, load=load)
    except Exception as exc:
        raise EngineError(f"vLLM failed to start: {exc}") from exc
    logger.info("vLLM engine ready in %.1f s", time.perf_counter() - started)
    try:
        yield engine
    finally:
        await engine.aclose()


class VllmEngine:
    """Adapter from a started ``AsyncLLMEngine`` to streamchat's ``Engine``.

    Owns the engine: :meth:`aclose` shuts it down. Build it with
    :func:`open_vllm_engine` rather than directly. ``content_ids=False``
    leaves the identification of videos to vLLM's own hashing of every
    request's frames (see :class:`FrameDigests`; for comparisons).
    """

    def __init__(
        self, llm: Any, *, content_ids: bool = True, load: SchedulerLoad | None = None
    ) -> None:
        self._llm = llm
        self._load = load
        self._running: set[str] = set()
        self._closed = False
        model_config = llm.model_config
        hf_config = model_config.hf_config
        self._model_name = str(model_config.served_model_name or model_config.model)
        self._max_model_len = int(model_config.max_model_len)
        self._family = _FAMILIES.get(hf_config.model_type, hf_config.model_type)
        self._tokenizer = llm.get_tokenizer()
        self._video_token_id = _video_token_id(hf_config, self._tokenizer)
        self._frame_factor = _frame_factor(hf_config)
        processor = _hf_processor(model_config)
        self._chat_template: str | None = getattr(processor, "chat_template", None)
        self._costs = _vision_costs(model_config, self._family, self._tokenizer, processor)
        self._digests = FrameDigests() if content_ids else None
        self._timelines = TimelineSessions(
            max_model_len=self._max_model_len,
            messages=self._timeline_messages,
            render=self._rendered_with_media,
            forget=self._forget,
            compute=self._compute,
        )

    @property
    def frame_factor(self) -> int | None:
        return self._frame_factor

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def vision_costs(self) -> VisionCosts | None:
        return self._costs

    @property
    def default_context(self) -> ContextKind:
        """The timeline for Qwen3-VL, whose timestamps keep a segment's time exactly as one
        video does; one video per ask for Qwen2-VL and Qwen2.5-VL, whose temporal
        positions restart at each segment (docs/timeline.md compares them)."""
        return "timeline" if self._family == "qwen3_vl" else "window"

    @property
    def llm(self) -> Any:
        """vLLM's own ``AsyncLLMEngine`` (benchmarks call it directly to compare)."""
        return self._live()

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, whose chat template renders the prompts."""
        return self._tokenizer

    def running(self) -> frozenset[str]:
        """Ids whose answer generator is open (until it ends or is closed)."""
        return frozenset(self._running)

    def healthy(self) -> bool:
        """vLLM's engine core is alive (``errored`` turns true when it died)."""
        return self._llm is not None and not self._llm.errored

    def load(self) -> tuple[int, int]:
        """Requests vLLM's scheduler is running and has waiting, as of its last step.

        Its last step may be long past once everything is answered: with nothing
        streaming, both are 0. Without the scheduler's counts (an adapter built
        without :class:`SchedulerLoad`), the answers streaming, none waiting.
        """
        if not self._running:
            return 0, 0
        if self._load is None:
            return len(self._running), 0
        return self._load.running, self._load.waiting

    def families(self) -> Iterator[Metric]:
        """The timelines' families, and vLLM's own ``vllm:*`` ones, from the registry its stat
        logger writes into (only with :class:`SchedulerLoad`: vLLM then exports them)."""
        yield from self._timelines.families()
        if self._load is None:
            return
        for family in REGISTRY.collect():
            if family.name.startswith("vllm:"):
                yield family

    def engine_unfinished(self) -> int:
        """Requests vLLM's front end still tracks (0 when nothing is in flight).

        Unlike :meth:`running`, this asks vLLM itself, so tests can prove that
        an aborted or cancelled request is really gone from the engine.
        """
        return 0 if self._closed else int(self._llm.get_num_unfinished_requests())

    async def generate(self, request: Request) -> AsyncGenerator[Delta, None]:
        """Stream the answer; the last delta carries the finish reason and usage.

        An answer the engine failed before its first token is asked once more
        with a fresh render: vLLM's front end may believe the engine holds a
        video it does not (a render never submitted, after a cancel between the
        two), and the engine then fails the request; forgetting the prompt's
        videos first makes the second render send them.
        """
        llm = self._live()
        if request.request_id in self._running:
            raise ValueError(f"request {request.request_id!r} is already running")
        self._running.add(request.request_id)
        outputs: AsyncGenerator[Any, None] | None = None
        try:
            for retried in (False, True):
                prepared = await self._prepare(request)
                outputs = llm.generate(
                    prepared.engine_input, _sampling_params(prepared.request), request.request_id
                )
                answer = _Answer(prepared.request, self._video_token_id, prepared.frames)
                try:
                    async for output in outputs:
                        if (delta := answer.delta(output)) is not None:
                            yield delta
                except _FailedUnstarted:
                    if retried:
                        raise
                    logger.info("request %s failed unstarted: again", request.request_id)
                    self._forget(prepared.engine_input)
                    await outputs.aclose()
                    continue
                except EngineError:
                    raise
                except Exception as exc:
                    logger.exception("request %s failed in vLLM", request.request_id)
                    raise EngineError(f"the engine failed: {exc}") from exc
                if not answer.finished:
                    raise EngineError("the engine ended the answer without a final output")
                self._timelines.answered(
                    prepared, answer.reason, answer.text, answer.completion_tokens
                )
                return
        finally:
            if outputs is not None:
                # vLLM's generator aborts its request if it is not finished.
                await outputs.aclose()
            self._running.discard(request.request_id)

    async def abort(self, request_id: str) -> None:
        if request_id in self._running and not self._closed:
            logger.debug("aborting request %s", request_id)
            await self._llm.abort(request_id)

    def prefill(self, context: TimelineContext, frames: Sequence[Frame]) -> None:
        """Compute the full segments new in ``frames`` now, ahead of the next ask
        (:meth:`TimelineSessions.prefill <streamchat.engine.sessions.TimelineSessions.prefill>`)."""
        self._timelines.prefill(context, frames)

    def end_session(self, session: str) -> None:
        """Drop ``session``'s timeline; work running ahead for it is cancelled (and aborted)."""
        self._timelines.end_session(session)

    def warming(self, session: str) -> asyncio.Task[None] | None:
        """The warm-up of ``session``'s rebased timeline, if one was started (for tests)."""
        return self._timelines.warming(session)

    def prefilling(self, session: str) -> asyncio.Task[None] | None:
        """``session``'s prefill running ahead of its next ask, if any (for tests, benchmarks)."""
        return self._timelines.prefilling(session)

    async def aclose(self) -> None:
        """Abort what is in flight and shut vLLM down (its processes exit)."""
        if self._closed:
            return
        self._closed = True
        self._timelines.close()
        if self._running:
            await self._llm.abort(list(self._running))
        logger.info("shutting down vLLM engine")
        self._llm.shutdown()
        # Drop vLLM now: its __del__ shuts down again, which fails if it only
        # runs at interpreter exit.
        self._llm = None

    # -- helpers --------------------------------------------------------------

    def _live(self) -> Any:
        """vLLM's engine, or ``EngineError`` once :meth:`aclose` began."""
        if self._closed:
            raise EngineError("the engine is shut down")
        return self._llm

    async def _prepare(self, request: Request) -> Prepared:
        """What to submit for ``request``: on its session's timeline, or as one prompt."""
        if isinstance(request, GenerationRequest) and request.timeline is not None:
            prepared = await self._timelines.prepare(request, request.timeline)
            if prepared is not None:
                return prepared
            request = dataclasses.replace(request, timeline=None)
        engine_input, fitted, messages = await self._render(request)
        length = len(engine_input["prompt_token_ids"])
        return Prepared(engine_input, fitted, media_frames(messages), length)

    def _timeline_messages(self, draft: Draft) -> list[Message]:
        """The draft's messages; Qwen3-VL's videos carry their times, the others' are labelled."""
        return draft.messages(labels=self._family != "qwen3_vl")

    async def _compute(self, engine_input: Any, request_id: str) -> None:
        """Compute ``engine_input``'s prompt with one token of answer, for the prefix cache
        (a timeline's work ahead of its next ask, :mod:`streamchat.engine.sessions`)."""
        params = SamplingParams(max_tokens=1, output_kind=RequestOutputKind.FINAL_ONLY)
        outputs = self._live().generate(engine_input, params, request_id)
        try:
            async for _ in outputs:
                pass
        finally:
            await outputs.aclose()

    async def _render(self, request: Request) -> tuple[Any, Request, list[Message]]:
        """vLLM's engine input for ``request``; the request and its messages as fitted.

        vLLM counts a prompt's video tokens only when it expands the videos,
        after its renderer's text check (an over-long prompt then fails inside
        ``generate``, untyped), and it ends an answer wherever the context
        ends. So the prompt is rendered here and its length, video tokens
        included, read from the renderer's output before anything is submitted:

        * a live session's earlier turns are dropped, oldest first, until the
          prompt and the requested answer (``max_tokens``) fit ``max_model_len``
          together: a long answer that joined the history leaves room for the
          next question rather than breaking every later one (a
          :class:`ChatRequest`'s turns are the client's: never dropped);
        * with no history left, an answer longer than the room that remains
          is cut to that room (it ends with ``length``);
        * a question that leaves no room at all is ``ContextTooLong``.

        A prompt that fits is rendered once and submitted. One that does not
        shows what its videos add to its text's tokens; the fewest turns to
        drop are then bisected on the text alone (tokenized by vLLM's renderer,
        in its worker, with no video processing) and the prompt rendered again
        with them gone, which checks the count. A render that is not submitted
        is forgotten by vLLM's multimodal cache (:meth:`_forget`).
        """
        limit = self._max_model_len
        wanted = request.sampling.max_tokens
        messages, droppable = conversation(request)
        media = self._media(messages)
        extra = 0  # what the media add to the text's tokens, once a render has shown it
        while True:
            rendered = await self._rendered(messages, media)
            if rendered.fits(wanted, limit) or (not droppable and rendered.fits(1, limit)):
                break
            self._forget(rendered.engine_input)
            if not droppable:
                raise self._too_long(messages, rendered.counted)
            if rendered.length is not None:
                text = await self._rendered(messages, {})
                extra = rendered.length - (text.length or 0)
            drop = await self._turns_to_drop(messages, droppable, limit - wanted - extra)
            logger.info(
                "request %s: %d of %d earlier turns dropped to fit the context",
                request.request_id,
                drop,
                droppable,
            )
            messages = messages[2 * drop :]
            droppable -= drop
        assert rendered.length is not None
        if rendered.length + wanted > limit:
            room = limit - rendered.length
            logger.info(
                "request %s: max_tokens %d lowered to the %d tokens left in the context",
                request.request_id,
                wanted,
                room,
            )
            sampling = dataclasses.replace(request.sampling, max_tokens=room)
            request = dataclasses.replace(request, sampling=sampling)
        return rendered.engine_input, request, messages

    async def _turns_to_drop(self, messages: list[Message], droppable: int, room: int) -> int:
        """The fewest oldest turns (one at least) whose removal brings the text within ``room``.

        Bisected on the whole text's tokens, since a turn's cost includes the
        chat template's markup around it; all of them if nothing less will do.
        """
        low, high = 1, droppable
        while low < high:
            middle = (low + high) // 2
            text = await self._rendered(messages[2 * middle :], {})
            if text.fits(0, room):
                high = middle
            else:
                low = middle + 1
        return low

    async def _rendered(self, messages: Sequence[Message], media: dict[str, Any]) -> Rendered:
        """The prompt of ``messages`` through vLLM's renderer, and its length.

        Without ``media`` only the text is tokenized (each video or image one
        placeholder token), touching no multimodal cache.
        """
        prompt = {"prompt": self._text(messages), **media}
        try:
            (engine_input,) = await self._live().renderer.render_cmpl_async([prompt])
        except VLLMValidationError as exc:
            if exc.parameter not in ("input_tokens", "input_text"):
                raise EngineError(f"could not prepare the prompt: {exc}") from exc
            # The text alone is over the context; vLLM counted characters or tokens.
            counted = exc.value if exc.parameter == "input_tokens" else None
            return Rendered(None, None, counted)
        except Exception as exc:
            raise EngineError(f"could not prepare the prompt: {exc}") from exc
        length = len(engine_input["prompt_token_ids"])
        return Rendered(engine_input, length, length)

    async def _rendered_with_media(self, messages: Sequence[Message]) -> Rendered:
        """The prompt of ``messages`` with their videos and images (:meth:`_rendered`)."""
        return await self._rendered(messages, self._media(messages))

    def _forget(self, engine_input: Any) -> None:
        """Tell vLLM's multimodal cache that ``engine_input`` was never submitted (or failed).

        Rendering a video records it in the front end's cache as sent to the
        engine core, so the next prompt with it is sent without its data: had
        the record stayed, that prompt would fail in the engine core (a cache
        miss, finished with ``error``). vLLM drops records this way itself when
        the engine reports such a miss.
        """
        cache = self._live().renderer.mm_processor_cache
        if cache is None or engine_input is None:
            return
        for hashes in engine_input.get("mm_hashes", {}).values():
            for mm_hash in hashes:
                cache.invalidate(mm_hash)

    def _too_long(self, messages: Sequence[Message], length: object) -> ContextTooLong:
        """The typed refusal of a prompt that alone fills the context."""
        needs = f"needs {length} tokens" if length is not None else "is too long"
        return ContextTooLong(
            f"the question with its {media_frames(messages)} frames {needs}, leaving no room "
            f"for an answer in the context of {self._max_model_len} tokens: ask about fewer "
            "frames (max_frames, last_seconds) or a shorter question"
        )

    def _text(self, messages: Sequence[Message]) -> str:
        """The prompt's text from the model's chat template (a placeholder per video and image).

        The processor's template is preferred, as vLLM's own chat path does:
        some checkpoints' tokenizers carry a text-only template.
        """
        text: str = self._tokenizer.apply_chat_template(
            hf_messages(messages),
            chat_template=self._chat_template,
            tokenize=False,
            add_generation_prompt=True,
        )
        return text

    def _media(self, messages: Sequence[Message]) -> dict[str, Any]:
        """The videos (with their metadata) and images of ``messages`` in order, with their ids."""
        videos: list[Any] = []
        images: list[Any] = []
        ids: dict[str, list[str]] = {"video": [], "image": []}
        for part in (part for message in messages for part in message.content):
            if isinstance(part, Video):
                frames = clip_frames(part.frames)
                video: Any = _stack_frames(frames)
                metadata = video_metadata(
                    frames, part.fps, family=self._family, measured=part.measured
                )
                if metadata is not None:
                    video = (video, metadata)
                videos.append(video)
                if self._digests is not None:
                    size = _newest_size(frames)
                    ids["video"].append(
                        self._digests.video_id(frames, video_size=size, metadata=metadata)
                    )
            elif isinstance(part, Image):
                images.append(part.frame.image)
                if self._digests is not None:
                    ids["image"].append("streamchat-" + self._digests.frame(part.frame.image).hex())
        data = {kind: items for kind, items in (("video", videos), ("image", images)) if items}
        if not data:
            return {}
        parts: dict[str, Any] = {"multi_modal_data": data}
        if self._digests is not None:
            parts["multi_modal_uuids"] = {kind: ids[kind] for kind in data}
        return parts


class SchedulerLoad:
    """The scheduler's counts after its last step, as vLLM tells its stat loggers.

    :meth:`logger` is the stat logger factory to hand vLLM (``stat_loggers``); it
    records into this object, in the event loop's thread (vLLM's output handler).
    """

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0

    def logger(self, vllm_config: Any, engine_index: int = 0) -> StatLoggerBase:
        return _LoadLogger(self)


class _LoadLogger(StatLoggerBase):
    def __init__(self, load: SchedulerLoad) -> None:
        self._load = load

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is not None:
            self._load.running = scheduler_stats.num_running_reqs
            self._load.waiting = (
                scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
            )

    def log_engine_initialized(self) -> None:
        pass


class FrameDigests(FrameCache[None]):
    """Content identities of frames and of the videos made of them, for vLLM's caches.

    vLLM keys its multimodal processor cache and the prefix cache of video
    tokens on a hash of the video it is given, and by default hashes the
    whole ``(T, H, W, 3)`` array on every request: about 19 MB for a full
    window, 10-20 ms here, for every question, although the window has
    changed by a frame or two (or not at all) since the last one. A digest of
    each frame is taken once, when the frame is first asked about, and kept
    while the frame lives (:class:`~streamchat.engine.frames.FrameCache`); a
    video's identity (``multi_modal_uuids``) is a digest of its frames'
    digests, their size after :func:`_stack_frames` and the metadata; vLLM
    then skips its own hashing. blake3 is vLLM's own hash, and the fastest here.
    """

    def __init__(self) -> None:
        super().__init__(_blake3_digest)

    def frame(self, image: npt.NDArray[np.uint8]) -> bytes:
        """The digest of one frame's image (computed at most once per array)."""
        return self.digest(image)

    def video_id(
        self,
        frames: Sequence[Frame],
        *,
        video_size: tuple[int, int],
        metadata: dict[str, Any] | None,
    ) -> str:
        """The identity of the video :meth:`VllmEngine._media` builds from ``frames``."""
        digest = blake3()
        header = {"size": list(video_size), "count": len(frames), "metadata": metadata}
        digest.update(json.dumps(header, sort_keys=True).encode())
        for frame in frames:
            digest.update(self.frame(frame.image))
        return "streamchat-" + digest.hexdigest(20)


def _blake3_digest(image: npt.NDArray[np.uint8]) -> bytes:
    digest = blake3(f"{image.dtype.str}{image.shape}".encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.digest(16)


class _FailedUnstarted(EngineError):
    """The engine failed a request before its first token (see :meth:`VllmEngine.generate`)."""


class _Answer:
    """Turns one request's DELTA outputs into deltas, counting tokens for usage."""

    def __init__(self, request: Request, video_token_id: int, frames: int) -> None:
        self.request = request
        self.video_token_id = video_token_id
        self.frames = frames
        self.prompt_ids: Sequence[int] = ()
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.finished = False
        self.reason: FinishReason | None = None
        self._text: list[str] = []

    @property
    def text(self) -> str:
        """The answer's text so far."""
        return "".join(self._text)

    def delta(self, output: Any) -> Delta | None:
        """The delta for ``output``; ``None`` for an output with no new text."""
        if output.prompt_token_ids is not None:
            self.prompt_ids = output.prompt_token_ids
        # Known once the prefill is scheduled, then repeated on every output;
        # None from an engine that does not report it.
        if output.num_cached_tokens is not None:
            self.cached_tokens = output.num_cached_tokens
        completion = output.outputs[0]
        self.completion_tokens += len(completion.token_ids)
        if completion.text:
            self._text.append(completion.text)
        if not output.finished:
            return Delta(text=completion.text) if completion.text else None
        if completion.finish_reason == "error" and not self.completion_tokens:
            raise _FailedUnstarted("the engine failed the request before its first token")
        self.finished = True
        reason = self.reason = _finish_reason(completion.finish_reason)
        usage = Usage(
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=self.completion_tokens,
            video_tokens=sum(1 for t in self.prompt_ids if t == self.video_token_id),
            frames=self.frames,
            cached_tokens=min(self.cached_tokens, len(self.prompt_ids)),
        )
        logger.debug("request %s finished: %s, %s", self.request.request_id, reason, usage)
        return Delta(text=completion.text, finish_reason=reason, usage=usage)


def _sampling_params(request: Request) -> Any:
    options = request.sampling
    return SamplingParams(
        max_tokens=options.max_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        seed=options.seed,
        stop=list(options.stop) or None,
        structured_outputs=(
            StructuredOutputsParams(choice=list(options.choices)) if options.choices else None
        ),
        output_kind=RequestOutputKind.DELTA,
    )


def _finish_reason(reason: str | None) -> FinishReason:
    """vLLM's finish reason in streamchat's terms; an engine error raises."""
    mapped = _FINISH_REASONS.get(reason or "")
    if mapped is None:
        raise EngineError(f"the engine finished the answer with {reason!r}")
    return mapped


def _hf_processor(model_config: Any) -> Any:
    """The model's Hugging Face processor (its chat template and video limits), or None."""
    try:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(  # type: ignore[no-untyped-call]
            model_config.model, trust_remote_code=model_config.trust_remote_code
        )
    except Exception:  # an unusual model: the processor is vLLM's business
        logger.info("no Hugging Face processor for %s", model_config.model)
        return None


def _vision_costs(
    model_config: Any, family: str, tokenizer: Any, processor: Any
) -> VisionCosts | None:
    """The model's video token arithmetic (:mod:`streamchat.budget`), from its own configs.

    Patch, merge and temporal patch sizes come from the vision config; the
    smallest frame from the video processor (frames below it are enlarged);
    Qwen3-VL's per-pair text from its tokenizer: a timestamp at its longest
    and the vision start and end tokens its processor writes around each pair.
    """
    vision = getattr(model_config.hf_config, "vision_config", None)
    patch = getattr(vision, "patch_size", None)
    merge = getattr(vision, "spatial_merge_size", None)
    if not isinstance(patch, int) or not isinstance(merge, int):
        return None
    temporal = getattr(vision, "temporal_patch_size", 2)
    pair_text = 0
    if family == "qwen3_vl":
        pair_text = len(tokenizer.encode("<14400.0 seconds>", add_special_tokens=False)) + 2
    return VisionCosts(
        max_model_len=int(model_config.max_model_len),
        factor=patch * merge,
        temporal_patch=int(temporal),
        min_frame_pixels=_min_frame_pixels(processor, family),
        pair_text_tokens=pair_text,
    )


def _min_frame_pixels(processor: Any, family: str) -> int:
    """The video processor's smallest frame in pixels (0 when it cannot be read).

    Qwen2-VL's and Qwen2.5-VL's ``size.shortest_edge`` bounds each frame;
    Qwen3-VL's bounds a whole video (frames x height x width), so a
    two-frame clip is the worst case.
    """
    size = getattr(getattr(processor, "video_processor", None), "size", None)
    shortest = getattr(size, "shortest_edge", None)
    if shortest is None and isinstance(size, dict):
        shortest = size.get("shortest_edge")
    if not isinstance(shortest, int):
        return 0
    return shortest // 2 if family == "qwen3_vl" else shortest


def _frame_factor(hf_config: Any) -> int | None:
    """Pixels per merged vision token side: 28 for Qwen2/2.5-VL, 32 for Qwen3-VL."""
    vision = getattr(hf_config, "vision_config", None)
    patch = getattr(vision, "patch_size", None)
    merge = getattr(vision, "spatial_merge_size", None)
    if isinstance(patch, int) and isinstance(merge, int):
        return patch * merge
    return None


def _video_token_id(hf_config: Any, tokenizer: Any) -> int:
    token_id = getattr(hf_config, "video_token_id", None)
    if token_id is None:
        token_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    return int(token_id)
