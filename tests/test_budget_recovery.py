"""Budget recovery paths (issue 17, item 1), each on a real SQLite file and the real PostgreSQL.

Each test here fails on a bug that once passed every other budget test:

- a live call that outlasts its reservation TTL: its hold is expired (released) by another
  call about to block, and the call's event, settling it later, must not release it again
  (a $0.05/day budget once ended at $0.10 spent with -$0.05 reserved);
- a counter created after events it counts were already charged to nothing (a call let
  through while the budgets could not be checked): it is seeded from the ledger, and the
  event must not be counted a second time (one $0.01 call once counted $0.02);
- a budget added mid-window is seeded from the ledger without the blocked calls (a
  requests=3 budget added after 1 real and 3 blocked calls once refused every call);
- PostgreSQL's one-statement reserve takes a call that fits the limit exactly (``<=``, not
  ``<``), without falling back to the transaction path (which hid the difference).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from conftest import fetch_events
from sqlalchemy.exc import OperationalError

from llmtally import Budget, BudgetExceeded, Price
from llmtally._budgets.budget import window_for
from llmtally._budgets.counters import check_counters

PENNY = {"penny": Price(input=0, output=0.01, per="token")}  # one output token = $0.01 exactly
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)


def _penny_call(tally, **attribution) -> bool:
    """Reserve $0.01, then record the call that cost exactly that. False if blocked."""
    try:
        held = tally.reserve(model="penny", input_tokens=0, max_tokens=1, **attribution)
    except BudgetExceeded:
        return False
    tally.record(model="penny", output_tokens=1, reservation=held, **attribution)
    return True


def _state(tally, label: str | None = None) -> tuple[float, float]:
    states = [s for s in tally.budget_states() if label is None or s.budget.label == label]
    [state] = states
    return round(state.spent, 9), round(state.reserved, 9)


def _clocked(make_tally, url, budgets, **kwargs):
    clock = {"now": NOW}
    tally = make_tally(url, prices=PENNY, budgets=budgets, clock=lambda: clock["now"], **kwargs)
    return tally, clock


# -- 1. a live call outlasting its TTL ----------------------------------------------------------


def test_a_live_call_expired_by_another_is_not_released_again_when_it_settles(ledger_url,
                                                                            make_tally):
    tally, clock = _clocked(make_tally, ledger_url, [Budget(usd=0.05, per="day")],
                            reservation_ttl_s=1)
    slow = tally.reserve(model="penny", input_tokens=0, max_tokens=5)  # holds the whole $0.05
    clock["now"] += timedelta(seconds=2)  # the call is still running, past its TTL
    assert _penny_call(tally)  # about to block: the stale hold is expired, this call goes
    assert _state(tally) == (0.01, 0.0)
    tally.record(model="penny", output_tokens=4, reservation=slow)  # the slow call ends: $0.04
    assert _state(tally) == (0.05, 0.0)  # charged once, its hold not given back a second time
    assert not _penny_call(tally)  # the budget is spent
    assert check_counters(tally.store) == []


def test_a_hold_settled_after_its_ttl_is_not_expired_again(ledger_url, make_tally):
    tally, clock = _clocked(make_tally, ledger_url, [Budget(usd=0.05, per="day")],
                            reservation_ttl_s=1)
    slow = tally.reserve(model="penny", input_tokens=0, max_tokens=5)
    clock["now"] += timedelta(seconds=2)
    tally.record(model="penny", output_tokens=4, reservation=slow)  # settled late, unexpired
    assert _state(tally) == (0.04, 0.0)
    clock["now"] += timedelta(seconds=10)  # expiry is due at the next check
    assert _penny_call(tally)
    assert not _penny_call(tally)  # nothing was released twice: $0.05 is the limit
    assert _state(tally) == (0.05, 0.0)
    assert check_counters(tally.store) == []


def test_releasing_an_expired_hold_gives_nothing_back_twice(ledger_url, make_tally):
    tally, clock = _clocked(make_tally, ledger_url, [Budget(usd=0.05, per="day")],
                            reservation_ttl_s=1)
    unused = tally.reserve(model="penny", input_tokens=0, max_tokens=5)
    clock["now"] += timedelta(seconds=2)
    assert _penny_call(tally)  # expires the unused hold
    tally.release(unused)  # the call was never made: release it (already expired)
    assert _state(tally) == (0.01, 0.0)
    assert [_penny_call(tally) for _ in range(5)] == [True] * 4 + [False]
    assert _state(tally) == (0.05, 0.0)
    assert check_counters(tally.store) == []


# -- 2. a counter created after its events were charged to nothing ------------------------------


def test_a_call_let_through_before_the_counter_exists_is_counted_once(ledger_url, make_tally):
    tally, _ = _clocked(make_tally, ledger_url, [Budget(usd=0.05, per="day")])
    checked = tally.budgets.reserve

    def unreachable(*args, **kwargs):
        raise OperationalError("UPDATE llmtally_budget_counters", {}, OSError("connection refused"))

    tally.budgets.reserve = unreachable
    assert _penny_call(tally)  # fail open: allowed, no hold, no counter yet
    tally.budgets.reserve = checked
    assert tally.flush(10)  # its event is stored (and charged to the counters that exist: none)
    assert _state(tally) == (0.01, 0.0)
    assert [_penny_call(tally) for _ in range(5)] == [True] * 4 + [False]  # the counter: $0.01
    assert _state(tally) == (0.05, 0.0)
    assert check_counters(tally.store) == []


def test_an_event_recorded_before_any_counter_is_seeded_once(ledger_url, make_tally):
    tally, _ = _clocked(make_tally, ledger_url, [Budget(requests=3, per="day"),
                                                 Budget(usd=0.05, per="day")])
    tally.record(model="penny", output_tokens=1)  # no reservation: charged when written
    assert tally.flush(10)
    assert _state(tally, "requests 3/day") == (1, 0)
    assert [_penny_call(tally) for _ in range(3)] == [True, True, False]
    assert _state(tally, "requests 3/day") == (3, 0)
    assert _state(tally, "usd 0.05/day") == (0.03, 0.0)
    assert check_counters(tally.store) == []


# -- 3. a budget added mid-window: blocked calls are not seeded ---------------------------------


def test_a_budget_added_mid_window_is_seeded_without_blocked_calls(ledger_url, make_tally):
    first, _ = _clocked(make_tally, ledger_url, [Budget(usd=0.01, per="day")])
    assert [_penny_call(first) for _ in range(4)] == [True, False, False, False]
    assert first.flush(10)
    assert sorted(r["status"] for r in fetch_events(ledger_url)) == ["blocked"] * 3 + ["ok"]
    # a budget no process defined until now: its counter is seeded from 1 call, not 4
    second, _ = _clocked(make_tally, ledger_url, [Budget(requests=3, per="day")])
    assert [_penny_call(second) for _ in range(3)] == [True, True, False]
    assert _state(second) == (3, 0)
    assert check_counters(first.store) == []


def test_blocked_calls_are_not_charged_to_a_counter_that_exists(ledger_url, make_tally):
    tally, _ = _clocked(make_tally, ledger_url, [Budget(requests=2, per="day"),
                                                 Budget(tokens=1000, per="day")])
    assert [_penny_call(tally) for _ in range(5)] == [True, True, False, False, False]
    tally.record(model="penny", status="blocked", input_tokens=7, output_tokens=7)
    assert _state(tally, "requests 2/day") == (2, 0)
    assert _state(tally, "tokens 1000/day") == (2, 0)
    assert check_counters(tally.store) == []


# -- 4. PostgreSQL: the one-statement reserve ---------------------------------------------------


def test_postgres_one_statement_reserve_takes_an_exact_fit(pg_url, make_tally):
    tally, _ = _clocked(make_tally, pg_url, [Budget(usd=0.03, per="day")])
    assert _penny_call(tally)  # the first check expires dead holds: the transaction path
    ledger = tally.budgets
    fallbacks = []
    in_transaction = ledger._reserve_in_transaction

    def fallback(*args, **kwargs):
        fallbacks.append(args)
        return in_transaction(*args, **kwargs)

    ledger._reserve_in_transaction = fallback
    assert _penny_call(tally)
    assert _penny_call(tally)  # $0.02 + $0.01 = the limit exactly: fits
    assert fallbacks == []  # both held by the one statement
    assert not _penny_call(tally)
    assert fallbacks  # a call with no room goes to the transaction path (which names the budget)
    assert _state(tally) == (0.03, 0.0)


def test_postgres_one_statement_reserve_decides_at_the_unit(pg_url, make_tally):
    budgets = [Budget(usd=0.03, per="day"), Budget(tokens=10, per="day"),
               Budget(requests=1, per="day", action="warn")]
    tally, _ = _clocked(make_tally, pg_url, budgets)
    ledger = tally.budgets
    ledger.publish()
    now = NOW.replace(tzinfo=None)
    covering = ledger.covering({}, now)
    ledger._ensure_counters_pg(covering, now)
    # exactly the limits: held on all three (the warn-only budget never refuses)
    held = ledger._reserve_in_one_statement("r1", covering,
                                            {"usd": 0.03, "tokens": 10, "requests": 1}, now)
    assert held is not None and len(held.holds) == 3
    ledger.release(held)
    # one nano-dollar over: refused, and nothing held anywhere
    assert ledger._reserve_in_one_statement(
        "r2", covering, {"usd": 0.030000001, "tokens": 10, "requests": 1}, now) is None
    # one token over: refused
    assert ledger._reserve_in_one_statement(
        "r3", covering, {"usd": 0.01, "tokens": 11, "requests": 1}, now) is None
    # the warn-only budget far past its limit still holds
    held = ledger._reserve_in_one_statement("r4", covering,
                                            {"usd": 0.01, "tokens": 1, "requests": 50}, now)
    assert held is not None
    states = {s.budget.label: (s.spent, round(s.reserved, 9)) for s in ledger.states(now)}
    assert states == {"usd 0.03/day": (0, 0.01), "tokens 10/day": (0, 1),
                      "requests 1/day": (0, 50)}
    window = window_for("day", NOW)
    assert all(h.window == window for h in held.holds)
    assert check_counters(tally.store) == []
