"""Print what the image installs before the code: pyproject's dependencies and the extras named.

The images install dependencies in a layer of their own, before the code is copied, so a
rebuild after a code change reuses that layer (minutes of vLLM and torch). pip cannot install
only a project's dependencies, so this reads them from pyproject.toml (Python 3.11's tomllib,
no third-party import), one requirement a line, with the build backend the code install needs.
Run it where pyproject.toml is:

    python3 requirements.py cpu   # the CPU image: streamchat's deps, vLLM for CPUs, torch
    python3 requirements.py       # the GPU image: streamchat's deps only (vLLM is the base's)
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    project = data["project"]
    lines = list(data["build-system"]["requires"]) + list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return lines


if __name__ == "__main__":
    print("\n".join(requirements(Path("pyproject.toml"), sys.argv[1:])))
