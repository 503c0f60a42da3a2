"""Budgets exact on every path (issue 18): one line blocks sync calls too, every event in the
ledger is charged exactly once whatever path wrote it, caller ids never merge calls or skip
holds, estimates that cannot be gamed, definitions shared through the ledger.

Real LiteLLM over HTTP to the loopback fake provider, real SQLite files and the real
PostgreSQL. Each call of ``gpt-4o-mini`` costs exactly $0.01 (one output token at $0.01, no
input price, ``max_tokens=1``), so the estimate equals the real cost.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading

import pytest
from conftest import MSGS, fetch_events
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmtally import Budget, BudgetExceeded, CallEvent, Price, Tally
from llmtally._budgets.counters import check_counters
from llmtally._events.event import event_row
from llmtally._events.scope import EMPTY
from llmtally._events.usage import Usage
from llmtally.testing import FakeUsage

litellm = pytest.importorskip("litellm")

PRICES = {"gpt-4o-mini": Price(input=0, output=0.01, per="token"),
          "gpt-3.5-turbo-instruct": Price(input=0, output=0.01, per="token"),
          "text-embedding-3-small": Price(input=0.01, output=0, per="token"),
          "penny": Price(input=0, output=0.01, per="token")}


FAKE_PROVIDER = {"usage": FakeUsage(prompt_tokens=1, completion_tokens=1)}


def _chat(fp, **kw):
    return {"model": "openai/gpt-4o-mini", "api_base": fp.openai_base, "api_key": "sk-test",
            "messages": MSGS, "max_tokens": 1, **kw}


def _spent(tally: Tally) -> dict[tuple[str, str], float]:
    return {(s.budget.label, s.instance): round(s.spent, 9) for s in tally.budget_states()}


def _meta(row: dict) -> dict:
    return row["metadata"] if isinstance(row["metadata"], dict) else json.loads(row["metadata"])


def _ledger_cost(url: str) -> float:
    return round(sum(row["cost"] or 0 for row in fetch_events(url) if row["status"] != "blocked"), 9)


# -- 1. one line: every sync SDK call is stopped before it is sent ------------------------------


SYNC_CALLS = {
    "completion": lambda fp: litellm.completion(**_chat(fp)),
    "stream": lambda fp: list(litellm.completion(**_chat(fp, stream=True,
                                                         stream_options={"include_usage": True}))),
    "text_completion": lambda fp: litellm.text_completion(
        model="openai/gpt-3.5-turbo-instruct", prompt="hi", max_tokens=1,
        api_base=fp.openai_base, api_key="sk-test"),
    "embedding": lambda fp: litellm.embedding(
        model="openai/text-embedding-3-small", input=["hi"], api_base=fp.openai_base,
        api_key="sk-test"),
    "router": lambda fp: litellm.Router(num_retries=0, model_list=[
        {"model_name": "gpt-4o-mini", "litellm_params": {
            "model": "openai/gpt-4o-mini", "api_base": fp.openai_base, "api_key": "sk-test"}}]
    ).completion(model="gpt-4o-mini", messages=MSGS, max_tokens=1),
}


@pytest.mark.parametrize("kind", sorted(SYNC_CALLS))
def test_one_line_blocks_every_sync_call_before_it_is_sent(ledger_url, make_tally, provider, kind):
    tally = make_tally(ledger_url, prices=PRICES, budgets=[Budget(usd=0.02, per="day")])
    litellm.callbacks = [tally.litellm()]  # the one line: no guard anywhere
    call = SYNC_CALLS[kind]
    call(provider)
    call(provider)
    with pytest.raises(BudgetExceeded, match="usd 0.02/day"):
        call(provider)
    assert provider.requests == 2  # the third never left the process
    assert tally.flush(10)
    rows = fetch_events(tally.store.url)
    assert sorted(row["status"] for row in rows) == ["blocked", "ok", "ok"]
    [state] = tally.budget_states()
    assert (round(state.spent, 9), state.reserved) == (0.02, 0)
    assert _ledger_cost(tally.store.url) == 0.02
    assert check_counters(tally.store) == []


def test_a_completion_imported_before_the_tally_existed_is_blocked(make_tally, provider):
    from litellm import completion  # bound before the Tally and its logger exist

    tally = make_tally(prices=PRICES, budgets=[Budget(usd=0.01, per="day")])
    litellm.callbacks = [tally.litellm()]
    completion(**_chat(provider))
    with pytest.raises(BudgetExceeded):
        completion(**_chat(provider))
    assert provider.requests == 1


def test_forty_sync_calls_under_a_budget_that_fits_four(make_tally, provider):
    tally = make_tally(prices=PRICES, budgets=[Budget(usd=0.04, per="day")])
    litellm.callbacks = [tally.litellm()]
    allowed = 0
    for _ in range(40):
        try:
            litellm.completion(**_chat(provider))
            allowed += 1
        except BudgetExceeded:
            pass
    assert (allowed, provider.requests) == (4, 4)


def test_sync_calls_from_threads_never_overshoot(ledger_url, make_tally, provider):
    tally = make_tally(ledger_url, prices=PRICES, budgets=[Budget(usd=0.05, per="day")])
    litellm.callbacks = [tally.litellm()]
    allowed = []

    def worker():
        for _ in range(5):
            try:
                litellm.completion(**_chat(provider))
                allowed.append(1)
            except BudgetExceeded:
                pass

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(allowed) == provider.requests == 5
    assert tally.flush(10)
    assert _spent(tally) == {("usd 0.05/day", ""): 0.05}
    assert check_counters(tally.store) == []


# -- 2. the ledger is the truth: spend outside a hold is charged ------------------------------


def test_spend_recorded_outside_a_hold_stops_the_next_async_call(ledger_url, make_tally, provider):
    tally = make_tally(ledger_url, prices=PRICES, budgets=[Budget(usd=0.05, per="day")])
    litellm.callbacks = [tally.litellm()]

    async def first():
        await litellm.acompletion(**_chat(provider))

    asyncio.run(first())  # the budget is in use
    for _ in range(4):  # $0.04 recorded by hand: no reservation
        tally.record(model="penny", output_tokens=1)
    assert tally.flush(10)

    async def next_call():
        await litellm.acompletion(**_chat(provider))

    with pytest.raises(BudgetExceeded):
        asyncio.run(next_call())
    assert provider.requests == 1
    assert _spent(tally) == {("usd 0.05/day", ""): 0.05}


def test_a_process_without_budgets_charges_the_ledgers_budgets(ledger_url, make_tally):
    guarded = make_tally(ledger_url, prices=PRICES, budgets=[Budget(usd=0.03, per="day")])
    assert guarded.reserve(model="penny", input_tokens=0, max_tokens=1) is not None
    plain = make_tally(ledger_url, prices=PRICES)  # defines no budget, shares the ledger
    plain.record(model="penny", output_tokens=1)
    plain.record(model="penny", output_tokens=1)
    assert plain.flush(10)
    with pytest.raises(BudgetExceeded):  # $0.01 held + $0.02 spent elsewhere: no room
        guarded.reserve(model="penny", input_tokens=0, max_tokens=1)
    assert check_counters(guarded.store) == []


def test_an_import_into_an_open_window_is_charged(ledger_url, make_tally, tmp_path):
    from llmtally._transfer.export import export_events
    from llmtally._transfer.importing import import_events

    tally = make_tally(ledger_url, prices=PRICES, budgets=[Budget(usd=0.10, per="day")])
    tally.reserve(model="penny", input_tokens=0, max_tokens=1)  # the counter exists
    source = make_tally(f"sqlite:///{tmp_path / 'other.db'}", prices=PRICES)
    for _ in range(3):
        source.record(model="penny", output_tokens=1)
    source.flush(10)
    path = tmp_path / "events.jsonl.gz"
    export_events(source.store, path)
    assert import_events(tally.store, path).imported == 3
    assert import_events(tally.store, path).imported == 0  # idempotent: not charged twice
    assert round(tally.budget_states()[0].spent, 9) == 0.03
    assert check_counters(tally.store) == []


def test_a_spill_replay_is_charged_once(make_tally, tmp_path):
    spill = tmp_path / "shared.spill.jsonl"
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    tally = make_tally(url, prices=PRICES, budgets=[Budget(tokens=100, per="day")],
                       spill_path=spill)
    tally.reserve(model="penny", input_tokens=0, max_tokens=1)
    tally.flush(10)
    rows = [event_row(CallEvent(model="penny", usage=Usage(5, 5)), event_id=f"spilled-{n}",
                      now=tally.now(), scope=EMPTY, prices=tally.prices) for n in range(3)]
    assert tally._writer.spill_now(rows + rows[:1], reason="test")  # one line twice
    assert tally.flush(10)
    assert not spill.exists()
    [state] = tally.budget_states()
    assert state.spent == 30  # three events of 10 tokens, the repeated line once
    assert check_counters(tally.store) == []


def test_prune_keeps_counters_equal_to_the_ledger(ledger_url, make_tally):
    from datetime import datetime, timedelta, timezone

    from llmtally._transfer.prune import prune_events

    now = datetime.now(timezone.utc)
    tally = make_tally(ledger_url, prices=PRICES, budgets=[Budget(usd=1, per="total"),
                                                           Budget(usd=1, per="day")])
    tally.reserve(model="penny", input_tokens=0, max_tokens=1)
    for days in (40, 30, 0):
        tally.record(model="penny", output_tokens=1, ts=now - timedelta(days=days))
    assert tally.flush(10)
    assert check_counters(tally.store) == []
    prune_events(tally.store, "10d", now=now)
    assert check_counters(tally.store) == []
    spent = _spent(tally)
    assert spent[("usd 1/total", "")] == 0.01 and spent[("usd 1/day", "")] == 0.01


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(
    st.sampled_from(["held", "unheld", "fail-open", "blocked", "duplicate", "released",
                     "error", "other-user"]),
    st.integers(min_value=0, max_value=3)), min_size=1, max_size=25))
def test_counters_equal_the_ledger_after_any_mix_of_paths(make_tally, tmp_path, steps):
    """Property: whatever mix of paths wrote the events, each counter's spend equals the sum
    over its window's covered events and its reserve equals the open holds."""
    from llmtally._budgets.states import Reservation

    url = f"sqlite:///{tmp_path / f'mix-{id(steps)}.db'}"
    tally = make_tally(url, prices=PRICES, budgets=[
        Budget(usd=0.05, per="day"), Budget(tokens=6, per="day", each="user"),
        Budget(requests=4, per="day", scope={"project": "p"}, action="warn")])
    last_id = None
    for path, tokens in steps:
        user = "bob" if path == "other-user" else "ann"
        try:
            held = tally.reserve(model="penny", input_tokens=0, max_tokens=1, user=user,
                                 project="p")
        except BudgetExceeded:
            continue
        if path == "released":
            tally.release(held)
            continue
        if path == "fail-open":
            held = Reservation("open", ())
        elif path == "unheld":
            tally.release(held)
            held = None
        event_id = last_id if path == "duplicate" and last_id else None
        last_id = tally.record(model="penny", output_tokens=tokens, user=user, project="p",
                               status="error" if path == "error" else "ok",
                               reservation=held, id=event_id)
        if path == "blocked":
            tally.record(model="penny", status="blocked", user=user, project="p")
    assert tally.flush(10)
    assert check_counters(tally.store) == []


# -- 3. caller ids never merge calls nor skip holds --------------------------------------------


def test_concurrent_calls_sharing_a_call_id_are_separate_events_and_holds(ledger_url, make_tally,
                                                                          provider):
    tally = make_tally(ledger_url, prices=PRICES, budgets=[Budget(usd=0.03, per="day")])
    litellm.callbacks = [tally.litellm()]
    provider.delay(0.2)  # all eight are in flight together

    async def main():
        async def one():
            try:
                await litellm.acompletion(**_chat(provider, litellm_call_id="same-id"))
                return True
            except BudgetExceeded:
                return False
        results = await asyncio.gather(*(one() for _ in range(8)))
        await tally.aflush(10)
        return results

    results = asyncio.run(main())
    assert sum(results) == 3 and provider.requests == 3
    rows = fetch_events(tally.store.url)
    assert sorted(row["status"] for row in rows) == ["blocked"] * 5 + ["ok"] * 3
    assert len({row["id"] for row in rows}) == 8
    assert all(_meta(row).get("litellm_call_id") == "same-id"
               for row in rows if row["status"] == "ok")
    assert _spent(tally) == {("usd 0.03/day", ""): 0.03}


def test_a_logger_registered_twice_records_one_event(make_tally, provider, monkeypatch):
    from llmtally.integrations.litellm import LiteLLMLogger

    tally = make_tally(prices=PRICES, budgets=[Budget(usd=1, per="day")])
    logger_ = tally.litellm()
    assert tally.litellm() is logger_  # one logger per Tally
    # LiteLLM itself runs one logger per key (class and public scalar attributes): the same
    # logger in three lists runs once. A second logger of this Tally under another key is not
    # dropped, so every call's hooks run twice; the call's own id (stamped when LiteLLM set it
    # up) makes the two records one event, charged once.
    again = LiteLLMLogger(tally)
    again.llmtally_instance += "-again"
    hooks = []
    record = LiteLLMLogger._record

    def counted(self, kwargs, *args, **kw):
        hooks.append(self)
        return record(self, kwargs, *args, **kw)

    monkeypatch.setattr(LiteLLMLogger, "_record", counted)
    litellm.callbacks = [logger_, again]
    litellm.success_callback.append(logger_)
    litellm._async_success_callback.append(logger_)
    litellm.completion(**_chat(provider))
    asyncio.run(litellm.acompletion(**_chat(provider)))
    assert tally.flush(10)
    assert sorted(map(id, hooks)) == sorted([id(logger_), id(again)] * 2)  # 2 calls x 2 loggers
    rows = fetch_events(tally.store.url)
    assert [(row["status"], round(row["cost"], 9)) for row in rows] == [("ok", 0.01)] * 2
    assert _spent(tally) == {("usd 1/day", ""): 0.02}


def test_two_tallies_in_one_process_each_record(tmp_path, provider):
    first = Tally(str(tmp_path / "a.db"), spill_path=tmp_path / "a.spill", price_map="bundled",
                  prices=PRICES)
    second = Tally(str(tmp_path / "b.db"), spill_path=tmp_path / "b.spill", price_map="bundled",
                   prices=PRICES)
    try:
        litellm.callbacks = [first.litellm(), second.litellm()]
        litellm.completion(**_chat(provider))
        assert first.flush(10) and second.flush(10)
        assert len(fetch_events(first.store.url)) == len(fetch_events(second.store.url)) == 1
    finally:
        first.close()
        second.close()


# -- 4. estimates that cannot be gamed ----------------------------------------------------------


def test_n_multiplies_the_output_estimate(make_tally, provider):
    tally = make_tally(prices=PRICES, budgets=[Budget(usd=0.04, per="day")])
    litellm.callbacks = [tally.litellm()]
    with pytest.raises(BudgetExceeded, match="needs 0.05"):
        litellm.completion(**_chat(provider, n=5))  # 5 choices of 1 token: $0.05 > $0.04
    assert provider.requests == 0
    held = tally.reserve(model="penny", input_tokens=0, max_tokens=1, choices=4)
    assert held.holds[0].amount == 4 * 10**7


@pytest.mark.parametrize("max_tokens", [None, 0, -5, "lots", 2.5, True, 10**12])
def test_max_tokens_absent_absurd_or_wrong_is_the_models_limit(make_tally, max_tokens):
    tally = make_tally(budgets=[Budget(tokens=10**9, per="day")], max_output_estimate=4096)
    held = tally.reserve(model="gpt-4o-mini", provider="openai", input_tokens=0,
                         max_tokens=max_tokens)
    limit = tally.prices.max_output_tokens("gpt-4o-mini", "openai")
    expected = limit if max_tokens == 10**12 else min(limit, 4096)
    assert held.holds[0].amount == expected


def test_an_embedding_counts_every_input(make_tally, provider):
    tally = make_tally(prices=PRICES, budgets=[Budget(tokens=1000, per="day")])
    litellm.callbacks = [tally.litellm()]
    texts = ["one two three four five"] * 10
    with pytest.raises(BudgetExceeded) as blocked:
        tally_budget = Budget(tokens=20, per="day")
        small = make_tally(prices=PRICES, budgets=[tally_budget])
        litellm.callbacks = [small.litellm()]
        litellm.embedding(model="openai/text-embedding-3-small", input=texts,
                          api_base=provider.openai_base, api_key="sk-test")
    assert blocked.value.requested >= 50  # every input counted, not just the first
    assert provider.requests == 0


def test_unpriced_models_under_a_usd_budget_are_a_decision(make_tally, caplog):
    allow = make_tally(budgets=[Budget(usd=0.01, per="day")])
    with caplog.at_level(logging.WARNING, logger="llmtally"):
        for _ in range(3):
            assert allow.reserve(model="my-own-deployment", input_tokens=5) is not None
    assert caplog.text.count("'my-own-deployment' has no price") == 1  # once per model
    block = make_tally(budgets=[Budget(usd=0.01, per="day")], unpriced="block")
    with pytest.raises(BudgetExceeded, match="has no price"):
        block.reserve(model="my-own-deployment", input_tokens=5)
    priced = make_tally(budgets=[Budget(usd=0.01, per="day")], unpriced="block",
                        prices={"my-own-deployment": Price(input=0, output=0, per="token")})
    assert priced.reserve(model="my-own-deployment", input_tokens=5) is not None
    assert block.flush(10)
    assert [row["status"] for row in fetch_events(block.store.url)] == ["blocked"]


def test_unpriced_setting_is_checked(make_tally):
    from llmtally import ConfigError

    with pytest.raises(ConfigError, match="unpriced="):
        make_tally(unpriced="maybe")


# -- 6. async callers never wait for budget SQL on their loop ----------------------------------


def test_async_holds_are_taken_off_the_event_loop(make_tally, provider, monkeypatch):
    tally = make_tally(prices=PRICES, budgets=[Budget(usd=1, per="day")])
    litellm.callbacks = [tally.litellm()]
    threads = []
    real = tally.budgets.reserve

    def spy(*args, **kwargs):
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(tally.budgets, "reserve", spy)

    async def main():
        loop_thread = threading.current_thread()
        await litellm.acompletion(**_chat(provider))
        await tally.aflush(10)
        return loop_thread

    loop_thread = asyncio.run(main())
    assert threads and all(thread is not loop_thread for thread in threads)
    assert tally.litellm()._holds == {}
    assert _spent(tally) == {("usd 1/day", ""): 0.01}


# -- 7. budgets visible everywhere, conflicts clear ---------------------------------------------


def test_budgets_are_defined_in_the_ledger_for_every_reader(ledger_url, make_tally):
    from click.testing import CliRunner

    from llmtally.cli import main

    tally = make_tally(ledger_url, prices=PRICES, budgets=[Budget(usd=5, per="day", name="daily"),
                                                           Budget(tokens=100, per="hour")])
    tally.reserve(model="penny", input_tokens=0, max_tokens=1)
    reader = make_tally(ledger_url)  # defines none
    from llmtally._budgets.counters import defined_budgets

    with reader.store.connect() as conn:
        labels = sorted(d.budget.label for d in defined_budgets(conn))
    assert labels == ["daily", "tokens 100/hour"]
    result = CliRunner().invoke(main, ["budgets", "--db", ledger_url])
    assert result.exit_code == 0, result.output
    assert "daily" in result.output and "tokens 100/hour" in result.output


def test_a_conflicting_definition_is_logged_and_the_latest_wins(ledger_url, make_tally, caplog):
    first = make_tally(ledger_url, prices=PRICES, budgets=[Budget(usd=0.05, per="day")])
    first.reserve(model="penny", input_tokens=0, max_tokens=1)
    with caplog.at_level(logging.WARNING, logger="llmtally"):
        second = make_tally(ledger_url, prices=PRICES, budgets=[Budget(usd=0.01, per="day")])
    assert "The latest definition wins" in caplog.text
    first.budgets._next_refresh = first.budgets._next_refresh.min  # as after a few seconds
    with caplog.at_level(logging.WARNING, logger="llmtally"):
        with pytest.raises(BudgetExceeded, match="usd 0.01/day"):
            first.reserve(model="penny", input_tokens=0, max_tokens=1)  # $0.01 held already
    assert "redefined in the ledger" in caplog.text
    assert second.budgets.budgets[0].limit == 0.01


def test_budgets_check_finds_and_repairs_drift(ledger_url, make_tally):
    from click.testing import CliRunner
    from sqlalchemy import text

    from llmtally.cli import main

    tally = make_tally(ledger_url, prices=PRICES, budgets=[Budget(usd=1, per="day")])
    held = tally.reserve(model="penny", input_tokens=0, max_tokens=1)
    tally.record(model="penny", output_tokens=1, reservation=held)
    assert tally.flush(10)
    runner = CliRunner()
    assert runner.invoke(main, ["budgets", "--check", "--db", ledger_url]).exit_code == 0
    with tally.store.write() as conn:  # drift: someone edited the counter
        conn.execute(text("UPDATE llmtally_budget_counters SET spent = spent + 123"))
    checked = runner.invoke(main, ["budgets", "--check", "--db", ledger_url])
    assert checked.exit_code == 1 and "usd 1/day" in checked.output
    repaired = runner.invoke(main, ["budgets", "--repair", "--db", ledger_url])
    assert repaired.exit_code == 0, repaired.output
    assert check_counters(tally.store) == []
    assert _spent(tally) == {("usd 1/day", ""): 0.01}


def test_aflush_means_every_finished_async_call(make_tally, provider, caplog):
    tally = make_tally(prices=PRICES, budgets=[
        Budget(usd=100, per="day"), Budget(usd=50, per="day", each="user"),
        Budget(tokens=10**6, per="minute")])
    litellm.callbacks = [tally.litellm()]

    async def main():
        await asyncio.gather(*(litellm.acompletion(**_chat(provider, user=f"u{i % 5}"))
                               for i in range(200)))
        assert await tally.aflush(30)

    with caplog.at_level(logging.WARNING, logger="llmtally"):
        asyncio.run(main())
        tally.close()
    assert "after this Tally was closed" not in caplog.text
    rows = fetch_events(tally.store.url)
    assert len(rows) == 200 and all(row["status"] == "ok" for row in rows)
    assert check_counters(tally.store) == []


# -- found by review: each of these failed before its fix ----------------------------------


def test_a_caller_cannot_choose_the_stamp_that_keys_a_hold(make_tally, provider):
    tally = make_tally(prices=PRICES, budgets=[Budget(usd=0.03, per="day")])
    litellm.callbacks = [tally.litellm()]
    provider.delay(0.3)

    async def main():
        async def one(n):
            await asyncio.sleep(0.02 * n)
            try:
                await litellm.acompletion(**_chat(provider, llmtally_event_id="mine"))
                return True
            except BudgetExceeded:
                return False
        results = await asyncio.gather(*(one(n) for n in range(8)))
        await tally.aflush(10)
        return results

    assert sum(asyncio.run(main())) == 3 and provider.requests == 3
    assert _spent(tally) == {("usd 0.03/day", ""): 0.03}
    assert check_counters(tally.store) == []


def test_a_cancelled_async_check_gives_its_hold_back(make_tally):
    import time

    from llmtally._budgets.offloop import reserve_off_loop

    tally = make_tally(prices=PRICES, budgets=[Budget(usd=0.05, per="day")])

    def slow_reserve():
        time.sleep(0.2)  # the caller is cancelled while the hold is being taken
        return tally.reserve(model="penny", input_tokens=0, max_tokens=1)

    async def main():
        task = asyncio.ensure_future(reserve_off_loop(tally, slow_reserve))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5)  # the thread finishes, its hold is given back

    asyncio.run(main())
    [state] = tally.budget_states()
    assert state.reserved == 0


def test_costs_of_half_a_nano_unit_keep_counters_equal_to_the_ledger(ledger_url, make_tally):
    tally = make_tally(ledger_url, prices={"tiny": Price(input=2.5e-9, output=0, per="token")},
                       budgets=[Budget(usd=1, per="day")])
    tally.reserve(model="tiny", input_tokens=1, max_tokens=1)
    for _ in range(10):
        tally.record(model="tiny", input_tokens=1)
    assert tally.flush(10)
    assert check_counters(tally.store) == []


def test_a_threshold_already_reached_when_a_counter_is_created_still_fires_once(make_tally):
    seen = []
    tally = make_tally(prices=PRICES, alerts=[seen.append],
                       budgets=[Budget(usd=0.10, per="day", warn_at=(0.5,))])
    for _ in range(6):  # $0.06 before any counter exists
        tally.record(model="penny", output_tokens=1)
    assert tally.flush(10)
    tally.reserve(model="penny", input_tokens=0, max_tokens=1)  # creates it, seeded at $0.06
    tally.record(model="penny", output_tokens=1)
    tally.record(model="penny", output_tokens=1)
    assert tally.flush(10)
    assert [(a["event"], a["threshold"]) for a in seen] == [("threshold", 0.5)]


def test_budgets_keep_working_after_the_sqlite_file_is_replaced(make_tally, tmp_path):
    path = tmp_path / "moved.db"
    tally = make_tally(f"sqlite:///{path}", prices=PRICES, budgets=[Budget(usd=0.03, per="day")])
    held = tally.reserve(model="penny", input_tokens=0, max_tokens=1)
    tally.record(model="penny", output_tokens=1, reservation=held)
    assert tally.flush(10)
    path.unlink()
    tally.record(model="penny", output_tokens=1)  # the writer follows the file to its new inode
    assert tally.flush(10)
    results = []
    for _ in range(4):
        try:
            held = tally.reserve(model="penny", input_tokens=0, max_tokens=1)
            tally.record(model="penny", output_tokens=1, reservation=held)
            results.append(True)
        except BudgetExceeded:
            results.append(False)
    assert results == [True, True, False, False]  # $0.01 in the new file, then two more
    assert check_counters(tally.store) == []
