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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from streamchat.engine.base import GenerationRequest, SamplingOptions, TimelineContext
from streamchat.engine.tiny_model import DEFAULT_SCALE, FAMILIES, Scale, build_tiny_model
from streamchat.window import Frame

from .common import base_parser, print_table, summarise, write_result

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


async def _together(
    asker: _Asker, sessions: int, rounds: int, *, kind: str, seed: int
) -> list[float]:
    """``sessions`` sessions asking at once, ``rounds`` times; TTFTs after the first round.

    ``kind``: ``window`` (one video per ask), ``timeline``, or ``prefilled`` (the
    timeline, every session's new frames computed ahead between rounds)."""
    streams = [Stream(seed + i, asker.shape) for i in range(sessions)]
    for stream in streams:
        stream.advance(asker.shape.window)
    ttfts: list[float] = []
    series = f"together-{kind}"
    sessions_of = [f"{series}-{i}" if kind != "window" else None for i in range(sessions)]
    for number in range(rounds + 1):
        asks = await asyncio.gather(
            *(
                asker.ask(series, number, stream, session=session)
                for session, stream in zip(sessions_of, streams, strict=True)
            )
        )
        if number > 0:  # the first round is every session's cold ask
            ttfts.extend(a.ttft for a in asks)
        for stream in streams:
            stream.advance(STEP)
        if kind == "prefilled":
            await asyncio.gather(
                *(
                    _prefill(asker, session, stream)
                    for session, stream in zip(sessions_of, streams, strict=True)
                    if session is not None
                )
            )
    for session in sessions_of:
        if session is not None:
            asker.engine.end_session(session)
    return ttfts


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
    if args.quick:
        args.families, args.sessions, args.rounds, args.window_asks = ["qwen2_vl"], 2, 1, 1
    print(
        f"window {shape.window} frames of {shape.size}x{shape.size} at {FPS:g} fps, slack "
        f"{shape.slack}, asks every {STEP / FPS:g} s; model scale {shape.scale.as_dict()} "
        f"(text width {shape.scale.text_width}, vision width {shape.scale.vision_width}); "
        f"max_model_len {shape.max_model_len}; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    families: dict[str, Any] = {}
    for family, model in _models(args.out, args.families, shape):
        families[family] = await _family(family, model, shape, repeat, args)
    return {
        "quick": args.quick,
        "repeat": repeat,
        "shape": {**dataclasses.asdict(shape), "scale": shape.scale.as_dict(), "fps": FPS},
        "step_frames": STEP,
        "families": families,
    }


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0], repeat=3)
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument(
        "--window-asks", type=int, default=2, help="(b) asks per repetition (default: 2)"
    )
    parser.add_argument(
        "--sessions", type=int, default=8, help="sessions asking at once; 0: none (default: 8)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="their asks after the first")
    args = parser.parse_args(argv)
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
