"""The price engine: hand-computed costs from the bundled map, name resolution, overrides, currencies.

Expected costs are written out from the map's per-token prices (litellm 1.110.2 snapshot).
"""

from __future__ import annotations

import importlib.util
import json
import math
import threading
import time
from pathlib import Path

import pytest
from conftest import fetch_events
from hypothesis import given, settings
from hypothesis import strategies as st

from llmtally._errors import ConfigError
from llmtally._pricing import book as _pricing
from llmtally._pricing import price_map as _price_map
from llmtally._pricing.book import PriceBook
from llmtally._pricing.price import CURRENCIES, Price, PricedCost
from llmtally._pricing.price_map import slim_entry

REPO = Path(__file__).resolve().parent.parent
SNAPSHOT = REPO / "src" / "llmtally" / "data" / "prices.json"


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return PriceBook(price_map="bundled")


def priced(book: PriceBook, model: str, provider: str | None = None, **tokens: int) -> PricedCost:
    result = book.cost(model=model, provider=provider, **tokens)
    assert result.status == "priced", (model, provider, result)
    return result


# --------------------------------------------------------------------------- hand-computed costs


def test_gpt_4o_mini_with_cached_tokens(book: PriceBook) -> None:
    result = priced(book, "gpt-4o-mini", input_tokens=120, cache_read_tokens=100, output_tokens=30)
    # 20 uncached * 1.5e-07 + 100 cached * 7.5e-08 + 30 out * 6e-07
    assert result.cost == pytest.approx(20 * 1.5e-07 + 100 * 7.5e-08 + 30 * 6e-07, abs=1e-12)
    assert result.cost == pytest.approx(2.85e-05, abs=1e-12)
    assert result.currency == "USD"
    assert result.source == "litellm-map:2026-11-25"
    assert (result.model_key, result.provider) == ("gpt-4o-mini", "openai")


def test_anthropic_cache_write_and_read(book: PriceBook) -> None:
    result = priced(
        book,
        "claude-sonnet-4-5",
        "anthropic",
        input_tokens=10_000,
        cache_read_tokens=6_000,
        cache_write_tokens=3_000,
        output_tokens=500,
    )
    # 1000 uncached * 3e-06 + 6000 read * 3e-07 + 3000 written * 3.75e-06 + 500 out * 1.5e-05
    assert result.cost == pytest.approx(
        1000 * 3e-06 + 6000 * 3e-07 + 3000 * 3.75e-06 + 500 * 1.5e-05, abs=1e-12
    )
    assert result.cost == pytest.approx(0.02355, abs=1e-12)


@pytest.mark.parametrize(
    ("model", "provider"), [("deepseek/deepseek-chat", None), ("deepseek-chat", "deepseek")]
)
def test_deepseek_cache_hit(book: PriceBook, model: str, provider: str | None) -> None:
    result = priced(book, model, provider, input_tokens=1000, cache_read_tokens=800, output_tokens=200)
    # 200 * 2.8e-07 + 800 * 2.8e-08 + 200 * 4.2e-07
    assert result.cost == pytest.approx(200 * 2.8e-07 + 800 * 2.8e-08 + 200 * 4.2e-07, abs=1e-12)
    assert result.cost == pytest.approx(1.624e-04, abs=1e-12)
    assert result.provider == "deepseek"


@pytest.mark.parametrize(
    ("model", "provider"),
    [
        ("dashscope/qwen-plus", None),
        ("qwen-plus", "dashscope"),
        ("qwen-plus", "tongyi"),
        ("qwen-plus", "alibaba"),
    ],
)
def test_qwen(book: PriceBook, model: str, provider: str | None) -> None:
    result = priced(book, model, provider, input_tokens=2000, output_tokens=500)
    assert result.cost == pytest.approx(2000 * 4e-07 + 500 * 1.2e-06, abs=1e-12)
    assert result.model_key == "dashscope/qwen-plus"


def test_reasoning_priced_apart_from_output(book: PriceBook) -> None:
    # dashscope/qwen-turbo: output 2e-07, reasoning 5e-07; 300 out of which 200 reasoning
    result = priced(book, "dashscope/qwen-turbo", input_tokens=1000, output_tokens=300, reasoning_tokens=200)
    assert result.cost == pytest.approx(1000 * 5e-08 + 100 * 2e-07 + 200 * 5e-07, abs=1e-12)
    assert result.cost == pytest.approx(1.7e-04, abs=1e-12)


@pytest.mark.parametrize(
    ("model", "provider"),
    [("moonshot/kimi-k2.5", None), ("kimi-k2.5", "moonshot"), ("kimi-k2.5", "moonshotai")],
)
def test_moonshot(book: PriceBook, model: str, provider: str | None) -> None:
    result = priced(book, model, provider, input_tokens=5000, cache_read_tokens=4000, output_tokens=1000)
    assert result.cost == pytest.approx(1000 * 6e-07 + 4000 * 1e-07 + 1000 * 3e-06, abs=1e-12)
    assert result.cost == pytest.approx(4.0e-03, abs=1e-12)


def test_embedding(book: PriceBook) -> None:
    result = priced(book, "text-embedding-3-small", input_tokens=1000)
    assert result.cost == pytest.approx(1000 * 2e-08, abs=1e-12)
    assert book.lookup("text-embedding-3-small").mode == "embedding"


def test_gemini_reasoning_tokens(book: PriceBook) -> None:
    # gemini/gemini-2.5-flash lists output_cost_per_reasoning_token (2.5e-06, equal to its output
    # price in this map); 1200 out of which 1000 are thoughts.
    result = priced(
        book, "gemini-2.5-flash", "google_genai", input_tokens=1000, output_tokens=1200, reasoning_tokens=1000
    )
    assert result.model_key == "gemini/gemini-2.5-flash"
    assert result.cost == pytest.approx(1000 * 3e-07 + 200 * 2.5e-06 + 1000 * 2.5e-06, abs=1e-12)
    assert book.lookup("gemini/gemini-2.5-flash").reasoning == pytest.approx(2.5e-06, abs=1e-15)


def test_above_threshold_prices(book: PriceBook) -> None:
    # gemini/gemini-2.5-pro: above 200k prompt tokens input 2.5e-06, cache read 2.5e-07, output 1.5e-05
    above = priced(
        book, "gemini/gemini-2.5-pro", input_tokens=300_000, cache_read_tokens=100_000, output_tokens=1000
    )
    assert above.cost == pytest.approx(200_000 * 2.5e-06 + 100_000 * 2.5e-07 + 1000 * 1.5e-05, abs=1e-12)
    below = priced(book, "gemini/gemini-2.5-pro", input_tokens=100_000, output_tokens=1000)
    assert below.cost == pytest.approx(100_000 * 1.25e-06 + 1000 * 1e-05, abs=1e-12)
    at = priced(book, "gemini/gemini-2.5-pro", input_tokens=200_000)  # "above" means strictly above
    assert at.cost == pytest.approx(200_000 * 1.25e-06, abs=1e-12)


def test_tiered_pricing_ranges(book: PriceBook) -> None:
    # dashscope/qwen-flash: (0, 256k] -> 5e-08 / 4e-07; (256k, 1M] -> 2.5e-07 / 2e-06
    high = priced(book, "dashscope/qwen-flash", input_tokens=300_000, output_tokens=1000)
    assert high.cost == pytest.approx(300_000 * 2.5e-07 + 1000 * 2e-06, abs=1e-12)
    edge = priced(book, "dashscope/qwen-flash", input_tokens=256_000, output_tokens=1000)
    assert edge.cost == pytest.approx(256_000 * 5e-08 + 1000 * 4e-07, abs=1e-12)
    beyond = priced(
        book, "dashscope/qwen-flash", input_tokens=2_000_000
    )  # past the last range: the last tier
    assert beyond.cost == pytest.approx(2_000_000 * 2.5e-07, abs=1e-12)
    nothing = priced(book, "dashscope/qwen-flash", output_tokens=10)
    assert nothing.cost == pytest.approx(10 * 4e-07, abs=1e-12)


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("model", "provider", "key", "expected"),
    [
        # Bedrock: region path stripped to the base model id
        (
            "bedrock/us-east-1/anthropic.claude-3-5-haiku-20241022-v1:0",
            None,
            "anthropic.claude-3-5-haiku-20241022-v1:0",
            1000 * 8e-07 + 100 * 4e-06,
        ),
        (
            "anthropic.claude-3-5-haiku-20241022-v1:0",
            "amazon_bedrock",
            "anthropic.claude-3-5-haiku-20241022-v1:0",
            1000 * 8e-07 + 100 * 4e-06,
        ),
        # cross-region inference profiles are their own keys, priced 10% above the base id
        (
            "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
            "bedrock",
            "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
            1000 * 3.3e-06 + 100 * 1.65e-05,
        ),
        (
            "global.anthropic.claude-sonnet-4-5-20250929-v1:0",
            "bedrock_converse",
            "global.anthropic.claude-sonnet-4-5-20250929-v1:0",
            1000 * 3e-06 + 100 * 1.5e-05,
        ),
        # GovCloud region paths are keys of their own, at GovCloud prices
        (
            "bedrock/us-gov-west-1/anthropic.claude-sonnet-4-5-20250929-v1:0",
            None,
            "bedrock/us-gov-west-1/anthropic.claude-sonnet-4-5-20250929-v1:0",
            1000 * 3.6e-06 + 100 * 1.8e-05,
        ),
        # Vertex AI
        ("gemini-2.5-pro", "vertex_ai", "gemini-2.5-pro", 1000 * 1.25e-06 + 100 * 1e-05),
        ("gemini-2.5-pro", "google_vertexai", "gemini-2.5-pro", 1000 * 1.25e-06 + 100 * 1e-05),
        ("vertex_ai/gemini-2.5-pro", None, "gemini-2.5-pro", 1000 * 1.25e-06 + 100 * 1e-05),
        ("claude-sonnet-4-5", "vertex_ai", "vertex_ai/claude-sonnet-4-5", 1000 * 3e-06 + 100 * 1.5e-05),
        # Azure OpenAI
        ("azure/gpt-4o-mini", None, "azure/gpt-4o-mini", 1000 * 1.5e-07 + 100 * 6e-07),
        ("gpt-4o-mini", "azure", "azure/gpt-4o-mini", 1000 * 1.5e-07 + 100 * 6e-07),
        ("gpt-4o-mini", "azure_openai", "azure/gpt-4o-mini", 1000 * 1.5e-07 + 100 * 6e-07),
        # names are case-insensitive, the key comes back as the map spells it
        ("GPT-4o-Mini", "OpenAI", "gpt-4o-mini", 1000 * 1.5e-07 + 100 * 6e-07),
    ],
)
def test_provider_names(book: PriceBook, model: str, provider: str | None, key: str, expected: float) -> None:
    result = priced(book, model, provider, input_tokens=1000, output_tokens=100)
    assert result.model_key == key
    assert result.cost == pytest.approx(expected, abs=1e-12)


def test_no_region_prefix_guessing(book: PriceBook) -> None:
    # "ca." is not a profile in the map: it is not priced as the bare model id
    assert book.lookup("ca.anthropic.claude-sonnet-4-5-20250929-v1:0", "bedrock") is None
    # nor is a prefix or suffix of a known name
    assert book.lookup("gpt-4o-mini-2099-01-01") is None
    assert book.lookup("gpt-4o-min") is None


def test_unknown_model_is_unpriced_never_zero(book: PriceBook) -> None:
    result = book.cost(model="acme-llm-9000", provider="openai", input_tokens=10, output_tokens=10)
    # unpriced, never 0; the names are still the ones the ledger stores
    assert result == PricedCost(None, "USD", "unpriced", None, None, "openai", "acme-llm-9000")
    assert book.cost(model="", input_tokens=1).status == "unpriced"


def test_cross_provider_guard(book: PriceBook) -> None:
    assert book.cost(model="gpt-4o-mini", provider="anthropic", input_tokens=10).cost is None
    assert book.cost(model="claude-sonnet-4-5", provider="openai", input_tokens=10).cost is None
    # a provider the map does not know (a gateway) takes the model's own entry
    gateway = priced(book, "gpt-4o-mini", "my-gateway", input_tokens=1000)
    assert (gateway.model_key, gateway.provider) == ("gpt-4o-mini", "my-gateway")
    assert gateway.cost == pytest.approx(1000 * 1.5e-07, abs=1e-12)
    # same family, other spelling: text-completion-openai belongs to openai, and is stored so
    instruct = priced(book, "gpt-3.5-turbo-instruct", "openai", input_tokens=1)
    assert (instruct.provider, book.lookup("gpt-3.5-turbo-instruct").provider) == ("openai", "text-completion-openai")


def test_side_without_price_is_unpriced(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"emb": {"litellm_provider": "x", "input_cost_per_token": 1e-06}}))
    book = PriceBook(price_map=str(path))
    assert book.cost(model="emb", input_tokens=10).cost == pytest.approx(1e-05, abs=1e-12)
    output_used = book.cost(model="emb", input_tokens=10, output_tokens=5)
    assert (output_used.status, output_used.cost, output_used.model_key) == ("unpriced", None, "emb")


# --------------------------------------------------------------------------- overrides and currencies


def test_override_beats_map() -> None:
    book = PriceBook({"gpt-4o-mini": Price(input=1.0, output=2.0)}, price_map="bundled")
    result = book.cost(model="gpt-4o-mini", provider="openai", input_tokens=1000, output_tokens=500)
    assert result.cost == pytest.approx((1000 * 1.0 + 500 * 2.0) / 1e6, abs=1e-12)
    assert (result.source, result.model_key, result.provider) == (
        "override:gpt-4o-mini",
        "gpt-4o-mini",
        "openai",
    )


def test_override_keys_and_defaults() -> None:
    book = PriceBook(
        {
            "openai/My-Model": Price(input=10, output=20, per="1K"),
            "google/gem-x": Price(input=0.5, per="token", cache_read=0.25),
            "plain": {"input": 3, "output": 6, "reasoning": 9},  # a table from llmtally.toml
        },
        price_map="bundled",
    )
    by_provider = book.cost(model="my-model", provider="openai", input_tokens=2, output_tokens=1)
    assert by_provider.cost == pytest.approx((2 * 10 + 1 * 20) / 1000, abs=1e-12)
    assert by_provider.source == "override:openai/My-Model"
    assert book.lookup("my-model") is None  # keyed by provider: not for other providers
    gem = book.cost(model="gem-x", provider="google_genai", input_tokens=4, cache_read_tokens=2)
    assert gem.cost == pytest.approx(2 * 0.5 + 2 * 0.25, abs=1e-12)
    # unset cache prices cost the input price, unset reasoning the output price
    plain = book.cost(
        model="plain", input_tokens=10, cache_write_tokens=4, output_tokens=5, reasoning_tokens=2
    )
    assert plain.cost == pytest.approx((10 * 3 + 3 * 6 + 2 * 9) / 1e6, abs=1e-12)


def test_override_in_cny_converted_to_usd() -> None:
    book = PriceBook(
        {"my-model": Price(input=2, output=8, currency="CNY")}, rates={"CNY": 0.1389}, price_map="bundled"
    )
    result = book.cost(model="my-model", input_tokens=1000, output_tokens=500)
    assert result.currency == "USD"
    assert result.cost == pytest.approx((1000 * 2 + 500 * 8) / 1e6 * 0.1389, abs=1e-12)


def test_cny_book_converts_the_usd_map() -> None:
    book = PriceBook(
        {"local": Price(input=2, output=8, currency="CNY")},
        currency="CNY",
        rates={"USD": 7.2},
        price_map="bundled",
    )
    mapped = book.cost(model="gpt-4o-mini", input_tokens=120, cache_read_tokens=100, output_tokens=30)
    assert mapped.currency == "CNY"
    assert mapped.cost == pytest.approx(2.85e-05 * 7.2, abs=1e-12)
    local = book.cost(model="local", input_tokens=1000)  # already in CNY: no rate needed
    assert local.cost == pytest.approx(1000 * 2 / 1e6, abs=1e-12)
    assert book.lookup("gpt-4o-mini").input == pytest.approx(1.5e-07 * 7.2, abs=1e-15)


def test_missing_rate_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"rates.*USD.*CNY"):
        PriceBook(currency="CNY")
    with pytest.raises(ConfigError, match=r"rates.*EUR"):
        PriceBook({"m": Price(input=1, currency="EUR")})
    with pytest.raises(ConfigError, match=r"rates\['EUR'\]"):
        PriceBook(rates={"EUR": -1})
    with pytest.raises(ConfigError, match="currency"):
        PriceBook(currency="XYZ")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"input": -1}, "input"),
        ({"input": float("nan")}, "input"),
        ({"input": 1, "output": float("inf")}, "output"),
        ({"input": True}, "input"),
        ({"input": 1, "cache_read": -0.5}, "cache_read"),
        ({"input": 1, "cache_write": "1"}, "cache_write"),
        ({"input": 1, "reasoning": False}, "reasoning"),
        ({"input": 1, "per": "2M"}, "per"),
        ({"input": 1, "currency": "XYZ"}, "currency"),
        ({"input": 1, "currency": 840}, "currency"),
    ],
)
def test_bad_price_values(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"Price\.{field}") as info:
        Price(**kwargs)
    bad = kwargs[field]
    assert repr(bad) in str(info.value)


def test_price_normalises_currency_and_rejects_positional_use() -> None:
    assert Price(input=1, currency="cny").currency == "CNY"
    assert {"USD", "EUR", "CNY", "JPY", "GBP"} <= CURRENCIES and "XYZ" not in CURRENCIES
    with pytest.raises(TypeError):
        Price(1.0)  # type: ignore[misc]


def test_bad_override_shapes() -> None:
    with pytest.raises(ConfigError, match="overrides"):
        PriceBook({"": Price(input=1)})
    with pytest.raises(ConfigError, match=r"overrides\['m'\]"):
        PriceBook({"m": 0.5})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match=r"overrides\['m'\]"):
        PriceBook({"m": {"input": 1, "outptu": 2}})  # type: ignore[dict-item]


# --------------------------------------------------------------------------- price maps


def test_price_map_path_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="price_map.*nope.json"):
        PriceBook(price_map=str(tmp_path / "nope.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="price_map.*broken.json.*JSON"):
        PriceBook(price_map=str(broken)).cost(model="x")
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="price_map"):
        PriceBook(price_map=str(listing)).known_models()


def test_price_map_file_in_litellm_format(tmp_path: Path) -> None:
    full = {
        "sample_spec": {"input_cost_per_token": 0.0, "litellm_provider": "one of ..."},
        "acme/chat-1": {
            "litellm_provider": "acme",
            "mode": "chat",
            "max_output_tokens": 4096,
            "supports_vision": True,
            "input_cost_per_token": 1e-06,
            "output_cost_per_token": 2e-06,
            "input_cost_per_token_priority": 9.0,
            "input_cost_per_token_above_128k_tokens": 3e-06,
        },
        "acme/latest": {"alias_of": "acme/chat-1"},
        "acme/image": {"litellm_provider": "acme", "output_cost_per_image": 0.04},
    }
    path = tmp_path / "map.json"
    path.write_text(json.dumps(full))
    book = PriceBook(price_map=str(path))
    assert book.known_models() == 2  # no sample_spec, no per-image-only entry; the alias is kept
    assert book.map_source == f"file:{path}"
    assert book.cost(model="acme/chat-1", input_tokens=10).cost == pytest.approx(1e-05, abs=1e-12)
    assert book.cost(model="acme/chat-1", input_tokens=200_000).cost == pytest.approx(0.6, abs=1e-12)
    assert book.cost(model="latest", provider="acme", output_tokens=1).model_key == "acme/latest"
    assert book.max_output_tokens("acme/latest") == 4096


def test_bundled_and_litellm_maps() -> None:
    bundled = PriceBook(price_map="bundled")
    snapshot = json.loads(SNAPSHOT.read_text())
    assert bundled.map_source == f"litellm-map:{snapshot['version']}"
    assert bundled.known_models() == len(snapshot["models"])
    if importlib.util.find_spec("litellm") is None:
        pytest.skip("litellm not installed")
    from importlib.metadata import version

    installed = PriceBook(price_map="litellm")
    assert installed.map_source == f"litellm-map:{version('litellm')}"
    assert installed.cost(
        model="gpt-4o-mini", input_tokens=120, cache_read_tokens=100, output_tokens=30
    ).cost == pytest.approx(2.85e-05, abs=1e-12)
    # auto: the same litellm as the snapshot's -> the (smaller) snapshot
    if version("litellm") == snapshot["litellm_version"]:
        assert PriceBook().map_source == bundled.map_source


def test_auto_prefers_a_newer_installed_litellm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model_prices_and_context_window_backup.json"
    path.write_text(
        json.dumps({"gpt-4o-mini": {"litellm_provider": "openai", "input_cost_per_token": 1e-06}})
    )
    monkeypatch.setattr(_price_map, "installed_litellm", lambda: ("99.0.0", str(path)))
    book = PriceBook()
    assert book.map_source == "litellm-map:99.0.0"
    assert book.cost(model="gpt-4o-mini", input_tokens=1).cost == pytest.approx(1e-06, abs=1e-15)
    monkeypatch.setattr(_price_map, "installed_litellm", lambda: ("1.0.0", str(path)))
    assert PriceBook().map_source.startswith("litellm-map:20")  # older litellm: the snapshot


def test_map_loads_once_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    loads = []
    real = _pricing.load_map

    def counting(choice: str) -> object:
        loads.append(choice)
        time.sleep(0.05)
        return real(choice)

    monkeypatch.setattr(_pricing, "load_map", counting)
    book = PriceBook(price_map="bundled")
    assert loads == []  # lazy: nothing read at construction
    results: list[float | None] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(book.cost(model="gpt-4o-mini", input_tokens=1000).cost)
        )
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loads == ["bundled"]
    assert results == [pytest.approx(1.5e-04, abs=1e-12)] * 8


def test_max_output_tokens(book: PriceBook) -> None:
    assert book.max_output_tokens("gpt-4o-mini") == 16384
    assert book.max_output_tokens("acme-unknown") is None
    overridden = PriceBook({"gpt-4o-mini": Price(input=1)}, price_map="bundled")
    assert overridden.max_output_tokens("gpt-4o-mini") == 16384  # the map still knows the limit


def test_snapshot_is_slim() -> None:
    snapshot = json.loads(SNAPSHOT.read_text())
    assert set(snapshot) == {"version", "litellm_version", "models"}
    assert "sample_spec" not in snapshot["models"]
    fields = {name for entry in snapshot["models"].values() for name in entry}
    assert not any(name.endswith(("_priority", "_batches", "_flex")) for name in fields)
    assert "supports_vision" not in fields and "tiered_pricing" in fields
    assert all(slim_entry(entry) == entry for entry in snapshot["models"].values())


def test_update_script_writes_a_slim_snapshot(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("update_prices", REPO / "scripts" / "update_prices.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    source = tmp_path / "full.json"
    source.write_text(
        json.dumps(
            {
                "sample_spec": {"input_cost_per_token": 0.0},
                "m": {
                    "litellm_provider": "p",
                    "input_cost_per_token": 1e-06,
                    "output_cost_per_token_batches": 1.0,
                    "tiered_pricing": [
                        {"range": [0, 1000.0], "input_cost_per_token": 1e-06},
                        {"max_results_range": [0, 5], "input_cost_per_query": 0.1},
                    ],
                },
                "search": {"litellm_provider": "p", "input_cost_per_query": 0.005},
            }
        )
    )
    out = tmp_path / "prices.json"
    assert (
        module.main([str(source), "--litellm-version", "9.9.9", "--date", "2030-01-02", "-o", str(out)]) == 0
    )
    written = json.loads(out.read_text())
    assert written == {
        "litellm_version": "9.9.9",
        "version": "2030-01-02",
        "models": {
            "m": {
                "litellm_provider": "p",
                "input_cost_per_token": 1e-06,
                "tiered_pricing": [{"range": [0, 1000], "input_cost_per_token": 1e-06}],
            }
        },
    }
    assert "\n" not in out.read_text().rstrip("\n")  # compact


# --------------------------------------------------------------------------- robustness and speed


def test_odd_token_counts(book: PriceBook) -> None:
    # negative and junk counts are 0; cache tokens beyond the prompt leave no negative uncached part
    assert book.cost(model="gpt-4o-mini", input_tokens=-5, output_tokens=None).cost == 0.0  # type: ignore[arg-type]
    over = book.cost(model="gpt-4o-mini", input_tokens=10, cache_read_tokens=50)
    assert over.cost == pytest.approx(50 * 7.5e-08, abs=1e-12)
    reasoning = book.cost(model="gpt-4o-mini", output_tokens=10, reasoning_tokens=30)
    assert reasoning.cost == pytest.approx(30 * 6e-07, abs=1e-12)
    assert book.cost(model="gpt-4o-mini", input_tokens=10**400).cost > 0


_MODELS = [
    ("gpt-4o-mini", None),
    ("claude-sonnet-4-5", "anthropic"),
    ("gemini/gemini-2.5-pro", None),
    ("dashscope/qwen-flash", None),
    ("dashscope/qwen-turbo", None),
    ("deepseek-chat", "deepseek"),
    ("text-embedding-3-small", None),
    ("override-me", None),
    ("unknown-model", None),
]
_HYPOTHESIS_BOOK = PriceBook(
    {"override-me": Price(input=1, output=2, currency="EUR")}, rates={"EUR": 1.1}, price_map="bundled"
)


@settings(max_examples=300, deadline=None)
@given(
    model=st.sampled_from(_MODELS),
    counts=st.tuples(*[st.integers(min_value=0) | st.integers(min_value=0, max_value=2_000_000)] * 5),
)
def test_cost_never_raises_or_goes_negative(model: tuple[str, str | None], counts: tuple[int, ...]) -> None:
    name, provider = model
    inp, out, read, write, reason = counts
    result = _HYPOTHESIS_BOOK.cost(
        model=name,
        provider=provider,
        input_tokens=inp,
        output_tokens=out,
        cache_read_tokens=read,
        cache_write_tokens=write,
        reasoning_tokens=reason,
    )
    if name == "unknown-model":
        assert result.cost is None and result.status == "unpriced"
    else:
        assert result.status == "priced"
        assert result.cost is not None and result.cost >= 0 and not math.isnan(result.cost)


# --------------------------------------------------------------------------- off-peak, cache, embeddings


def test_off_peak_hours_price_a_call_at_its_own_time(make_tally, sqlite_url) -> None:
    """DeepSeek's discount windows (weekdays 04:00-06:00 UTC among others): a call is priced at
    the hour it ran, not the hour it was recorded."""
    from datetime import datetime, timezone

    tally = make_tally(sqlite_url)
    peak = datetime(2026, 12, 2, 3, 0, tzinfo=timezone.utc)  # a Wednesday
    off_peak = datetime(2026, 12, 2, 5, 59, tzinfo=timezone.utc)
    weekend = datetime(2026, 12, 5, 3, 0, tzinfo=timezone.utc)  # Saturday: off-peak all day
    for ts in (peak, off_peak, weekend):
        tally.record(model="deepseek-v4-flash", input_tokens=1_000_000, output_tokens=1_000_000, ts=ts)
    tally.flush()
    costs = [row["cost"] for row in sorted(fetch_events(sqlite_url), key=lambda row: row["ts"])]
    assert costs == pytest.approx([0.3 + 1.2, 0.15 + 0.6, 0.15 + 0.6], abs=1e-9)


def test_fireworks_cache_reads_cost_half_and_embeddings_have_no_output(book: PriceBook) -> None:
    model = "fireworks_ai/accounts/fireworks/models/deepseek-r1"  # $3 in, $8 out, no cache price
    assert book.cost(model=model, input_tokens=1000, cache_read_tokens=600).cost == pytest.approx(
        (400 * 3 + 600 * 1.5) / 1e6, abs=1e-12)
    embedded = book.cost(model="mistral/mistral-embed", input_tokens=1000, output_tokens=50)
    assert (embedded.status, embedded.cost) == ("priced", pytest.approx(1000 * 0.1 / 1e6, abs=1e-12))


def test_a_map_files_provider_in_any_case_prices_calls_naming_it_in_any_case(tmp_path):
    """A user's map file may spell its provider "Acme"; calls naming it "acme" (or leading the
    model with "acme/") are priced by its entries, and another provider's calls are not."""
    import json

    from llmtally._pricing.book import PriceBook

    path = tmp_path / "map.json"
    path.write_text(json.dumps({
        "chat-1": {"litellm_provider": "Acme", "input_cost_per_token": 1e-6,
                   "output_cost_per_token": 2e-6, "mode": "chat"},
        "gpt-x": {"litellm_provider": "openai", "input_cost_per_token": 5e-6, "mode": "chat"},
    }))
    book = PriceBook(price_map=str(path))
    for model, provider in (("chat-1", "acme"), ("chat-1", "Acme"), ("acme/chat-1", None),
                            ("chat-1", None)):
        priced = book.cost(model, provider, input_tokens=1000, output_tokens=10)
        assert priced.cost == pytest.approx(1000 * 1e-6 + 10 * 2e-6, abs=1e-12), (model, provider)
    assert book.cost("chat-1", "openai", input_tokens=1000).status == "unpriced"
