"""``llmtally demo``, run as a user runs it: the CLI in a subprocess, offline, into a fresh file."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

LLMTALLY = [sys.executable, "-m", "llmtally.cli"]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    env.pop("LLMTALLY_DATABASE_URL", None)
    return subprocess.run([*LLMTALLY, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=240)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    where = tmp_path_factory.mktemp("demo")
    return _run("demo", "--db", "demo.db", "-o", "reports/", cwd=where), where


def test_the_demo_fills_a_ledger_through_the_real_integrations(demo_run):
    result, where = demo_run
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(where / "demo.db") as conn:
        live = dict(conn.execute(
            "SELECT source, count(*) FROM llmtally_events WHERE project = 'demo-live' "
            "AND status = 'ok' GROUP BY source").fetchall())
        blocked = conn.execute(
            "SELECT model, cost, error_type FROM llmtally_events WHERE project = 'demo-budget'"
        ).fetchall()
        history = conn.execute("SELECT count(*), count(DISTINCT project), count(DISTINCT provider),"
                               " sum(status = 'error'), sum(cost_status = 'unpriced') "
                               "FROM llmtally_events WHERE source = 'manual'").fetchone()
    assert live == {"litellm": 12, "langchain": 6}
    assert blocked == [("gpt-4o", 0.0, "llmtally.BudgetExceeded")]
    assert "Blocked before sending" in result.stdout
    calls, projects, providers, errors, unpriced = history
    assert calls == 4_000 + 1  # the back-fill, plus the blocked call recorded by reserve()
    assert projects >= 4 and providers >= 4 and errors > 0 and unpriced > 0


def test_the_demo_writes_the_report_with_the_ledgers_figures(demo_run):
    result, where = demo_run
    assert result.returncode == 0, result.stderr
    reports = list((where / "reports").glob("llmtally-*.html"))
    assert len(reports) == 1
    assert f"Report: {Path('reports') / reports[0].name}" in result.stdout
    period = re.search(r"period\s+(\d{4}-\d\d-\d\d) – (\d{4}-\d\d-\d\d)", result.stdout)
    assert period, result.stdout
    since, last_day = period.groups()
    with sqlite3.connect(where / "demo.db") as conn:
        cost, calls = conn.execute(
            "SELECT coalesce(sum(cost), 0), count(*) FROM llmtally_events "
            "WHERE ts >= ? AND ts < date(?, '+1 day')",  # blocked calls count, at no cost
            (since, last_day)).fetchone()
    printed_cost = re.search(r"cost\s+\$([\d,]+\.\d\d)", result.stdout).group(1)
    printed_calls = re.search(r"calls\s+([\d,]+)", result.stdout).group(1)
    assert float(printed_cost.replace(",", "")) == pytest.approx(cost, abs=0.005)
    assert int(printed_calls.replace(",", "")) == calls
    html = reports[0].read_text()
    assert f"${printed_cost}" in html and "<script" not in html


def test_a_second_run_starts_afresh(demo_run):
    _first, where = demo_run
    again = _run("demo", "--db", "demo.db", "-o", "reports/", cwd=where)
    assert again.returncode == 0, again.stderr
    with sqlite3.connect(where / "demo.db") as conn:
        assert conn.execute("SELECT count(*) FROM llmtally_events WHERE project = 'demo-live'"
                            ).fetchone()[0] == 18


def test_the_demo_refuses_to_overwrite_a_real_ledger(tmp_path):
    from llmtally import Tally

    with Tally(f"sqlite:///{tmp_path / 'mine.db'}", price_map="bundled",
               spill_path=tmp_path / "s.jsonl") as tally:
        tally.record(model="gpt-4o-mini", input_tokens=1, output_tokens=1)
    result = _run("demo", "--db", "mine.db", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "not a demo ledger" in result.stderr and "--db" in result.stderr
    with sqlite3.connect(tmp_path / "mine.db") as conn:
        assert conn.execute("SELECT count(*) FROM llmtally_events").fetchone()[0] == 1


def test_the_weekly_report_example_runs_on_the_demo_ledger(demo_run):
    _result, where = demo_run
    example = Path(__file__).resolve().parent.parent / "examples" / "weekly_report.py"
    done = subprocess.run([sys.executable, str(example), "demo.db", "weekly/"], cwd=where,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    written = list((where / "weekly").glob("llmtally-*-W*.html"))
    assert len(written) == 1 and f"wrote {Path('weekly') / written[0].name}" in done.stdout


def test_the_demo_speaks_the_configured_language_and_keeps_its_own_ledger(tmp_path):
    (tmp_path / "llmtally.toml").write_text('language = "ko"\ndatabase_url = "sqlite:///other.db"\n')
    result = _run("demo", "--db", "demo.db", "-o", "reports/", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "보고서:" in result.stdout and "Report:" not in result.stdout
    assert (tmp_path / "demo.db").exists() and not (tmp_path / "other.db").exists()
