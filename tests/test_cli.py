"""The `llmtally` command, run as users run it (the installed console script)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from llmtally import Tally

NOW = datetime.now(timezone.utc)


def llmtally(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    exe = shutil.which("llmtally") or os.path.join(os.path.dirname(sys.executable), "llmtally")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, cwd=cwd,
                          env={**os.environ, **(env or {})})


def empty_ledger(path) -> str:
    Tally(f"sqlite:///{path}", price_map="bundled", spill_path=f"{path}.spill.jsonl").close()
    return str(path)


@pytest.fixture
def ledger(tmp_path):
    db = tmp_path / "cli.db"
    with Tally(f"sqlite:///{db}", price_map="bundled", spill_path=tmp_path / "s.jsonl") as tally:
        with tally.scope(project="search", user="alice"):
            tally.record(provider="openai", model="gpt-4o-mini", input_tokens=1200,
                         output_tokens=300, cache_read_tokens=1000, ts=NOW - timedelta(hours=2))
            tally.record(provider="openai", model="gpt-4o-mini", status="error",
                         error_type="openai.RateLimitError", ts=NOW - timedelta(hours=1))
        with tally.scope(project="etl", user="bob"):
            tally.record(model="deepseek/deepseek-chat", input_tokens=10_000, output_tokens=1000,
                         ts=NOW - timedelta(days=1))
            tally.record(provider="acme", model="acme-llm", input_tokens=50, output_tokens=5,
                         ts=NOW - timedelta(days=2))
        tally.record(model="gpt-4o-mini", input_tokens=999, ts=NOW - timedelta(days=20))
    return str(db)


def test_help_lists_the_commands():
    result = llmtally("--help")
    assert result.returncode == 0
    for command in ("summary", "prices", "unpriced"):
        assert command in result.stdout
    assert "Examples:" in result.stdout


def test_summary_table_by_model(ledger):
    result = llmtally("summary", "--since", "7d", "--db", ledger)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["model", "calls", "errors", "input", "output", "cached", "cost",
                                "unpriced"]
    mini = next(line for line in lines if line.startswith("gpt-4o-mini"))
    assert mini.split()[:6] == ["gpt-4o-mini", "2", "1", "1200", "300", "1000"]
    assert "0.000285 USD" in mini
    total = next(line for line in lines if line.startswith("TOTAL"))
    assert total.split()[1:3] == ["4", "1"]
    assert "llmtally unpriced" in result.stdout


def test_summary_json_and_csv_carry_exact_figures(ledger):
    result = llmtally("summary", "--since", "7d", "--by", "project", "--json", "--db", ledger)
    rows = {row["key"]: row for row in json.loads(result.stdout)}
    assert rows["search"]["calls"] == 2
    assert rows["search"]["cost"] == pytest.approx(2.85e-4, abs=1e-12)
    assert rows["etl"]["cost"] == pytest.approx(10_000 * 0.28e-6 + 1000 * 0.42e-6, abs=1e-12)
    assert rows["etl"]["unpriced_calls"] == 1
    result = llmtally("summary", "--since", "30d", "--by", "user", "--csv", "--db", ledger)
    table = {row["key"]: row for row in csv.DictReader(io.StringIO(result.stdout))}
    assert table["bob"]["calls"] == "2" and table[""]["input_tokens"] == "999"


def test_summary_filters_by_project(ledger):
    result = llmtally("summary", "--since", "7d", "--project", "etl", "--json", "--db", ledger)
    assert sum(row["calls"] for row in json.loads(result.stdout)) == 2


def test_unpriced_lists_models_and_how_to_price_them(ledger):
    result = llmtally("unpriced", "--db", ledger)
    assert result.returncode == 0
    assert "acme-llm" in result.stdout and "[prices." in result.stdout
    rows = json.loads(llmtally("unpriced", "--json", "--db", ledger).stdout)
    assert [(r["provider"], r["model"], r["calls"], r["input_tokens"]) for r in rows] == \
        [("acme", "acme-llm", 1, 50)]


def test_prices_shows_per_million_prices():
    result = llmtally("prices", "gpt-4o-mini", "--price-map", "bundled")
    assert result.returncode == 0, result.stderr
    assert "input:        0.1500" in result.stdout
    assert "output:       0.6000" in result.stdout
    assert "cache read:   0.0750" in result.stdout
    result = llmtally("prices", "qwen-plus", "--provider", "dashscope", "--price-map", "bundled")
    assert "input:        0.4000" in result.stdout


def test_prices_with_an_override_from_the_config(tmp_path):
    config = tmp_path / "llmtally.toml"
    config.write_text('[prices."acme-llm"]\ninput = 2.5\noutput = 10\n')
    result = llmtally("prices", "acme-llm", "--config", str(config))
    assert "input:        2.5000" in result.stdout and "override" in result.stdout


def test_errors_are_one_line_with_exit_code_2(tmp_path):
    result = llmtally("prices", "no-such-model-anywhere")
    assert result.returncode == 2
    assert "no price known for 'no-such-model-anywhere'" in result.stderr
    broken = tmp_path / "broken.db"
    broken.write_bytes(b"garbage" * 1000)
    result = llmtally("summary", "--db", str(broken))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not a usable SQLite database" in result.stderr
    result = llmtally("summary", "--since", "yesterday-ish", "--db", empty_ledger(tmp_path / "ok.db"))
    assert result.returncode == 2 and "neither a date" in result.stderr
    config = tmp_path / "llmtally.toml"
    config.write_text('currency = "XYZ"\n')
    result = llmtally("summary", "--config", str(config), "--db", empty_ledger(tmp_path / "ok.db"))
    assert result.returncode == 2 and "XYZ" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_empty_ledger_says_so(tmp_path):
    result = llmtally("summary", "--db", empty_ledger(tmp_path / "empty.db"))
    assert result.returncode == 0 and "No calls recorded" in result.stdout
    result = llmtally("summary", "--db", str(tmp_path / "missing.db"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert not (tmp_path / "missing.db").exists()  # a read never creates a ledger


def test_budgets_shows_use_limit_reset_and_instances(tmp_path):
    config = tmp_path / "llmtally.toml"
    config.write_text(f"""
database_url = "{tmp_path / 'b.db'}"
price_map = "bundled"
[[budgets]]
usd = 1
per = "month"
[[budgets]]
tokens = 5000
per = "day"
each = "user"
""")
    with Tally.from_config(config, spill_path=tmp_path / "s.jsonl") as tally:
        for user in ("alice", "bob", "alice"):
            held = tally.reserve(model="gpt-4o-mini", input_tokens=1000, max_tokens=100, user=user)
            tally.record(model="gpt-4o-mini", input_tokens=1000, output_tokens=80, user=user,
                         reservation=held)
    rows = json.loads(llmtally("budgets", "--json", "--config", str(config)).stdout)
    by_scope = {(r["budget"], json.dumps(r["scope"])): r for r in rows}
    month = by_scope[("usd 1/month", "{}")]
    assert month["used"] == pytest.approx(3 * (1000 * 0.15e-6 + 80 * 0.6e-6), abs=1e-9)
    assert month["reserved"] == 0 and month["resets_at"].endswith("T00:00:00+00:00")
    alice = by_scope[("tokens 5000/day each user", '{"user": "alice"}')]
    assert (alice["used"], alice["limit"]) == (2160, 5000)
    assert alice["percent"] == pytest.approx(43.2)
    table = llmtally("budgets", "--config", str(config))
    assert table.returncode == 0 and "user=bob" in table.stdout and "1,080" in table.stdout
    empty = llmtally("budgets", "--db", empty_ledger(tmp_path / "other.db"))
    assert "No budgets configured" in empty.stdout
