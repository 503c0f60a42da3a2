"""Rows nobody can store never wedge the writer: hostile metadata is cleaned in record(), a row
the writer still cannot serialise or the ledger refuses goes to the rejected file (and can be
read back there), the rest land; the same on the spill path and on replay; the log stays short.

Real SQLite files and the real PostgreSQL, up, and down (a closed port: events spill).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest
from conftest import CLOSED_PORT_URL, fetch_events

from llmtally import Tally
from llmtally._events.metadata import MAX_DEPTH, MAX_NODES
from llmtally._storage.spill import SpillFile, encode_event
from llmtally._storage.tables import EVENT_COLUMNS

MAX_LOG_RECORDS = 20


class Unprintable:
    """An object whose str() and repr() both raise."""

    def __str__(self) -> str:
        raise RuntimeError("no text for you")

    __repr__ = __str__


def _cycle() -> dict:
    meta: dict = {"name": "loop"}
    meta["self"] = meta
    return meta


def _deep(levels: int = 5000) -> dict:
    top = current = {}
    for _ in range(levels):
        current["x"] = {}
        current = current["x"]
    return top


def _depth(meta: dict) -> int:
    depth, current = 0, meta
    while isinstance(current, dict) and "x" in current:
        depth, current = depth + 1, current["x"]
    return depth


def _hostile_metadata() -> list[dict]:
    return [_cycle(), _deep(), {"odd": Unprintable(), Unprintable(): "key"}]


def _row(**values) -> dict:
    """A whole event as the writer receives it, bypassing record()'s cleaning."""
    row = dict.fromkeys(EVENT_COLUMNS)
    row.update(id=uuid.uuid4().hex, ts=datetime(2026, 11, 2, 12, 0), source="manual",
               model="gpt-4o-mini", call_type="chat", streamed=False, status="ok",
               input_tokens=1, output_tokens=1, cache_read_tokens=0, cache_write_tokens=0,
               reasoning_tokens=0, cost=0.0, currency="USD", cost_status="priced", tags=[],
               metadata={})
    row.update(values)
    return row


def _log_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("llmtally")]


def _metadata(row: dict) -> dict:
    """A stored row's metadata (SQLite gives JSON back as text to plain SQL)."""
    meta = row["metadata"]
    return json.loads(meta) if isinstance(meta, str) else meta


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_hostile_metadata_is_cleaned_in_record_and_every_event_lands(ledger_url, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="llmtally")
    with Tally(ledger_url, price_map="bundled", spill_path=tmp_path / "spill.jsonl") as tally:
        hostile = [tally.record(model="gpt-4o-mini", input_tokens=1, metadata=meta)
                   for meta in _hostile_metadata()]
        good = [tally.record(model="gpt-4o-mini", input_tokens=2, metadata={"n": n})
                for n in range(50)]
        assert tally.flush(20)
        assert (tally._writer.written, tally._writer.rejected) == (53, 0)
    by_id = {row["id"]: row for row in fetch_events(ledger_url)}
    assert set(by_id) == {*hostile, *good}
    assert sum(row["input_tokens"] for row in by_id.values()) == 3 + 2 * 50
    cycle, deep, odd = (_metadata(by_id[i]) for i in hostile)
    # record() copies the top level, so the loop is cut where the original dict comes back
    assert cycle == {"name": "loop", "self": {"name": "loop", "self": "<cycle>"},
                     "llmtally_warnings": ["metadata refers to itself; the loop was cut"]}
    assert _depth(deep) == MAX_DEPTH
    assert f"metadata nested deeper than {MAX_DEPTH} levels was cut" in deep["llmtally_warnings"]
    assert odd["odd"] == "<unprintable Unprintable>" and odd["<unprintable Unprintable>"] == "key"
    assert [_metadata(by_id[i]) for i in good] == [{"n": n} for n in range(50)]
    assert len(_log_records(caplog)) < MAX_LOG_RECORDS
    assert not list(tmp_path.glob("spill.jsonl*"))


def test_hostile_metadata_while_the_ledger_is_down_spills_then_replays(ledger_url, tmp_path,
                                                                        caplog):
    caplog.set_level(logging.DEBUG, logger="llmtally")
    spill = tmp_path / "spill.jsonl"
    with Tally(CLOSED_PORT_URL, price_map="bundled", spill_path=spill) as tally:
        hostile = [tally.record(model="gpt-4o-mini", input_tokens=1, metadata=meta)
                   for meta in _hostile_metadata()]
        good = [tally.record(model="gpt-4o-mini", input_tokens=2) for _ in range(50)]
        assert tally.flush(20)
    assert sorted(row["id"] for row in _read_jsonl(spill)) == sorted([*hostile, *good])
    with Tally(ledger_url, price_map="bundled", spill_path=spill) as tally:
        assert tally.flush(20)
    rows = fetch_events(ledger_url)
    assert sorted(row["id"] for row in rows) == sorted([*hostile, *good])
    assert sum(row["input_tokens"] for row in rows) == 3 + 2 * 50
    assert not list(tmp_path.glob("spill.jsonl*"))
    assert len(_log_records(caplog)) < MAX_LOG_RECORDS


def _unstorable_rows() -> list[dict]:
    """Rows the writer cannot serialise (metadata) or the ledger cannot store (model)."""
    return [_row(metadata=_cycle()), _row(metadata=_deep()),
            _row(metadata={"odd": Unprintable()}), _row(model=Unprintable())]


@pytest.mark.parametrize("down", [False, True], ids=["up", "down"])
def test_the_writer_keeps_rows_it_cannot_store_in_the_rejected_file(ledger_url, down, tmp_path,
                                                                     caplog):
    caplog.set_level(logging.DEBUG, logger="llmtally")
    spill = tmp_path / "spill.jsonl"
    bad = _unstorable_rows()
    bad_ids = [row["id"] for row in bad]
    good = [_row(input_tokens=n) for n in range(1, 101)]
    with Tally(CLOSED_PORT_URL if down else ledger_url, price_map="bundled",
               spill_path=spill) as tally:
        for row in [good[0], *bad, *good[1:]]:  # bad rows in the middle of a batch
            tally._writer.submit(row)
        assert tally.flush(20)
        assert tally._writer.rejected == len(bad)
    rejected = _read_jsonl(tmp_path / "spill.jsonl.rejected.jsonl")
    assert [row["id"] for row in rejected] == bad_ids
    cycle, deep, odd, unnamed = rejected
    assert cycle["metadata"]["self"] == "<cycle>" and _depth(deep["metadata"]) == MAX_DEPTH
    assert odd["metadata"]["odd"] == "<unprintable Unprintable>"
    assert unnamed["model"] == "<unprintable Unprintable>"
    for row in rejected:
        assert row["metadata"]["llmtally_warnings"][-1].startswith("rejected: ")
    if down:  # the good rows wait in the spill file, and replay into the ledger once it is up
        # (a replay the writer tried while closing, against the still-closed port, leaves the
        # file claimed under spill.jsonl.replaying.<pid>.*: the next Tally replays it whole)
        kept = [spill, *tmp_path.glob("spill.jsonl.replaying.*")]
        waiting = [row for path in kept if path.exists() for row in _read_jsonl(path)]
        assert sorted(r["id"] for r in waiting) == sorted(r["id"] for r in good)
        with Tally(ledger_url, price_map="bundled", spill_path=spill) as tally:
            assert tally.flush(20)
    rows = fetch_events(ledger_url)
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in good)
    assert sum(r["input_tokens"] for r in rows) == sum(range(1, 101))
    assert not spill.exists() and not list(tmp_path.glob("spill.jsonl.replaying.*"))
    assert len(_log_records(caplog)) < MAX_LOG_RECORDS


def test_a_spill_line_the_ledger_refuses_goes_to_the_rejected_file_and_the_rest_land(
        ledger_url, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="llmtally")
    spill = SpillFile(tmp_path / "spill.jsonl")
    good = [_row(input_tokens=n) for n in range(1, 2501)]  # more than one replay batch
    refused = [_row(model=None)]  # NOT NULL, on both databases
    if "postgresql" in ledger_url:  # VARCHAR lengths are enforced on PostgreSQL only
        refused += [_row(id="i" * 200), _row(user="u" * 300)]
    lines = [encode_event(row) for row in good]
    for offset, row in enumerate(refused):
        lines.insert(1500 + offset * 7, encode_event(row))
    spill.append_lines(lines)
    with Tally(ledger_url, price_map="bundled", spill_path=spill.path) as tally:
        assert tally.flush(30)
        assert tally._writer.rejected == len(refused)
    rows = fetch_events(ledger_url)
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in good)
    assert sum(r["input_tokens"] for r in rows) == sum(range(1, 2501))
    rejected = _read_jsonl(tmp_path / "spill.jsonl.rejected.jsonl")
    assert sorted(r["id"] for r in rejected) == sorted(r["id"] for r in refused)
    assert not spill.path.exists() and not list(tmp_path.glob("spill.jsonl.replaying.*"))
    assert len(_log_records(caplog)) < MAX_LOG_RECORDS


def test_record_turns_any_metadata_into_plain_json_quickly(sqlite_url, tmp_path):
    import enum

    class Level(enum.IntEnum):
        HIGH = 3

    class Name(str):
        def __str__(self) -> str:
            raise RuntimeError("hostile")

    shared: list = []
    for _ in range(60):  # 2**60 paths through shared lists: walking them all would never end
        shared = [shared, shared]
    with Tally(sqlite_url, price_map="bundled", spill_path=tmp_path / "spill.jsonl") as tally:
        started = time.perf_counter()
        odd = tally.record(model="gpt-4o-mini", metadata={
            "when": datetime(2026, 11, 2, 12, 30), "pair": (1, "a"), "level": Level.HIGH,
            "name": Name("kept"), 7: "seven", "set": {1}})
        huge = tally.record(model="gpt-4o-mini", metadata={"shared": shared})
        flat = tally.record(model="gpt-4o-mini", metadata={"values": list(range(40_000))})
        assert time.perf_counter() - started < 2.0
        assert tally.flush(20)
    by_id = {row["id"]: _metadata(row) for row in fetch_events(sqlite_url)}
    assert by_id[odd] == {"when": "2026-11-02 12:30:00", "pair": [1, "a"], "level": 3,
                          "name": "kept", "7": "seven", "set": "{1}"}
    for event in (huge, flat):
        assert by_id[event]["llmtally_metadata_dropped"] == f"more than {MAX_NODES} values"
        assert by_id[event]["llmtally_warnings"] == [
            f"metadata held more than {MAX_NODES} values; dropped"]


def test_a_rejected_row_without_metadata_gets_its_note_in_metadata():
    from llmtally._storage.writer_rows import salvaged

    kept = salvaged({"id": "x", "tags": (), "metadata": None}, ValueError("refused\nsecond"))
    assert kept["metadata"] == {"llmtally_warnings": ["rejected: ValueError: refused"]}
    assert "llmtally_rejected" not in kept
