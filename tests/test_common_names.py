"""The names users pass most resolve as LiteLLM resolves them (the table in docs/prices.md)."""

from __future__ import annotations

import json
import logging
from importlib.metadata import version
from importlib.resources import files

import pytest

from llmtally._pricing.book import PriceBook
from llmtally._pricing.names import canonical_provider

litellm = pytest.importorskip("litellm")

# 40 names as users write them in litellm.completion(model=...), across the providers our users
# run: OpenAI, Azure, Anthropic, Bedrock ids and inference profiles, Vertex, Gemini, DeepSeek,
# Qwen/DashScope, Moonshot, Mistral, Groq, xAI, OpenRouter, Together, Fireworks, Ollama.
COMMON_NAMES = (
    "gpt-4o-mini", "gpt-4o", "gpt-4.1", "o3-mini", "text-embedding-3-small",
    "azure/gpt-4o-mini", "azure/gpt-4o",
    "claude-sonnet-4-5", "claude-haiku-4-5", "anthropic/claude-opus-4-5",
    "bedrock/anthropic.claude-3-5-sonnet-20240620-v1:0",
    "bedrock/us.anthropic.claude-3-5-sonnet-20241022-v2:0",
    "anthropic.claude-haiku-4-5-20251001-v1:0", "bedrock/amazon.nova-pro-v1:0",
    "bedrock/meta.llama3-1-70b-instruct-v1:0",
    "vertex_ai/gemini-2.5-pro", "vertex_ai/claude-sonnet-4-5@20250929",
    "gemini/gemini-2.5-flash", "gemini-2.5-pro",
    "deepseek/deepseek-chat", "deepseek/deepseek-reasoner", "deepseek/deepseek-v4-flash",
    "dashscope/qwen-plus", "dashscope/qwen-max", "dashscope/qwen-turbo",
    "moonshot/kimi-k2-0905-preview", "moonshot/moonshot-v1-8k",
    "mistral/mistral-large-latest", "mistral/mistral-small-latest",
    "groq/llama-3.3-70b-versatile", "groq/llama-3.1-8b-instant",
    "xai/grok-3", "xai/grok-4",
    "openrouter/openai/gpt-4o", "openrouter/anthropic/claude-3.5-sonnet",
    "together_ai/meta-llama/Llama-3.3-70B-Instruct-Turbo",
    "fireworks_ai/accounts/fireworks/models/llama-v3p1-70b-instruct",
    "fireworks_ai/accounts/fireworks/models/deepseek-v3",
    "ollama/llama3.1", "ollama/llama2",
)


# Where we differ on purpose.
EXPLAINED = {
    "openrouter/openai/gpt-4o": "LiteLLM's map has no OpenRouter entries, so its calculator "
    "charges nothing; OpenRouter bills the provider's own token price, which llmtally charges "
    "from OpenAI's entry (a provider the map does not know takes the model's own entry).",
}


def litellm_view(name: str) -> tuple[str, str, float | None]:
    """(provider, model) as LiteLLM routes ``name``, and what its calculator charges for 1M in + 1M out."""
    model, provider, _, _ = litellm.get_llm_provider(model=name)
    try:
        prompt, completion = litellm.cost_per_token(model=name, prompt_tokens=1_000_000,
                                                    completion_tokens=1_000_000)
        cost: float | None = prompt + completion
    except Exception:
        cost = None
    return provider, model, cost


@pytest.fixture(scope="module")
def book() -> PriceBook:
    logging.getLogger("LiteLLM").setLevel(logging.CRITICAL)
    return PriceBook(price_map="litellm")


def test_forty_names() -> None:
    assert len(set(COMMON_NAMES)) == 40


def test_the_saved_provider_names_are_litellms() -> None:
    """A model name led by any provider LiteLLM routes by is read as that provider's."""
    saved = json.loads((files("llmtally") / "data" / "providers.json").read_text(encoding="utf-8"))
    installed = {str(getattr(p, "value", p)).lower() for p in litellm.provider_list}
    if saved["litellm_version"] == version("litellm"):
        assert set(saved["providers"]) == installed
    assert len(installed - set(saved["providers"])) <= 0.1 * len(installed)


@pytest.mark.parametrize("name", COMMON_NAMES)
def test_a_common_name_resolves_as_litellm_does(book: PriceBook, name: str) -> None:
    provider, model, theirs = litellm_view(name)
    found = book.resolve(name)
    assert (found.provider, found.model) == (canonical_provider(provider), model)
    ours = book.cost(model=name, input_tokens=1_000_000, output_tokens=1_000_000).cost
    if name in EXPLAINED:
        assert ours is not None and theirs is None
    elif theirs is None or ours is None:
        assert ours == theirs
    else:
        assert ours == pytest.approx(theirs, abs=1e-9)
