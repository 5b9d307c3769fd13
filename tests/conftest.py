"""Every test runs offline: no model hub is reachable here, and none may be asked.

Also the fixtures every layer shares: the media corpus the ``ffmpeg`` tool writes
the way cameras and phones do (``tests/support/ffmpeg.py``).

Set before any test module imports huggingface_hub (which reads these once, at
import), so vLLM and transformers only ever load the locally built tiny model.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402

from tests.support.ffmpeg import Corpus  # noqa: E402


@pytest.fixture(scope="session")
def ffmpeg_corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """Files written by the ``ffmpeg`` command, each on first use, once per test session.

    Raises (the test fails, it is not skipped) when ``ffmpeg`` is not installed.
    """
    return Corpus(tmp_path_factory.mktemp("ffmpeg-corpus"))
