"""Integrations with LLM frameworks. Each is imported on demand, never by ``import llmtally``:
``tally.litellm()`` loads :mod:`llmtally.integrations.litellm` (and litellm itself)."""
