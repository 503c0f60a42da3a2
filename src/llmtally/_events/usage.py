"""Reading token usage out of whatever a provider SDK returned, defensively.

Handles OpenAI (chat completions, legacy completions, embeddings, Responses API), Anthropic
Messages, LiteLLM ``ModelResponse`` and Gemini ``usage_metadata`` shapes, as objects or
dicts. Every count is normalised to the ledger's convention (see ``_model``): input includes
cache reads and writes, output includes reasoning. Nothing here raises for an odd shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = ["Usage", "TOKEN_FIELDS", "extract_usage", "response_model", "response_text",
           "coerce_count", "MAX_TOKEN_COUNT"]

MAX_TOKEN_COUNT = 10**12
"""Larger counts are not real usage (no call is a trillion tokens): they are treated as invalid."""


class Usage(NamedTuple):
    """A call's token counts (input includes cache reads and writes; output, reasoning)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    try:
        return getattr(obj, key, None)
    except Exception:  # properties of odd objects may raise
        return None


TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
                "reasoning_tokens")
"""The token counts of a call, as :class:`Usage` fields and as the ledger's columns."""


def coerce_count(value: Any) -> int | None:
    """A token count as a non-negative int, or None if ``value`` is not a usable count."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        count = value
    elif isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            return None
        count = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit()) or len(text) > 13:
            return None
        count = int(text)
    else:
        return None
    return count if 0 <= count <= MAX_TOKEN_COUNT else None


def _count(obj: Any, *keys: str) -> int:
    for key in keys:
        value = coerce_count(_get(obj, key))
        if value is not None:
            return value
    return 0


def extract_usage(response: Any) -> Usage | None:
    """The usage a response reports, normalised; None when it reports none."""
    try:
        usage = _get(response, "usage")
        if usage is None:
            usage = _get(response, "usage_metadata")
        if usage is None:
            return None
        return _normalise(usage)
    except Exception:
        return None


def _normalise(usage: Any) -> Usage | None:
    if _get(usage, "prompt_tokens") is not None:  # OpenAI chat/completions/embeddings, LiteLLM
        prompt_details = _get(usage, "prompt_tokens_details")
        output_details = _get(usage, "completion_tokens_details")
        return _consistent(
            input_tokens=_count(usage, "prompt_tokens"),
            output_tokens=_count(usage, "completion_tokens"),
            cache_read=_count(prompt_details, "cached_tokens")
            or _count(usage, "cache_read_input_tokens", "prompt_cache_hit_tokens"),
            cache_write=_count(prompt_details, "cache_creation_tokens")
            or _count(usage, "cache_creation_input_tokens"),
            reasoning=_count(output_details, "reasoning_tokens"),
        )
    if _get(usage, "prompt_token_count") is not None:  # Gemini: thoughts are outside candidates
        thoughts = _count(usage, "thoughts_token_count")
        return _consistent(
            input_tokens=_count(usage, "prompt_token_count"),
            output_tokens=_count(usage, "candidates_token_count") + thoughts,
            cache_read=_count(usage, "cached_content_token_count"),
            cache_write=0,
            reasoning=thoughts,
        )
    if _get(usage, "input_tokens") is None:
        return None
    if _get(usage, "cache_read_input_tokens") is not None or \
            _get(usage, "cache_creation_input_tokens") is not None:
        # Anthropic Messages: input_tokens excludes the cached parts; add them back in.
        cache_read = _count(usage, "cache_read_input_tokens")
        cache_write = _count(usage, "cache_creation_input_tokens")
        return _consistent(
            input_tokens=_count(usage, "input_tokens") + cache_read + cache_write,
            output_tokens=_count(usage, "output_tokens"),
            cache_read=cache_read,
            cache_write=cache_write,
            reasoning=0,
        )
    # OpenAI Responses API and LangChain usage_metadata: input includes cache, output reasoning.
    input_details = _get(usage, "input_tokens_details") or _get(usage, "input_token_details")
    output_details = _get(usage, "output_tokens_details") or _get(usage, "output_token_details")
    return _consistent(
        input_tokens=_count(usage, "input_tokens"),
        output_tokens=_count(usage, "output_tokens"),
        cache_read=_count(input_details, "cached_tokens", "cache_read"),
        cache_write=_count(input_details, "cache_creation"),
        reasoning=_count(output_details, "reasoning_tokens", "reasoning"),
    )


def _consistent(*, input_tokens: int, output_tokens: int, cache_read: int, cache_write: int,
                reasoning: int) -> Usage:
    """Parts never exceed their whole: a total smaller than its parts is raised to their sum."""
    return Usage(
        input_tokens=max(input_tokens, cache_read + cache_write),
        output_tokens=max(output_tokens, reasoning),
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        reasoning_tokens=reasoning,
    )


def response_model(response: Any) -> str | None:
    """The model name the provider answered with, if the response carries one."""
    try:
        model = _get(response, "model") or _get(_get(response, "response_metadata"), "model_name")
        return str(model) if model else None
    except Exception:
        return None


def response_text(response: Any) -> str:
    """The generated text, for counting output tokens when a response reports no usage."""
    try:
        choices = _get(response, "choices")
        if choices:
            parts = []
            for choice in choices:
                message = _get(choice, "message") or _get(choice, "delta")
                parts.append(str(_get(message, "content") or _get(choice, "text") or ""))
            return "".join(parts)
        content = _get(response, "content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):  # Anthropic content blocks
            return "".join(str(_get(block, "text") or "") for block in content)
        text = _get(response, "output_text") or _get(response, "text")
        return text if isinstance(text, str) else ""
    except Exception:
        return ""
