"""Soak: thousands of real LiteLLM calls (sync, async, streamed, failing) from 2 processes of
8 threads each, against the fake provider, on SQLite and on PostgreSQL: the ledger holds every
call the application saw exactly once, with the same ids, tokens and cost.

``LLMTALLY_TEST_SOAK_CALLS`` sets the number of calls per backend, rounded down to whole blocks
of 80 (default: 5,920 on SQLite and 1,920 on PostgreSQL, about 60 s on the 2-core machine; the
docs/storage.md gives the figures of the full 20,000-call run; `.ci/run` runs 10,000).
"""

from __future__ import annotations

import os

import pytest
from conftest import call_id_of, fetch_events

from llmtally.testing import FakeProvider

from .conftest import run_workers

pytest.importorskip("litellm")

PROCESSES, THREADS, ASYNC_THREADS = 2, 8, 2
DEFAULT_CALLS = {"sqlite": 6_000, "postgres": 2_000}
PROMPT, COMPLETION = 12, 5  # what the fake provider reports for every successful call


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the full 20,000 calls take ~3 min per backend on 2 cores
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_every_call_is_in_the_ledger_exactly_once(backend, request, tmp_path):
    url = (f"sqlite:///{tmp_path / 'soak.db'}" if backend == "sqlite"
           else request.getfixturevalue("pg_url"))
    calls = int(os.environ.get("LLMTALLY_TEST_SOAK_CALLS") or DEFAULT_CALLS[backend])
    block = THREADS * 10  # each thread's calls cycle through 10 kinds (6 plain, 3 streams, 1 error)
    per_process = max(block, calls // PROCESSES // block * block)
    with FakeProvider() as provider:
        reports = run_workers({"mode": "soak", "url": url, "base": provider.openai_base,
                               "spill": str(tmp_path / "spill.jsonl"), "workdir": str(tmp_path),
                               "threads": THREADS, "async_threads": ASYNC_THREADS,
                               "calls": per_process}, PROCESSES)
        requests = provider.requests
    ok = [i for report in reports for i in report["ok"]]
    errors = [i for report in reports for i in report["error"]]
    assert len(ok) + len(errors) == PROCESSES * per_process == requests
    assert len(set(ok) | set(errors)) == len(ok) + len(errors)  # the application saw unique ids

    rows = fetch_events(url)
    by_id = {call_id_of(row): row for row in rows}
    assert len(rows) == len(by_id) == len(ok) + len(errors)  # nothing missing, nothing extra
    assert set(by_id) == set(ok) | set(errors)
    assert {by_id[i]["status"] for i in ok} == {"ok"}
    assert {(by_id[i]["status"], by_id[i]["error_type"]) for i in errors} == \
        {("error", "litellm.NotFoundError")}
    assert sum(r["input_tokens"] for r in rows) == PROMPT * len(ok)
    assert sum(r["output_tokens"] for r in rows) == COMPLETION * len(ok)
    unit = (PROMPT * 0.15 + COMPLETION * 0.6) / 1e6  # gpt-4o-mini, USD
    assert sum(r["cost"] or 0 for r in rows) == pytest.approx(unit * len(ok), rel=1e-9)
    total = len(rows)
    assert (sum(bool(r["streamed"]) for r in rows), len(errors)) == (total * 3 // 10, total // 10)
    assert not list(tmp_path.glob("spill.jsonl*"))
    seconds = max(report["seconds"] for report in reports)
    print(f"\nsoak {backend}: {len(rows):,} calls in {seconds:.1f} s "
          f"({len(rows) / seconds:,.0f} calls/s through LiteLLM with llmtally)")
