"""Budgets when the ledger fails, through real LiteLLM calls to the fake provider:

- PostgreSQL unreachable (the TCP proxy cut) with the default fail-open: calls are allowed, one
  warning is logged (not one per call), and budgets apply again once it is back;
- the same with ``fail_closed=True``: calls are blocked with a clear error and not one request
  reaches the provider;
- a worker process SIGKILLed while its call (and budget hold) is in flight: the hold blocks
  others until ``reservation_ttl_s`` passes, then the budget is usable again (PostgreSQL; the
  SQLite case with a fake clock is in tests/test_budgets.py).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import MSGS, fetch_events

from llmtally import Budget, BudgetExceeded, Tally
from llmtally.testing import FakeProvider

from .conftest import wait_until, worker_env

litellm = pytest.importorskip("litellm")



def _args(provider: FakeProvider) -> dict:
    return {"model": "openai/gpt-4o-mini", "api_base": provider.openai_base, "api_key": "sk-x",
            "messages": MSGS, "max_tokens": 20}


def _tally(url: str, tmp_path, limit: int = 1000, **kwargs) -> Tally:
    tally = Tally(url, price_map="bundled", spill_path=tmp_path / "spill.jsonl",
                  budgets=[Budget(requests=limit, per="day")], **kwargs)
    litellm.callbacks = [tally.litellm()]
    return tally


def _used(tally: Tally) -> float:
    [state] = tally.budget_states()
    return state.spent + state.reserved


@pytest.mark.slow
def test_fail_open_allows_calls_logs_once_and_budgets_resume(pg_proxy, provider, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="llmtally")
    proxy, url = pg_proxy
    tally = _tally(url, tmp_path, limit=5)
    guarded = tally.guard(litellm.completion)
    for _ in range(3):
        asyncio.run(litellm.acompletion(**_args(provider)))
    assert _used(tally) == 3
    proxy.cut()
    for _ in range(10):  # both routes that check budgets: the async hook and tally.guard
        asyncio.run(litellm.acompletion(**_args(provider)))
        guarded(**_args(provider))
    assert provider.requests == 23  # every call allowed, although the budget is 5 requests
    warnings = [r.getMessage() for r in caplog.records if "budgets could not be checked" in r.getMessage()]
    assert len(warnings) == 1 and "fail open" in warnings[0]
    proxy.restore()
    # Budgets apply again, with the outage's spend charged: the first check after the outage
    # first stores the 20 calls let through (which charges them), so it is blocked.
    with pytest.raises(BudgetExceeded):
        asyncio.run(litellm.acompletion(**_args(provider)))
    assert provider.requests == 23
    assert tally.flush(10) and _used(tally) == 23
    sent = provider.requests
    assert wait_until(lambda: tally.flush(5) and sum(r["status"] == "ok" for r in fetch_events(url)) == sent,
                      timeout=40, interval=0.5)  # the calls made during the outage were replayed
    tally.close()


@pytest.mark.slow
def test_fail_closed_blocks_before_sending_while_the_ledger_is_down(pg_proxy, provider, tmp_path):
    proxy, url = pg_proxy
    tally = _tally(url, tmp_path, fail_closed=True)
    guarded = tally.guard(litellm.completion)
    asyncio.run(litellm.acompletion(**_args(provider)))
    assert provider.requests == 1
    proxy.cut()
    with pytest.raises(BudgetExceeded, match="could not check budgets.*fail_closed=True"):
        asyncio.run(litellm.acompletion(**_args(provider)))
    with pytest.raises(BudgetExceeded, match="could not check budgets.*fail_closed=True"):
        guarded(**_args(provider))
    assert provider.requests == 1  # nothing left the process while blocked
    proxy.restore()
    asyncio.run(litellm.acompletion(**_args(provider)))
    guarded(**_args(provider))
    assert provider.requests == 3
    tally.close()


@pytest.mark.slow
def test_a_killed_workers_hold_expires_after_the_ttl(pg_url, provider, tmp_path):
    ttl_s = 2.0
    budget = Budget(requests=1, per="day")
    provider.delay(60)  # the worker's call stays in flight, holding the budget's one request
    worker = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import litellm
        from llmtally import Budget, Tally
        tally = Tally({pg_url!r}, price_map="bundled", spill_path={str(tmp_path / 'w.jsonl')!r},
                      budgets=[Budget(requests=1, per="day")], reservation_ttl_s={ttl_s})
        litellm.callbacks = [tally.litellm()]
        tally.guard(litellm.completion)(model="openai/gpt-4o-mini", api_base={provider.openai_base!r},
                                        api_key="sk-x", messages=[{{"role": "user", "content": "x"}}])
    """)], stderr=subprocess.PIPE, text=True, env=worker_env())
    try:
        assert wait_until(lambda: provider.requests == 1, timeout=60, interval=0.05)
        worker.send_signal(signal.SIGKILL)
        worker.communicate(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
    provider.delay(0)
    tally = Tally(pg_url, price_map="bundled", spill_path=tmp_path / "spill.jsonl",
                  budgets=[budget], reservation_ttl_s=ttl_s)
    litellm.callbacks = [tally.litellm()]
    started = time.monotonic()
    with pytest.raises(BudgetExceeded):  # still held by the dead process
        asyncio.run(litellm.acompletion(**_args(provider)))
    assert provider.requests == 1
    time.sleep(max(0.0, ttl_s + 0.5 - (time.monotonic() - started)))
    response = asyncio.run(litellm.acompletion(**_args(provider)))  # its hold has expired
    assert response.choices[0].message.content and provider.requests == 2
    tally.close()
