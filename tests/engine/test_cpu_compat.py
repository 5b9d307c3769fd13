"""The CPU-install workaround makes torchvision importable here and in child processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from streamchat.engine import cpu_compat


def test_install_is_idempotent() -> None:
    """A second call changes nothing and reports the same state."""
    assert cpu_compat.install() == cpu_compat.install()


def test_torchvision_and_transformers_import_in_this_process() -> None:
    """With the workaround installed, the imports vLLM needs succeed."""
    cpu_compat.install()
    import torchvision  # noqa: F401
    from transformers import Qwen2VLVideoProcessor  # noqa: F401


def test_child_python_processes_get_the_workaround() -> None:
    """A fresh interpreter started from here (as vLLM's are) imports torchvision too."""
    if not cpu_compat.install():
        pytest.skip("this install needs no workaround")
    assert str(cpu_compat.SITE_DIR) in os.environ["PYTHONPATH"].split(os.pathsep)
    code = (
        "import sys, torchvision, transformers.audio_utils\n"
        "print(sys.modules.get('torchaudio', 'absent'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in {"None", "absent"}
