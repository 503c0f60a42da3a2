"""One name per provider and per model, whichever path recorded the call (issue 16, items 5-7)."""

from __future__ import annotations

import json

import pytest
from conftest import fetch_events, rollups_mismatch
from sqlalchemy import create_engine, text

from llmtally import Budget, BudgetExceeded
from llmtally._budgets.counters import check_counters
from llmtally._storage.store import normalize_url
from llmtally.testing import FakeProvider, FakeUsage

MSGS = [{"role": "user", "content": "hi"}]


def _names(url: str) -> list[tuple[str, str, str]]:
    return sorted((row["provider"] or "", row["model"], row["cost_status"]) for row in fetch_events(url))


def test_every_spelling_of_a_model_is_one_row_in_summaries(make_tally, ledger_url) -> None:
    tally = make_tally(ledger_url)
    for model, provider in (("deepseek/deepseek-chat", None), ("deepseek-chat", "deepseek"),
                            ("deepseek-chat", None), ("DeepSeek/deepseek-chat", "DeepSeek"),
                            ("deepseek/deepseek-chat", "deepseek")):
        tally.record(model=model, provider=provider, input_tokens=1000, output_tokens=100)
    tally.flush()
    assert _names(ledger_url) == [("deepseek", "deepseek-chat", "priced")] * 5
    (row,) = tally.summary(by="model", since="2000-01-01")
    assert (row.key, row.calls) == ("deepseek-chat", 5)
    # deepseek/deepseek-chat: 0.28 in, 0.42 out per 1M
    assert row.cost == pytest.approx(5 * (1000 * 0.28 + 100 * 0.42) / 1e6, abs=1e-12)


def test_provider_variants_of_the_price_map_store_one_name(make_tally, sqlite_url) -> None:
    tally = make_tally(sqlite_url)
    tally.record(model="gemini-2.5-flash", provider="vertex_ai-language-models", input_tokens=10)
    tally.record(model="gemini-2.5-flash", provider="google_vertexai", input_tokens=10)
    tally.record(model="anthropic.claude-3-5-sonnet-20240620-v1:0", provider="bedrock_converse",
                 input_tokens=10)
    tally.record(model="gpt-3.5-turbo-instruct", input_tokens=10)  # text-completion-openai's entry
    tally.record(model="nomic-ai/nomic-embed-text-v1.5", provider="fireworks_ai-embedding-models",
                 input_tokens=10)
    tally.flush()
    assert {p for p, _, _ in _names(sqlite_url)} == {"vertex_ai", "bedrock", "openai", "fireworks_ai"}
    assert all(status == "priced" for _, _, status in _names(sqlite_url))


def test_a_provider_route_never_prices_another_providers_entry(make_tally, sqlite_url) -> None:
    tally = make_tally(sqlite_url)
    for model in ("anthropic/gpt-4o-mini", "groq/gpt-4o", "bedrock/claude-sonnet-4-5"):
        tally.record(model=model, input_tokens=100, output_tokens=10)
    tally.flush()
    assert _names(sqlite_url) == [("anthropic", "gpt-4o-mini", "unpriced"),
                                  ("bedrock", "claude-sonnet-4-5", "unpriced"),
                                  ("groq", "gpt-4o", "unpriced")]


def test_budget_scopes_match_every_spelling(make_tally, ledger_url) -> None:
    tally = make_tally(ledger_url, budgets=[
        Budget(requests=2, per="day", scope={"provider": "DeepSeek", "model": "deepseek-chat"})])
    tally.record(model="deepseek/deepseek-chat", input_tokens=10)
    tally.record(model="deepseek-chat", provider="deepseek", input_tokens=10)
    tally.flush()
    with pytest.raises(BudgetExceeded):
        tally.reserve(model="deepseek/deepseek-chat", messages=MSGS)
    with pytest.raises(BudgetExceeded):
        tally.reserve(model="deepseek-chat", messages=MSGS)
    tally.release(tally.reserve(model="gpt-4o-mini", messages=MSGS))  # another model: not in scope


def test_litellm_and_record_store_a_route_alike(make_tally, sqlite_url) -> None:
    litellm = pytest.importorskip("litellm")
    tally = make_tally(sqlite_url)
    litellm.callbacks = [tally.litellm()]
    try:
        with FakeProvider(usage=FakeUsage(prompt_tokens=120, completion_tokens=30)) as fp:
            litellm.completion(model="deepseek/deepseek-chat", api_base=fp.openai_base, api_key="sk-test",
                               messages=MSGS)
        tally.record(model="deepseek/deepseek-chat", input_tokens=120, output_tokens=30)
        tally.flush()
    finally:
        litellm.callbacks = []
    rows = fetch_events(sqlite_url)
    assert {(r["provider"], r["model"]) for r in rows} == {("deepseek", "deepseek-chat")}
    assert len(rows) == 2 and rows[0]["cost"] == pytest.approx(rows[1]["cost"], abs=1e-12)


def test_migration_rewrites_old_names_and_recounts_budgets(make_tally, ledger_url) -> None:
    """A ledger written before migration 4 (raw map providers, routes in model names, budget
    definitions keyed by a routed model, counters of those names) reads as one name per
    provider after it: one definition, counters equal to the events."""
    per_model = Budget(requests=100, per="day", each="model")
    scoped = Budget(requests=100, per="day", scope={"model": "deepseek/deepseek-chat"})
    assert scoped.scope == {"model": "deepseek-chat"}  # a routed scope names the stored model
    tally = make_tally(ledger_url, budgets=[per_model, scoped])
    for _ in range(3):
        tally.release(tally.reserve(model="deepseek-chat", provider="deepseek", messages=MSGS))
        tally.record(model="deepseek-chat", provider="deepseek", input_tokens=10)
    tally.record(model="anthropic.claude-3-5-sonnet-20240620-v1:0", provider="bedrock", input_tokens=10)
    tally.record(model="gemini-2.5-flash", provider="gemini", input_tokens=10)
    tally.flush()
    tally.close()
    old_key = scoped.key.replace("model=deepseek-chat", "model=deepseek/deepseek-chat")
    old_definition = json.dumps({**scoped.to_dict(), "scope": {"model": "deepseek/deepseek-chat"}})
    engine = create_engine(normalize_url(ledger_url))
    with engine.begin() as conn:  # what an older llmtally wrote
        conn.execute(text("UPDATE llmtally_events SET model = 'deepseek/deepseek-chat' "
                          "WHERE model = 'deepseek-chat'"))
        conn.execute(text("UPDATE llmtally_events SET provider = 'bedrock_converse' "
                          "WHERE provider = 'bedrock'"))
        conn.execute(text("UPDATE llmtally_events SET provider = NULL, model = 'gemini/gemini-2.5-flash' "
                          "WHERE provider = 'gemini'"))
        conn.execute(text("UPDATE llmtally_budget_counters SET instance = 'deepseek/deepseek-chat' "
                          "WHERE instance = 'deepseek-chat'"))
        conn.execute(text("UPDATE llmtally_budget_counters SET budget_key = :old WHERE budget_key = :new"),
                     {"old": old_key, "new": scoped.key})
        conn.execute(text("UPDATE llmtally_budgets SET budget_key = :old, definition = :definition "
                          "WHERE budget_key = :new"),
                     {"old": old_key, "new": scoped.key, "definition": old_definition})
        conn.execute(text("DELETE FROM llmtally_schema WHERE version >= 4"))
        conn.execute(text("DROP TABLE llmtally_rollups"))  # migration 5 makes them again
        conn.execute(text("DROP TABLE llmtally_rollup_sketches"))
    engine.dispose()
    reopened = make_tally(ledger_url)  # defines nothing itself: reads the ledger's budgets
    assert sum(row.calls for row in reopened.summary(since="2000-01-01")) == 5  # opens: migrates
    assert _names(ledger_url) == [("bedrock", "anthropic.claude-3-5-sonnet-20240620-v1:0", "priced")] + [
        ("deepseek", "deepseek-chat", "priced")] * 3 + [("gemini", "gemini-2.5-flash", "priced")]
    assert check_counters(reopened.store) == []
    assert rollups_mismatch(ledger_url) == []  # summed under the names migration 4 wrote
    engine = create_engine(normalize_url(ledger_url))
    with engine.connect() as conn:
        keys = [row[0] for row in conn.execute(text("SELECT budget_key FROM llmtally_budgets"))]
    engine.dispose()
    assert sorted(keys) == sorted([per_model.key, scoped.key])
    again = make_tally(ledger_url, budgets=[per_model, scoped])
    again.release(again.reserve(model="deepseek-chat", provider="deepseek", messages=MSGS))
    used = {(state.budget.key, state.instance): state.spent for state in again.budget_states()}
    assert used[(per_model.key, "deepseek-chat")] == 3
    assert used[(scoped.key, "")] == 3


def test_llmtally_prices_says_which_entry_and_why() -> None:
    import subprocess
    import sys

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "llmtally.cli", "prices", *args, "--price-map", "bundled"],
                              capture_output=True, text=True, timeout=60)

    routed = run("deepseek/deepseek-chat")
    assert routed.returncode == 0, routed.stderr
    assert "stored as:    model deepseek-chat, provider deepseek (the route 'deepseek'" in routed.stdout
    assert "matched:      deepseek/deepseek-chat" in routed.stdout
    bare = run("deepseek-chat")
    assert "matched:      deepseek/deepseek-chat" in bare.stdout  # the provider's own key first
    assert "from the entry the bare name matched" in bare.stdout
    off_peak = run("deepseek-v4-flash")
    assert "off-peak:     input 0.1500, output 0.6000" in off_peak.stdout
    crossed = run("anthropic/gpt-4o-mini")
    assert crossed.returncode == 2 and crossed.stdout == ""
    assert len(crossed.stderr.strip().splitlines()) == 1
    assert "'gpt-4o-mini' is openai's" in crossed.stderr and "provider here: anthropic" in crossed.stderr
