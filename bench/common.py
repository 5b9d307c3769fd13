"""What every benchmark shares: arguments, statistics, the table, the JSON result, the machine.

Figures are summarised as median with min and max rather than mean and
deviation: on a shared machine the distribution has a long tail (another
job's burst), and the median is what survives it. Every result carries a
description of the machine and its load average when the run started (other
jobs) and ended (the benchmark's own included), so a figure is never read
without its context.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_OUT",
    "Summary",
    "base_parser",
    "ffmpeg_version",
    "machine",
    "percentiles",
    "print_table",
    "summarise",
    "write_result",
]

DEFAULT_OUT = Path("artifacts/bench")

_LOAD_AT_START = os.getloadavg()
"""Taken when a benchmark starts (imports this module): other jobs' load, not ours."""


@dataclass(frozen=True, slots=True)
class Summary:
    """Median, min and max of repeated measurements of one figure."""

    median: float
    min: float
    max: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return {"median": self.median, "min": self.min, "max": self.max, "n": self.n}

    def text(self, digits: int = 1) -> str:
        if self.n == 1:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} ({self.min:.{digits}f}-{self.max:.{digits}f})"


def summarise(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("nothing to summarise")
    return Summary(statistics.median(values), min(values), max(values), len(values))


def percentiles(values: Sequence[float]) -> dict[str, float | int]:
    """p50, p90, min and max (nearest-rank p90: a value that occurred)."""
    if not values:
        raise ValueError("nothing to summarise")
    ordered = sorted(values)
    rank = max(0, math.ceil(0.9 * len(ordered)) - 1)
    return {
        "p50": statistics.median(ordered),
        "p90": ordered[rank],
        "min": ordered[0],
        "max": ordered[-1],
        "n": len(ordered),
    }


def base_parser(description: str, *, repeat: int | None) -> argparse.ArgumentParser:
    """The flags every benchmark takes: ``--quick``, ``--out``, and ``--repeat`` unless
    ``repeat`` is None (a benchmark that repeats in its own units)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="only check that the benchmark runs: tiny inputs, one repetition",
    )
    if repeat is not None:
        parser.add_argument(
            "--repeat", type=int, default=repeat, help="repetitions (default: %(default)s)"
        )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="directory for the JSON result and generated media (default: %(default)s)",
    )
    return parser


def lengths_parser(description: str, lengths: Sequence[float]) -> argparse.ArgumentParser:
    """:func:`base_parser` (3 repetitions) with ``--lengths``: the clip lengths in seconds."""
    parser = base_parser(description, repeat=3)
    parser.add_argument(
        "--lengths",
        nargs="+",
        type=float,
        default=list(lengths),
        help="clip lengths in seconds (default: %(default)s)",
    )
    return parser


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A plain-text table, columns padded to fit: readable in a terminal and a CI log."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    sys.stdout.flush()


def write_result(out: Path, name: str, result: dict[str, Any]) -> Path:
    """Write ``result`` (with the machine description) to ``out/<name>.json``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), **result}
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    print(f"wrote {path}")
    return path


def ffmpeg_version() -> str | None:
    """The first line of ``ffmpeg -version``, or ``None`` when the tool is missing."""
    tool = shutil.which("ffmpeg")
    if tool is None:
        return None
    try:
        done = subprocess.run(
            [tool, "-hide_banner", "-version"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.splitlines()[0] if done.stdout else None


def machine() -> dict[str, Any]:
    """Where and when the figures were taken: CPU, cores, memory, load, library versions."""
    import av
    import psutil  # type: ignore[import-untyped]  # no stubs in the test extras

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in _LOAD_AT_START],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "pyav": av.__version__,
        "pyav_ffmpeg": av.ffmpeg_version_info,
        "ffmpeg_tool": ffmpeg_version(),
    }
