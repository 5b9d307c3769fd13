"""``python -m streamchat_client``: the same as the ``streamchat-client`` command."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
