"""Fixtures for the real vLLM engine on tiny models built offline.

Engine start-up takes 15-60 s here, so one engine serves all tests of this
package per model family. The fixture is package-scoped and parametrized by
family: pytest runs the tests grouped by family and finishes one engine before
it starts the next, so at most one engine runs at a time (the machine has two
cores), and none is left running when other packages start their own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest

from streamchat.engine.tiny_model import build_tiny_model
from tests.support.engines import tiny_engine

if TYPE_CHECKING:
    from streamchat.engine.vllm import VllmEngine

ENGINE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
"""Families run through the real engine, one after the other (about 25 s each)."""


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Builds (once per session and family) a tiny model; returns its directory."""
    root = tmp_path_factory.mktemp("tiny-models")

    def build(family: str) -> Path:
        return build_tiny_model(root / family, family=family)

    return build


@pytest.fixture(scope="package", params=ENGINE_FAMILIES)
async def vllm_engine(
    request: pytest.FixtureRequest, tiny_model: Callable[[str], Path]
) -> AsyncIterator[VllmEngine]:
    """A started ``VllmEngine`` on the tiny model of one family.

    On teardown it checks that shutting down left no engine process behind.
    """
    family: str = request.param
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    async with tiny_engine(tiny_model(family), family) as engine:
        started = [
            child
            for child in psutil.Process().children(recursive=True)
            if child.pid not in before and not _is_resource_tracker(child)
        ]
        yield engine
    # Processes exit a moment after shutdown returns: wait for that (bounded), then check.
    _, alive = psutil.wait_procs(started, timeout=30)
    leftover = [child for child in alive if _is_alive(child)]
    assert not leftover, f"engine processes still running after shutdown: {leftover}"


def _is_resource_tracker(process: psutil.Process) -> bool:
    """multiprocessing's helper, which lives as long as our process by design."""
    try:
        return any("resource_tracker" in part for part in process.cmdline())
    except psutil.Error:
        return False


def _is_alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
