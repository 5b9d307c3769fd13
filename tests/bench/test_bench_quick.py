"""The benchmarks' ``--quick`` modes still run and write complete results.

Each benchmark runs as ``python -m bench.<name> --quick`` in a subprocess, as a
person would run it, with its output under ``tmp_path``. Only the shape of the
JSON result and the sign of its figures are checked, never timings: the
figures depend on the machine and its load.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120
ENGINE_TIMEOUT = 600
CACHE_BLOCK = 128
"""vLLM's prefix-cache block on CPU: an ask recomputes the partly filled one before it."""
QUESTION_TOKENS = 64
"""More than a benchmark question takes, with its sentence on the stream and the template."""
"""The engine benchmarks start vLLM (15-60 s, more under load); ``peer`` starts two in turn."""
REMOTE_TIMEOUT = 900
"""``remote`` starts vLLM twice in turn and imports it once more: 5 min seen on a busy box."""


def run_quick(
    name: str,
    out: Path,
    env: dict[str, str] | None = None,
    *,
    timeout: float = TIMEOUT,
    flags: tuple[str, ...] = (),
) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--quick", *flags, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, Any] = json.loads((out / f"{name}.json").read_text())
    assert result["benchmark"] == name
    assert result["quick"] is True
    assert {"date", "cores", "pyav", "ffmpeg_tool"} <= result["machine"].keys()
    return result


def assert_summary(summary: dict[str, Any]) -> None:
    assert summary["n"] >= 1
    assert 0 < summary["min"] <= summary["median"] <= summary["max"]


def assert_percentiles(figures: dict[str, Any]) -> None:
    assert figures["n"] >= 1
    assert 0 < figures["min"] <= figures["p50"] <= figures["p90"] <= figures["max"]


def test_ingest_quick(tmp_path: Path) -> None:
    """Every clip has positive throughput in every streamchat mode, and ratios when ffmpeg ran."""
    result = run_quick("ingest", tmp_path)
    has_ffmpeg = shutil.which("ffmpeg") is not None
    assert result["ffmpeg"]["available"] is has_ffmpeg
    assert {c["clip"]["codec"] for c in result["clips"]} == {"h264", "vp8", "vp9"}
    for clip in result["clips"]:
        for mode in ("feed", "feed-keyframes", "push", "url"):
            figures = clip["modes"][mode]
            assert figures["available"] is True
            for key in ("seconds", "fps", "realtime"):
                assert_summary(figures[key])
            ratio = clip["ratio_vs_ffmpeg"][mode]
            if has_ffmpeg:
                assert_summary(ratio)
            else:
                assert ratio is None
        assert clip["modes"]["ffmpeg"]["available"] is has_ffmpeg


def test_ingest_quick_without_ffmpeg(tmp_path: Path) -> None:
    """With no ffmpeg on the PATH the run still completes and says the reference is missing."""
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    result = run_quick("ingest", tmp_path, env=env)
    assert result["ffmpeg"] == {"available": False, "version": None}
    for clip in result["clips"]:
        assert clip["modes"]["ffmpeg"] == {"available": False}
        assert clip["ratio_vs_ffmpeg"]["feed"] is None
        assert_summary(clip["modes"]["feed"]["fps"])


def test_memory_quick(tmp_path: Path) -> None:
    """The long-stream run reports RSS at the window fill and at the end, and decoded video."""
    result = run_quick("memory", tmp_path)
    (run,) = result["runs"]
    assert run["video_seconds"] > 0 and run["frames_decoded"] > 0
    for key in ("rss_baseline_mib", "rss_window_full_mib", "rss_end_mib", "realtime"):
        assert run[key] > 0
        assert_summary(result["summary"][key])
    assert "growth_mib" in run and "slope_mib_per_video_hour" in run
    assert len(run["samples"]) >= 2


def test_spread_quick(tmp_path: Path) -> None:
    """Each way of decoding a spread keeps the frames asked for and times itself against vLLM's."""
    result = run_quick("spread", tmp_path)
    (row,) = result["clips"]
    assert set(row["seconds"]) == {"streamchat", "streamchat-all", "vllm"}
    for mode in ("streamchat", "streamchat-all"):
        assert row["frames_kept"][mode] == row["frames_kept"]["vllm"] == result["frames"]
        assert_summary(row["over_vllm"][mode])
    assert 0 < row["frames_decoded"]["streamchat"] <= row["frames_decoded"]["streamchat-all"]


def test_concurrency_quick(tmp_path: Path) -> None:
    """The search measures each step's lag, CPU and RSS and reports the largest N held."""
    result = run_quick("concurrency", tmp_path)
    (search,) = result["searches"]
    assert [s["sessions"] for s in search["steps"]] == [1, 2]  # the quick limit is 2
    for step in search["steps"]:
        assert step["server_cpu_cores"] > 0 and step["rss_peak_mib"] > 0
        assert step["frames_per_session"]["median"] > 0
    assert 0 <= result["max_sessions_held"]["median"] <= 2


@pytest.mark.engine
def test_latency_quick(tmp_path: Path) -> None:
    """Every series reports first and later asks; the streamchat ones are paired with direct."""
    result = run_quick("latency", tmp_path, timeout=ENGINE_TIMEOUT)
    paired = ("adapter", "adapter-vllm-hash", "ws", "ws+history")
    assert set(result["series"]) == {"direct", *paired}
    for entry in result["series"].values():
        for label in ("first", "later"):
            assert_percentiles(entry[label]["ttft"])
            assert_percentiles(entry[label]["total"])
    pairs = {f"{series}/{ask}" for series in paired for ask in ("first", "later")}
    assert set(result["vs_direct"]) == pairs
    for pair in result["vs_direct"].values():
        assert pair["ttft_ratio"]["min"] > 0
    assert_percentiles(result["content_ids_later"]["ttft_ratio"])
    # All but ws+history (which replays history) ask the direct prompt, token for token.
    for series in ("adapter", "adapter-vllm-hash", "ws"):
        assert result["vs_direct"][f"{series}/first"]["same_prompt_tokens"] is True
        assert result["vs_direct"][f"{series}/later"]["same_prompt_tokens"] is True
    assert len(result["asks"]) == result["windows"] * result["asks_per_window"] * len(
        paired + ("direct",)
    )


@pytest.mark.engine
def test_peer_quick(tmp_path: Path) -> None:
    """All three sides answer about the same clip; ratios over vLLM are computed per length.

    The door (``streamchat-openai``) and vLLM get the same requests: a first, the identical one
    repeated, another question; their usage says how many prompt and video tokens each took.
    """
    result = run_quick("peer", tmp_path, timeout=ENGINE_TIMEOUT)
    ((length, entry),) = result["by_length"].items()
    for side in ("streamchat", "streamchat-openai", "vllm"):
        for key in ("ttft", "total", "ttft_second", "total_second", "prompt_tokens"):
            assert_summary(entry[side][key])
    for side in ("streamchat", "streamchat-openai", "vllm"):
        assert_summary(entry[side]["video_tokens"])
    for side in ("streamchat-openai", "vllm"):
        for key in ("ttft_repeated", "total_repeated"):
            assert_summary(entry[side][key])
    assert_summary(entry["streamchat"]["decode_seconds"])
    assert set(entry["streamchat_over_vllm"]) == {
        "ttft",
        "total",
        "ttft_second",
        "total_second",
        "push_to_first_token_vs_ttft",
    }
    assert set(entry["openai_over_vllm"]) == {
        "ttft",
        "total",
        "ttft_repeated",
        "total_repeated",
        "ttft_second",
        "total_second",
    }
    for name in ("streamchat_over_vllm", "openai_over_vllm"):
        for ratio in entry[name].values():
            assert_summary(ratio)
    (run,) = result["runs"]
    assert run["streamchat"]["frames_in_window"] > 0
    assert [a["ask"] for a in run["streamchat"]["asks"]] == ["first", "second"]
    for side in ("streamchat-openai", "vllm"):
        asks = run[side]["asks"]
        assert [a["ask"] for a in asks] == ["first", "repeated", "second"]
        first, repeated, _ = asks
        # The same request twice: the same prompt, the same video tokens.
        assert repeated["prompt_tokens"] == first["prompt_tokens"]
        assert 0 < first["video_tokens"] < first["prompt_tokens"]
        assert repeated["video_tokens"] == first["video_tokens"]
    # The request pins frames and size: every side gives the model the same video tokens.
    sides = ("streamchat", "streamchat-openai", "vllm")
    tokens = {side: run[side]["asks"][0]["video_tokens"] for side in sides}
    assert len(set(tokens.values())) == 1, tokens
    for side in sides:
        for ask in run[side]["asks"]:
            assert ask["completion_tokens"] > 0 or ask["finish_reason"] == "stop"
    flags = result["engine_flags"]
    assert flags[flags.index("--max-model-len") + 1] == str(result["max_model_len"])


@pytest.mark.engine
def test_timeline_quick(tmp_path: Path) -> None:
    """Every ask series is measured against the cold ask, and the timeline's asks hit the cache.

    The steady asks never rebase on their path, the slack's end rebases ahead with a warm-up,
    and the stream's jump at the slack's edge rebases on the ask's path; asks whose new frames
    were computed ahead compute less than the steady ones.
    """
    result = run_quick("timeline", tmp_path, timeout=ENGINE_TIMEOUT)
    entry = result["families"]["qwen2_vl"]
    series = entry["series"]
    measured = ("cold", "window", "timeline", "rebase_warmed", "rebase_on_path", "yes_no")
    for name in (*measured, "prefilled", "prefilled_yes_no"):
        assert_summary(series[name]["ttft"])
        assert_summary(series[name]["over_cold"])
    assert series["cold"]["cached_tokens"]["max"] == 0
    for name in ("timeline", "rebase_warmed", "yes_no", "prefilled", "prefilled_yes_no"):
        # Everything before the new segments and the question came from the prefix cache.
        assert series[name]["cached_tokens"]["min"] > series[name]["computed_tokens"]["max"]
    rebases = entry["rebases"]
    assert rebases["steady_asks"] > 0 and rebases["steady_on_path"] == 0
    assert rebases["ahead"] >= 1 and rebases["warmup_seconds"] is not None
    assert rebases["jump_on_path"] == rebases["jumps"] == 1
    # Frames computed ahead leave an ask its question and at most the partly filled block.
    for name in ("prefilled", "prefilled_yes_no"):
        assert series[name]["computed_tokens"]["max"] <= CACHE_BLOCK + QUESTION_TOKENS
    assert entry["prefills"]["n"] >= 1
    for kind in ("timeline", "prefilled", "window"):
        assert_summary(entry["together"][kind])


@pytest.mark.engine
def test_timeline_peer_quick(tmp_path: Path) -> None:
    """``--peer`` asks the same streams of the timeline and of ``vllm serve`` (one video per ask).

    Both sides answer every session in both rounds, and compute their whole cold prompts;
    after 2 s of new video the timeline's prefix cache holds most of its prompt, while
    vLLM's server, given a new video, reuses less than that.
    """
    # Two engines one after the other: 5 min under a load of 4.
    result = run_quick("timeline", tmp_path, timeout=2 * ENGINE_TIMEOUT, flags=("--peer",))
    assert result["families"] == {}
    ((family, entry),) = result["peer"].items()
    assert family == "qwen3_vl" and entry["sessions"] == 2 and entry["rounds_after_2s"] == 1
    sides = entry["sides"]
    assert set(sides) == {"timeline", "prefilled", "vllm_serve"}
    for side in sides.values():
        assert set(side) == {"cold", "after_2s"}
        for figures in side.values():
            assert figures["ttft"]["n"] == 2
            assert_summary(figures["ttft"])
            assert 0 < figures["ttft"]["max"] <= figures["total"]["max"]
            assert figures["prompt_tokens"]["min"] > 0
    timeline, served = sides["timeline"], sides["vllm_serve"]
    assert all(side["cold"]["cached_tokens"]["max"] == 0 for side in sides.values())
    after = timeline["after_2s"]
    assert after["cached_tokens"]["min"] > after["prompt_tokens"]["max"] / 2
    assert served["after_2s"]["cached_tokens"]["max"] < after["cached_tokens"]["min"]

    def computed(side: str) -> int:
        """The most tokens an ask after 2 s of new video computed on ``side``."""
        asks = [a for a in entry["asks"][side] if a["repetition"] > 0]  # rounds after the first
        return max(a["prompt_tokens"] - a["cached_tokens"] for a in asks)

    # The new segments came ahead: its question and at most the partly filled block before it.
    assert computed("prefilled") <= CACHE_BLOCK + QUESTION_TOKENS
    assert set(entry["over_vllm_serve"]) == {"timeline", "prefilled"}
    for ratios in entry["over_vllm_serve"].values():
        assert set(ratios) == {"cold", "after_2s"} and all(r > 0 for r in ratios.values())
    assert [len(asks) for asks in entry["asks"].values()] == [4, 4, 4]


@pytest.mark.engine
def test_remote_quick(tmp_path: Path) -> None:
    """The local engine and every remote frame format answer about the same fresh frames.

    Nothing came from a cache, both engines took the same prompt tokens, each format's
    ratio over local is computed, and PPM reaches vLLM bit-exact while JPEG does not.
    """
    result = run_quick("remote", tmp_path, timeout=REMOTE_TIMEOUT)
    formats = result["formats"]
    assert formats[0] == "ppm" and len(formats) >= 2
    ((window, entry),) = result["windows"].items()
    for side in ("local", *formats):
        for key in ("ttft", "total", "prompt_tokens", "video_tokens"):
            assert_summary(entry[side][key])
        assert entry[side]["cached_tokens_max"] == 0
    for frame_format in formats:
        figures = entry[frame_format]
        assert_summary(figures["ttft_over_local"])
        assert_summary(figures["total_over_local"])
        assert figures["same_prompt_tokens"] is True
        assert 0 <= figures["same_answer"] <= figures["ttft"]["n"]
        cost = result["encoding"][window][frame_format]
        assert_summary(cost["encode_ms"])
        assert cost["url_bytes"] > 0
    # A PPM URL is raw RGB in base64; JPEG's is smaller.
    sizes = {f: result["encoding"][window][f]["url_bytes"] for f in formats}
    assert all(sizes[f] < sizes["ppm"] for f in formats[1:])
    for content, rows in result["quality"].items():
        assert rows["ppm"]["mae"] == rows["ppm"]["max_error"] == 0, content
        assert rows["ppm"]["exact_pixels"] == 1.0
        for frame_format, row in rows.items():
            assert row["encode_ms_per_frame"] > 0 and row["decode_ms_per_frame"] > 0
            if frame_format != "ppm":
                assert 0 < row["mae"] <= row["max_error"], (content, frame_format)
    assert len(result["asks"]) == len(formats) + 1
