"""PostgreSQL unreachable for 10 s in the middle of a run of real LiteLLM calls (a TCP proxy
between the ledger and the server is cut, then restored): every call succeeds, the events wait
in memory, then in the spill file, and after recovery each is in the ledger exactly once."""

from __future__ import annotations

import logging
import time

import pytest
from conftest import call_id_of, fetch_events, rollups_mismatch

from llmtally import Tally
from llmtally.testing import FakeProvider

from .conftest import CallLoop, wait_until

litellm = pytest.importorskip("litellm")

OUTAGE_S = 10.0


@pytest.mark.slow
def test_calls_succeed_through_a_10_s_outage_and_every_event_lands_once(pg_proxy, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="llmtally")
    proxy, url = pg_proxy
    spill = tmp_path / "spill.jsonl"
    tally = Tally(url, price_map="bundled", spill_path=spill)
    litellm.callbacks = [tally.litellm()]
    with FakeProvider() as provider, CallLoop(provider.openai_base) as calls:
        time.sleep(2.0)
        assert tally.flush(10) and fetch_events(url), "the ledger works before the outage"
        before_cut = len(calls.done)
        proxy.cut()
        time.sleep(OUTAGE_S / 2)
        assert spill.exists() or tally._writer.queued > 0  # the events wait
        time.sleep(OUTAGE_S / 2)
        during = len(calls.done) - before_cut
        proxy.restore()
        time.sleep(2.0)
        calls.stop()
        requests = provider.requests
    ids = calls.ids
    assert calls.failures == []
    assert len(ids) == requests and during > 50  # calls went on during the outage
    assert tally._writer.spilled > 0  # the 10 s outage outlasted spill_after_s (5 s)

    def all_landed() -> bool:
        tally.flush(5)
        return len(fetch_events(url)) >= len(ids)

    assert wait_until(all_landed, timeout=40, interval=0.5), "events did not land after recovery"
    rows = fetch_events(url)
    assert sorted(call_id_of(r) for r in rows) == sorted(ids)  # every call, once
    assert sum(r["input_tokens"] for r in rows) == 12 * len(ids)
    assert not list(tmp_path.glob("spill.jsonl*"))  # the spill file was replayed and removed
    assert rollups_mismatch(url) == []
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot write to the ledger" in m for m in messages) == 1  # once, not per retry
    assert sum("is reachable again" in m for m in messages) >= 1
    assert all("password" not in m for m in messages)
    tally.close()
    print(f"\noutage: {len(ids)} calls, {during} during the {OUTAGE_S:.0f} s outage, "
          f"{tally._writer.spilled} events spilled and replayed")
