"""Hourly rollups: equal to a GROUP BY over the events after every kind of write, on SQLite and
PostgreSQL; the latency sketches within their stated error of the exact percentiles."""

from __future__ import annotations

import gzip
import json
import math
import random
import threading
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner
from conftest import fetch_events, one_event_insert, rollup_calls, rollups_mismatch
from sqlalchemy import create_engine, text

from llmtally import Budget, BudgetExceeded, Tally
from llmtally._storage import sketch
from llmtally._storage.migrations import MIGRATIONS, migrate
from llmtally._storage.store import Store, normalize_url
from llmtally.cli import main

NOW = datetime.now(timezone.utc).replace(tzinfo=None)
START = (NOW - timedelta(days=3)).replace(minute=0, second=0, microsecond=0)


def _varied(tally: Tally, count: int, seed: int = 1, start: datetime = START) -> list[str]:
    """``count`` calls spread over a day: every status, streamed or not, cache hits, unpriced
    models, missing provider / project / user, long and odd names."""
    rng = random.Random(seed)
    ids = []
    for i in range(count):
        streamed = rng.random() < 0.3
        status = rng.choice(["ok"] * 6 + ["error", "blocked"])
        ids.append(tally.record(
            model=rng.choice(["gpt-4o-mini", "claude-sonnet-4-5", "my-own-model", "gpt-4o"]),
            provider=rng.choice(["openai", "anthropic", None]),
            input_tokens=rng.randrange(0, 5000), output_tokens=rng.randrange(0, 800),
            cache_read_tokens=rng.choice([0, 0, 100]), reasoning_tokens=rng.choice([0, 50]),
            latency_ms=rng.choice([None, rng.lognormvariate(6, 1)]),
            ttft_ms=rng.lognormvariate(5, 1) if streamed and rng.random() < 0.8 else None,
            streamed=streamed, status=status,
            error_type="RateLimitError" if status == "error" else None,
            cache_hit=rng.random() < 0.05, estimated=rng.random() < 0.1,
            ts=start + timedelta(seconds=rng.randrange(0, 86_400)),
            project=rng.choice([None, "search", "支付", "p" * 300]),
            user=rng.choice([None, "ana", "bo", "김" * 300]),
            call_type=rng.choice(["chat", "embedding"]),
        ))
    return ids


def _when(value: str | datetime) -> datetime:
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def test_rollups_equal_the_events_after_recording(ledger_url, make_tally):
    tally = make_tally(ledger_url)
    ids = _varied(tally, 600)
    assert tally.flush(30)
    assert rollups_mismatch(ledger_url) == []
    assert rollup_calls(ledger_url) == len(fetch_events(ledger_url)) == len(ids) == 600


def test_rollups_count_an_id_once_however_often_it_is_written(ledger_url, make_tally):
    tally = make_tally(ledger_url)
    for _ in range(3):  # the same ids again, in new batches
        for i in range(40):
            tally.record(id=f"call-{i}", model="gpt-4o-mini", provider="openai",
                         input_tokens=1000, output_tokens=10, latency_ms=100.0, ts=START)
        assert tally.flush(20)
    store = Store(ledger_url)
    try:  # one batch holding an id twice, and an id already stored
        row = dict(fetch_events(ledger_url)[0], id="twice", ts=START, tags=[], metadata={})
        assert store.insert_many([row, dict(row, input_tokens=5), dict(row, id="call-0")]) == 1
    finally:
        store.close()
    assert rollups_mismatch(ledger_url) == []
    assert rollup_calls(ledger_url) == 41


def test_rollups_follow_budget_charges_and_blocked_calls(ledger_url, make_tally):
    tally = make_tally(ledger_url, budgets=[Budget(usd=0.05)])
    for i in range(30):
        try:
            hold = tally.reserve(model="gpt-4o", input_tokens=2000, max_tokens=200)
        except BudgetExceeded:
            continue
        tally.record(model="gpt-4o", input_tokens=2000, output_tokens=200,
                     latency_ms=300.0 + i, reservation=hold)
    assert tally.flush(20)
    rows = fetch_events(ledger_url)
    assert {row["status"] for row in rows} == {"ok", "blocked"}
    assert rollups_mismatch(ledger_url) == []


def test_import_and_prune_keep_the_rollups_equal(ledger_url, make_tally, tmp_path):
    source = make_tally(f"sqlite:///{tmp_path / 'source.db'}")
    _varied(source, 400)
    assert source.flush(20)
    runner = CliRunner()
    exported = tmp_path / "events.jsonl.gz"
    assert runner.invoke(main, ["export", "--db", source.database_url, "-o", str(exported)]).exit_code == 0
    for _ in range(2):  # the second import adds nothing, to the events or the rollups
        result = runner.invoke(main, ["import", str(exported), "--db", ledger_url])
        assert result.exit_code == 0, result.output
        assert rollups_mismatch(ledger_url) == []
        assert rollup_calls(ledger_url) == 400
    # a cutoff in the middle of an hour: that hour keeps the calls after it
    cutoff = START + timedelta(hours=7, minutes=23, seconds=11)
    kept = [row for row in fetch_events(ledger_url) if _when(row["ts"]) >= cutoff]
    result = runner.invoke(main, ["prune", "--older-than", cutoff.isoformat(), "--db", ledger_url])
    assert result.exit_code == 0, result.output
    assert rollups_mismatch(ledger_url) == []
    assert rollup_calls(ledger_url) == len(kept) == len(fetch_events(ledger_url))
    assert 0 < len(kept) < 400
    lines = [json.loads(line) for line in gzip.open(exported, "rt")]
    assert len(lines) == 400


def test_a_ledger_made_before_rollups_gets_them_when_opened(ledger_url):
    writer = Store(ledger_url, migrations=MIGRATIONS[:4])
    with writer.write() as conn:
        migrate(conn, MIGRATIONS[:4])
        # rows as the store writes them, bypassing the (new) rollups: what an old version did
        store_rows = [dict(id=f"old-{i}", ts=START + timedelta(minutes=7 * i), source="manual",
                           provider="openai", model="gpt-4o-mini", resolved_model=None,
                           call_type="chat", streamed=False, status="ok", error_type=None,
                           input_tokens=i, output_tokens=1, cache_read_tokens=0,
                           cache_write_tokens=0, reasoning_tokens=0, cost=0.001 * i,
                           currency="USD", cost_status="priced", price_source=None,
                           latency_ms=10.0 + i, ttft_ms=None, project=None, user=None,
                           session=None, tags=[], request_id=None, metadata={})
                      for i in range(50)]
        from llmtally._storage.store import driver_row
        conn.exec_driver_sql(one_event_insert(writer.dialect),
                             [driver_row(row, writer.dialect == "sqlite") for row in store_rows])
    writer.close()
    reopened = Store(ledger_url)  # migration 5 sums what is there
    reopened.ensure_schema()
    reopened.close()
    assert rollups_mismatch(ledger_url) == []
    assert rollup_calls(ledger_url) == 50


def test_two_writers_at_once_on_postgres_count_each_event_once(pg_url, make_tally):
    tallies = [make_tally(pg_url, batch_size=50) for _ in range(2)]
    shared = [f"shared-{i}" for i in range(300)]

    def write(tally: Tally, seed: int) -> None:
        rng = random.Random(seed)
        for i, call_id in enumerate(shared):
            tally.record(id=call_id, model="gpt-4o-mini", provider="openai", input_tokens=100,
                         latency_ms=50.0 + i, ts=START + timedelta(minutes=i % 120))
            tally.record(model="gpt-4o-mini", provider="openai", input_tokens=rng.randrange(100),
                         latency_ms=rng.random() * 1000, ts=START + timedelta(minutes=i % 120))
        assert tally.flush(60)

    threads = [threading.Thread(target=write, args=(tally, n)) for n, tally in enumerate(tallies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(fetch_events(pg_url)) == 900
    assert rollups_mismatch(pg_url) == []
    assert rollup_calls(pg_url) == 900


def test_rollups_check_finds_a_changed_row_and_rebuild_mends_it(ledger_url, make_tally):
    tally = make_tally(ledger_url)
    _varied(tally, 200)
    assert tally.flush(20)
    tally.close()
    runner = CliRunner()
    result = runner.invoke(main, ["rollups", "--check", "--db", ledger_url])
    assert result.exit_code == 0 and "every rollup equals the events" in result.output
    engine = create_engine(normalize_url(ledger_url))
    with engine.begin() as conn:
        conn.execute(text("UPDATE llmtally_rollups SET calls = calls + 1 WHERE hour = "
                          "(SELECT MIN(hour) FROM llmtally_rollups)"))
    engine.dispose()
    assert rollups_mismatch(ledger_url) != []
    result = runner.invoke(main, ["rollups", "--check", "--db", ledger_url])
    assert result.exit_code == 1 and "llmtally rollups --rebuild" in result.output
    result = runner.invoke(main, ["rollups", "--rebuild", "--db", ledger_url])
    assert result.exit_code == 0 and "from 200 events" in result.output
    assert rollups_mismatch(ledger_url) == []
    result = runner.invoke(main, ["rollups", "--db", ledger_url])
    assert result.exit_code == 0 and "summing 200 events" in result.output


# -- the sketch ----------------------------------------------------------------------------


def _exact(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p * len(ordered) / 100)) - 1]


@pytest.mark.parametrize("seed", range(20))
def test_sketch_percentiles_are_within_the_stated_error_of_the_exact_ones(seed):
    rng = random.Random(seed)
    count = rng.choice([1, 2, 7, 100, 5000])
    values = [rng.choice([rng.lognormvariate(6, 2), rng.uniform(0, 3), rng.expovariate(0.01)])
              for _ in range(count)]
    parts = [sketch.bucket_of(value) for value in values]
    counts = sketch.merged((bucket, 1) for bucket in parts)
    for p in (1, 50, 90, 95, 99, 100):
        exact, estimate = _exact(values, p), sketch.percentile(counts, p)
        if exact <= sketch.MIN_VALUE_MS:
            assert estimate == 0.0
        else:
            assert abs(estimate - exact) <= sketch.RELATIVE_ERROR * exact * (1 + 1e-9), (p, exact)


def test_sketches_merge_to_the_sketch_of_the_union():
    rng = random.Random(3)
    first = [rng.lognormvariate(5, 1) for _ in range(300)]
    second = [rng.lognormvariate(7, 1) for _ in range(500)]
    merged = sketch.merged([(sketch.bucket_of(v), 1) for v in first]
                           + [(sketch.bucket_of(v), 1) for v in second])
    whole = sketch.merged((sketch.bucket_of(v), 1) for v in first + second)
    assert merged == whole
    assert sketch.percentile({}, 50) is None
    assert sketch.value_of(sketch.bucket_of(0.0)) == 0.0 == sketch.value_of(sketch.bucket_of(-5))
    # up to 1 µs, the edge included, is the zero bucket; just past it, the first real one
    assert sketch.bucket_of(sketch.MIN_VALUE_MS) == sketch.ZERO_BUCKET
    assert sketch.bucket_of(sketch.MIN_VALUE_MS * 1.001) == sketch.ZERO_BUCKET + 1


# -- reading: whole hours from the rollups, the rest from the events -------------------------

CLOCK_NOW = datetime(2026, 11, 26, 7, 41, 13, tzinfo=timezone.utc)


def _events_as_python(url: str) -> list[dict]:
    rows = fetch_events(url)
    for row in rows:
        row["ts"] = _when(row["ts"])
    return rows


@pytest.mark.parametrize("zone", ["UTC", "Asia/Kolkata", "Asia/Kathmandu", "America/St_Johns"])
def test_report_and_summary_equal_the_events_in_any_zone_and_any_period(ledger_url, make_tally,
                                                                         zone):
    from zoneinfo import ZoneInfo

    from llmtally._reporting.report import build_report

    tally = make_tally(ledger_url, clock=lambda: CLOCK_NOW, timezone=zone)
    start = (CLOCK_NOW - timedelta(days=16)).replace(tzinfo=None)
    for day in range(16):
        _varied(tally, 90, seed=day, start=start + timedelta(days=day))
    assert tally.flush(30)
    events = _events_as_python(ledger_url)
    report = build_report(tally, week="last")
    begin, end = (moment.astimezone(timezone.utc).replace(tzinfo=None)
                  for moment in (report.period.start, report.period.end))
    week = [row for row in events if begin <= row["ts"] < end]
    assert len(week) > 300
    assert report.current.calls == len(week)
    assert report.current.errors == sum(row["status"] == "error" for row in week)
    assert report.current.input_tokens == sum(row["input_tokens"] for row in week)
    assert report.current.cost == pytest.approx(sum(row["cost"] or 0 for row in week), abs=1e-9)
    local = ZoneInfo(zone)
    days: dict = {}
    for row in week:
        day = row["ts"].replace(tzinfo=timezone.utc).astimezone(local).date()
        days[day] = days.get(day, 0) + 1
    assert [calls for *_rest, calls in report.daily] == [days.get(
        (report.period.start + timedelta(days=n)).date(), 0) for n in range(7)]
    failed: dict = {}
    for row in week:
        if row["status"] == "error":
            failed[(row["provider"], row["error_type"])] = failed.get(
                (row["provider"], row["error_type"]), 0) + 1
    assert {(row.provider, row.error_type): row.count for row in report.errors} == failed
    costly = sorted((row for row in week if (row["cost"] or 0) > 0),
                    key=lambda row: (-row["cost"], row["ts"], row["id"]))[:10]
    assert [call.id for call in report.costly] == [row["id"] for row in costly]

    since, until = CLOCK_NOW - timedelta(hours=50, minutes=17), CLOCK_NOW - timedelta(minutes=193)
    a, b = (moment.replace(tzinfo=None) for moment in (since, until))
    window = [row for row in events if a <= row["ts"] < b]
    for by, key in (("model", lambda e: e["model"]), ("user", lambda e: e["user"]),
                    ("day", lambda e: e["ts"].date().isoformat()),
                    ("session", lambda e: e["session"])):
        summary = {row.key: row for row in tally.summary(since=since, until=until, by=by)}
        expected: dict = {}
        for row in window:
            expected.setdefault(key(row), []).append(row)
        assert set(summary) == set(expected), by
        for name, rows in expected.items():
            assert summary[name].calls == len(rows), (by, name)
            assert summary[name].output_tokens == sum(r["output_tokens"] for r in rows)
            assert summary[name].cost == pytest.approx(sum(r["cost"] or 0 for r in rows),
                                                       abs=1e-9)
    filtered = tally.summary(since=since, until=until, by="model", project="search",
                             status="ok")
    assert sum(row.calls for row in filtered) == sum(
        1 for row in window if row["project"] == "search" and row["status"] == "ok")


def test_the_costliest_calls_are_found_in_few_hours_and_through_ties(ledger_url, make_tally):
    from llmtally._reporting import data

    tally = make_tally(ledger_url, clock=lambda: CLOCK_NOW)
    base = datetime(2026, 11, 16, 0, 0, 0)
    for hour in range(7 * 24):  # every call costs the same but 3: ties everywhere
        for minute in (5, 35):
            tally.record(model="gpt-4o-mini", provider="openai", input_tokens=1000,
                         ts=base + timedelta(hours=hour, minutes=minute))
    for hour, tokens in ((30, 90_000), (100, 50_000), (160, 70_000)):
        tally.record(id=f"big-{hour}", model="gpt-4o-mini", provider="openai",
                     input_tokens=tokens, ts=base + timedelta(hours=hour, minutes=50),
                     project="p1" if hour == 100 else None)
    for hour in range(0, 7 * 24, 5):  # a project's calls, cheaper than the costliest overall
        tally.record(model="gpt-4o-mini", provider="openai", input_tokens=3000 + hour,
                     ts=base + timedelta(hours=hour, minutes=40), project="p1")
    assert tally.flush(20)
    begin = base + timedelta(minutes=20)  # starts and ends inside an hour
    end = base + timedelta(days=7, minutes=-20)
    rows = data.Range(begin, end, begin - timedelta(days=7), end - timedelta(days=7))
    events = [row for row in _events_as_python(ledger_url) if begin <= row["ts"] < end]
    expected = sorted(events, key=lambda row: (-row["cost"], row["ts"], row["id"]))
    with tally.store.connect() as conn:
        for limit in (1, 3, 10, 400):
            found = data.costliest_calls(conn, rows, limit)
            assert [call.id for call in found] == [row["id"] for row in expected[:limit]]
    assert [call.id for call in found[:3]] == ["big-30", "big-160", "big-100"]
    mine = [row for row in expected if row["project"] == "p1"]
    with tally.store.connect() as conn:
        for limit in (1, 5, 50):
            found = data.costliest_calls(conn, data.Range(
                begin, end, begin - timedelta(days=7), end - timedelta(days=7), (("project", "p1"),)),
                limit)
            assert [call.id for call in found] == [row["id"] for row in mine[:limit]]
    assert found[0].id == "big-100" and len(mine) > 30


def test_periods_at_the_end_of_time_do_not_overflow(ledger_url, make_tally):
    tally = make_tally(ledger_url)
    tally.record(model="gpt-4o-mini", input_tokens=1, ts=datetime(9999, 12, 31, 23, 40))
    assert [row.calls for row in tally.summary(since="9999-12-31T23:30:00")] == [1]
    assert [row.calls for row in tally.summary(since="9999-12-31T22:30:00",
                                               until="9999-12-31T23:50:00")] == [1]
    assert rollups_mismatch(ledger_url) == []
