"""When the database is unreachable events wait, then spill to a file that is replayed later."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import CLOSED_PORT_URL, fetch_events, require_postgres, rollups_mismatch

from llmtally import Tally
from llmtally._storage.spill import SpillFile


def _record_while_down(tmp_path, count: int) -> list[str]:
    spill = tmp_path / "spill.jsonl"
    tally = Tally(CLOSED_PORT_URL, price_map="bundled", spill_path=spill)
    started = time.perf_counter()
    ids = [tally.record(model="gpt-4o-mini", provider="openai", input_tokens=i, output_tokens=1)
           for i in range(count)]
    assert time.perf_counter() - started < 1.0, "record() must not wait for the database"
    assert tally.flush(20), "flush() must finish: the events are safe in the spill file"
    tally.close()
    assert len(spill.read_text().splitlines()) == count
    return ids


def test_events_spill_while_postgres_is_down_and_replay_when_it_returns(pg_url, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="llmtally")
    ids = _record_while_down(tmp_path, 300)
    assert any("cannot write to the ledger" in r.getMessage() for r in caplog.records)
    assert "postgres@127.0.0.1:1" in caplog.text and "password" not in caplog.text.lower()
    # The database is back (the URL now points at a live server): the backlog is replayed.
    with Tally(pg_url, price_map="bundled", spill_path=tmp_path / "spill.jsonl") as tally:
        assert tally.flush(20)
    rows = fetch_events(pg_url)
    assert sorted(r["id"] for r in rows) == sorted(ids)
    assert sum(r["input_tokens"] for r in rows) == sum(range(300))
    assert not list(tmp_path.glob("spill.jsonl*"))
    assert rollups_mismatch(pg_url) == []


def test_replaying_twice_adds_nothing(sqlite_url, tmp_path, caplog):
    ids = _record_while_down(tmp_path, 50)
    backup = (tmp_path / "spill.jsonl").read_bytes()
    caplog.set_level(logging.WARNING, logger="llmtally")
    caplog.clear()  # what the outage logged
    for replay in range(2):
        (tmp_path / "spill.jsonl").write_bytes(backup)
        with Tally(sqlite_url, price_map="bundled", spill_path=tmp_path / "spill.jsonl") as tally:
            assert tally.flush(20), f"replay {replay} did not finish"
        # the whole file went in: no spill file, no claimed (*.replaying.<pid>) copy, no rejects
        assert sorted(path.name for path in tmp_path.iterdir() if "spill" in path.name) == []
        rows = fetch_events(sqlite_url)
        assert sorted(r["id"] for r in rows) == sorted(ids)
        assert sum(r["input_tokens"] for r in rows) == sum(range(50))
        assert rollups_mismatch(sqlite_url) == []
    assert [r.getMessage() for r in caplog.records if r.name.startswith("llmtally")] == []


def test_a_line_cut_by_a_power_failure_is_skipped_and_not_glued_to_the_next(sqlite_url, tmp_path, caplog):
    spill = SpillFile(tmp_path / "spill.jsonl")
    ids = _record_while_down(tmp_path, 10)
    with open(spill.path, "ab") as handle:
        handle.write(b'{"id": "half-written", "ts": "2026-11-')  # the process died here
    # A later process appends more: the stub must not swallow its first event.
    with Tally(CLOSED_PORT_URL, price_map="bundled", spill_path=spill.path) as tally:
        later = tally.record(model="gpt-4o-mini", input_tokens=5)
    caplog.set_level(logging.WARNING, logger="llmtally")
    with Tally(sqlite_url, price_map="bundled", spill_path=spill.path) as tally:
        tally.flush(20)
    assert sorted(r["id"] for r in fetch_events(sqlite_url)) == sorted([*ids, later])
    assert "1 unreadable lines (11)" in caplog.text


def test_two_processes_replaying_one_spill_file_add_each_event_once(sqlite_url, tmp_path):
    ids = _record_while_down(tmp_path, 2000)
    script = textwrap.dedent(f"""
        from llmtally import Tally
        with Tally({sqlite_url!r}, price_map="bundled",
                   spill_path={str(tmp_path / 'spill.jsonl')!r}) as tally:
            assert tally.flush(60)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    rows = fetch_events(sqlite_url)
    assert len(rows) == 2000 and sorted(r["id"] for r in rows) == sorted(ids)
    assert not list(tmp_path.glob("spill.jsonl*"))


def test_a_claim_left_by_a_dead_replayer_is_taken_over(sqlite_url, tmp_path):
    ids = _record_while_down(tmp_path, 20)
    # A replayer (pid that no longer exists) claimed the file and died before finishing.
    dead_pid = 2**22 + 12345
    (tmp_path / "spill.jsonl").rename(tmp_path / f"spill.jsonl.replaying.{dead_pid}.abc")
    with Tally(sqlite_url, price_map="bundled", spill_path=tmp_path / "spill.jsonl") as tally:
        tally.flush(20)
    assert sorted(r["id"] for r in fetch_events(sqlite_url)) == sorted(ids)
    assert not list(tmp_path.glob("spill.jsonl*"))


def test_a_row_the_database_refuses_is_set_aside_and_the_rest_are_kept(pg_url, tmp_path):
    tally = Tally(pg_url, price_map="bundled", spill_path=tmp_path / "spill.jsonl")
    good = [tally.record(model="gpt-4o-mini", input_tokens=1) for _ in range(5)]
    bad = {"id": "bad-row", "ts": "not a timestamp"}  # as if a buggy version had queued it
    tally._writer.submit({**fetch_shape(), **bad})
    assert tally.flush(20)
    tally.close()
    assert sorted(r["id"] for r in fetch_events(pg_url)) == sorted(good)
    rejected = tmp_path / "spill.jsonl.rejected.jsonl"
    assert json.loads(rejected.read_text())["id"] == "bad-row"


def fetch_shape() -> dict:
    """A complete event row, as the writer receives it."""
    from datetime import datetime

    from llmtally._storage.tables import EVENT_COLUMNS

    row = {name: None for name in EVENT_COLUMNS}
    row.update(ts=datetime(2026, 1, 1), source="manual", model="m", call_type="chat",
               streamed=False, status="ok", currency="USD", cost_status="unpriced", tags=[],
               metadata={}, input_tokens=0, output_tokens=0, cache_read_tokens=0,
               cache_write_tokens=0, reasoning_tokens=0)
    return row


@pytest.fixture(autouse=True)
def _postgres_for_closed_port_tests():
    """The closed-port URL needs psycopg installed even though no server answers."""
    require_postgres()


def test_faults_are_logged_once_per_interval_not_per_call(caplog):
    from llmtally._log import warn_limited

    caplog.set_level(logging.WARNING, logger="llmtally")
    for _ in range(500):
        warn_limited("test-fault", "llmtally: the thing failed", interval_s=0.2)
    assert [r.getMessage() for r in caplog.records] == ["llmtally: the thing failed"]
    time.sleep(0.25)
    warn_limited("test-fault", "llmtally: the thing failed", interval_s=0.2)
    assert caplog.records[-1].getMessage() == \
        "llmtally: the thing failed (499 similar messages suppressed)"
