"""Every test runs offline: no model hub is reachable here, and none may be asked.

Set before any test module imports huggingface_hub (which reads these once, at
import), so vLLM and transformers only ever load the locally built tiny model.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
