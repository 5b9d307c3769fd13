"""``python -m bench.timeline``: asks on a live stream, the window as one video vs the timeline.

A session asking about a live stream sees a window that moved by a few frames
since its last question. In the ``window`` context each ask sends that window
as one new video: the vision encoder runs on every frame and every video token
is prefilled again. In the ``timeline`` context (:mod:`streamchat.engine.timeline`)
the session's prompt only grows at its end: segments of 4 frames with stable
content ids, then the turns, so vLLM's prefix cache holds what an ask shares
with the last one and only the new segments and the question are computed.

Measured through :meth:`VllmEngine.generate` itself (no server, no socket), one
engine per model family, the families one after another, each on a tiny
random model *scaled up* (:data:`BENCH_SCALE`: more and wider layers, the real
checkpoints' preprocessing) so that encoding and prefill dominate an ask as
they do with a real model. The stream is simulated: random 448x448 frames at
2 fps, a 64-frame window, an ask after every 2 s (4 new frames) of video. Each
series runs on frames of its own, so no cache has seen them. Per repetition:

* (a) **cold**: the first ask on a fresh stream, one video, nothing cached;
* (b) **window**: asks after 2 s of new video, one video each (no timeline);
* (c) **timeline**: asks after 2 s of new video on the session's timeline, in
  steady state (the asks a session makes between rebases);
* (e1) **during a warm-up**: the ask after the timeline was rebased ahead
  (half its slack used: the adapter makes a rebased copy after an answer and
  computes it in the background), while that warm-up still runs: it goes on
  with the timeline as it was, sharing the engine with the warm-up;
* (e) **warmed rebase**: the ask once the warm-up ended and the rebased copy
  took over (the warm-up awaited, and timed from the rebase);
* (d) **rebase on the ask's path**: the stream jumps by more than the whole
  slack at once, so the ask itself rebases:
  the whole rebased prompt is prefilled (the encoder cache still holds its
  segments);
* (f) **yes/no**: every other steady ask is a yes/no question bound to the
  choices ``yes`` / ``no`` (a fixed-choice structured output: a token or two);
  its whole answer against the cold ask's TTFT;
* (g) **prefilled ahead**: asks after 2 s of new video on a timeline whose new
  frames the engine computed ahead (``Engine.prefill``, what a session hands it
  as frames arrive; awaited and timed here) and (h) the yes/no ones among them:
  the ask computes its question and at most a cache block more.

Ratios are to (a), per repetition (the median of a series' asks over that
repetition's cold ask), then summarised over repetitions. ``cached_tokens``
and ``prompt_tokens`` come from the answers' usage (vLLM's per-request
prefix-cache hits). Rebases are read from the adapter's log: one before an
ask's first token is on its path; the warm-up of one made after an answer is
timed and compared with the 2 s until the next ask.

``--sessions N`` (default 8) then runs N sessions asking at once, each on its
own stream, in the timeline context, then on the timeline with the new frames
computed ahead between rounds, then in the window context, on the last
family's engine.

``--peer`` measures instead those N sessions against vLLM's own server, one
family (default Qwen3-VL), the engines one after the other: streamchat's
timeline in one in-process engine, then ``vllm serve`` (same engine settings)
asked over its OpenAI API with each ask's window as one video, as a client of
that server sends it (:func:`streamchat.engine.remote.video_part`: PPM frames in
one ``data:video/jpeg`` URL; the family's metadata in ``media_io_kwargs``).
Both get the same frames: a cold round (every session's first ask), then
``--rounds`` rounds after 2 s of new video; each side first answers one ask
on a stream of its own (one-off costs, not measured).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from streamchat.engine.base import GenerationRequest, SamplingOptions, TimelineContext
from streamchat.engine.prompt import video_metadata
from streamchat.engine.remote import SERVER_FLAGS, video_part
from streamchat.engine.tiny_model import DEFAULT_SCALE, FAMILIES, Scale, build_tiny_model
from streamchat.window import Frame

from .common import base_parser, print_table, summarise, write_result
from .peer import engine_flags, stream_chat_completion, vllm_serve

if TYPE_CHECKING:
    from streamchat.engine.vllm import VllmEngine

__all__ = ["BENCH_SCALE", "main"]

BENCH_SCALE = Scale(text_layers=4, vision_depth=2)
"""A tiny model whose encoder and prefill dominate an ask (the default's are too cheap)."""
FPS = 2.0
STEP = 4
"""New frames between two asks: 2 s of video at 2 fps, one segment."""
QUESTION = "What changed in the last seconds?"
YES_NO = "Is anyone in the picture? Answer yes or no."
YES_NO_CHOICES = ("yes", "no")
PREFILLED_ASKS = 6
"""Asks of (g) and (h) per repetition: past the slack's half, so a rebase ahead is among them."""
SERIES = (
    "cold",
    "window",
    "timeline",
    "rebase_warming",
    "rebase_warmed",
    "rebase_on_path",
    "yes_no",
    "prefilled",
    "prefilled_yes_no",
)
LABELS = {
    "cold": "(a) cold ask, one video",
    "window": "(b) after 2 s, window",
    "timeline": "(c) after 2 s, timeline",
    "rebase_on_path": "(d) rebase on the path",
    "rebase_warming": "(e1) during a warm-up",
    "rebase_warmed": "(e) after a warmed rebase",
    "yes_no": "(f) yes/no on the timeline",
    "prefilled": "(g) after 2 s, prefilled ahead",
    "prefilled_yes_no": "(h) yes/no, prefilled ahead",
}
_REBASED = "request %s: timeline of %d frames rebased to t=%.1fs (%s)"
PEER_FAMILY = "qwen3_vl"
"""``--peer``'s family unless ``--families`` names others."""
PEER_ROUNDS = ("cold", "after_2s")
PEER_SIDES = ("timeline", "prefilled")
"""streamchat's sides of ``--peer``, each compared with ``vllm serve``."""
PEER_LABELS = {
    "timeline": "streamchat, timeline",
    "prefilled": "streamchat, timeline + prefill",
    "vllm_serve": "vllm serve, one video",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Shape:
    """What one run asks about: the window, the slack, the frames, the answers."""

    window: int
    slack: int
    size: int
    max_tokens: int
    max_model_len: int
    scale: Scale

    @property
    def max_frames(self) -> int:
        return self.window + self.slack


FULL = Shape(window=64, slack=32, size=448, max_tokens=8, max_model_len=16384, scale=BENCH_SCALE)
QUICK = Shape(window=16, slack=8, size=224, max_tokens=4, max_model_len=8192, scale=DEFAULT_SCALE)


class Stream:
    """A simulated live stream: random frames at :data:`FPS`, a window of the newest."""

    def __init__(self, seed: int, shape: Shape) -> None:
        self._rng = np.random.default_rng(seed)
        self._shape = shape
        self._count = 0
        self.window: deque[Frame] = deque(maxlen=shape.window)

    def advance(self, frames: int) -> None:
        size = self._shape.size
        for _ in range(frames):
            image = self._rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            self.window.append(Frame(pts=self._count / FPS, image=image))
            self._count += 1


@dataclasses.dataclass
class Ask:
    """One measured ask."""

    series: str
    family: str
    repetition: int
    ttft: float
    total: float
    prompt_tokens: int
    cached_tokens: int
    rebased_on_path: bool
    rebased_after: bool

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Rebases(logging.Handler):
    """The request ids of the adapter's rebases, on an ask's path and ahead (its log names
    the request; ``/metrics`` only counts them)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.on_path: list[str] = []
        self.ahead: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == _REBASED and isinstance(record.args, tuple):
            when = self.ahead if record.args[3] == "ahead" else self.on_path
            when.append(str(record.args[0]))


class _Asker:
    """Asks one engine, timing each answer and noting the rebases it made."""

    def __init__(self, engine: VllmEngine, shape: Shape, family: str) -> None:
        self.engine, self.shape, self.family = engine, shape, family
        self.rebases = _Rebases()
        self.count = 0

    async def ask(
        self,
        series: str,
        repetition: int,
        stream: Stream,
        *,
        session: str | None = None,
        yes_no: bool = False,
    ) -> Ask:
        self.count += 1
        request_id = f"{series}-{self.count}"
        context = None
        if session is not None:
            context = TimelineContext(
                session=session, max_frames=self.shape.max_frames, keep_turns=8
            )
        request = GenerationRequest(
            request_id=request_id,
            question=YES_NO if yes_no else QUESTION,
            frames=list(stream.window),
            sampling=(
                SamplingOptions(max_tokens=4, choices=YES_NO_CHOICES)
                if yes_no
                else SamplingOptions(max_tokens=self.shape.max_tokens)
            ),
            fps=FPS,
            timeline=context,
        )
        first: float | None = None
        on_path = False
        usage = None
        started = time.perf_counter()
        async for delta in self.engine.generate(request):
            if first is None:
                first = time.perf_counter() - started
                on_path = request_id in self.rebases.on_path
            if delta.usage is not None:
                usage = delta.usage
        total = time.perf_counter() - started
        assert first is not None and usage is not None, "the engine gave no answer"
        return Ask(
            series,
            self.family,
            repetition,
            first,
            total,
            usage.prompt_tokens,
            usage.cached_tokens,
            rebased_on_path=on_path,
            rebased_after=request_id in self.rebases.ahead,
        )


async def _window_series(asker: _Asker, repetition: int, seed: int, asks: int) -> list[Ask]:
    """(a) then (b): a fresh stream's first ask, then asks 2 s apart, one video each."""
    stream = Stream(seed, asker.shape)
    stream.advance(asker.shape.window)
    results = [await asker.ask("cold", repetition, stream)]
    for _ in range(asks):
        stream.advance(STEP)
        results.append(await asker.ask("window", repetition, stream))
    return results


async def _timeline_series(asker: _Asker, repetition: int, seed: int) -> tuple[list[Ask], Any]:
    """(c), (e), (f) and (d) on one session: a whole slack, a rebase ahead, a jump.

    Asks every 2 s until the adapter rebases ahead (the slack used up), awaits
    the warm-up (timed), asks (e); goes on to the slack's edge, where the
    stream jumps by 4 s and the ask rebases on its path (d).
    """
    engine, shape = asker.engine, asker.shape
    session = f"timeline-{asker.family}-{repetition}"
    stream = Stream(seed, shape)
    stream.advance(shape.window)
    first = await asker.ask("timeline_first", repetition, stream, session=session)
    results, warmups = [first], []
    steady = 0

    async def step(series: str) -> Ask:
        nonlocal steady
        stream.advance(STEP)
        yes_no = series == "timeline" and steady % 2 == 1
        steady += series == "timeline"
        ask = await asker.ask(
            "yes_no" if yes_no else series, repetition, stream, session=session, yes_no=yes_no
        )
        results.append(ask)
        return ask

    for _ in range(shape.slack // STEP):
        if (await step("timeline")).rebased_after:
            break
    else:
        raise AssertionError("the timeline used up its slack without a rebase ahead")
    task = engine.warming(session)
    started = time.perf_counter()
    await step("rebase_warming")  # 2 s later, the warm-up still running: not waited for
    if task is not None:
        await asyncio.wait([task])
        warmups.append(time.perf_counter() - started)
    await step("rebase_warmed")
    for _ in range(2):
        await step("timeline")
    stream.advance(shape.slack)  # the stream jumps: more than the whole slack at once
    await step("rebase_on_path")
    engine.end_session(session)
    return results, warmups


async def _prefill(asker: _Asker, session: str, stream: Stream) -> float | None:
    """Hand the engine the new frames as a session does between asks; the seconds it took
    to compute them ahead (None: nothing to compute). A rebased copy warming up is awaited
    first (the frames arriving meanwhile are handed over once it took over)."""
    engine = asker.engine
    if (warming := engine.warming(session)) is not None:
        await asyncio.wait([warming])
    context = TimelineContext(session=session, max_frames=asker.shape.max_frames, keep_turns=8)
    started = time.perf_counter()
    engine.prefill(context, list(stream.window))
    if (task := engine.prefilling(session)) is None:
        return None
    await asyncio.wait([task])
    return time.perf_counter() - started


async def _prefilled_series(
    asker: _Asker, repetition: int, seed: int, asks: int
) -> tuple[list[Ask], list[float]]:
    """(g) and (h): asks every 2 s on a timeline whose new frames were computed ahead.

    Between asks the engine gets the new frames as the session hands them over
    while the stream goes on (awaited here: it computes them in less than the
    2 s to the next ask); every other ask is a yes/no question. A rebase ahead
    happens on the way, as in (c).
    """
    session = f"prefilled-{asker.family}-{repetition}"
    stream = Stream(seed, asker.shape)
    stream.advance(asker.shape.window)
    results = [await asker.ask("prefilled_first", repetition, stream, session=session)]
    durations: list[float] = []
    for number in range(asks):
        stream.advance(STEP)
        if (took := await _prefill(asker, session, stream)) is not None:
            durations.append(took)
        yes_no = number % 2 == 1
        series = "prefilled_yes_no" if yes_no else "prefilled"
        results.append(await asker.ask(series, repetition, stream, session=session, yes_no=yes_no))
    asker.engine.end_session(session)
    return results, durations


Asking = Callable[[str, int, int, Stream], Awaitable[Ask]]
"""Asks about a stream: ``(series, round, session number, stream)``."""


async def _rounds(
    ask: Asking,
    shape: Shape,
    sessions: int,
    rounds: int,
    *,
    series: str,
    seed: int,
    between: Callable[[Sequence[Stream]], Awaitable[None]] | None = None,
) -> list[list[Ask]]:
    """``sessions`` streams asked about at once, ``rounds + 1`` times, 2 s of video apart
    (``between`` runs on the streams once they advanced, before the next round)."""
    streams = [Stream(seed + i, shape) for i in range(sessions)]
    for stream in streams:
        stream.advance(shape.window)
    results: list[list[Ask]] = []
    for number in range(rounds + 1):
        asks = await asyncio.gather(*(ask(series, number, i, s) for i, s in enumerate(streams)))
        results.append(list(asks))
        for stream in streams:
            stream.advance(STEP)
        if between is not None and number < rounds:
            await between(streams)
    return results


async def _together(
    asker: _Asker, sessions: int, rounds: int, *, kind: str, seed: int
) -> list[float]:
    """``sessions`` sessions asking at once, ``rounds`` times; TTFTs after the first round.

    ``kind``: ``window`` (one video per ask), ``timeline``, or ``prefilled`` (the
    timeline, every session's new frames computed ahead between rounds)."""
    series = f"together-{kind}"
    per_round = await _session_rounds(asker, sessions, rounds, series=series, kind=kind, seed=seed)
    # The first round is every session's cold ask.
    return [a.ttft for asks in per_round[1:] for a in asks]


async def _session_rounds(
    asker: _Asker, sessions: int, rounds: int, *, series: str, kind: str, seed: int
) -> list[list[Ask]]:
    """:func:`_rounds` on ``asker``'s engine in context ``kind`` (see :func:`_together`);
    the sessions' timelines are ended after."""

    def session(i: int) -> str | None:
        return f"{series}-{i}" if kind != "window" else None

    async def ask(series: str, number: int, i: int, stream: Stream) -> Ask:
        return await asker.ask(series, number, stream, session=session(i))

    async def prefill(streams: Sequence[Stream]) -> None:
        await asyncio.gather(
            *(_prefill(asker, f"{series}-{i}", stream) for i, stream in enumerate(streams))
        )

    between = prefill if kind == "prefilled" else None
    per_round = await _rounds(
        ask, asker.shape, sessions, rounds, series=series, seed=seed, between=between
    )
    for i in range(sessions):
        if (name := session(i)) is not None:
            asker.engine.end_session(name)
    return per_round


class _Served:
    """Asks ``vllm serve`` about a stream's window as one video, as its client would."""

    def __init__(self, client: httpx.AsyncClient, root: str, model: str, shape: Shape) -> None:
        self.client, self.url, self.model, self.shape = (
            client,
            f"{root}/v1/chat/completions",
            model,
            shape,
        )

    async def ask(self, family: str, series: str, number: int, label: str, stream: Stream) -> Ask:
        frames = list(stream.window)
        metadata = video_metadata(frames, FPS, family=family, measured=False) or {}
        metadata.pop("video_backend", None)  # informational; vLLM names its own
        part = video_part([f.image for f in frames], f"{label}-{frames[0].pts:.1f}-{len(frames)}")
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}],
            "max_tokens": self.shape.max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "media_io_kwargs": {"video": {"num_frames": -1} | metadata},
        }
        answer = await stream_chat_completion(
            self.client, self.url, body, name="vllm serve", kind=series
        )
        assert answer.cached_tokens is not None, "vllm serve told no cached tokens"
        return Ask(
            series,
            family,
            number,
            answer.ttft,
            answer.total,
            answer.prompt_tokens,
            answer.cached_tokens,
            rebased_on_path=False,
            rebased_after=False,
        )


async def _peer_timeline(
    family: str, model: Path, shape: Shape, args: argparse.Namespace
) -> dict[str, list[list[Ask]]]:
    """The timeline side of ``--peer``, in one engine: every session on its timeline, then
    again with each session's new frames computed ahead between rounds (as a live session
    hands them to the engine while the stream goes on)."""
    from streamchat.engine.vllm import make_engine_args, open_vllm_engine

    started = time.perf_counter()
    engine_args = make_engine_args(model, max_model_len=shape.max_model_len)
    async with open_vllm_engine(engine_args) as engine:
        print(f"{family}: engine ready in {time.perf_counter() - started:.1f} s", flush=True)
        asker = _Asker(engine, shape, family)
        await _session_rounds(asker, 1, 0, series="peer-warm-up", kind="timeline", seed=999)
        return {
            kind: await _session_rounds(
                asker, args.sessions, args.rounds, series=f"peer-{kind}", kind=kind, seed=seed
            )
            for kind, seed in (("timeline", 7), ("prefilled", 107))
        }


async def _peer_served(
    family: str, model: Path, shape: Shape, args: argparse.Namespace
) -> list[list[Ask]]:
    """The ``vllm serve`` side of ``--peer``: the same streams, one video per ask."""
    flags = [*SERVER_FLAGS, *engine_flags({"max_model_len": shape.max_model_len})]
    log = Path(args.out) / f"timeline-peer-{family}-vllm-serve.log"
    started = time.perf_counter()
    async with (
        vllm_serve(log, model, flags, timeout=600.0) as root,
        httpx.AsyncClient(trust_env=False, timeout=1800.0) as client,
    ):
        print(f"{family}: vllm serve ready in {time.perf_counter() - started:.1f} s", flush=True)
        served = _Served(client, root, str(model), shape)

        async def ask(series: str, number: int, i: int, stream: Stream) -> Ask:
            return await served.ask(family, series, number, f"{series}-{i}", stream)

        await _rounds(ask, shape, 1, 0, series="peer-warm-up", seed=999)  # one-off costs
        return await _rounds(ask, shape, args.sessions, args.rounds, series="peer-serve", seed=7)


def _peer_round(asks: Sequence[Ask]) -> dict[str, Any]:
    return {
        key: summarise([getattr(a, key) for a in asks]).as_dict()
        for key in ("ttft", "total", "prompt_tokens", "cached_tokens")
    }


async def _peer(family: str, model: Path, shape: Shape, args: argparse.Namespace) -> dict[str, Any]:
    """``--peer`` for one family: the timeline, then ``vllm serve`` (never both at once)."""
    sides = await _peer_timeline(family, model, shape, args)
    sides["vllm_serve"] = await _peer_served(family, model, shape, args)
    rounds = {
        side: {"cold": per_round[0], "after_2s": [a for r in per_round[1:] for a in r]}
        for side, per_round in sides.items()
    }
    summaries = {
        side: {name: _peer_round(asks) for name, asks in by_round.items()}
        for side, by_round in rounds.items()
    }
    ratios = {
        side: {
            name: summaries[side][name]["ttft"]["median"]
            / summaries["vllm_serve"][name]["ttft"]["median"]
            for name in PEER_ROUNDS
        }
        for side in PEER_SIDES
    }
    _peer_table(family, args.sessions, summaries, ratios)
    return {
        "sessions": args.sessions,
        "rounds_after_2s": args.rounds,
        "sides": summaries,
        "over_vllm_serve": ratios,
        "asks": {
            side: [a.as_dict() for asks in per_round for a in asks]
            for side, per_round in sides.items()
        },
    }


def _peer_table(
    family: str, sessions: int, summaries: dict[str, Any], ratios: dict[str, dict[str, float]]
) -> None:
    def ttft(entry: dict[str, Any]) -> str:
        figures = entry["ttft"]
        return f"{figures['median']:.2f} ({figures['min']:.2f}-{figures['max']:.2f})"

    def tokens(entry: dict[str, Any]) -> str:
        return f"{entry['cached_tokens']['median']:.0f} / {entry['prompt_tokens']['median']:.0f}"

    rows = [
        [
            PEER_LABELS[side],
            ttft(by_round["cold"]),
            ttft(by_round["after_2s"]),
            tokens(by_round["cold"]),
            tokens(by_round["after_2s"]),
        ]
        for side, by_round in summaries.items()
    ]
    rows.extend(
        [f"{side} / vllm serve", f"{ratio['cold']:.2f}x", f"{ratio['after_2s']:.2f}x", "", ""]
        for side, ratio in ratios.items()
    )
    print(f"\n{family}, {sessions} sessions asking at once, TTFT s median (min-max):")
    print_table(["", "cold round", "after 2 s", "cached / prompt, cold", "after 2 s"], rows)


def _summary(asks: Sequence[Ask], series: str) -> dict[str, Any] | None:
    mine = [a for a in asks if a.series == series]
    if not mine:
        return None
    ratios = []
    for repetition in sorted({a.repetition for a in mine}):
        cold = [a.ttft for a in asks if a.series == "cold" and a.repetition == repetition]
        figure = "total" if series.endswith("yes_no") else "ttft"
        own = [getattr(a, figure) for a in mine if a.repetition == repetition]
        if cold:
            ratios.append(statistics.median(own) / cold[0])
    return {
        "ttft": summarise([a.ttft for a in mine]).as_dict(),
        "total": summarise([a.total for a in mine]).as_dict(),
        "prompt_tokens": summarise([a.prompt_tokens for a in mine]).as_dict(),
        "cached_tokens": summarise([a.cached_tokens for a in mine]).as_dict(),
        "computed_tokens": summarise([a.prompt_tokens - a.cached_tokens for a in mine]).as_dict(),
        "over_cold": summarise(ratios).as_dict() if ratios else None,
        "rebased_on_path": sum(a.rebased_on_path for a in mine),
        "n": len(mine),
    }


def _family_table(family: str, summaries: dict[str, Any]) -> None:
    rows = []
    for series in SERIES:
        entry = summaries.get(series)
        if entry is None:
            continue
        ratio = entry["over_cold"]
        rows.append(
            [
                LABELS[series],
                str(entry["n"]),
                f"{entry['ttft']['median'] * 1000:.0f}",
                f"{entry['total']['median'] * 1000:.0f}",
                f"{entry['cached_tokens']['median']:.0f} / {entry['prompt_tokens']['median']:.0f}",
                f"{ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f})" if ratio else "",
            ]
        )
    print(f"\n{family}:")
    print_table(["ask", "n", "TTFT ms", "total ms", "cached / prompt", "vs (a), (f): total"], rows)


async def _family(
    family: str, model: Path, shape: Shape, repeat: int, args: argparse.Namespace
) -> dict[str, Any]:
    from streamchat.engine.vllm import make_engine_args, open_vllm_engine

    overrides = {"max_model_len": shape.max_model_len}
    started = time.perf_counter()
    async with open_vllm_engine(make_engine_args(model, **overrides)) as engine:
        print(f"{family}: engine ready in {time.perf_counter() - started:.1f} s", flush=True)
        asker = _Asker(engine, shape, family)
        log = logging.getLogger("streamchat.engine")
        log.addHandler(asker.rebases)
        log.setLevel(logging.INFO)
        try:
            await _window_series(asker, -1, 999, 0)  # one-off costs, not measured
            once = Stream(998, shape)
            once.advance(shape.window // 4)
            await asker.ask("one_off", -1, once, yes_no=True)  # the choices' grammar compiles
            asks: list[Ask] = []
            warmups: list[float] = []
            prefills: list[float] = []
            for repetition in range(repeat):
                seed = 1000 * (repetition + 1)
                asks.extend(await _window_series(asker, repetition, seed, args.window_asks))
                mine, warm = await _timeline_series(asker, repetition, seed + 500)
                asks.extend(mine)
                warmups.extend(warm)
                mine, took = await _prefilled_series(asker, repetition, seed + 700, PREFILLED_ASKS)
                asks.extend(mine)
                prefills.extend(took)
                print(f"  repetition {repetition + 1}/{repeat}", flush=True)
            together = None
            if args.sessions and family == args.families[-1]:
                together = {
                    kind: summarise(
                        await _together(asker, args.sessions, args.rounds, kind=kind, seed=7)
                    ).as_dict()
                    for kind in ("timeline", "prefilled", "window")
                }
        finally:
            log.removeHandler(asker.rebases)
    summaries = {s: _summary(asks, s) for s in (*SERIES, "timeline_first", "prefilled_first")}
    _family_table(family, summaries)
    steady = [a for a in asks if a.series in ("timeline", "yes_no")]
    rebases = {
        "steady_asks": len(steady),
        "steady_on_path": sum(a.rebased_on_path for a in steady),
        "ahead": sum(a.rebased_after for a in asks),
        "every_seconds": shape.slack / FPS,
        "warmup_seconds": summarise(warmups).as_dict() if warmups else None,
        "warmups_within_interval": sum(w <= STEP / FPS for w in warmups),
        "jump_on_path": sum(a.rebased_on_path for a in asks if a.series == "rebase_on_path"),
        "jumps": sum(a.series == "rebase_on_path" for a in asks),
    }
    prefilled = {
        "seconds": summarise(prefills).as_dict() if prefills else None,
        "within_interval": sum(p <= STEP / FPS for p in prefills),
        "n": len(prefills),
    }
    print(
        f"rebases: {rebases['steady_on_path']} of {rebases['steady_asks']} steady asks rebased "
        f"on their path; {rebases['ahead']} ahead (every {rebases['every_seconds']:g} s of "
        f"stream), warm-ups {_seconds(warmups)} ({rebases['warmups_within_interval']} within "
        f"the {STEP / FPS:g} s to the next ask); the jump rebased on the path "
        f"{rebases['jump_on_path']} of {rebases['jumps']} times"
    )
    print(
        f"prefills ahead: {_seconds(prefills)} ({prefilled['within_interval']} of "
        f"{prefilled['n']} within the {STEP / FPS:g} s to the next ask)"
    )
    if together is not None:
        print(
            f"{args.sessions} sessions at once, TTFT median: timeline "
            f"{together['timeline']['median'] * 1000:.0f} ms, prefilled ahead "
            f"{together['prefilled']['median'] * 1000:.0f} ms, window "
            f"{together['window']['median'] * 1000:.0f} ms"
        )
    return {
        "series": summaries,
        "rebases": rebases,
        "prefills": prefilled,
        "together": together,
        "asks": [a.as_dict() for a in asks],
    }


def _seconds(values: Sequence[float]) -> str:
    return summarise(values).text(2) + " s" if values else "none"


def _models(out: Path, families: Sequence[str], shape: Shape) -> Iterator[tuple[str, Path]]:
    for family in families:
        suffix = "" if shape.scale == DEFAULT_SCALE else "-bench"
        yield (
            family,
            build_tiny_model(out / f"tiny-{family}{suffix}", family=family, scale=shape.scale),
        )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    shape = QUICK if args.quick else FULL
    repeat = 1 if args.quick else args.repeat
    if args.families is None:
        args.families = [PEER_FAMILY] if args.peer else list(FAMILIES)
    if args.quick:
        args.sessions, args.rounds, args.window_asks = 2, 1, 1
        args.families = [PEER_FAMILY if args.peer else "qwen2_vl"]
    print(
        f"window {shape.window} frames of {shape.size}x{shape.size} at {FPS:g} fps, slack "
        f"{shape.slack}, asks every {STEP / FPS:g} s; model scale {shape.scale.as_dict()} "
        f"(text width {shape.scale.text_width}, vision width {shape.scale.vision_width}); "
        f"max_model_len {shape.max_model_len}; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    families: dict[str, Any] = {}
    peer: dict[str, Any] = {}
    for family, model in _models(args.out, args.families, shape):
        if args.peer:
            peer[family] = await _peer(family, model, shape, args)
        else:
            families[family] = await _family(family, model, shape, repeat, args)
    return {
        "quick": args.quick,
        "repeat": repeat,
        "shape": {**dataclasses.asdict(shape), "scale": shape.scale.as_dict(), "fps": FPS},
        "step_frames": STEP,
        "families": families,
        "peer": peer or None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0], repeat=3)
    parser.add_argument(
        "--families",
        nargs="+",
        choices=FAMILIES,
        help=f"default: all; with --peer, {PEER_FAMILY}",
    )
    parser.add_argument(
        "--window-asks", type=int, default=2, help="(b) asks per repetition (default: 2)"
    )
    parser.add_argument(
        "--sessions", type=int, default=8, help="sessions asking at once; 0: none (default: 8)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="their asks after the first")
    parser.add_argument(
        "--peer",
        action="store_true",
        help="only the sessions asking at once, on the timeline against vllm serve",
    )
    args = parser.parse_args(argv)
    if args.peer and args.sessions < 1:
        parser.error("--peer needs --sessions 1 or more")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)  # the adapter's INFO records feed _Rebases only
    from streamchat.engine import cpu_compat

    cpu_compat.install()
    result = asyncio.run(run(args))
    write_result(Path(args.out), "timeline", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
