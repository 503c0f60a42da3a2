"""Budgets: calendar windows, scopes, reserve before / settle after, concurrency, alerts, faults."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from conftest import fetch_events, require_postgres

from llmtally import Budget, BudgetExceeded, ConfigError, Price, Tally
from llmtally._budgets.budget import instance_for, window_for
from llmtally.testing import FakeProvider, FakeUsage

PENNY = {"penny": Price(input=0, output=0.01, per="token")}  # one output token = $0.01 exactly
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)


def _penny_call(tally: Tally, **attribution) -> bool:
    """Reserve $0.01, then record the call that cost exactly that. False if blocked."""
    try:
        held = tally.reserve(model="penny", input_tokens=0, max_tokens=1, **attribution)
    except BudgetExceeded:
        return False
    tally.record(model="penny", output_tokens=1, reservation=held, **attribution)
    return True


# -- windows ------------------------------------------------------------------------------------

def _utc(*args) -> datetime:
    return datetime(*args)


@pytest.mark.parametrize(("per", "now", "start", "end"), [
    ("minute", datetime(2026, 11, 25, 23, 59, 59, tzinfo=timezone.utc), _utc(2026, 11, 25, 23, 59), _utc(2026, 11, 26, 0, 0)),
    ("hour", datetime(2026, 11, 25, 23, 0, tzinfo=timezone.utc), _utc(2026, 11, 25, 23), _utc(2026, 11, 26)),
    ("day", datetime(2026, 11, 25, 23, 59, 59, 999999, tzinfo=timezone.utc), _utc(2026, 11, 25), _utc(2026, 11, 26)),
    ("day", datetime(2026, 11, 26, 0, 0, tzinfo=timezone.utc), _utc(2026, 11, 26), _utc(2026, 11, 27)),
    ("week", datetime(2026, 11, 29, 23, 0, tzinfo=timezone.utc), _utc(2026, 11, 23), _utc(2026, 11, 30)),  # a Sunday
    ("week", datetime(2026, 11, 30, 0, 0, tzinfo=timezone.utc), _utc(2026, 11, 30), _utc(2026, 12, 7)),   # Monday
    ("month", datetime(2026, 11, 30, 23, 59, tzinfo=timezone.utc), _utc(2026, 11, 1), _utc(2026, 12, 1)),
    ("month", datetime(2026, 12, 31, 12, 0, tzinfo=timezone.utc), _utc(2026, 12, 1), _utc(2027, 1, 1)),
    ("month", datetime(2028, 2, 29, 12, 0, tzinfo=timezone.utc), _utc(2028, 2, 1), _utc(2028, 3, 1)),
])
def test_utc_windows_have_exact_boundaries(per, now, start, end):
    window = window_for(per, now)
    assert (window.start, window.end) == (start, end)


def test_total_never_resets():
    window = window_for("total", NOW)
    assert window.end is None and window.start <= datetime(2000, 1, 1)


def test_windows_follow_the_time_zone_and_dst():
    berlin = ZoneInfo("Europe/Berlin")
    # 2026-03-29: clocks go 02:00 -> 03:00 in Berlin, so that day is 23 hours long.
    day = window_for("day", datetime(2026, 3, 29, 12, 0, tzinfo=berlin), berlin)
    assert (day.start, day.end) == (_utc(2026, 3, 28, 23), _utc(2026, 3, 29, 22))
    # 2026-10-25: clocks go 03:00 -> 02:00, a 25-hour day.
    day = window_for("day", datetime(2026, 10, 25, 12, 0, tzinfo=berlin), berlin)
    assert (day.start, day.end) == (_utc(2026, 10, 24, 22), _utc(2026, 10, 25, 23))
    # Local midnight, not UTC midnight: 23:30 UTC on Nov 25 is already Nov 26 in Berlin.
    day = window_for("day", datetime(2026, 11, 25, 23, 30, tzinfo=timezone.utc), berlin)
    assert day.start == _utc(2026, 11, 25, 23)
    month = window_for("month", datetime(2026, 10, 31, 23, 30, tzinfo=timezone.utc), berlin)
    assert (month.start, month.end) == (_utc(2026, 10, 31, 23), _utc(2026, 11, 30, 23))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"usd": -1}, "must be a number >= 0"),
    ({"usd": 1, "tokens": 5}, "exactly one of"),
    ({}, "exactly one of"),
    ({"tokens": 1.5}, "whole number"),
    ({"usd": 1, "per": "fortnight"}, "per='fortnight' is not a window"),
    ({"usd": 1, "scope": {"team": "x"}}, "scope key 'team' is unknown"),
    ({"usd": 1, "each": "colour"}, "each='colour'"),
    ({"usd": 1, "action": "shout"}, "action='shout'"),
    ({"usd": 1, "warn_at": (1.5,)}, "warn_at"),
    ({"usd": float("nan")}, "must be a number"),
])
def test_invalid_budgets_are_refused_with_the_field_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Budget(**kwargs)


def test_unknown_time_zone_is_refused(make_tally):
    with pytest.raises(ConfigError, match="timezone='Mars/Olympus'"):
        make_tally(budgets=[Budget(usd=1)], timezone="Mars/Olympus")


def test_scopes_and_each_decide_which_calls_count():
    attrs = {"project": "search", "user": "alice", "provider": "openai", "model": "gpt-4o",
             "tags": ("beta",)}
    assert instance_for(Budget(usd=1), attrs) == ""
    assert instance_for(Budget(usd=1, scope={"project": "search"}), attrs) == ""
    assert instance_for(Budget(usd=1, scope={"project": "etl"}), attrs) is None
    assert instance_for(Budget(usd=1, scope={"tag": "beta"}), attrs) == ""
    assert instance_for(Budget(usd=1, scope={"tag": "prod"}), attrs) is None
    assert instance_for(Budget(usd=1, scope={"model": "gpt-4o", "provider": "openai"}), attrs) == ""
    assert instance_for(Budget(usd=1, each="user"), attrs) == "alice"
    assert instance_for(Budget(usd=1, scope={"project": "search"}, each="user"), attrs) == "alice"
    assert instance_for(Budget(usd=1, each="user"), {**attrs, "user": None}) is None


# -- reserve, settle, block ---------------------------------------------------------------------

def test_exactly_the_limit_is_spent_and_the_next_call_is_blocked(ledger_url, make_tally):
    tally = make_tally(ledger_url, prices=PENNY, budgets=[Budget(usd=1, per="day")])
    results = [_penny_call(tally) for _ in range(105)]
    assert results.count(True) == 100 and results[100:] == [False] * 5
    tally.flush(10)
    rows = fetch_events(ledger_url)
    assert sum(r["status"] == "ok" for r in rows) == 100
    blocked = [r for r in rows if r["status"] == "blocked"]
    assert len(blocked) == 5
    assert all(r["cost"] == 0 and r["error_type"] == "llmtally.BudgetExceeded" for r in blocked)
    [state] = tally.budget_states()
    assert (state.spent, state.reserved) == (1.0, 0.0)


def test_budget_exceeded_says_which_budget_scope_use_limit_and_reset(make_tally):
    tally = make_tally(prices=PENNY, clock=lambda: NOW,
                       budgets=[Budget(usd=0.02, per="day", each="user")])
    assert _penny_call(tally, user="alice") and _penny_call(tally, user="alice")
    with pytest.raises(BudgetExceeded) as info:
        tally.reserve(model="penny", input_tokens=0, max_tokens=1, user="alice")
    error = info.value
    assert error.budget.label == "usd 0.02/day each user"
    assert error.scope == {"user": "alice"}
    assert (error.used, error.limit, error.requested) == (pytest.approx(0.02), 0.02, 0.01)
    assert error.resets_at == datetime(2026, 11, 26, tzinfo=timezone.utc)
    assert "user=alice" in str(error) and "resets 2026-11-26T00:00:00+00:00" in str(error)
    assert _penny_call(tally, user="bob")  # every user has a budget of their own
    assert _penny_call(tally)  # no user: the each="user" budget does not cover it


def test_the_estimate_uses_the_prompt_and_max_tokens_then_settles_to_the_real_cost(make_tally):
    tally = make_tally(budgets=[Budget(usd=1, per="month")])
    messages = [{"role": "user", "content": "Say hello to the whole wide world, please."}]
    held = tally.reserve(model="gpt-4o-mini", provider="openai", messages=messages, max_tokens=1000)
    [hold] = held.holds
    prompt = hold.amount / 1e9 - 1000 * 0.6e-6
    assert 0 < prompt / 0.15e-6 < 40  # the prompt was counted offline: a few tokens
    [state] = tally.budget_states()
    assert state.reserved == pytest.approx(hold.amount / 1e9) and state.spent == 0
    tally.record(model="gpt-4o-mini", provider="openai", input_tokens=20, output_tokens=10,
                 reservation=held)
    [state] = tally.budget_states()
    assert state.reserved == 0
    assert state.spent == pytest.approx(20 * 0.15e-6 + 10 * 0.6e-6, abs=1e-9)


def test_without_max_tokens_the_models_output_limit_is_capped(make_tally):
    tally = make_tally(budgets=[Budget(tokens=10**9)], max_output_estimate=2000)
    held = tally.reserve(model="gpt-4o-mini", input_tokens=100)  # its limit is 16,384
    assert held.holds[0].amount == 100 + 2000
    tally.release(held)
    assert tally.budget_states()[0].reserved == 0


def test_a_failed_call_releases_its_hold_but_counts_as_a_request(make_tally):
    tally = make_tally(prices=PENNY, budgets=[Budget(usd=1), Budget(requests=10, per="minute")])

    @tally.track(model="penny")
    def failing(max_tokens: int):
        raise TimeoutError("provider too slow")

    with pytest.raises(TimeoutError):
        failing(max_tokens=1)
    usd, requests = sorted(tally.budget_states(), key=lambda s: s.budget.kind)[::-1]
    assert (usd.budget.kind, usd.spent, usd.reserved) == ("usd", 0.0, 0.0)
    assert (requests.budget.kind, requests.spent, requests.reserved) == ("requests", 1.0, 0.0)


def test_warn_budgets_never_block(make_tally):
    seen = []
    tally = make_tally(prices=PENNY, alerts=[seen.append],
                       budgets=[Budget(usd=0.05, action="warn", warn_at=(0.5, 1.0))])
    assert all(_penny_call(tally) for _ in range(10))
    tally.flush()  # warnings fire when the events that cross them are stored
    assert [(a["event"], a["threshold"]) for a in seen] == [("threshold", 0.5), ("threshold", 1.0)]
    assert tally.budget_states()[0].spent == pytest.approx(0.10)


def test_spend_already_in_the_ledger_counts_when_a_budget_is_added(sqlite_url, make_tally):
    before = make_tally(sqlite_url, prices=PENNY, clock=lambda: NOW)
    for _ in range(7):
        before.record(model="penny", output_tokens=1, project="search")
    before.record(model="penny", output_tokens=1, project="etl")
    before.flush(10)
    tally = make_tally(sqlite_url, prices=PENNY, clock=lambda: NOW,
                       budgets=[Budget(usd=0.1, per="month", scope={"project": "search"})])
    results = [_penny_call(tally, project="search") for _ in range(5)]
    assert results == [True, True, True, False, False]


def test_tag_scoped_budgets_count_tagged_events(ledger_url, make_tally):
    seed = make_tally(ledger_url, prices=PENNY, clock=lambda: NOW)
    seed.record(model="penny", output_tokens=1, tags=["beta", "x"])
    seed.record(model="penny", output_tokens=1, tags=["other"])
    seed.flush(10)
    tally = make_tally(ledger_url, prices=PENNY, clock=lambda: NOW,
                       budgets=[Budget(usd=0.03, per="day", scope={"tag": "beta"})])
    assert [_penny_call(tally, tags=["beta"]) for _ in range(3)] == [True, True, False]
    assert _penny_call(tally, tags=["other"])


def test_a_blocked_tracked_call_never_reaches_the_provider(make_tally):
    openai = pytest.importorskip("openai")
    with FakeProvider(usage=FakeUsage(prompt_tokens=10, completion_tokens=1)) as provider:
        tally = make_tally(prices={"gpt-4o-mini": Price(input=0, output=0.01, per="token")},
                           budgets=[Budget(usd=0.02, per="day")])
        client = openai.OpenAI(base_url=provider.openai_base, api_key="sk-test", max_retries=0)
        ask = tally.track(provider="openai")(client.chat.completions.create)
        for _ in range(2):
            ask(model="gpt-4o-mini", max_tokens=1, messages=[{"role": "user", "content": "hi"}])
        assert provider.requests == 2
        with pytest.raises(BudgetExceeded):
            ask(model="gpt-4o-mini", max_tokens=1, messages=[{"role": "user", "content": "hi"}])
        assert provider.requests == 2  # nothing was sent


# -- concurrency --------------------------------------------------------------------------------

CONCURRENT_WORKER = """
import sys, threading
from datetime import datetime
from llmtally import Budget, BudgetExceeded, Price, Tally
url, spill, kind = sys.argv[1], sys.argv[2], sys.argv[3]
now = datetime.fromisoformat(sys.argv[4])  # one fixed moment: the run never straddles a window
budgets = {"usd": [Budget(usd=1.00, per="day")], "tokens": [Budget(tokens=1000, per="minute")],
           # several counters per call, shared in different combinations: locks taken in order
           "overlapping": [Budget(usd=1.00, per="day"), Budget(usd=5, per="day", each="user"),
                           Budget(requests=10**6, per="month", scope={"project": "p"})]}[kind]
tally = Tally(url, price_map="bundled", spill_path=spill, budgets=budgets, clock=lambda: now,
              prices={"penny": Price(input=0, output=0.01, per="token")})
ok = blocked = 0
lock = threading.Lock()
def run(n):
    global ok, blocked
    who = {"user": f"u{n % 3}", "project": "p"}
    for _ in range(10):
        try:
            held = tally.reserve(model="penny", input_tokens=0, max_tokens=10 if kind == "tokens" else 1, **who)
        except BudgetExceeded:
            with lock: blocked += 1
            continue
        tally.record(model="penny", output_tokens=10 if kind == "tokens" else 1, reservation=held, **who)
        with lock: ok += 1
threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
for t in threads: t.start()
for t in threads: t.join()
tally.close()
print(ok, blocked)
"""


@pytest.mark.parametrize("kind", ["usd", "tokens", "overlapping"])
def test_four_processes_of_eight_threads_never_overshoot(ledger_url, tmp_path, kind):
    script = tmp_path / "worker.py"
    script.write_text(CONCURRENT_WORKER)
    moment = datetime.now(timezone.utc).replace(second=30).isoformat()
    procs = [subprocess.Popen([sys.executable, str(script), ledger_url,
                               str(tmp_path / f"spill-{n}.jsonl"), kind, moment],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in range(4)]
    ok = blocked = 0
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        done, refused = map(int, out.split())
        ok, blocked = ok + done, blocked + refused
    # 320 attempts against $1.00 of $0.01 calls (or 1,000 tokens of 10-token calls): exactly 100.
    assert (ok, blocked) == (100, 220)
    rows = fetch_events(ledger_url)
    assert sum(r["status"] == "ok" for r in rows) == 100
    if kind != "tokens":
        assert sum(r["cost"] for r in rows if r["status"] == "ok") == pytest.approx(1.0, abs=1e-9)


# -- expiry, alerts, faults ---------------------------------------------------------------------

def test_a_killed_processes_reservation_expires(sqlite_url, tmp_path, make_tally):
    script = textwrap.dedent(f"""
        import os
        from llmtally import Budget, Price, Tally
        tally = Tally({sqlite_url!r}, price_map="bundled", spill_path={str(tmp_path / 'k.jsonl')!r},
                      budgets=[Budget(usd=0.05, per="day")], reservation_ttl_s=1,
                      prices={{"penny": Price(input=0, output=0.01, per="token")}})
        tally.reserve(model="penny", input_tokens=0, max_tokens=5)   # holds all $0.05
        os.kill(os.getpid(), 9)                                       # dies before settling
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert result.returncode == -9
    clock = {"now": datetime.now(timezone.utc)}
    tally = make_tally(sqlite_url, prices=PENNY, budgets=[Budget(usd=0.05, per="day")],
                       reservation_ttl_s=1, clock=lambda: clock["now"])
    assert not _penny_call(tally)  # still held by the dead process
    clock["now"] += timedelta(seconds=2)
    assert _penny_call(tally)      # its hold expired


def test_each_threshold_fires_once_per_window_across_tallies(ledger_url, make_tally):
    seen = []
    budget = Budget(usd=0.10, per="day", warn_at=(0.5, 0.8))
    first = make_tally(ledger_url, prices=PENNY, budgets=[budget], alerts=[seen.append])
    second = make_tally(ledger_url, prices=PENNY, budgets=[budget], alerts=[seen.append])
    for turn in range(10):
        assert _penny_call(first if turn % 2 else second)
    assert not _penny_call(first)
    first.flush()
    second.flush()
    thresholds = [a["threshold"] for a in seen if a["event"] == "threshold"]
    assert thresholds == [0.5, 0.8]
    blocked = [a for a in seen if a["event"] == "blocked"]
    assert len(blocked) == 1 and blocked[0]["budget"] == "usd 0.1/day"
    assert json.dumps(seen)  # alerts are plain JSON


def test_fail_open_allows_calls_when_the_ledger_is_unreachable(tmp_path, caplog):
    require_postgres()
    url = "postgresql+psycopg://postgres@127.0.0.1:1/test"
    tally = Tally(url, price_map="bundled", spill_path=tmp_path / "s.jsonl", prices=PENNY,
                  budgets=[Budget(usd=0.01, per="day")])
    assert _penny_call(tally) and _penny_call(tally)  # allowed, logged
    assert "budgets could not be checked" in caplog.text
    tally.close()
    closed = Tally(url, price_map="bundled", spill_path=tmp_path / "s2.jsonl", prices=PENNY,
                   budgets=[Budget(usd=0.01, per="day")], fail_closed=True)
    with pytest.raises(BudgetExceeded, match="could not check budgets.*fail_closed=True"):
        closed.reserve(model="penny", input_tokens=0, max_tokens=1)
    closed.close()


def test_calls_let_through_unchecked_are_charged_to_the_budget_once(ledger_url, make_tally):
    """A call that went out without a hold — fail open (an empty reservation) or simply
    recorded — is charged to every covering budget by the transaction that stores it, once,
    including a counter that does not exist yet (seeded from the ledger, this event in it)."""
    from llmtally._budgets.states import Reservation

    tally = make_tally(ledger_url, prices=PENNY, budgets=[Budget(usd=0.03, per="day"),
                                                          Budget(usd=1, per="day", each="user")])
    assert _penny_call(tally, user="ann")  # the day counter exists; ann's is created
    tally.record(model="penny", output_tokens=1, user="ann",
                 reservation=Reservation("let-through", ()))  # fail open: nothing held
    tally.record(model="penny", output_tokens=1, user="bob")  # bob's counter does not exist yet
    tally.flush()
    spent = {(s.budget.label, s.instance): round(s.spent, 9) for s in tally.budget_states()}
    assert spent == {("usd 0.03/day", ""): 0.03, ("usd 1/day each user", "ann"): 0.02}
    assert _penny_call(tally, user="bob") is False  # the day budget is spent: refused
    assert round(tally.budget_states()[0].spent, 9) == 0.03
    from llmtally._budgets.counters import check_counters

    assert check_counters(tally.store) == []  # every counter equals the ledger's GROUP BY


def test_no_budgets_means_no_reservation_and_no_database_work(make_tally):
    tally = make_tally()
    assert tally.reserve(model="gpt-4o-mini", input_tokens=10) is None
    assert tally.budget_states() == []
    tally.release(None)


# -- webhooks -----------------------------------------------------------------------------------

class _Receiver:
    """A loopback HTTP endpoint that records JSON POSTs; fails the first ``fail_first`` ones."""

    def __init__(self, fail_first: int = 0) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        receiver = self
        self.bodies: list[dict] = []
        self.attempts = 0
        self.fail_first = fail_first

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.attempts += 1
                if receiver.attempts <= receiver.fail_first:
                    self.send_response(500)
                else:
                    receiver.bodies.append(json.loads(body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/secret-token-123"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_webhooks_get_each_threshold_and_the_block_as_json(make_tally):
    receiver = _Receiver()
    try:
        tally = make_tally(prices=PENNY, alerts=[receiver.url],
                           budgets=[Budget(usd=0.04, per="day", each="user", warn_at=(0.5,))])
        results = [_penny_call(tally, user="ann") for _ in range(5)]
        assert results == [True] * 4 + [False]
        tally.flush()  # the threshold fires when the events crossing it are stored
        assert tally._guard.drain_alerts(10)
        events = [(body["event"], body.get("threshold")) for body in receiver.bodies]
        assert sorted(events, key=str) == [("blocked", None), ("threshold", 0.5)]
        blocked = receiver.bodies[1]
        assert blocked["budget"] == "usd 0.04/day each user"
        assert blocked["scope"] == {"user": "ann"} and blocked["limit"] == 0.04
        assert blocked["used"] == pytest.approx(0.04) and blocked["resets_at"]
    finally:
        receiver.close()


def test_a_failing_webhook_is_retried_and_never_delays_the_call(make_tally, caplog):
    import logging
    import time as _time

    receiver = _Receiver(fail_first=2)
    try:
        tally = make_tally(prices=PENNY, alerts=[receiver.url, "http://127.0.0.1:1/hook?token=s3cret"],
                           budgets=[Budget(usd=0.01, per="day", warn_at=())])
        caplog.set_level(logging.WARNING, logger="llmtally")
        assert _penny_call(tally)
        started = _time.perf_counter()
        assert not _penny_call(tally)  # blocked: alerts go out on another thread
        assert _time.perf_counter() - started < 1.0
        assert tally._guard.drain_alerts(20)
        assert receiver.attempts == 3 and len(receiver.bodies) == 1  # 2 failures, then delivered
        assert "could not be delivered to http://127.0.0.1:1/…" in caplog.text
        assert "s3cret" not in caplog.text and "secret-token" not in caplog.text
    finally:
        receiver.close()
