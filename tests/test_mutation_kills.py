"""Tests written to kill mutants that survived the rest of the suite (``python
benchmarks/mutation.py``; the triage is in benchmarks/RESULTS.md, "Mutation testing").

Each pins down behaviour the other tests exercised without checking: the exact format of a
spill line, which claims a replayer takes, which counters a batch of events charges.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from llmtally import Budget, Price
from llmtally._storage.spill import SpillFile, _process_alive, decode_event, encode_event

# -- _spill.py -----------------------------------------------------------------------------------


def _event(n: int = 1, **extra) -> dict:
    return {"id": f"e{n}", "ts": datetime(2026, 11, 25, 12, 0, n), **extra}


def test_a_spill_line_is_compact_ascii_json_with_an_iso_timestamp():
    line = encode_event({**_event(), "model": "gpt-4o", "text": "caf\u00e9 \ud800",
                         "cost": Decimal("0.5")})
    assert line == ('{"id":"e1","ts":"2026-11-25T12:00:01","model":"gpt-4o",'
                    '"text":"caf\\u00e9 \\ud800","cost":"0.5"}')
    line.encode("ascii")  # never fails: every non-ASCII character is escaped
    assert encode_event({"id": "x", "ts": "already text"}) == '{"id":"x","ts":"already text"}'
    row = decode_event(encode_event(_event(2, model="m")))
    assert row == _event(2, model="m")


@pytest.mark.parametrize("line", ['[1, 2]', '{"ts": "2026-11-25T12:00:00"}',
                                  '{"id": 7, "ts": "2026-11-25T12:00:00"}', '{"id": "e1"}',
                                  '{"id": "e1", "ts": "yesterday"}'])
def test_anything_but_an_event_is_refused_on_decode(line):
    with pytest.raises(ValueError, match="not an llmtally event|Invalid isoformat"):
        decode_event(line)


def test_appending_nothing_creates_no_file(tmp_path):
    spill = SpillFile(tmp_path / "sub" / "x.spill.jsonl")
    spill.append([])
    spill.append_lines([])
    assert not spill.path.exists() and not spill.has_backlog()


def test_appends_create_the_directory_and_a_private_file(tmp_path):
    spill = SpillFile(tmp_path / "new" / "dir" / "x.spill.jsonl")
    spill.append([_event(1), _event(2)])
    assert stat.S_IMODE(os.stat(spill.path).st_mode) == 0o600
    assert spill.path.read_text().splitlines() == [encode_event(_event(1)), encode_event(_event(2))]
    assert spill.has_backlog()


def test_a_stub_left_by_a_dead_writer_stays_on_a_line_of_its_own(tmp_path):
    spill = SpillFile(tmp_path / "x.spill.jsonl")
    spill.path.write_bytes(encode_event(_event(1)).encode()[:15])  # cut mid-line, no newline
    spill.append([_event(2)])
    spill.append([_event(3)])  # after a whole line: no blank line inserted
    lines = spill.path.read_text().split("\n")
    assert lines[1:] == [encode_event(_event(2)), encode_event(_event(3)), ""]
    [claimed] = spill.claim()
    rows, bad = spill.read(claimed)
    assert [r["id"] for r in rows] == ["e2", "e3"] and bad == [1]


def test_read_skips_blank_lines_and_numbers_bad_ones_from_one(tmp_path):
    path = tmp_path / "claimed"
    path.write_text("\n".join(["", encode_event(_event(1)), "not json", "   ", "[]",
                               encode_event(_event(2)), '{"id": "e9", "ts": 5}']) + "\n")
    rows, bad = SpillFile(tmp_path / "x").read(path)
    assert [r["id"] for r in rows] == ["e1", "e2"]
    assert bad == [3, 5, 7]


def test_read_keeps_a_line_with_invalid_utf8_readable(tmp_path):
    path = tmp_path / "claimed"
    path.write_bytes(b'{"id":"e1","ts":"2026-11-25T12:00:00","model":"a\xffb"}\n')
    rows, bad = SpillFile(tmp_path / "x").read(path)
    assert bad == [] and rows[0]["model"] == "a\ufffdb"


def test_claim_takes_the_file_and_the_claims_of_dead_processes_only(tmp_path, request):
    spill = SpillFile(tmp_path / "x.spill.jsonl")
    spill.append([_event(1)])
    dead = 2**22 + 12345  # above the default pid_max: no such process
    assert not _process_alive(dead)
    orphan = tmp_path / f"x.spill.jsonl.replaying.{dead}.abc"
    orphan.write_text(encode_event(_event(2)) + "\n")
    sleeper = subprocess.Popen(["sleep", "60"])  # a live process of our own (a mutant may
    request.addfinalizer(sleeper.kill)           # signal it: never a process we did not start)
    live = tmp_path / f"x.spill.jsonl.replaying.{sleeper.pid}.def"
    live.write_text(encode_event(_event(3)) + "\n")
    odd = tmp_path / "x.spill.jsonl.replaying.notapid.ghi"
    odd.write_text("")
    for n in range(5):  # more names that are no claim, among more claims of dead processes
        (tmp_path / f"x.spill.jsonl.replaying.z{n}.q").write_text("")
        (tmp_path / f"x.spill.jsonl.replaying.{dead + 1 + n}.r{n}").write_text("")
    dotted = tmp_path / f"x.spill.jsonl.replaying.{dead}.a.b"  # extra dots after the pid
    dotted.write_text("")
    other = tmp_path / f"y.spill.jsonl.replaying.{dead}.jkl"  # another spill file's claim
    other.write_text("")
    mine_before = tmp_path / f"x.spill.jsonl.replaying.{os.getpid()}.mno"  # an unfinished replay
    mine_before.write_text(encode_event(_event(4)) + "\n")
    assert spill.has_backlog()
    claimed = spill.claim()
    assert live.exists() and odd.exists() and other.exists()  # not taken
    assert mine_before in claimed and not orphan.exists() and not spill.path.exists()
    assert not dotted.exists()
    assert len(claimed) == 9
    prefix = f"x.spill.jsonl.replaying.{os.getpid()}."
    assert all(p.name.startswith(prefix) for p in claimed)
    ids = sorted(r["id"] for p in claimed for r in spill.read(p)[0])  # the empty ones: none
    assert ids == ["e1", "e2", "e4"]
    for path in claimed:
        path.unlink()
    assert not spill.has_backlog()  # a live process's claim is not a backlog of ours
    live.unlink()
    orphan.write_text("")
    assert spill.has_backlog()  # a dead process's claim is


def test_a_claimed_file_is_renamed_with_a_fresh_suffix_each_time(tmp_path):
    spill = SpillFile(tmp_path / "x.spill.jsonl")
    spill.append([_event(1)])
    [first] = spill.claim()
    spill.append([_event(2)])
    claimed = spill.claim()
    assert first in claimed and len(claimed) == 2  # our own unfinished claim, and the new one
    suffixes = {p.name.rsplit(".", 1)[1] for p in claimed}
    assert len(suffixes) == 2 and all(len(s) == 12 for s in suffixes)


def test_process_alive(monkeypatch):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        assert _process_alive(sleeper.pid)
        time.sleep(0.3)
        assert sleeper.poll() is None  # only asked: no signal delivered
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not _process_alive(sleeper.pid)

    def not_ours(pid, signal):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", not_ours)
    assert _process_alive(12345)  # another user's process is alive


def test_a_forked_child_gets_a_lock_of_its_own(tmp_path):
    spill = SpillFile(tmp_path / "x.spill.jsonl")
    spill._lock.acquire()  # held by a thread of the parent at the fork
    spill.reset_lock()
    spill.append([_event(1)])
    assert spill.path.exists()


def test_an_append_follows_the_file_a_replayer_claimed_meanwhile(tmp_path):
    spill = SpillFile(tmp_path / "x.spill.jsonl")
    spill.append([_event(1)])
    [claimed] = spill.claim()
    with spill.replaying(claimed):
        spill.append([_event(2)])  # the path now names a new file: appended there
    assert [r["id"] for r in spill.read(claimed)[0]] == ["e1"]
    assert [json.loads(line)["id"] for line in spill.path.read_text().splitlines()] == ["e2"]


def test_timestamps_keep_their_zone_through_a_spill_line():
    aware = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)
    assert decode_event(encode_event({"id": "a", "ts": aware}))["ts"] == aware


def test_an_append_that_lost_the_race_to_a_claim_retries_on_the_new_file(tmp_path, monkeypatch):
    from llmtally._storage import spill as _spill

    answers = iter([False, True])  # first open: the file was claimed between open and flock
    monkeypatch.setattr(_spill, "_still_at", lambda fd, path: next(answers))
    spill = SpillFile(tmp_path / "x.spill.jsonl")
    spill.append([_event(1)])
    assert spill.path.read_text() == encode_event(_event(1)) + "\n"  # written once, not lost
    assert next(answers, "asked twice") == "asked twice"  # checked under the lock, each time


def test_still_at_tells_a_renamed_or_replaced_file(tmp_path):
    from llmtally._storage.spill import _still_at

    path = tmp_path / "f"
    path.write_text("x")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _still_at(fd, path)
        path.rename(tmp_path / "g")
        assert not _still_at(fd, path)  # gone
        path.write_text("y")
        assert not _still_at(fd, path)  # another file under the name
    finally:
        os.close(fd)


# -- _reservations.py ----------------------------------------------------------------------------

PENNY = {"penny": Price(input=0, output=0.01, per="token")}
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)


def test_thresholds_are_reached_at_their_share_of_the_limit():
    from llmtally._budgets.states import thresholds_reached

    assert thresholds_reached(Budget(tokens=100, warn_at=(0.5, 0.8)), 10) == []
    assert thresholds_reached(Budget(tokens=100, warn_at=(0.5, 0.8)), 50) == [0.5]
    assert thresholds_reached(Budget(tokens=100, warn_at=(0.5, 0.8)), 80) == [0.5, 0.8]
    assert thresholds_reached(Budget(requests=1, warn_at=(0.5, 0.8)), 1) == [0.5, 0.8]
    assert thresholds_reached(Budget(requests=1, warn_at=(0.5, 0.8)), 0) == []
    assert thresholds_reached(Budget(usd=0, warn_at=(0.5,)), 10) == []  # no limit to share


def test_postgres_one_statement_reserve_holds_nothing_for_a_kind_not_estimated(pg_url,
                                                                              make_tally):
    tally = make_tally(pg_url, prices=PENNY, budgets=[Budget(tokens=10, per="day"),
                                                      Budget(usd=1, per="day")],
                       clock=lambda: NOW)
    ledger = tally.budgets
    ledger.publish()
    now = NOW.replace(tzinfo=None)
    covering = ledger.covering({}, now)
    ledger._ensure_counters_pg(covering, now)
    held = ledger._reserve_in_one_statement("r1", covering, {"usd": 0.5}, now)
    assert sorted((h.budget.kind, h.amount) for h in held.holds) == [("tokens", 0),
                                                                     ("usd", 500_000_000)]


# -- _store.py: the inserting transaction charges what it really inserted -----------------------


@pytest.mark.parametrize("ledger", ["sqlite", "postgres"])
def test_a_batch_charges_each_new_event_once_however_many_and_repeated(ledger, request,
                                                                        make_tally, tmp_path):
    url = (f"sqlite:///{tmp_path / 'big.db'}" if ledger == "sqlite"
           else request.getfixturevalue("pg_url"))
    tally = make_tally(url, prices=PENNY, budgets=[Budget(requests=5000, per="day")],
                       clock=lambda: NOW, batch_size=5000, flush_interval_s=60)
    held = tally.reserve(model="penny", input_tokens=0, max_tokens=1)  # creates the counter
    tally.record(id="first", model="penny", output_tokens=1, reservation=held)
    assert tally.flush(10)
    for n in range(1200):  # one batch: more ids than one lookup of 500 holds
        tally.record(id=f"e{n}", model="penny", output_tokens=1)
    for n in range(300):  # the same ids again, in the same batch
        tally.record(id=f"e{n}", model="penny", output_tokens=1)
    tally.record(id="first", model="penny", output_tokens=1)  # stored in an earlier batch
    assert tally.flush(30)
    [state] = tally.budget_states()
    assert (state.spent, state.reserved) == (1201, 0)
    from llmtally._budgets.counters import check_counters

    assert check_counters(tally.store) == []


def test_a_call_straddling_midnight_releases_yesterday_and_charges_today(ledger_url, make_tally):
    from datetime import timedelta

    from conftest import fetch_events

    from llmtally._budgets.counters import check_counters

    clock = {"now": datetime(2026, 11, 25, 23, 59, 59, tzinfo=timezone.utc)}
    tally = make_tally(ledger_url, prices=PENNY, budgets=[Budget(usd=0.05, per="day")],
                       clock=lambda: clock["now"])
    held = tally.reserve(model="penny", input_tokens=0, max_tokens=5)  # $0.05 on the 25th
    clock["now"] += timedelta(seconds=2)  # the call ends on the 26th: its event counts there
    tally.record(model="penny", output_tokens=3, reservation=held)
    assert tally.flush(10)
    assert len(fetch_events(ledger_url)) == 1
    [today] = tally.budget_states()
    assert (round(today.spent, 9), today.reserved) == (0.03, 0)
    clock["now"] -= timedelta(seconds=2)
    [yesterday] = tally.budget_states()
    assert (yesterday.spent, yesterday.reserved) == (0, 0)  # released, nothing charged there
    assert check_counters(tally.store) == []


def test_a_threshold_is_reported_by_a_charge_not_by_a_release(ledger_url, make_tally):
    seen = []
    tally = make_tally(ledger_url, prices=PENNY, clock=lambda: NOW, alerts=[seen.append],
                       budgets=[Budget(usd=0.10, per="day", each="user", warn_at=(0.5,))])
    for _ in range(6):  # alice's calls before her counter exists: seeded later, not charged
        tally.record(model="penny", output_tokens=1, user="alice")
    assert tally.flush(10)
    held = tally.reserve(model="penny", input_tokens=0, max_tokens=1, user="alice")  # seeds $0.06
    tally.record(model="penny", output_tokens=1, user="bob", reservation=held)  # bob's call
    assert tally.flush(10)
    assert [a for a in seen if a["event"] == "threshold"] == []  # alice: a release, no charge
    tally.record(model="penny", output_tokens=1, user="alice")
    assert tally.flush(10)
    assert [(a["threshold"], a["scope"]) for a in seen if a["event"] == "threshold"] == [
        (0.5, {"user": "alice"})]


def _thresholds(seen: list) -> list:
    return [(a["budget"], a["threshold"]) for a in seen if a["event"] == "threshold"]


def test_a_late_event_in_a_closed_window_warns_no_one(ledger_url, make_tally):
    from datetime import timedelta

    seen = []
    clock = {"now": NOW - timedelta(days=1)}
    tally = make_tally(ledger_url, prices=PENNY, clock=lambda: clock["now"], alerts=[seen.append],
                       budgets=[Budget(usd=0.10, per="day", warn_at=(0.5,))])
    held = tally.reserve(model="penny", input_tokens=0, max_tokens=1)  # yesterday's counter
    tally.record(model="penny", output_tokens=1, reservation=held)
    assert tally.flush(10)
    clock["now"] = NOW
    for _ in range(5):  # yesterday's calls, recorded today: charged to yesterday's window
        tally.record(model="penny", output_tokens=1, ts=NOW - timedelta(hours=23))
    assert tally.flush(10)
    assert _thresholds(seen) == []  # that window is over: nothing to warn about
    clock["now"] = NOW - timedelta(days=1)
    [yesterday] = tally.budget_states()
    assert round(yesterday.spent, 9) == 0.06


def test_thresholds_warn_in_a_local_day_that_started_the_day_before_in_utc(ledger_url,
                                                                          make_tally):
    seen = []
    tally = make_tally(ledger_url, prices=PENNY, clock=lambda: NOW, alerts=[seen.append],
                       timezone="Europe/Berlin",  # the day began at 23:00 UTC on the 24th
                       budgets=[Budget(usd=0.10, per="day", warn_at=(0.5,))])
    for _ in range(5):
        held = tally.reserve(model="penny", input_tokens=0, max_tokens=1)
        tally.record(model="penny", output_tokens=1, reservation=held)
    assert tally.flush(10)
    assert _thresholds(seen) == [("usd 0.1/day", 0.5)]


def test_a_total_budget_warns_once_across_processes(ledger_url, make_tally):
    seen = []
    budget = Budget(usd=0.10, per="total", warn_at=(0.5, 0.8))
    first = make_tally(ledger_url, prices=PENNY, clock=lambda: NOW, alerts=[seen.append],
                       budgets=[budget])
    second = make_tally(ledger_url, prices=PENNY, clock=lambda: NOW, alerts=[seen.append],
                        budgets=[budget])
    for turn in range(9):
        tally = first if turn % 2 else second
        held = tally.reserve(model="penny", input_tokens=0, max_tokens=1)
        tally.record(model="penny", output_tokens=1, reservation=held)
        assert tally.flush(10)
    assert _thresholds(seen) == [("usd 0.1/total", 0.5), ("usd 0.1/total", 0.8)]
    [alert] = [a for a in seen if a["threshold"] == 0.5]
    assert alert["resets_at"] is None


def test_an_event_charged_at_the_instant_its_window_ends_warns_no_one(ledger_url, make_tally):
    seen = []
    clock = {"now": NOW}
    tally = make_tally(ledger_url, prices=PENNY, clock=lambda: clock["now"], alerts=[seen.append],
                       budgets=[Budget(usd=0.10, per="day", warn_at=(0.5,))])
    held = tally.reserve(model="penny", input_tokens=0, max_tokens=1)
    tally.record(model="penny", output_tokens=1, reservation=held)
    assert tally.flush(10)
    clock["now"] = datetime(2026, 11, 26, tzinfo=timezone.utc)  # midnight: the 25th is over
    for _ in range(5):
        tally.record(model="penny", output_tokens=1, ts=NOW)
    assert tally.flush(10)
    assert _thresholds(seen) == []


def test_two_budgets_crossing_in_one_batch_both_warn(ledger_url, make_tally):
    seen = []
    tally = make_tally(ledger_url, prices=PENNY, clock=lambda: NOW, alerts=[seen.append],
                       flush_interval_s=60, budgets=[Budget(usd=0.10, per="day", warn_at=(0.5,)),
                                                     Budget(requests=10, per="day", warn_at=(0.5,))])
    held = tally.reserve(model="penny", input_tokens=0, max_tokens=1)  # both counters exist
    tally.record(model="penny", output_tokens=1, reservation=held)
    assert tally.flush(10)
    for _ in range(4):
        tally.record(model="penny", output_tokens=1)
    assert tally.flush(10)  # one transaction: both budgets reach half their limit
    assert sorted(_thresholds(seen)) == [("requests 10/day", 0.5), ("usd 0.1/day", 0.5)]
    assert sorted(round(a["used"], 9) for a in seen if a["event"] == "threshold") == [0.05, 5]


def test_a_batch_settling_more_than_a_thousand_holds_releases_every_one(ledger_url, make_tally):
    from llmtally._budgets.counters import check_counters

    tally = make_tally(ledger_url, prices=PENNY, budgets=[Budget(requests=5000, per="day")],
                       clock=lambda: NOW, batch_size=5000, flush_interval_s=60)
    held = [tally.reserve(model="penny", input_tokens=0, max_tokens=1) for _ in range(1201)]
    for reservation in held:  # settled in one transaction: released in chunks of 500 ids
        tally.record(model="penny", output_tokens=1, reservation=reservation)
    assert tally.flush(60)
    [state] = tally.budget_states()
    assert (state.spent, state.reserved) == (1201, 0)
    assert check_counters(tally.store) == []


# -- _pricing.py ---------------------------------------------------------------------------------
#
# Off-peak rates from a price map in LiteLLM's format (a JSON file, as a user may give): each
# call below uses input 1000 (100 cache read, 50 cache write) and output 300 (100 reasoning).

_USAGE = {"input_tokens": 1000, "cache_read_tokens": 100, "cache_write_tokens": 50,
          "output_tokens": 300, "reasoning_tokens": 100}
_OFF_PEAK_MAP = {
    # own cache-read and reasoning prices; off-peak only the input is cheaper, every day
    # 22:00-02:00 and 12:00-13:00 UTC
    "peaky-a": {"litellm_provider": "acme", "mode": "chat", "input_cost_per_token": 1e-6,
                "output_cost_per_token": 2e-6, "cache_read_input_token_cost": 1e-7,
                "output_cost_per_reasoning_token": 3e-6,
                "off_peak_pricing": {"input_cost_per_token": 5e-7,
                                     "hours_utc": ["22:00-02:00", "12:00-13:00"]}},
    # an own cache-write price; off-peak output and cache read are cheaper, 03:00-04:00 UTC on
    # Saturdays and Sundays of Los Angeles
    "peaky-b": {"litellm_provider": "acme", "mode": "chat", "input_cost_per_token": 1e-6,
                "output_cost_per_token": 2e-6, "cache_creation_input_token_cost": 4e-6,
                "off_peak_pricing": {"output_cost_per_token": 1e-6,
                                     "cache_read_input_token_cost": 2e-7,
                                     "weekday_timezone": "America/Los_Angeles",
                                     "windows": [{"hours_utc": ["03:00-04:00"],
                                                  "weekdays": ["sat", "Sunday"]}]}},
    # off-peak windows with minutes: 10:30-11:45 and 23:00-23:59 UTC, every day
    "peaky-d": {"litellm_provider": "acme", "mode": "chat", "input_cost_per_token": 1e-6,
                "off_peak_pricing": {"input_cost_per_token": 5e-7,
                                     "hours_utc": ["10:30-11:45", "23:00-23:59"]}},
    # no cache or reasoning prices; off-peak output and reasoning, all day every day
    "peaky-e": {"litellm_provider": "acme", "mode": "chat", "input_cost_per_token": 1e-6,
                "output_cost_per_token": 2e-6,
                "off_peak_pricing": {"output_cost_per_token": 1.5e-6,
                                     "output_cost_per_reasoning_token": 2.5e-6,
                                     "hours_utc": ["00:00-00:00"]}},
    # no cache or reasoning prices; off-peak input and cache write, all day every day
    "peaky-c": {"litellm_provider": "acme", "mode": "chat", "input_cost_per_token": 1e-6,
                "output_cost_per_token": 2e-6,
                "off_peak_pricing": {"input_cost_per_token": 5e-7,
                                     "cache_creation_input_token_cost": 8e-7,
                                     "windows": [{"hours_utc": ["00:00-00:00"]}]}},
}
# peak: 850 uncached x input + 100 x cache read + 50 x cache write + 200 x output + 100 x reasoning
_A_PEAK = 850 * 1e-6 + 100 * 1e-7 + 50 * 1e-6 + 200 * 2e-6 + 100 * 3e-6  # 0.00161
# off-peak: the input rate, and the cache write that follows it (no own price); own cache
# read and reasoning prices kept
_A_OFF = 850 * 5e-7 + 100 * 1e-7 + 50 * 5e-7 + 200 * 2e-6 + 100 * 3e-6  # 0.00116
_B_PEAK = 850 * 1e-6 + 100 * 1e-6 + 50 * 4e-6 + 200 * 2e-6 + 100 * 2e-6  # 0.00175
# off-peak: standard input, own cache write kept, reasoning follows the off-peak output
_B_OFF = 850 * 1e-6 + 100 * 2e-7 + 50 * 4e-6 + 200 * 1e-6 + 100 * 1e-6  # 0.00137
# off-peak: cache read follows the off-peak input, reasoning the (standard) output
_C_OFF = 850 * 5e-7 + 100 * 5e-7 + 50 * 8e-7 + 200 * 2e-6 + 100 * 2e-6  # 0.001115


@pytest.fixture
def off_peak_book(tmp_path, monkeypatch):
    """A book on _OFF_PEAK_MAP, on a machine whose local time zone is Los Angeles (naive
    moments still mean UTC)."""
    import time as _time

    from llmtally._pricing.book import PriceBook

    path = tmp_path / "off_peak.json"
    path.write_text(json.dumps(_OFF_PEAK_MAP))
    monkeypatch.setenv("TZ", "America/Los_Angeles")
    _time.tzset()
    yield PriceBook(price_map=str(path))
    monkeypatch.undo()
    _time.tzset()


def _utc(day, hour, minute=0):
    return datetime(2026, 12, day, hour, minute, tzinfo=timezone.utc)


@pytest.mark.parametrize(("at", "expected"), [
    (_utc(2, 11, 59), _A_PEAK), (_utc(2, 12, 0), _A_OFF), (_utc(2, 12, 59), _A_OFF),
    (_utc(2, 13, 0), _A_PEAK),  # a window's start is in it, its end is not
    (_utc(2, 21, 59), _A_PEAK), (_utc(2, 22, 0), _A_OFF), (_utc(3, 1, 59), _A_OFF),
    (_utc(3, 2, 0), _A_PEAK),  # the same across midnight
    (datetime(2026, 12, 2, 17, 30, tzinfo=timezone(timedelta(hours=5))), _A_OFF),  # 12:30 UTC
    (datetime(2026, 12, 2, 12, 30), _A_OFF),  # naive: UTC, whatever the machine's zone
    (datetime(2026, 12, 2, 17, 30), _A_PEAK),
    # a moment datetime cannot express in UTC (year 0): the standard price
    (datetime(1, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))), _A_PEAK),
])
def test_off_peak_windows_every_day_start_in_end_out(off_peak_book, at, expected):
    priced = off_peak_book.cost(model="peaky-a", at=at, **_USAGE)
    assert priced.cost == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("at", "expected"), [
    (_utc(5, 3, 30), _B_PEAK),  # Saturday 03:30 UTC is Friday 19:30 in Los Angeles
    (_utc(7, 3, 30), _B_OFF),  # Monday 03:30 UTC is Sunday in Los Angeles
    (datetime(2026, 12, 7, 3, 30), _B_OFF),  # naive: UTC
    (datetime(2026, 12, 5, 3, 30), _B_PEAK),
    (_utc(7, 4, 0), _B_PEAK), (_utc(6, 12, 0), _B_PEAK),  # Sunday, out of the hours
])
@pytest.mark.parametrize("machine_zone", ["Pacific/Honolulu", "Asia/Kolkata"])
def test_off_peak_weekdays_are_read_in_the_blocks_time_zone(off_peak_book, monkeypatch, at,
                                                            expected, machine_zone):
    import time as _time

    # the machine's own zone, on either side of UTC, changes nothing
    monkeypatch.setenv("TZ", machine_zone)
    _time.tzset()
    priced = off_peak_book.cost(model="peaky-b", at=at, **_USAGE)
    assert priced.cost == pytest.approx(expected, abs=1e-12)


def test_a_window_starting_where_it_ends_is_all_day(off_peak_book):
    for at in (_utc(2, 0, 0), _utc(5, 13, 17), _utc(6, 23, 59)):
        assert off_peak_book.cost(model="peaky-c", at=at, **_USAGE).cost == \
            pytest.approx(_C_OFF, abs=1e-12)
        # standard input and cache prices; the block's own output and reasoning rates
        assert off_peak_book.cost(model="peaky-e", at=at, **_USAGE).cost == \
            pytest.approx(850 * 1e-6 + 100 * 1e-6 + 50 * 1e-6 + 200 * 1.5e-6 + 100 * 2.5e-6, abs=1e-12)


def test_a_price_needs_an_input_price_and_says_what_is_allowed():
    from llmtally._errors import ConfigError

    with pytest.raises(ConfigError, match=r"^Price\.input: None is not a number"):
        Price(input=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^Price\.per: '1G' is not allowed; use one of '1M', '1K', 'token'$"):
        Price(input=1, per="1G")
    with pytest.raises(ConfigError, match=r"^Price\.currency: 'usd\$' is not an ISO 4217 currency code"):
        Price(input=1, currency="usd$")


def test_litellm_versions_compare_by_their_leading_numbers():
    from llmtally._versions import version_tuple as _version_tuple

    assert _version_tuple("1.110.2") == (1, 110, 2)
    assert _version_tuple("1.81.0rc1") == (1, 81, 0)
    assert _version_tuple("2.0.0.1.5") == (2, 0, 0, 1)  # four parts at most
    assert _version_tuple("1.2.dev3.4") == (1, 2)  # stops at the first part with no number
    assert _version_tuple("1.110.10") > _version_tuple("1.110.9")


def test_no_litellm_installed_means_no_litellm_map(monkeypatch):
    import importlib.util

    from llmtally._errors import ConfigError
    from llmtally._pricing import book as _pricing
    from llmtally._pricing import price_map as _price_map

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    assert _price_map.installed_litellm() is None
    with pytest.raises(ConfigError, match=r"needs litellm installed"):
        _pricing.PriceBook(price_map="litellm")
    assert _pricing.PriceBook().map_source == _pricing.PriceBook(price_map="bundled").map_source


def test_an_unreadable_litellm_map_names_itself(tmp_path, monkeypatch):
    from llmtally._errors import ConfigError
    from llmtally._pricing import book as _pricing
    from llmtally._pricing import price_map as _price_map

    broken = tmp_path / "model_prices_and_context_window_backup.json"
    broken.write_text("{not json")
    monkeypatch.setattr(_price_map, "installed_litellm", lambda: ("99.0.0", str(broken)))
    with pytest.raises(ConfigError, match=r"^price_map='litellm': '.*backup\.json' is not a readable JSON price map"):
        _pricing.PriceBook(price_map="litellm").known_models()
    broken.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"^price_map: '.*backup\.json' holds no JSON object of models"):
        _pricing.PriceBook(price_map="litellm").known_models()


def test_a_price_map_file_removed_before_first_use_is_a_clear_error(tmp_path):
    from llmtally._errors import ConfigError
    from llmtally._pricing.book import PriceBook

    path = tmp_path / "map.json"
    path.write_text(json.dumps({"m": {"input_cost_per_token": 1e-6}}))
    book = PriceBook(price_map=str(path))  # checked here, read on first use
    path.unlink()
    with pytest.raises(ConfigError, match=r"^price_map: file '.*map\.json' not found; give an existing JSON price map"):
        book.cost(model="m", input_tokens=1)


def test_aliases_are_followed_up_to_five_hops_and_never_loop():
    from llmtally._pricing.price_map import slim_price_map

    real = {"litellm_provider": "acme", "input_cost_per_token": 1e-6}
    raw = {
        "five-hops": {"alias_of": "h1"}, "six-hops": {"alias_of": "g1"},  # g1 -> h1 -> ... -> real
        "h1": {"alias_of": "h2"}, "h2": {"alias_of": "h3"}, "h3": {"alias_of": "h4"},
        "h4": {"alias_of": "h5"}, "h5": {"alias_of": "real"},
        "g1": {"alias_of": "h1"},
        "ghost": {"alias_of": "nowhere"}, "loop-a": {"alias_of": "loop-b"},
        "loop-b": {"alias_of": "loop-a"}, "note": "not an entry", "real": real,
    }
    slim = slim_price_map(raw)
    assert slim["five-hops"] == slim["h1"] == slim["real"] == real
    # "six-hops" needs six: none (later keys are resolved later, from aliases resolved before)
    assert sorted(slim) == ["five-hops", "g1", "h1", "h2", "h3", "h4", "h5", "real"]


def test_slim_off_peak_blocks_keep_good_rules_only():
    from llmtally._pricing.price_map import slim_entry

    base = {"input_cost_per_token": 1e-6}

    def off_peak(block):
        return (slim_entry({**base, "off_peak_pricing": block}) or {}).get("off_peak_pricing")

    rules = [
        "junk", {"hours_utc": "bad"}, {"hours_utc": ["01:00-02:00"], "weekdays": "mon"},
        {"hours_utc": ["03:00-04:00"]}, {"hours_utc": ["05:00-06:00", "7-8"],
                                       "weekdays": ["mon", 9, 8, 0, 7, True, "Sun", " FRI ", "xyz"]},
    ]
    assert off_peak({"input_cost_per_token": 5e-7, "windows": rules}) == {
        "input_cost_per_token": 5e-7,
        "windows": [{"hours_utc": ["03:00-04:00"]},
                    {"hours_utc": ["05:00-06:00"], "weekdays": ["mon", 7, "Sun", " FRI "]}],
    }
    assert off_peak({"input_cost_per_token": 5e-7, "hours_utc": "22:00-02:00", "windows": 5}) == {
        "input_cost_per_token": 5e-7, "hours_utc": ["22:00-02:00"]}
    assert off_peak({"hours_utc": ["01:00-02:00"]}) is None  # no rate
    assert off_peak({"input_cost_per_token": 5e-7}) is None  # no hours


def test_slim_tiers_keep_whole_bounds_as_ints_and_skip_junk():
    from llmtally._pricing.price_map import slim_entry

    tiers = ["junk", {"range": [0]}, {"range": [0, "x"], "input_cost_per_token": 1e-6},
             {"range": [0, 128000.0], "input_cost_per_token": 1e-6},
             {"range": [128000.0, 1e6 + 0.5], "input_cost_per_token": 2e-6}]
    slim = slim_entry({"input_cost_per_token": 1e-6, "tiered_pricing": tiers})
    assert json.dumps(slim["tiered_pricing"]) == (
        '[{"range": [0, 128000], "input_cost_per_token": 1e-06}, '
        '{"range": [128000, 1000000.5], "input_cost_per_token": 2e-06}]')
    assert slim_entry({"input_cost_per_token": 1e-6, "tiered_pricing": None}) == {
        "input_cost_per_token": 1e-6}


def test_a_price_map_file_may_be_a_snapshot_like_llmtallys(tmp_path):
    from llmtally._pricing.book import PriceBook

    path = tmp_path / "snapshot.json"
    path.write_text(json.dumps({"version": "2026-12-01", "models": {
        "acme/chat": {"litellm_provider": "acme", "input_cost_per_token": 2e-6}}}))
    book = PriceBook(price_map=str(path))
    assert book.known_models() == 1
    assert book.cost(model="acme/chat", input_tokens=1000).cost == pytest.approx(2e-3, abs=1e-12)


def test_slim_entries_read_prices_given_as_text_and_drop_negative_ones_and_other_fields():
    from llmtally._pricing.price_map import slim_entry

    assert slim_entry({"input_cost_per_token": "1e-6", "output_cost_per_token": -2e-6,
                       "cache_read_input_token_cost": "free", "mode": "chat",
                       "source": "https://example.com/pricing", "supports_vision": True}) == {
        "input_cost_per_token": 1e-6, "mode": "chat"}


@pytest.mark.parametrize(("at", "off"), [
    (_utc(2, 10, 29), False), (_utc(2, 10, 30), True), (_utc(2, 11, 44), True),
    (_utc(2, 11, 45), False), (_utc(2, 22, 59), False), (_utc(2, 23, 0), True),
    (_utc(2, 23, 58), True), (_utc(2, 23, 59), False),
])
def test_off_peak_windows_count_their_minutes(off_peak_book, at, off):
    priced = off_peak_book.cost(model="peaky-d", at=at, input_tokens=1000)
    assert priced.cost == pytest.approx(5e-4 if off else 1e-3, abs=1e-12)


def test_off_peak_hours_outside_a_day_are_dropped():
    from llmtally._pricing.price_map import slim_entry

    hours = ["24:00-01:00", "01:60-02:00", "01:00-24:00", "01:00-02:60", 5, "1:5-2:00",
             "23:59-00:00", "23:00-23:59", " 7:05 - 8:10 "]
    slim = slim_entry({"input_cost_per_token": 1e-6,
                       "off_peak_pricing": {"input_cost_per_token": 5e-7, "hours_utc": hours}})
    assert slim["off_peak_pricing"]["hours_utc"] == ["23:59-00:00", "23:00-23:59", " 7:05 - 8:10 "]


# Tiers (LiteLLM's tiered_pricing): a prompt size in a tier's (low, high] takes its rates; one
# below the first tier takes the first, any other the last.
_TIER_MAP = {
    "gappy": {"litellm_provider": "acme", "mode": "chat", "input_cost_per_token": 9e-6,
              "tiered_pricing": [
                  {"range": [3000, 4000], "input_cost_per_token": 2e-6},
                  {"range": [1000, 2000], "input_cost_per_token": 1e-6},
                  {"range": [5000, 6000], "input_cost_per_token": 3e-6}]},
    # a tier without an output price keeps the model's; its cache and reasoning prices are its own
    "tiered": {"litellm_provider": "acme", "mode": "chat", "input_cost_per_token": 9e-6,
               "output_cost_per_token": 5e-6,
               "tiered_pricing": [{"range": [0, 1_000_000], "input_cost_per_token": 1e-6,
                                   "cache_read_input_token_cost": 1e-7,
                                   "cache_creation_input_token_cost": 2e-6,
                                   "output_cost_per_reasoning_token": 4e-6}]},
}


@pytest.mark.parametrize(("tokens", "rate"), [
    (500, 1e-6), (1000, 1e-6), (1500, 1e-6), (2000, 1e-6), (2500, 3e-6), (3000, 3e-6),
    (3500, 2e-6), (4000, 2e-6), (5500, 3e-6), (7000, 3e-6),
])
def test_a_prompt_size_picks_its_tier(tmp_path, tokens, rate):
    from llmtally._pricing.book import PriceBook

    path = tmp_path / "tiers.json"
    path.write_text(json.dumps(_TIER_MAP))
    book = PriceBook(price_map=str(path))
    assert book.cost(model="gappy", input_tokens=tokens).cost == pytest.approx(tokens * rate, abs=1e-12)


def test_a_tier_without_an_output_price_keeps_the_models(tmp_path):
    from llmtally._pricing.book import PriceBook

    path = tmp_path / "tiers.json"
    path.write_text(json.dumps(_TIER_MAP))
    priced = PriceBook(price_map=str(path)).cost(model="tiered", **_USAGE)
    expected = 850 * 1e-6 + 100 * 1e-7 + 50 * 2e-6 + 200 * 5e-6 + 100 * 4e-6  # 0.00236
    assert priced.cost == pytest.approx(expected, abs=1e-12)


def test_token_counts_that_are_not_plain_ints():
    from llmtally._pricing.book import PriceBook

    book = PriceBook(price_map="bundled")  # gpt-4o-mini: $0.15 / $0.60 per 1M, cache read $0.075

    def cost(**tokens):
        return book.cost(model="gpt-4o-mini", **tokens).cost

    assert cost(input_tokens=1.0, output_tokens=2.9) == pytest.approx(1.5e-7 + 2 * 6e-7, abs=1e-15)
    assert cost(input_tokens="lots", output_tokens=10) == pytest.approx(10 * 6e-7, abs=1e-15)
    # a negative cache count is 0: the whole prompt is uncached
    assert cost(input_tokens=1000, cache_read_tokens=-100) == pytest.approx(1000 * 1.5e-7, abs=1e-15)


# ``*_above_<N>k_tokens`` levels: each level exceeded replaces the rates it names; the others
# stay as the level below left them.
_ABOVE_MAP = {"stepped": {
    "litellm_provider": "acme", "mode": "chat", "input_cost_per_token": 1e-6,
    "output_cost_per_token": 2e-6, "cache_read_input_token_cost": 1e-7,
    "cache_creation_input_token_cost": 3e-6, "output_cost_per_reasoning_token": 4e-6,
    "input_cost_per_token_above_1k_tokens": 2e-6,
    "output_cost_per_token_above_2k_tokens": 5e-6,
    "cache_creation_input_token_cost_above_2k_tokens": 6e-6,
    "cache_read_input_token_cost_above_3k_tokens": 5e-7,
    "output_cost_per_reasoning_token_above_3k_tokens": 7e-6,
}}


@pytest.mark.parametrize(("prompt", "rates"), [
    (1000, (1e-6, 2e-6, 1e-7, 3e-6, 4e-6)),  # at a threshold: not above it
    (1001, (2e-6, 2e-6, 1e-7, 3e-6, 4e-6)),
    (2000, (2e-6, 2e-6, 1e-7, 3e-6, 4e-6)),
    (2500, (2e-6, 5e-6, 1e-7, 6e-6, 4e-6)),
    (3500, (2e-6, 5e-6, 5e-7, 6e-6, 7e-6)),
])
def test_above_levels_replace_only_the_rates_they_name(tmp_path, prompt, rates):
    from llmtally._pricing.book import PriceBook

    path = tmp_path / "above.json"
    path.write_text(json.dumps(_ABOVE_MAP))
    book = PriceBook(price_map=str(path))
    inp, out, read, write, reason = rates
    expected = (prompt - 150) * inp + 100 * read + 50 * write + 200 * out + 100 * reason
    priced = book.cost(model="stepped", **{**_USAGE, "input_tokens": prompt})
    assert priced.cost == pytest.approx(expected, abs=1e-12)


def test_ledger_names_take_off_only_the_providers_own_route():
    from llmtally._pricing.names import ledger_names, split_route

    assert ledger_names("my-gateway/llama-3", "My-Gateway") == ("llama-3", "My-Gateway")
    assert ledger_names("text-completion-openai/gpt-3.5-turbo-instruct", "openai") == \
        ("gpt-3.5-turbo-instruct", "openai")
    assert ledger_names("openrouter/anthropic/claude-3.5", "openrouter") == \
        ("anthropic/claude-3.5", "openrouter")
    assert ledger_names("anthropic/claude-x", "openrouter") == ("anthropic/claude-x", "openrouter")
    assert ledger_names("None/llama", None) == ("None/llama", None)
    # "google" names Gemini's SDK, but LiteLLM routes no "google/": the name stays whole
    assert ledger_names("google/gemini-pro", "gemini") == ("google/gemini-pro", "gemini")
    assert split_route("openrouter/anthropic/claude-3.5") == ("anthropic/claude-3.5", "openrouter")
    assert split_route("deepseek") == ("deepseek", None)
    assert split_route("acme-corp/x") == ("acme-corp/x", None)
    assert split_route("deepseek/") == ("deepseek/", None)


def test_fireworks_cache_reads_default_to_half_the_input_price_off_peak_too(tmp_path):
    from llmtally._pricing.book import PriceBook

    path = tmp_path / "fireworks.json"
    path.write_text(json.dumps({
        "fireworks_ai/input-only": {"litellm_provider": "fireworks_ai", "mode": "chat",
                                    "input_cost_per_token": 1e-6},
        "fireworks_ai/own-cache": {"litellm_provider": "fireworks_ai", "mode": "chat",
                                   "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6,
                                   "cache_read_input_token_cost": 1e-7},
        "fireworks_ai/nightly": {"litellm_provider": "fireworks_ai", "mode": "chat",
                                 "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6,
                                 "off_peak_pricing": {"input_cost_per_token": 4e-7,
                                                      "hours_utc": ["00:00-00:00"]}},
    }))
    book = PriceBook(price_map=str(path))

    def cost(model):
        return book.cost(model=model, input_tokens=1000, cache_read_tokens=100,
                         at=_utc(2, 12)).cost

    assert cost("fireworks_ai/input-only") == pytest.approx(900 * 1e-6 + 100 * 5e-7, abs=1e-12)
    assert cost("fireworks_ai/own-cache") == pytest.approx(900 * 1e-6 + 100 * 1e-7, abs=1e-12)
    assert cost("fireworks_ai/nightly") == pytest.approx(900 * 4e-7 + 100 * 2e-7, abs=1e-12)


def test_above_levels_in_plain_tokens_and_in_another_currency(tmp_path):
    from llmtally._pricing.book import PriceBook

    path = tmp_path / "above.json"
    path.write_text(json.dumps({**_ABOVE_MAP, "plain": {
        "litellm_provider": "acme", "mode": "chat", "input_cost_per_token": 1e-6,
        "input_cost_per_token_above_1500_tokens": 3e-6}}))
    book = PriceBook(price_map=str(path))
    assert book.cost(model="plain", input_tokens=1500).cost == pytest.approx(1.5e-3, abs=1e-12)
    assert book.cost(model="plain", input_tokens=1600).cost == pytest.approx(4.8e-3, abs=1e-12)
    cny = PriceBook(price_map=str(path), currency="CNY", rates={"USD": 7})
    assert cny.cost(model="stepped", input_tokens=2000).cost == pytest.approx(2000 * 2e-6 * 7, abs=1e-12)


def test_a_looked_up_price_says_its_currency_and_limits():
    from llmtally._pricing.book import PriceBook

    assert (PriceBook(price_map="bundled").lookup("gpt-4o-mini").currency,
            PriceBook(price_map="bundled").lookup("gpt-4o-mini").max_input_tokens) == ("USD", 128000)
    cny = PriceBook({"mine": Price(input=1, currency="EUR")}, currency="CNY",
                    rates={"USD": 7, "EUR": 8}, price_map="bundled")
    assert cny.lookup("gpt-4o-mini").currency == cny.lookup("mine").currency == "CNY"
    assert cny.lookup("mine").input == pytest.approx(8e-6, abs=1e-18)  # 1 EUR per 1M tokens


def test_an_embedding_without_an_output_price_charges_output_nothing(tmp_path):
    from llmtally._pricing.book import PriceBook

    path = tmp_path / "embeddings.json"
    path.write_text(json.dumps({
        "embed-cached": {"litellm_provider": "acme", "mode": "embedding",
                         "input_cost_per_token": 1e-6, "cache_read_input_token_cost": 1e-7},
        "embed-priced-output": {"litellm_provider": "acme", "mode": "embedding",
                                "input_cost_per_token": 1e-6, "output_cost_per_token": 3e-6},
    }))
    book = PriceBook(price_map=str(path))
    assert book.cost(model="embed-cached", input_tokens=1000, output_tokens=5).cost == \
        pytest.approx(1e-3, abs=1e-12)
    assert book.cost(model="embed-priced-output", input_tokens=1000, output_tokens=5).cost == \
        pytest.approx(1e-3 + 1.5e-5, abs=1e-12)


def test_book_configuration_errors_say_what_to_fix():
    from llmtally._errors import ConfigError
    from llmtally._pricing.book import PriceBook

    with pytest.raises(ConfigError, match=r"^currency: 'XYZ' is not an ISO 4217 currency code"):
        PriceBook(currency="XYZ")
    with pytest.raises(ConfigError, match=r"^rates: no rate for USD \(the price map is in USD, "
                                          r"the book is in CNY\); pass rates=\{'USD': <CNY per 1 USD>\}$"):
        PriceBook(currency="CNY")
    with pytest.raises(ConfigError, match=r"^rates: no rate for EUR \(override 'mine' is priced in EUR, "
                                          r"the book is in USD\)"):
        PriceBook({"mine": Price(input=1, currency="EUR")})
    with pytest.raises(ConfigError, match=r"^price_map: 5 is not allowed; use 'auto', 'bundled', "
                                          r"'litellm' or a file path$"):
        PriceBook(price_map=5)  # type: ignore[arg-type]


def test_overrides_keep_their_cache_write_price_and_provider():
    from llmtally._pricing.book import PriceBook

    book = PriceBook({"mine": Price(input=1, output=2, cache_write=3, per="1M")}, price_map="bundled")
    priced = book.cost(model="mine", provider="DeepSeek", input_tokens=1000, cache_write_tokens=400)
    assert priced.cost == pytest.approx(600 * 1e-6 + 400 * 3e-6, abs=1e-15)
    assert book.lookup("mine", "DeepSeek").provider == "deepseek"


def test_lookups_and_limits_heed_the_provider(tmp_path):
    from llmtally._pricing.book import PriceBook

    book = PriceBook(price_map="bundled")
    assert book.lookup("gpt-4o-mini", "anthropic") is None  # OpenAI's entry is not Anthropic's
    assert book.max_output_tokens("gpt-4o-mini", "anthropic") is None
    assert book.max_output_tokens("gpt-4o-mini") == 16384
    path = tmp_path / "limits.json"
    path.write_text(json.dumps({
        "acme-x": {"litellm_provider": "acme", "input_cost_per_token": 1e-6, "max_output_tokens": 4096},
        "acme/acme-x": {"litellm_provider": "acme", "input_cost_per_token": 2e-6}}))
    mapped = PriceBook(price_map=str(path))
    # a bare name is priced by its provider's own key, whose entry says no limit
    assert mapped.lookup("acme-x").model_key == "acme/acme-x"
    assert mapped.max_output_tokens("acme-x") is None


def test_rates_must_be_finite_positive_numbers_for_known_currencies():
    from llmtally._errors import ConfigError
    from llmtally._pricing.book import PriceBook

    for rate in (0, -1, float("inf"), float("nan"), True, "7"):
        with pytest.raises(ConfigError, match=r"^rates\['USD'\]: .* is not allowed; give how many CNY"):
            PriceBook(currency="CNY", rates={"USD": rate})
    with pytest.raises(ConfigError, match=r"^rates: 'XYZ' is not an ISO 4217 currency code"):
        PriceBook(rates={"XYZ": 1.0})


def test_an_override_under_a_provider_alias_answers_to_the_canonical_name_only():
    from llmtally._pricing.book import PriceBook

    book = PriceBook({"google/acme/gem": Price(input=1), "google": Price(input=2)}, price_map="bundled")
    assert book.cost(model="acme/gem", provider="gemini", input_tokens=10**6).cost == \
        pytest.approx(1.0, abs=1e-12)
    assert book.cost(model="gemini/").status == "unpriced"  # "google" is a model name, not a route


def test_a_model_price_costs_only_the_tokens_given():
    from llmtally._pricing.book import PriceBook

    price = PriceBook(price_map="bundled").lookup("gpt-4o-mini")  # $0.15 / $0.60 per 1M
    assert price.cost(input_tokens=1000) == pytest.approx(1.5e-4, abs=1e-15)
    assert price.cost(output_tokens=10) == pytest.approx(6e-6, abs=1e-15)


def test_counts_on_a_side_without_a_price_and_odd_counts(tmp_path):
    from llmtally._pricing.book import PriceBook

    path = tmp_path / "sides.json"
    path.write_text(json.dumps({
        **_ABOVE_MAP,
        "in-only": {"litellm_provider": "acme", "mode": "chat", "input_cost_per_token": 1e-6},
        "out-only": {"litellm_provider": "acme", "mode": "chat", "output_cost_per_token": 2e-6}}))
    book = PriceBook(price_map=str(path))
    assert book.cost(model="out-only", input_tokens=10).status == "unpriced"
    assert book.cost(model="out-only", cache_read_tokens=10).status == "unpriced"
    assert book.cost(model="out-only", output_tokens=10).cost == pytest.approx(2e-5, abs=1e-15)
    # a negative count is 0: no output used, so a model without an output price is priced
    assert book.cost(model="in-only", input_tokens=100, output_tokens=-10).cost == \
        pytest.approx(1e-4, abs=1e-15)
    # ...and a negative cache write adds nothing to the uncached prompt
    assert book.cost(model="stepped", input_tokens=1000, cache_write_tokens=-50).cost == \
        pytest.approx(1e-3, abs=1e-15)
    stepped = book.lookup("stepped")  # five different rates: each default count is 0
    assert stepped.cost(input_tokens=1000) == pytest.approx(1e-3, abs=1e-15)
    assert stepped.cost(output_tokens=10) == pytest.approx(2e-5, abs=1e-15)


def test_a_call_without_a_moment_is_priced_at_the_utc_now(tmp_path, monkeypatch):
    import time as _time

    from llmtally._pricing.book import PriceBook

    path = tmp_path / "half_day.json"
    path.write_text(json.dumps({"half-day": {
        "litellm_provider": "acme", "mode": "chat", "input_cost_per_token": 1e-6,
        "off_peak_pricing": {"input_cost_per_token": 5e-7, "hours_utc": ["00:00-12:00"]}}}))
    monkeypatch.setenv("TZ", "Etc/GMT+12")  # local time is 12 h behind UTC: off-peak flips
    _time.tzset()
    try:
        book = PriceBook(price_map=str(path))
        for _ in range(3):  # a call straddling 00:00 or 12:00 UTC is measured again
            before = datetime.now(timezone.utc)
            now = book.cost(model="half-day", input_tokens=1000).cost
            after = datetime.now(timezone.utc)
            if (before.hour < 12) == (after.hour < 12):
                break
        assert (before.hour < 12) == (after.hour < 12)
        assert now == pytest.approx(5e-4 if before.hour < 12 else 1e-3, abs=1e-15)
    finally:
        monkeypatch.undo()
        _time.tzset()


def test_a_map_files_own_providers_route_model_names(tmp_path):
    from llmtally._pricing.book import PriceBook

    path = tmp_path / "map.json"
    path.write_text(json.dumps({"acme/chat-1": {"litellm_provider": "acme", "input_cost_per_token": 1e-6},
                                "kimi/k2": {"litellm_provider": "kimi", "input_cost_per_token": 1e-6}}))
    book = PriceBook(price_map=str(path))
    found = book.resolve("acme/chat-1")
    assert (found.model, found.provider, found.price.model_key) == ("chat-1", "acme", "acme/chat-1")
    found = book.resolve("kimi/k2")  # a provider name LiteLLM does not route, folded to Moonshot
    assert (found.model, found.provider, found.price.model_key) == ("k2", "moonshot", "kimi/k2")


def test_litellm_gone_before_first_use_and_an_unreadable_newer_map(tmp_path, monkeypatch, caplog):
    import importlib.util
    import logging

    from llmtally._errors import ConfigError
    from llmtally._pricing import book as _pricing
    from llmtally._pricing import price_map as _price_map

    broken = tmp_path / "model_prices_and_context_window_backup.json"
    broken.write_text("{not json")
    monkeypatch.setattr(_price_map, "installed_litellm", lambda: ("99.0.0", str(broken)))
    with caplog.at_level(logging.WARNING, logger="llmtally"):
        book = _pricing.PriceBook()  # auto: the newer litellm's map is unreadable
        assert book.map_source == _pricing.PriceBook(price_map="bundled").map_source
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("llmtally", f"litellm 99.0.0's price map at {broken} is unreadable; "
                     "using llmtally's bundled snapshot")]
    monkeypatch.undo()
    if importlib.util.find_spec("litellm") is None:
        return
    book = _pricing.PriceBook(price_map="litellm")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(ConfigError, match=r"needs litellm installed"):
        book.known_models()


def test_a_price_map_file_without_models_names_itself(tmp_path):
    from llmtally._errors import ConfigError
    from llmtally._pricing.book import PriceBook

    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"^price_map: '.*list\.json' holds no JSON object of models"):
        PriceBook(price_map=str(listing)).known_models()


# -- _storage: what users type as database_url, and what counts as an outage -----------------


def test_database_urls_as_users_type_them(tmp_path, monkeypatch):
    from llmtally._errors import ConfigError
    from llmtally._storage.store_urls import normalize_url

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^database_url is empty: give a path such as "
                                          r"'llmtally\.db' or a URL such as "
                                          r"'postgresql\+psycopg://user@host/db'$"):
        normalize_url("  ")
    assert normalize_url("ledger.db") == f"sqlite:///{tmp_path / 'ledger.db'}"
    assert normalize_url(" sqlite:///rel/l.db?timeout=5 ") == f"sqlite:///{tmp_path}/rel/l.db?timeout=5"
    assert normalize_url("sqlite:///:memory:") == "sqlite:///:memory:"
    assert normalize_url("postgres://u:p@db:5432/llm") == "postgresql+psycopg://u:p@db:5432/llm"
    assert normalize_url("postgresql://u@db/llm") == "postgresql+psycopg://u@db/llm"
    # only the first "://" is the scheme's: a second one (in a query value) is kept as it is
    assert normalize_url("postgresql://u@db/llm?application_name=a://b") == \
        "postgresql+psycopg://u@db/llm?application_name=a://b"
    assert normalize_url("postgresql+psycopg://u@db/llm") == "postgresql+psycopg://u@db/llm"


@pytest.mark.postgres
def test_a_postgres_scheme_url_opens_the_real_server(tmp_path):
    """``postgres://`` (what Heroku and many dashboards hand out) reaches the server."""
    from conftest import PG_URL, require_postgres

    from llmtally import Tally

    require_postgres()
    url = PG_URL.replace("postgresql+psycopg://", "postgres://")
    assert url.startswith("postgres://")
    with Tally(url, price_map="bundled", spill_path=tmp_path / "s.jsonl") as tally:
        assert tally.store.dialect == "postgresql"
        assert tally.store.url.startswith("postgresql+psycopg://")


def test_what_counts_as_an_outage():
    import sqlite3

    from sqlalchemy.exc import DatabaseError, IntegrityError, OperationalError

    from llmtally._errors import LedgerError
    from llmtally._storage.store_outage import is_outage

    assert is_outage(OperationalError("SELECT 1", {}, Exception("db down")))
    assert is_outage(LedgerError("the file cannot be used now"))
    dropped = DatabaseError("SELECT 1", {}, Exception("server closed the connection"),
                            connection_invalidated=True)
    assert is_outage(dropped)
    assert not is_outage(DatabaseError("SELECT 1", {}, Exception("bad value")))
    assert not is_outage(IntegrityError("INSERT", {}, Exception("duplicate key")))
    assert is_outage(OSError(28, "No space left on device"))
    assert is_outage(sqlite3.OperationalError("database is locked"))
    assert not is_outage(sqlite3.IntegrityError("UNIQUE constraint failed"))
    assert not is_outage(ValueError("a bad row"))
