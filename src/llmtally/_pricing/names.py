"""One name per provider and per model: LiteLLM's provider spellings folded, routes split off model names."""

from __future__ import annotations

import functools
import re

__all__ = ["canonical_provider", "ledger_names", "split_route"]

# Provider names people and frameworks use (LangChain's ls_provider, SDK names, vendors)
# mapped to LiteLLM's provider names, which are what the price map's keys are prefixed with.
_PROVIDER_ALIASES = {
    "google": "gemini",
    "google_genai": "gemini",
    "google-genai": "gemini",
    "google_ai": "gemini",
    "google_ai_studio": "gemini",
    "googleai": "gemini",
    "google_vertexai": "vertex_ai",
    "google-vertexai": "vertex_ai",
    "google_vertex_ai": "vertex_ai",
    "google_anthropic_vertex": "vertex_ai",
    "vertexai": "vertex_ai",
    "vertex": "vertex_ai",
    "vertex_ai_beta": "vertex_ai",
    "aws": "bedrock",
    "amazon": "bedrock",
    "amazon_bedrock": "bedrock",
    "aws_bedrock": "bedrock",
    "bedrock_converse": "bedrock",
    "azure_openai": "azure",
    "azure-openai": "azure",
    "azureopenai": "azure",
    "alibaba": "dashscope",
    "alibaba_cloud": "dashscope",
    "aliyun": "dashscope",
    "qwen": "dashscope",
    "tongyi": "dashscope",
    "kimi": "moonshot",
    "moonshotai": "moonshot",
    "moonshot_ai": "moonshot",
    "mistralai": "mistral",
    "mistral_ai": "mistral",
    "together": "together_ai",
    "togetherai": "together_ai",
    "fireworks": "fireworks_ai",
    "fireworksai": "fireworks_ai",
    "ibm": "watsonx",
    "ibm_watsonx": "watsonx",
    "zhipuai": "zai",
    "zhipu": "zai",
    "z_ai": "zai",
    "x-ai": "xai",
    "x_ai": "xai",
    "nvidia": "nvidia_nim",
    "nvidia_ai_endpoints": "nvidia_nim",
    "voyageai": "voyage",
    "doubao": "volcengine",
    "workers_ai": "cloudflare",
    "cloudflare_workers_ai": "cloudflare",
}


# LiteLLM provider names that price the same family of endpoints as another name.
_FAMILY_ALIASES = {
    "bedrock_converse": "bedrock",
    "bedrock_mantle": "bedrock",
    "azure_text": "azure",
    "cohere_chat": "cohere",
    "ai21_chat": "ai21",
    "ollama_chat": "ollama",
    "watsonx_text": "watsonx",
    "sagemaker_chat": "sagemaker",
    "anthropic_text": "anthropic",
}


_ENDPOINT_FAMILY = re.compile(r"^([a-z0-9_]+)-[a-z0-9_-]*models$")  # vertex_ai-language-models


def canonical_provider(provider: str | None) -> str | None:
    """The one name llmtally stores and scopes budgets by for ``provider``; None stays None.

    LiteLLM's routing name of the vendor, lower-cased: SDK and framework names map to it
    (``"google_genai"`` -> ``"gemini"``), and so do the price map's per-endpoint variants
    (``"bedrock_converse"`` -> ``"bedrock"``, ``"vertex_ai-language-models"`` -> ``"vertex_ai"``,
    ``"text-completion-openai"`` -> ``"openai"``). Names LiteLLM does not know are kept as
    given, case included.
    """
    if provider is None:
        return None
    name = str(provider).strip().lower()
    if not name:
        return None
    folded = _PROVIDER_ALIASES.get(name, name).removeprefix("text-completion-")
    family = _ENDPOINT_FAMILY.match(folded)
    if family:
        folded = family.group(1)
    folded = _PROVIDER_ALIASES.get(folded, folded)
    folded = _FAMILY_ALIASES.get(folded, folded)
    if folded == name and name not in litellm_routes():
        return str(provider)  # a provider LiteLLM does not know (your gateway) keeps its spelling
    return folded


def ledger_names(model: str, provider: str | None) -> tuple[str, str | None]:
    """``(model, provider)`` as the ledger stores them, for a call whose provider is known.

    The provider becomes its canonical name and its own route comes off the model name:
    ``("deepseek/deepseek-chat", "deepseek")`` and ``("deepseek-chat", "deepseek")`` are both
    ``("deepseek-chat", "deepseek")``. Another route stays (``"anthropic/claude-x"`` via
    ``"openrouter"`` is OpenRouter's name for it). Needs no price map.
    """
    canonical = canonical_provider(provider)
    if canonical is not None and "/" in model:
        head, _, tail = model.partition("/")
        head = head.strip().lower()
        if tail and (head in (str(provider).strip().lower(), canonical)
                     or (head in litellm_routes() and canonical_provider(head) == canonical)):
            return tail, canonical
    return model, canonical


def split_route(model: str) -> tuple[str, str | None]:
    """``(model, provider)`` for a name that may lead with a provider route LiteLLM routes by
    (``"deepseek/deepseek-chat"`` -> ``("deepseek-chat", "deepseek")``); else ``(model, None)``.
    Needs no price map (budget scopes and migrations use it)."""
    head, sep, tail = model.partition("/")
    if sep and tail and head.strip().lower() in litellm_routes():
        return tail, canonical_provider(head)
    return model, None


@functools.lru_cache(maxsize=1)
def litellm_routes() -> frozenset[str]:
    """LiteLLM's provider names (``litellm.provider_list``, saved by scripts/update_prices.py):
    ``openrouter/...`` routes a name even though the map has no OpenRouter entry."""
    import json
    from importlib.resources import files

    data = json.loads((files("llmtally") / "data" / "providers.json").read_text(encoding="utf-8"))
    return frozenset(data["providers"])
