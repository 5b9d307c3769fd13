"""Start-up hook of Python processes started by a streamchat process.

:mod:`streamchat.engine.cpu_compat` puts this directory on ``PYTHONPATH`` only
when its workaround is active, so that vLLM's engine, worker and helper
processes apply it too (read that module for why). This file loads
``cpu_compat.py`` by path (the child may not have streamchat on its
``sys.path`` yet) and then runs any ``sitecustomize`` it shadows.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _load_cpu_compat() -> None:
    name = "streamchat.engine.cpu_compat"
    module = sys.modules.get(name)
    if module is None:
        here = os.path.dirname(os.path.abspath(__file__))
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(os.path.dirname(here), "cpu_compat.py")
        )
        if spec is None or spec.loader is None:
            return
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    module.install_lazily()


def _run_shadowed_sitecustomize() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


_load_cpu_compat()
_run_shadowed_sitecustomize()
