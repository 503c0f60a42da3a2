"""Every priced model of LiteLLM's map costs what LiteLLM's own calculator says, to 1e-9.

The sweep prices each chat, completion and embedding model of the installed litellm's map
(and of llmtally's bundled snapshot) with three usages, at a peak and an off-peak moment,
named two ways: as the map's key with the entry's provider, and split the way LiteLLM
splits it for a call (``get_llm_provider``). Each must equal ``litellm.cost_per_token`` or
sit on ``INTENDED``, the short list of differences we mean, each with its reason.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from importlib.metadata import version
from typing import Any

import pytest

from llmtally._pricing.book import PriceBook
from llmtally._pricing.names import canonical_provider
from llmtally._pricing.price_map import _bundled_path, slim_entry

litellm = pytest.importorskip("litellm")
from litellm._internal_context import pinned_billing_time  # noqa: E402
from litellm.types.utils import Usage  # noqa: E402

# input, output, cache read, cache write, reasoning (ledger convention: input includes cache)
USAGES = ((1234, 567, 0, 0, 0), (50_000, 3000, 30_000, 2000, 1000), (250_000, 1000, 0, 0, 0))
PEAK = datetime(2026, 12, 2, 3, 0, tzinfo=timezone.utc)  # a Wednesday, outside DeepSeek's discount
OFF_PEAK = datetime(2026, 12, 2, 5, 0, tzinfo=timezone.utc)  # inside 04:00-06:00 UTC

# Differences we mean: (reason and the published price followed, which map keys it covers).
INTENDED: tuple[tuple[str, Any], ...] = (
    ("TwelveLabs on Bedrock prices its input per query, image or second of video, which a "
     "token count cannot say; LiteLLM's token calculator charges that input $0 (a Marengo "
     "embedding is $0.00007 a query or more, AWS Bedrock pricing). llmtally records the call "
     "unpriced rather than free or undercharged.",
     lambda key, entry: "twelvelabs." in key),
    ("LiteLLM routes these names to a provider its own entries do not name ('ai21_chat' for "
     "'ai21' entries, 'azure' for 'azure_text' ones), so its calculator refuses its own price; "
     "llmtally treats them as one provider and charges the map's (AI21's, Azure's) price.",
     lambda key, entry: entry.get("litellm_provider") in ("ai21", "azure_text")),
)


def _intended(key: str) -> str | None:
    entry = litellm.model_cost.get(key) or {}
    return next((why for why, covers in INTENDED if covers(key, entry)), None)


def _usage(tokens: tuple[int, ...], mode: str) -> Usage:
    inp, out, read, write, reason = tokens
    fields: dict[str, Any] = {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out}
    if mode != "embedding":
        if read or write:
            fields["prompt_tokens_details"] = {"cached_tokens": read, "cache_creation_tokens": write}
            fields["cache_read_input_tokens"] = read
            fields["cache_creation_input_tokens"] = write
        if reason:
            fields["completion_tokens_details"] = {"reasoning_tokens": reason}
    return Usage(**fields)


def _theirs(model: str, provider: str | None, tokens: tuple[int, ...], mode: str) -> float | None:
    try:
        prompt, completion = litellm.cost_per_token(
            model=model, custom_llm_provider=provider, usage_object=_usage(tokens, mode),
            call_type="embedding" if mode == "embedding" else "completion")
    except Exception:  # LiteLLM refuses the name: no price
        return None
    return prompt + completion


def _split(key: str, provider: str) -> tuple[str, str]:
    try:
        model, found, _, _ = litellm.get_llm_provider(model=key)
        return model, found
    except Exception:
        return key, provider


def _priced_models(entries: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    out = []
    for key, entry in entries.items():
        if not isinstance(entry, dict) or entry.get("mode") not in ("chat", "completion", "embedding"):
            continue
        if entry.get("input_cost_per_token") is None and entry.get("output_cost_per_token") is None:
            continue
        out.append((key, entry.get("litellm_provider") or "", entry["mode"], "off_peak_pricing" in entry))
    return out


def _sweep(book: PriceBook, models: list[tuple[str, str, str, bool]]) -> dict[str, str]:
    """Key -> the first difference found; empty when every model agrees."""
    differences: dict[str, str] = {}
    for key, provider, mode, off_peak in models:
        names = ((key, provider), _split(key, provider))
        for moment in (PEAK, OFF_PEAK) if off_peak else (PEAK,):
            with pinned_billing_time(moment):
                for tokens in USAGES:
                    if mode == "embedding":  # an embedding reads no cache and does not reason
                        tokens = (*tokens[:2], 0, 0, 0)
                    for model, route in names:
                        theirs = _theirs(model, route, tokens, mode)
                        ours = book.cost(model=model, provider=route, at=moment, input_tokens=tokens[0],
                                         output_tokens=tokens[1], cache_read_tokens=tokens[2],
                                         cache_write_tokens=tokens[3], reasoning_tokens=tokens[4]).cost
                        same = (ours is None and theirs is None) or (
                            ours is not None and theirs is not None and abs(ours - theirs) <= 1e-9)
                        if not same and key not in differences:
                            differences[key] = (f"{model!r} via {route!r}, {tokens} at {moment:%H:%M}: "
                                                f"llmtally {ours}, litellm {theirs}")
    return differences


@pytest.fixture(autouse=True)
def _quiet_litellm() -> Any:
    logger = logging.getLogger("LiteLLM")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


def test_every_model_of_the_installed_map_costs_what_litellm_says() -> None:
    models = _priced_models(litellm.model_cost)
    assert len(models) > 3000
    differences = _sweep(PriceBook(price_map="litellm"), models)
    unexplained = {key: why for key, why in differences.items() if _intended(key) is None}
    assert unexplained == {}, f"{len(unexplained)} of {len(models)} models differ"
    used = {_intended(key) for key in differences}
    assert [why for why, _ in INTENDED if why not in used] == [], "an INTENDED rule no longer applies"
    assert len(differences) <= 0.01 * len(models)  # a short list: at most 1 % of the models


def test_every_model_of_the_bundled_snapshot_costs_what_litellm_says() -> None:
    """The bundled snapshot prices every model it shares with the installed map exactly as that
    map does (which the sweep above holds to LiteLLM's calculator): all of them when the
    snapshot was made from the installed litellm."""
    snapshot = json.loads(_bundled_path().read_text(encoding="utf-8"))
    same = {key for key, entry in snapshot["models"].items()
            if slim_entry(litellm.model_cost.get(key)) == entry}
    if snapshot["litellm_version"] == version("litellm"):
        assert len(same) == len(snapshot["models"])
    assert len(same) >= 0.9 * len(snapshot["models"])
    bundled, installed = PriceBook(price_map="bundled"), PriceBook(price_map="litellm")
    differing = []
    for key, provider, mode, off_peak in _priced_models({key: litellm.model_cost[key] for key in same}):
        for moment in (PEAK, OFF_PEAK):
            for tokens in USAGES:
                ours, theirs = (book.cost(model=key, provider=provider, at=moment, input_tokens=tokens[0],
                                          output_tokens=tokens[1], cache_read_tokens=tokens[2],
                                          cache_write_tokens=tokens[3], reasoning_tokens=tokens[4]).cost
                                for book in (bundled, installed))
                if ours != theirs:
                    differing.append((key, tokens, ours, theirs))
    assert differing == []


def test_one_name_per_provider() -> None:
    """Every provider name of the map stores as one name per vendor."""
    raw = {entry.get("litellm_provider") for entry in litellm.model_cost.values()
           if isinstance(entry, dict) and isinstance(entry.get("litellm_provider"), str)}
    assert {canonical_provider(name) for name in raw if name.startswith("vertex_ai")} == {"vertex_ai"}
    assert {canonical_provider(name) for name in raw if name.startswith("bedrock")} == {"bedrock"}
    assert {canonical_provider(name) for name in raw if name.startswith("fireworks_ai")} == {"fireworks_ai"}
    assert canonical_provider("text-completion-openai") == "openai"
    assert canonical_provider("scx-ai") == "scx-ai"  # a provider whose name has a dash keeps it
