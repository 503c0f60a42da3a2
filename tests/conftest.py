"""Shared fixtures. Environment set here, before any test imports litellm or tiktoken."""

from __future__ import annotations

import os

# LiteLLM fetches its price map from the internet at import unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
