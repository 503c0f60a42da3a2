"""The writer's edges that its end-to-end tests pass over (each test here fails on a mutant that
survived `python benchmarks/mutation.py writer`; benchmarks/RESULTS.md lists them): when
pending events go to the spill file, what a durability="sync" record waits for, what a broken
deferred event logs, what an outage says."""

from __future__ import annotations

import json
import logging
import re
import time
from datetime import datetime

import pytest
from conftest import CLOSED_PORT_URL, fetch_events, unmute_logs, wait_until

from llmtally._storage.spill import SpillFile
from llmtally._storage.store import Store
from llmtally._storage.writer import Writer


def _row(n: int) -> dict:
    return {"id": f"w{n}", "ts": datetime(2026, 11, 25, 12, 0, n), "source": "manual",
            "provider": "openai", "model": "gpt-4o-mini", "call_type": "chat", "streamed": False,
            "status": "ok", "input_tokens": n, "output_tokens": 1, "cache_read_tokens": 0,
            "cache_write_tokens": 0, "reasoning_tokens": 0, "cost": 0.0, "currency": "USD",
            "cost_status": "priced"}


@pytest.fixture
def make_writer(tmp_path):
    """A Writer (its thread idle until woken) on a SQLite ledger, or any URL given."""
    made: list[Writer] = []

    def make(url: str | None = None, spill: SpillFile | None = None, **options) -> Writer:
        options.setdefault("flush_interval_s", 60)
        writer = Writer(Store(url or f"sqlite:///{tmp_path / 'ledger.db'}"),
                        spill or SpillFile(tmp_path / "spill.jsonl"), **options)
        made.append(writer)
        return writer

    yield make
    for writer in made:
        writer._pending.clear()
        writer.close(2)
        writer.store.close()


def test_pending_events_spill_at_max_pending_or_once_the_outage_lasted_spill_after_s(make_writer):
    writer = make_writer(max_pending=3, spill_after_s=5.0)
    writer._pending[:] = [_row(1), _row(2)]
    assert not writer._must_spill(100.0)  # the ledger is up and fewer than max_pending wait
    writer._pending.append(_row(3))
    assert writer._must_spill(100.0)  # max_pending reached, ledger up or not
    writer._pending[:] = [_row(1)]
    writer._down_since = 100.0
    assert not writer._must_spill(104.999)
    assert writer._must_spill(105.0)  # spill_after_s of outage, to the instant


def _unwritable_spill(tmp_path) -> SpillFile:
    """A spill file the disk refuses: its directory would be under a regular file."""
    (tmp_path / "a-file").write_text("")
    return SpillFile(tmp_path / "a-file" / "spill.jsonl")


def test_a_sync_record_waits_only_its_timeout_when_neither_ledger_nor_disk_takes_it(
        make_writer, tmp_path):
    writer = make_writer(CLOSED_PORT_URL, _unwritable_spill(tmp_path))
    row = _row(1)
    assert writer.submit_and_wait(row, timeout=0.5) is False
    # nobody waits for it any more: the writer goes back to waiting spill_after_s before
    # spilling instead of settling at once (the event itself stays in memory, like any)
    assert not writer._waits.waited_on


def test_a_sync_record_says_true_once_its_event_is_in_the_ledger(make_writer, tmp_path):
    writer = make_writer()
    assert writer.submit_and_wait(_row(1), timeout=10) is True
    assert [r["id"] for r in fetch_events(f"sqlite:///{tmp_path / 'ledger.db'}")] == ["w1"]


def test_a_dropped_deferred_event_counts_once_so_flush_still_waits_for_the_rest(
        make_writer, tmp_path):
    """flush() is True only when every submitted event is stored or spilled: a broken builder
    dropped on the way must not count as two, or an event left in memory counts as done."""
    writer = make_writer(CLOSED_PORT_URL, _unwritable_spill(tmp_path))
    writer.submit(lambda: None)  # a builder that gives nothing: dropped
    writer.submit(_row(1))  # neither the ledger nor the disk takes it
    assert writer.flush(1.0) is False


def test_a_broken_deferred_event_is_logged_with_its_traceback_and_a_non_dict_by_its_type(
        make_writer, caplog):
    writer = make_writer()

    def broken() -> dict:
        raise ValueError("odd response")

    with caplog.at_level(logging.WARNING, logger="llmtally"):
        writer.submit(broken)
        assert writer.flush(10)
    failed = [r for r in caplog.records if "could not build a deferred event" in r.getMessage()]
    assert [r.getMessage() for r in failed] == [
        "llmtally: could not build a deferred event (ValueError: odd response)"]
    assert failed[0].exc_info is not None and failed[0].exc_info[0] is ValueError
    caplog.clear()
    unmute_logs()  # the same rate-limit key: a minute apart in real use
    with caplog.at_level(logging.WARNING, logger="llmtally"):
        writer.submit(lambda: ["not", "a", "dict"])
        assert writer.flush(10)
    assert [r.getMessage() for r in caplog.records] == [
        "llmtally: a deferred event was built as a list, not a dict; dropped"]


def test_both_deferred_failures_share_one_rate_limit(make_writer, caplog):
    """A flood of broken builders logs one line a minute, whichever way each one broke."""
    writer = make_writer()
    with caplog.at_level(logging.WARNING, logger="llmtally"):
        writer.submit(lambda: 1 / 0)
        writer.submit(lambda: "text")
        writer.submit(lambda: 1 / 0)
        assert writer.flush(10)
    assert len([r for r in caplog.records if "deferred event" in r.getMessage()]) == 1


def test_an_outage_is_logged_with_its_cause(make_writer, tmp_path, caplog):
    writer = make_writer(CLOSED_PORT_URL, SpillFile(tmp_path / "spill.jsonl"))
    with caplog.at_level(logging.WARNING, logger="llmtally"):
        writer.submit(_row(1))
        writer._wake.set()
        assert writer.flush(10)  # spilled: someone flushes during an outage
    said = [r.getMessage() for r in caplog.records if "cannot write to the ledger" in r.getMessage()]
    assert len(said) == 1
    assert "OperationalError: " in said[0] and "connection" in said[0].lower()
    assert "1 events wait" in said[0]


# -- what the log says, and the retry back-off ----------------------------------------------------


class _Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_an_outage_message_names_the_ledger_the_cause_the_waiting_events_and_the_spill_file(
        make_writer, tmp_path, caplog, monkeypatch):
    from sqlalchemy.exc import OperationalError

    writer = make_writer(clock=_Clock())
    writer._pending[:] = [_row(1), _row(2)]
    monkeypatch.setattr(writer.store, "full_disk_note", lambda: "; its disk is full")
    with caplog.at_level(logging.WARNING, logger="llmtally"):
        writer._note_outage(OperationalError("INSERT", None, Exception("disk I/O error")))
    assert [r.getMessage() for r in caplog.records] == [
        f"llmtally: cannot write to the ledger {writer.store.display_url} (OperationalError: "
        "(builtins.Exception) disk I/O error; its disk is full); 2 events wait and will be "
        f"written when it is back (or kept in {tmp_path / 'spill.jsonl'})"]


def test_a_cause_that_already_says_full_is_not_told_twice(make_writer, caplog, monkeypatch):
    writer = make_writer(clock=_Clock())
    monkeypatch.setattr(writer.store, "full_disk_note", lambda: "; its disk is full")
    with caplog.at_level(logging.WARNING, logger="llmtally"):
        writer._note_outage(OSError("database or disk is full"))
    said = caplog.records[0].getMessage()
    assert "(OSError: database or disk is full); 0 events wait" in said


def test_retries_back_off_doubling_from_a_quarter_second_to_fifteen(make_writer):
    clock = _Clock()
    writer = make_writer(clock=clock)
    waits = []
    for _ in range(9):
        writer._note_outage(OSError("refused"))
        waits.append(writer._next_retry - clock.now)
    assert waits == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]
    assert writer._down_since == clock.now


def test_when_the_disk_refuses_the_spill_the_events_stay_pending_in_order(make_writer,
                                                                         tmp_path, caplog):
    writer = make_writer(spill=_unwritable_spill(tmp_path))
    writer._pending[:] = [_row(1), _row(2)]
    with caplog.at_level(logging.WARNING, logger="llmtally"):
        writer._spill_pending()
    assert [r["id"] for r in writer._pending] == ["w1", "w2"]
    assert writer.spilled == 0
    (failed,) = caplog.records
    assert failed.levelno == logging.ERROR
    assert failed.getMessage().startswith(
        f"llmtally: the ledger is unreachable and the spill file {tmp_path / 'a-file' / 'spill.jsonl'}"
        " cannot be written (")
    assert re.search(r" cannot be written \(\[Errno \d+\] [^()]+\); 2 events are held in memory$",
                     failed.getMessage())


def test_spilled_events_are_counted_and_said_with_the_reason(make_writer, tmp_path, caplog):
    writer = make_writer()
    assert writer.flush(10)  # its thread's first replay is over: the spill file stays as written
    writer._pending[:] = [_row(1), _row(2)]
    with caplog.at_level(logging.WARNING, logger="llmtally"):
        writer._spill_pending()
        assert writer.spill_now([_row(3)], reason="the in-memory queue is full")
    assert writer._pending == [] and writer.spilled == 3
    assert [r.getMessage() for r in caplog.records] == [
        f"llmtally: the ledger is unreachable; 2 events kept in {tmp_path / 'spill.jsonl'}, "
        "replayed when it is back"]  # the second is held back by the rate limit
    assert [line.count('"id"') for line in (tmp_path / "spill.jsonl").read_text().splitlines()] \
        == [1, 1, 1]


def test_a_spill_with_a_row_that_cannot_be_a_line_counts_only_the_others(tmp_path, caplog):
    from llmtally._storage.writer_spill import SpillHandoff

    done: list = []
    handoff = SpillHandoff(SpillFile(tmp_path / "spill.jsonl"), done.extend)
    loop: dict = {}
    loop["self"] = loop  # no JSON for a cycle
    rows = [_row(1), {**_row(2), "metadata": loop}, _row(3)]
    with caplog.at_level(logging.WARNING, logger="llmtally"):
        assert handoff.spill_now(rows, reason="testing") is True
    assert (handoff.spilled, handoff.rejected, len(done)) == (2, 1, 3)
    said = [r.getMessage() for r in caplog.records]
    assert f"llmtally: testing; 2 events kept in {tmp_path / 'spill.jsonl'}, replayed when it is back" in said


def test_a_rejected_message_names_the_event_or_a_question_mark(tmp_path, caplog):
    from llmtally._storage.writer_spill import SpillHandoff

    handoff = SpillHandoff(SpillFile(tmp_path / "spill.jsonl"), lambda rows: None)
    with caplog.at_level(logging.WARNING, logger="llmtally"):
        handoff.reject([({"id": "x" * 300}, ValueError("bad"))])
    assert f"(event {'x' * 200}: ValueError: bad)" in caplog.records[-1].getMessage()
    unmute_logs()
    with caplog.at_level(logging.WARNING, logger="llmtally"):
        handoff.reject([("not a row", ValueError("bad"))])
    assert "(event ?: ValueError: bad)" in caplog.records[-1].getMessage()


def test_closing_a_wedged_writer_takes_its_timeout_not_forever(make_writer, tmp_path):
    writer = make_writer(CLOSED_PORT_URL, _unwritable_spill(tmp_path))
    writer.submit(_row(1))
    started = time.monotonic()
    assert writer.close(0.5) is False
    assert time.monotonic() - started < 5


# -- rejected rows: what is kept of them, and what is said ---------------------------------------


def test_first_line_of_an_error_without_text_is_empty():
    from llmtally._storage.writer_rows import first_line

    assert first_line(ValueError("")) == ""
    assert first_line(ValueError("  one\ntwo")) == "one"


def test_a_salvaged_row_is_the_row_as_stored_plus_the_note():
    from llmtally._storage.writer_rows import salvaged

    kept = salvaged({**_row(1), "cost": float("nan"), "metadata": {"k": "v"}},
                    ValueError("refused " + "x" * 400))
    assert kept["cost"] is None  # as json_safe stores it: no NaN
    assert kept["metadata"] == {"k": "v", "llmtally_warnings": [
        "rejected: ValueError: " + ("refused " + "x" * 400)[:300]]}


def test_a_row_that_cannot_be_a_line_is_salvaged_field_by_field():
    from types import MappingProxyType

    from llmtally._storage.writer_rows import salvaged

    loop: dict = {}
    loop["me"] = loop  # no JSON for it
    row = {**_row(2), 5: "five", "odd": [loop], "extra": {"loop": loop},
           "metadata": MappingProxyType({"loop": loop, "llmtally_warnings": ["earlier"]})}
    kept = salvaged(row, ValueError("no"))
    assert kept["5"] == "five" and 5 not in kept
    assert kept["odd"] == "[{'me': {...}}]"  # as text
    assert kept["extra"] == "{'loop': {'me': {...}}}"  # only metadata is cleaned as metadata
    assert kept["metadata"] == {"loop": {"me": "<cycle>"}, "llmtally_warnings": [
        "metadata refers to itself; the loop was cut", "rejected: ValueError: no"]}


def test_a_salvaged_row_keeps_earlier_warnings_and_notes_metadata_that_is_no_dict():
    from llmtally._storage.writer_rows import salvaged

    kept = salvaged({**_row(3), "metadata": {"llmtally_warnings": ["earlier"]}}, ValueError("no"))
    assert kept["metadata"]["llmtally_warnings"] == ["earlier", "rejected: ValueError: no"]
    odd = salvaged({**_row(4), "metadata": "text"}, ValueError("no"))
    assert (odd["metadata"], odd["llmtally_rejected"]) == ("text", "rejected: ValueError: no")
    assert salvaged(["not", "a", "row"], ValueError("no")) == {
        "id": None, "metadata": {"llmtally_warnings": ["rejected: ValueError: no"]}}


def test_rejected_rows_are_counted_said_and_kept_with_their_cause(tmp_path, caplog):
    from llmtally._storage.writer_spill import SpillHandoff

    handoff = SpillHandoff(SpillFile(tmp_path / "spill.jsonl"), lambda rows: None)
    rejected = tmp_path / "spill.jsonl.rejected.jsonl"
    with caplog.at_level(logging.WARNING, logger="llmtally"):
        handoff.reject([(_row(1), ValueError("first")), (_row(2), KeyError("second"))])
        handoff.reject([(_row(3), ValueError("third"))])
    assert handoff.rejected == 3
    assert [r.getMessage() for r in caplog.records] == [
        f"llmtally: 2 events cannot be stored (event w2: KeyError: 'second'); they are kept in "
        f"{rejected}"]
    caplog.clear()
    unmute_logs()
    with caplog.at_level(logging.WARNING, logger="llmtally"):
        handoff.reject([(_row(9), ValueError("v" * 400))])
    assert f"(event w9: ValueError: {'v' * 300}); they" in caplog.records[0].getMessage()
    notes = [json.loads(line)["metadata"]["llmtally_warnings"]
             for line in rejected.read_text().splitlines()][:3]
    assert notes == [["rejected: ValueError: first"], ["rejected: KeyError: 'second'"],
                     ["rejected: ValueError: third"]]


def test_rejected_rows_that_cannot_be_kept_are_named_in_an_error(tmp_path, caplog):
    from llmtally._storage.writer_spill import SpillHandoff

    handoff = SpillHandoff(_unwritable_spill(tmp_path), lambda rows: None)
    with caplog.at_level(logging.WARNING, logger="llmtally"):
        handoff.reject([(_row(n), ValueError("bad")) for n in range(1, 13)])
    lost = caplog.records[-1]
    assert lost.levelno == logging.ERROR
    path = tmp_path / "a-file" / "spill.jsonl.rejected.jsonl"
    assert re.fullmatch(
        re.escape(f"llmtally: could not keep 12 rejected events in {path} (") + r"\w+Error: \[Errno \d+\] "
        r"[^()]+\): " + ", ".join(f"w{n}" for n in range(1, 11)), lost.getMessage())


def test_a_replay_keeps_the_refused_rows_of_every_batch_and_says_what_it_did(tmp_path, caplog):
    from llmtally._storage.writer_spill import SpillHandoff

    spill = SpillFile(tmp_path / "spill.jsonl")
    spill.append([_row(n) for n in range(1, 6)])
    with open(spill.path, "a") as file:
        file.write("not json\n{\"no\": \"id\"}\n")
    handoff = SpillHandoff(spill, lambda rows: None)
    stored: list = []

    def insert(rows: list) -> None:
        if any(row["id"] in ("w2", "w4") for row in rows):
            raise ValueError("refused")
        stored.extend(row["id"] for row in rows)

    with caplog.at_level(logging.INFO, logger="llmtally"):
        handoff.replay(insert, batch_size=2)  # w2 and w4 in different batches
    assert stored == ["w1", "w3", "w5"]
    rejected = tmp_path / "spill.jsonl.rejected.jsonl"
    assert [json.loads(line)["id"] for line in rejected.read_text().splitlines()] == ["w2", "w4"]
    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    claimed = said[-1][1].rsplit(" from ", 1)[1]
    assert said[-1] == (logging.INFO, f"llmtally: replayed 3 spilled events from {claimed}")
    assert (logging.WARNING, f"llmtally: {claimed} had 2 unreadable lines (6, 7); they were "
            "skipped") in said
    assert not spill.path.exists()


def test_unreadable_lines_are_named_up_to_ten(tmp_path, caplog):
    from llmtally._storage.writer_spill import SpillHandoff

    spill = SpillFile(tmp_path / "spill.jsonl")
    spill.path.write_text("junk\n" * 12)
    with caplog.at_level(logging.INFO, logger="llmtally"):
        SpillHandoff(spill, lambda rows: None).replay(lambda rows: None, batch_size=10)
    unreadable = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert unreadable[0].endswith(" had 12 unreadable lines (1, 2, 3, 4, 5, 6, 7, 8, 9, 10); "
                                  "they were skipped")


# -- metadata made storable on the writer's thread (writer_rows.json_safe) -----------------------


def test_metadata_is_made_storable_string_by_string_with_each_cut_noted():
    from llmtally._storage.writer_rows import json_safe

    meta = {"k\x00ey": "a\x00b", "s": "\udc80x", "long": "y" * 1500, "x" * 1100: 1,
            "nest": [{"deep": "z" * 1030}, "ok", 3, None], "llmtally_warnings": ["earlier"]}
    out = json_safe({"id": "a", "metadata": meta, "cost": float("nan"),
                     "latency_ms": float("inf"), "ttft_ms": 5.0})
    assert json_safe({"id": "a", "cost": 0.5, "ttft_ms": -float("inf")}) == {
        "id": "a", "cost": 0.5, "ttft_ms": None}
    assert out["metadata"] == {
        "key": "ab", "s": "?x", "long": "y" * 1024, "x" * 1024: 1,
        "nest": [{"deep": "z" * 1024}, "ok", 3, None],
        "llmtally_warnings": ["earlier", "a metadata text of 1500 characters was cut to 1024",
                              "a metadata text of 1100 characters was cut to 1024",
                              "a metadata text of 1030 characters was cut to 1024"]}
    assert (out["cost"], out["latency_ms"], out["ttft_ms"]) == (None, None, 5.0)
    assert meta["long"] == "y" * 1500  # the caller's dict is left alone
    exact = json_safe({"id": "b", "metadata": {"t": "q" * 1024, "u": "\x00"}})["metadata"]
    assert exact == {"t": "q" * 1024, "u": ""}  # 1,024 itself is not cut, nothing noted


def test_metadata_warnings_stop_at_twenty_and_too_much_metadata_is_dropped_whole():
    from llmtally._storage.writer_rows import json_safe

    many = json_safe({"id": "a", "metadata": {"many": ["w" * 1100] * 25}})["metadata"]
    assert many["llmtally_warnings"] == ["a metadata text of 1100 characters was cut to 1024"] * 20
    assert many["many"] == ["w" * 1024] * 25
    big = json_safe({"id": "b", "metadata": {"big": ["v" * 1000] * 70}})["metadata"]
    assert big == {"llmtally_metadata_dropped": 70289, "llmtally_warnings": [
        "metadata was 70289 characters of JSON; dropped (limit 65536)"]}
    listed = json_safe({"id": "c", "metadata": ["l" * 1100]})["metadata"]
    assert listed == {"value": ["l" * 1024], "llmtally_warnings": [
        "a metadata text of 1100 characters was cut to 1024"]}


def test_short_metadata_with_a_nul_a_nan_or_an_odd_value_is_still_cleaned():
    from llmtally._storage.writer_rows import json_safe

    when = datetime(2026, 11, 25, 12, 0)
    assert json_safe({"id": "a", "metadata": {"u": "a\x00"}})["metadata"] == {"u": "a"}
    assert json_safe({"id": "b", "metadata": {"n": float("nan"), "at": when}})["metadata"] == {
        "n": None, "at": "2026-11-25 12:00:00"}
    assert json_safe({"id": "c", "metadata": {"n": float("nan"), "u": "\x00"}})["metadata"] == {
        "n": None, "u": ""}


# -- the writer's loop: waking, full queues, outages met one by one, coming back -----------------


def test_the_writer_wakes_when_a_whole_batch_is_queued(make_writer, tmp_path):
    writer = make_writer(batch_size=2)  # and flush_interval_s=60: only a full batch wakes it
    writer.submit(_row(1))
    writer.submit(_row(2))
    wait_until(lambda: writer.written >= 2, timeout=10, interval=0.02)
    assert writer.written == 2


def test_a_full_queue_spills_the_event_and_says_why(make_writer, tmp_path, caplog):
    writer = make_writer(max_queue=1)
    with caplog.at_level(logging.WARNING, logger="llmtally"):
        writer.submit(_row(1))
        writer.submit(_row(2))  # the queue holds one already: this one goes to the spill file
    assert writer.spilled == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"llmtally: the in-memory queue is full; 1 events kept in {tmp_path / 'spill.jsonl'}, "
        "replayed when it is back"]


def test_a_full_queue_keeps_the_event_in_memory_when_the_disk_refuses_it(make_writer, tmp_path):
    writer = make_writer(CLOSED_PORT_URL, _unwritable_spill(tmp_path), max_queue=1)
    writer.submit(_row(1))
    writer.submit(_row(2))  # queue full, disk refuses: kept past the bound, not dropped
    queued = []
    while not writer._queue.empty():
        queued.append(writer._queue.get_nowait())
    assert [row["id"] for row in queued] == ["w1", "w2"]


def test_an_outage_met_while_inserting_one_by_one_is_logged_with_its_cause(make_writer,
                                                                          monkeypatch, caplog):
    from sqlalchemy.exc import OperationalError

    writer = make_writer()
    tried: list = []

    def insert(rows: list) -> None:
        tried.append([row["id"] for row in rows])
        if len(rows) > 1:
            raise ValueError("a bad row")  # not an outage: the rows are tried one by one
        if rows[0]["id"] == "w2":
            raise OperationalError("INSERT", None, ConnectionError("server closed the connection"))

    monkeypatch.setattr(writer, "_insert", insert)
    writer._pending[:] = [_row(1), _row(2), _row(3)]
    with caplog.at_level(logging.WARNING, logger="llmtally"):
        writer._write_pending()
    assert tried == [["w1", "w2", "w3"], ["w1"], ["w2"]]
    assert [row["id"] for row in writer._pending] == ["w2", "w3"]  # they wait for the ledger
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "(OperationalError: (builtins.ConnectionError) server closed " \
        "the connection)" in said[0] and "2 events wait" in said[0]


def test_coming_back_is_said_once_and_resets_the_back_off(make_writer, caplog):
    clock = _Clock()
    writer = make_writer(clock=clock)
    writer._note_outage(OSError("refused"))
    writer._note_outage(OSError("refused"))
    assert writer.behind
    with caplog.at_level(logging.WARNING, logger="llmtally"):
        writer._back_up()
        writer._back_up()  # not down any more: nothing to say
    assert [r.getMessage() for r in caplog.records if "again" in r.getMessage()] == [
        f"llmtally: the ledger {writer.store.display_url} is reachable again"]
    assert not writer.behind
    writer._note_outage(OSError("refused"))
    assert writer._next_retry - clock.now == 0.25


def test_a_sync_record_in_a_batch_with_other_events_is_told_when_it_is_stored(make_writer,
                                                                            caplog):
    writer = make_writer()
    writer.submit(_row(1))
    writer.submit(_row(2))
    with caplog.at_level(logging.WARNING, logger="llmtally"):
        assert writer.submit_and_wait(_row(3), timeout=10) is True
    assert writer.written == 3
    assert not [r for r in caplog.records if "unexpected error" in r.getMessage()]


def test_an_event_is_written_within_the_flush_interval_without_a_flush(make_writer):
    writer = make_writer(flush_interval_s=0.05)
    writer.submit(_row(1))
    wait_until(lambda: writer.written >= 1, timeout=10, interval=0.02)
    assert writer.written == 1


def test_an_outage_nobody_flushes_in_keeps_events_in_memory_until_spill_after_s(make_writer,
                                                                               tmp_path):
    writer = make_writer(CLOSED_PORT_URL, flush_interval_s=0.05, spill_after_s=30)
    writer.submit(_row(1))
    wait_until(lambda: writer.behind, timeout=10, interval=0.02)
    assert writer.behind
    time.sleep(0.5)  # several cycles of the writer, none of them settling
    assert writer.spilled == 0
    assert not (tmp_path / "spill.jsonl").exists()


def test_the_writer_thread_is_a_named_daemon(make_writer):
    thread = make_writer()._thread
    assert (thread.name, thread.daemon) == ("llmtally-writer", True)


def test_an_unexpected_error_in_a_cycle_is_logged_and_the_writer_goes_on(make_writer,
                                                                       monkeypatch, caplog):
    writer = make_writer(flush_interval_s=0.05)
    cycle = writer._cycle
    failures = iter([RuntimeError("boom\nsecond line")])

    def failing_once() -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        cycle()

    monkeypatch.setattr(writer, "_cycle", failing_once)
    with caplog.at_level(logging.WARNING, logger="llmtally"):
        writer.submit(_row(1))
        assert writer.flush(10)
    assert writer.written == 1
    (error,) = [r for r in caplog.records if "unexpected" in r.getMessage()]
    assert (error.levelno, error.getMessage()) == (
        logging.ERROR, "llmtally writer: unexpected error (RuntimeError: boom); events are "
        "kept and retried")
    assert error.exc_info is not None and error.exc_info[0] is RuntimeError


def test_a_flush_during_an_outage_spills_and_only_that_flush(make_writer, tmp_path):
    writer = make_writer(CLOSED_PORT_URL, flush_interval_s=0.05, spill_after_s=30)
    writer.submit(_row(1))
    assert writer.flush(10) is True  # someone flushes: the waiting event goes to the spill file
    assert writer.spilled == 1
    writer.submit(_row(2))  # nobody flushes now: it waits in memory for spill_after_s
    time.sleep(0.5)
    assert writer.spilled == 1


def test_a_flush_after_the_thread_stopped_says_false(make_writer):
    writer = make_writer()
    assert writer.close(5)
    writer.submit(_row(1))
    assert writer.flush(1) is False


def test_metadata_of_exactly_the_json_limit_is_kept_and_one_more_character_is_not():
    from llmtally._storage.writer_rows import MAX_METADATA_JSON, json_safe

    def sized(characters: int) -> dict:
        meta = {"a": ["v" * 1000] * 65, "b": ""}
        meta["b"] = "x" * (characters - len(json.dumps(meta)))
        assert len(json.dumps(meta)) == characters and len(meta["b"]) <= 1024
        return meta

    assert json_safe({"id": "a", "metadata": sized(MAX_METADATA_JSON)})["metadata"] \
        == sized(MAX_METADATA_JSON)
    assert "llmtally_metadata_dropped" in json_safe(
        {"id": "b", "metadata": sized(MAX_METADATA_JSON + 1)})["metadata"]

