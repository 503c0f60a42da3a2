"""The ledger end to end: record → background writer → real SQLite / PostgreSQL → read back."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import fetch_events

from llmtally import Tally

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)


def _json(value):
    return json.loads(value) if isinstance(value, str) else value


def test_every_field_round_trips(ledger_url, make_tally):
    tally = make_tally(ledger_url)
    ts = datetime(2026, 11, 20, 8, 30, 15, 123456, tzinfo=timezone.utc)
    with tally.scope(project="etl", user="bob", session="s-1", tags=["nightly"],
                     metadata={"job": "daily"}):
        event_id = tally.record(
            id="evt-1", ts=ts, source="manual", provider="openai", model="gpt-4o-mini",
            resolved_model="gpt-4o-mini-2024-07-18", call_type="chat", streamed=True,
            status="ok", input_tokens=1200, output_tokens=300, cache_read_tokens=1000,
            cache_write_tokens=0, reasoning_tokens=20, latency_ms=850.5, ttft_ms=120.25,
            tags=["beta"], request_id="req-9", metadata={"attempt": 2},
        )
    assert event_id == "evt-1"
    assert tally.flush(10)
    [row] = fetch_events(ledger_url)
    expected_cost = 200 * 0.15e-6 + 1000 * 0.075e-6 + 300 * 0.6e-6
    assert row["id"] == "evt-1"
    assert row["ts"] == datetime(2026, 11, 20, 8, 30, 15, 123456) or \
        str(row["ts"]).startswith("2026-11-20 08:30:15.123456")
    assert (row["source"], row["provider"], row["model"], row["resolved_model"]) == \
        ("manual", "openai", "gpt-4o-mini", "gpt-4o-mini-2024-07-18")
    assert (row["call_type"], bool(row["streamed"]), row["status"], row["error_type"]) == \
        ("chat", True, "ok", None)
    assert (row["input_tokens"], row["output_tokens"], row["cache_read_tokens"],
            row["cache_write_tokens"], row["reasoning_tokens"]) == (1200, 300, 1000, 0, 20)
    assert row["cost"] == pytest.approx(expected_cost, abs=1e-12)
    assert expected_cost == pytest.approx(2.85e-4, abs=1e-12)
    assert (row["currency"], row["cost_status"]) == ("USD", "priced")
    assert row["price_source"].startswith("litellm-map:")
    assert (row["latency_ms"], row["ttft_ms"]) == (850.5, 120.25)
    assert (row["project"], row["user"], row["session"], row["request_id"]) == \
        ("etl", "bob", "s-1", "req-9")
    assert _json(row["tags"]) == ["nightly", "beta"]
    assert _json(row["metadata"]) == {"job": "daily", "attempt": 2}


def test_same_id_is_stored_once(ledger_url, make_tally):
    tally = make_tally(ledger_url)
    for _ in range(3):
        tally.record(id="dup", model="gpt-4o-mini", provider="openai", input_tokens=10)
    tally.flush(10)
    from sqlalchemy import select

    from llmtally import UsageEvent

    with tally.store.connect() as conn:
        rows = [dict(r) for r in conn.execute(select(UsageEvent.__table__)).mappings()]
    assert len(rows) == 1
    assert tally.store.insert_many(rows) == 0  # the writer's own path, replayed: no-op
    tally.record(id="dup", model="gpt-4o-mini", provider="openai", input_tokens=99)
    tally.flush(10)
    [row] = fetch_events(ledger_url)
    assert row["input_tokens"] == 10  # the first write wins; later copies are ignored


def test_unknown_model_is_unpriced_not_zero(ledger_url, make_tally):
    tally = make_tally(ledger_url)
    tally.record(model="acme-llm-9000", provider="acme", input_tokens=500, output_tokens=50)
    tally.flush(10)
    [row] = fetch_events(ledger_url)
    assert row["cost"] is None
    assert row["cost_status"] == "unpriced"
    assert row["price_source"] is None
    [unpriced] = tally.unpriced()
    assert (unpriced.provider, unpriced.model, unpriced.calls, unpriced.input_tokens) == \
        ("acme", "acme-llm-9000", 1, 500)


def test_summary_groups_in_sql(ledger_url, make_tally):
    tally = make_tally(ledger_url, clock=lambda: NOW)
    calls = [
        ("gpt-4o-mini", "openai", "search", "alice", 1000, 100, 1),
        ("gpt-4o-mini", "openai", "search", "bob", 2000, 200, 2),
        ("deepseek/deepseek-chat", None, "etl", "bob", 10_000, 1000, 1),
        ("acme-llm", "acme", "etl", "carol", 50, 5, 1),
    ]
    for model, provider, project, user, tokens_in, tokens_out, days_ago in calls:
        tally.record(model=model, provider=provider, project=project, user=user,
                     input_tokens=tokens_in, output_tokens=tokens_out,
                     ts=NOW - timedelta(days=days_ago))
    tally.record(model="gpt-4o-mini", provider="openai", status="error", error_type="Timeout",
                 ts=NOW - timedelta(hours=1))
    tally.record(model="gpt-4o-mini", provider="openai", input_tokens=7, ts=NOW - timedelta(days=30))

    by_model = {row.key: row for row in tally.summary(since="7d", by="model")}
    mini = by_model["gpt-4o-mini"]
    assert (mini.calls, mini.errors, mini.input_tokens, mini.output_tokens) == (3, 1, 3000, 300)
    assert mini.cost == pytest.approx(3000 * 0.15e-6 + 300 * 0.6e-6, abs=1e-12)
    deepseek = by_model["deepseek-chat"]
    assert deepseek.cost == pytest.approx(10_000 * 0.28e-6 + 1000 * 0.42e-6, abs=1e-12)
    acme = by_model["acme-llm"]
    assert (acme.cost, acme.unpriced_calls) == (0.0, 1)

    by_project = {row.key: row.calls for row in tally.summary(since="7d", by="project")}
    assert by_project == {"search": 2, "etl": 2, None: 1}
    by_user = {row.key: row.calls for row in tally.summary(since="36h", by="user")}
    assert by_user == {"alice": 1, "carol": 1, "bob": 1, None: 1}
    by_day = {row.key: row.calls for row in tally.summary(since="40d", by="day")}
    assert by_day == {"2026-11-24": 3, "2026-11-23": 1, "2026-11-25": 1, "2026-10-26": 1}
    only_bob = tally.summary(since="7d", by="model", user="bob")
    assert sum(r.calls for r in only_bob) == 2
    window = tally.summary(since="2026-11-24", until="2026-11-24T12:00:01", by="model")
    assert sum(r.calls for r in window) == 3


def test_sqlite_file_is_private_in_wal_mode(tmp_path, make_tally):
    path = tmp_path / "nested" / "dir" / "ledger.db"
    tally = make_tally(f"sqlite:///{path}")
    tally.record(model="gpt-4o-mini", input_tokens=1)
    tally.flush(10)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    wal = path.with_name(path.name + "-wal")
    assert wal.exists() and stat.S_IMODE(wal.stat().st_mode) == 0o600
    import sqlite3

    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_plain_path_and_the_environment_variable_pick_the_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMTALLY_DATABASE_URL", str(tmp_path / "from-env.db"))
    with Tally(price_map="bundled") as tally:
        tally.record(model="gpt-4o-mini", input_tokens=1)
    assert len(fetch_events(f"sqlite:///{tmp_path / 'from-env.db'}")) == 1
    monkeypatch.delenv("LLMTALLY_DATABASE_URL")
    with Tally(price_map="bundled") as tally:  # the default: ./llmtally.db
        tally.record(model="gpt-4o-mini", input_tokens=1)
        assert tally.database_url.endswith(str(tmp_path / "llmtally.db"))
    assert len(fetch_events(f"sqlite:///{tmp_path / 'llmtally.db'}")) == 1


def _run_python(code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, **kwargs)


def test_events_are_flushed_at_interpreter_exit(ledger_url, tmp_path):
    result = _run_python(f"""
        from llmtally import Tally
        tally = Tally({ledger_url!r}, price_map="bundled", spill_path={str(tmp_path / 's.jsonl')!r})
        for i in range(2000):
            tally.record(model="gpt-4o-mini", provider="openai", input_tokens=i)
        # no flush(), no close(): the exit handler must write them
    """)
    assert result.returncode == 0, result.stderr
    rows = fetch_events(ledger_url)
    assert len(rows) == 2000
    assert sum(r["input_tokens"] for r in rows) == sum(range(2000))


def test_four_processes_writing_at_once_lose_nothing(ledger_url, tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(f"""
        import sys, threading
        from llmtally import Tally
        worker = sys.argv[1]
        tally = Tally({ledger_url!r}, price_map="bundled",
                      spill_path={str(tmp_path)!r} + f"/spill-{{worker}}.jsonl", batch_size=50)
        def run(thread):
            for i in range(250):
                tally.record(id=f"{{worker}}-{{thread}}-{{i}}", model="gpt-4o-mini",
                             provider="openai", input_tokens=1, output_tokens=1)
        threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
        for t in threads: t.start()
        for t in threads: t.join()
        assert tally.flush(60)
        tally.close()
    """))
    procs = [subprocess.Popen([sys.executable, str(script), str(w)], stderr=subprocess.PIPE,
                              text=True) for w in range(4)]
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
    rows = fetch_events(ledger_url)
    assert len(rows) == 4 * 4 * 250
    assert len({r["id"] for r in rows}) == 4000
    assert not list(tmp_path.glob("spill-*"))  # nothing had to wait in a spill file


def test_record_on_callers_thread_never_touches_the_database(tmp_path, make_tally):
    tally = make_tally(flush_interval_s=60)  # the writer sleeps: record() must still return
    for _ in range(100):
        tally.record(model="gpt-4o-mini", input_tokens=1)
    assert fetch_events(f"sqlite:///{tmp_path / 'ledger.db'}") == []
    assert tally.flush(10)
    assert len(fetch_events(f"sqlite:///{tmp_path / 'ledger.db'}")) == 100


def test_full_queue_spills_instead_of_blocking_or_dropping(tmp_path, make_tally):
    tally = make_tally(max_queue=10, flush_interval_s=60)
    assert tally.flush(10)  # the writer's start-up replay is over: it would take a spill line
    for _ in range(25):
        tally.record(model="gpt-4o-mini", input_tokens=1)
    spill = Path(tally.spill_path)
    assert spill.exists() and len(spill.read_text().splitlines()) == 15
    assert tally.flush(10)  # the flush replays the spilled 15 and writes the queued 10
    assert len(fetch_events(f"sqlite:///{tmp_path / 'ledger.db'}")) == 25
    assert not spill.exists()


def test_events_built_on_the_writer_thread_are_written_and_a_failing_builder_loses_only_itself(
        tmp_path, make_tally, caplog):
    """Integrations may queue a builder instead of an event (Tally.record_later): it runs on
    the writer thread, also when a full queue spills it; one that raises is logged and skipped."""
    from llmtally import CallEvent
    from llmtally._events.usage import Usage

    tally = make_tally(max_queue=3, flush_interval_s=60)

    def broken() -> CallEvent:
        raise ValueError("odd response")

    for n in range(6):
        assert tally.record_later(lambda n=n: CallEvent(id=f"later-{n}", model="gpt-4o-mini",
                                                        usage=Usage(input_tokens=n),
                                                        source="langchain"))
    tally.record_later(broken)
    assert tally.flush(10)
    rows = fetch_events(f"sqlite:///{tmp_path / 'ledger.db'}")
    assert sorted((r["id"], r["input_tokens"], r["source"]) for r in rows) == [
        (f"later-{n}", n, "langchain") for n in range(6)]
    assert "could not build a deferred event (ValueError: odd response)" in caplog.text


def test_a_call_recorded_after_close_waits_in_the_spill_file_for_the_next_tally(
        ledger_url, tmp_path, caplog):
    """LiteLLM keeps a logger registered even after litellm.callbacks is reassigned, so a
    closed Tally may still be handed calls: they are kept, not dropped."""
    from llmtally import Tally

    spill = tmp_path / "after-close.jsonl"
    first = Tally(ledger_url, price_map="bundled", spill_path=spill)
    first.record(model="gpt-4o-mini", input_tokens=1, id="before-close")
    first.close()
    first.record(model="gpt-4o-mini", input_tokens=2, id="after-close")
    assert "recorded after this Tally was closed" in caplog.text
    with Tally(ledger_url, price_map="bundled", spill_path=spill) as second:
        assert second.flush(10)
    assert sorted(r["id"] for r in fetch_events(ledger_url)) == ["after-close", "before-close"]


def test_forked_children_keep_recording(ledger_url, make_tally):
    import multiprocessing

    tally = make_tally(ledger_url)
    tally.record(id="parent-before", model="gpt-4o-mini", input_tokens=1)
    tally.flush(10)

    def child(worker: int) -> None:
        for i in range(200):
            tally.record(id=f"child-{worker}-{i}", model="gpt-4o-mini", input_tokens=1)
        # no flush: multiprocessing children exit through os._exit(); llmtally flushes anyway

    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=child, args=(w,)) for w in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    tally.record(id="parent-after", model="gpt-4o-mini", input_tokens=1)
    tally.flush(10)
    ids = {row["id"] for row in fetch_events(ledger_url)}
    assert len(ids) == 3 * 200 + 2
    assert {"parent-before", "parent-after", "child-2-199"} <= ids
