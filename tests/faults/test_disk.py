"""The SQLite ledger's disk fails mid-run, while an application makes real LiteLLM calls:

- **disk full**: the ledger lives on a real 8 MiB tmpfs that a filler file fills up, so SQLite
  gets ENOSPC from the kernel ("database or disk is full"), exactly as on a full disk;
- **read-only file**: the ledger file is replaced by a read-only copy (``chattr +i``, which
  binds root too; Linux checks permissions when a file is opened, so a mode change alone would
  not stop connections already open);
- **deleted file**: ``rm ledger.db*`` while connections are open.

Each time: every call succeeds, one clear message is logged (once per interval, not per call),
the events wait or go to the spill file (on another disk) and land in the ledger afterwards,
each once. Mounting and ``chattr`` need root (CI runs as root); elsewhere those tests skip.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from conftest import IN_CI, call_id_of, fetch_events

from llmtally import Tally
from llmtally.testing import FakeProvider

from .conftest import CallLoop, wait_until

pytest.importorskip("litellm")

FAULT_S = 6.0  # longer than the writer's spill_after_s (5 s): events reach the spill file


def _needs_root(what: str, result: subprocess.CompletedProcess) -> None:
    if result.returncode != 0:
        message = f"{what} is not permitted here ({result.stderr.strip()})"
        if IN_CI:
            pytest.fail(f"CI=true and {message}")
        pytest.skip(message)


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """An 8 MiB tmpfs, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    _needs_root("mounting a tmpfs", subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mount)],
        capture_output=True, text=True))
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _tally(db: Path, spill: Path) -> Tally:
    import litellm

    tally = Tally(f"sqlite:///{db}", price_map="bundled", spill_path=spill)
    litellm.callbacks = [tally.litellm()]
    return tally


def _fill(directory: Path) -> Path:
    """Write a file until the disk refuses (ENOSPC)."""
    filler = directory / "filler"
    # unbuffered: a buffered file keeps what a short write left over, and closing it then
    # raises ENOSPC once more, outside the loop
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == 28, exc  # ENOSPC: the disk is full
    return filler


def _landed(tally: Tally, url: str, ids: list[str]):
    def check() -> bool:
        tally.flush(5)
        return set(ids) <= {call_id_of(row) for row in fetch_events(url)}
    return check


def _messages(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.mark.slow
def test_disk_full_mid_run(small_disk, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="llmtally")
    db, spill = small_disk / "ledger.db", tmp_path / "spill.jsonl"
    url = f"sqlite:///{db}"
    tally = _tally(db, spill)
    with FakeProvider() as provider, CallLoop(provider.openai_base) as calls:
        time.sleep(1.0)
        filler = _fill(small_disk)
        # spill_after_s (5 s) after the first refused write, the events go to the spill file,
        # on another disk; on a loaded machine that first write can come late, so wait for it
        assert wait_until(spill.exists, timeout=60, interval=0.2)
        filler.unlink()  # space again
        time.sleep(1.0)
    assert calls.failures == [] and len(calls.done) > 100
    assert wait_until(_landed(tally, url, calls.ids), timeout=30, interval=0.5)
    rows = fetch_events(url)
    assert sorted(call_id_of(r) for r in rows) == sorted(calls.ids)  # every call once
    assert tally._writer.spilled > 0 and not spill.exists()
    [full] = _messages(caplog, "cannot write to the ledger")  # once, not once per retry
    # SQLite says "database or disk is full", or "disk I/O error" when the write refused was
    # the WAL index's: the message names the full disk either way
    assert "database or disk is full" in full or "disk I/O error; its disk is full" in full
    tally.close()


def test_the_outage_message_names_a_full_disk(small_disk):
    from llmtally._storage.store import Store

    store = Store(f"sqlite:///{small_disk / 'ledger.db'}")
    store.ensure_schema()
    assert store.full_disk_note() == ""
    filler = _fill(small_disk)
    assert store.full_disk_note() == "; its disk is full"
    filler.unlink()
    assert store.full_disk_note() == ""
    store.close()
    assert Store("sqlite://").full_disk_note() == ""  # in memory: no disk to speak of


@pytest.mark.slow
def test_ledger_file_replaced_by_a_read_only_file_mid_run(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="llmtally")
    db, spill = tmp_path / "ledger.db", tmp_path / "spill.jsonl"
    url = f"sqlite:///{db}"
    tally = _tally(db, spill)
    copy = tmp_path / "restored.db"
    with FakeProvider() as provider, CallLoop(provider.openai_base) as calls:
        time.sleep(1.0)
        with sqlite3.connect(db) as source, sqlite3.connect(copy) as target:
            source.backup(target)  # e.g. a backup restored over the ledger, read-only
        # Swapped in between two calls (an immutable file cannot be renamed, so it is made
        # read-only after the move; no event is being written in between).
        with calls.paused():
            assert tally.flush(10)
            os.replace(copy, db)
            _needs_root("chattr +i", subprocess.run(["chattr", "+i", str(db)],
                                                    capture_output=True, text=True))
            replaced_at = time.time()
        try:
            time.sleep(FAULT_S)
            assert spill.exists()  # the read-only file refused them: they wait in the spill file
        finally:
            subprocess.run(["chattr", "-i", str(db)], capture_output=True)  # writable again
        time.sleep(1.0)
    assert calls.failures == [] and len(calls.done) > 100
    after = calls.ids_after(replaced_at)
    assert len(after) > 50
    assert wait_until(_landed(tally, url, after), timeout=30, interval=0.5)
    rows = fetch_events(url)
    assert len(rows) == len({r["id"] for r in rows})  # nothing twice
    assert tally._writer.spilled > 0 and not spill.exists()
    assert len(_messages(caplog, "was deleted or replaced while in use")) == 1
    [refused] = _messages(caplog, "cannot write to the ledger")
    assert "Operation not permitted" in refused
    tally.close()


@pytest.mark.slow
def test_ledger_file_deleted_mid_run(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="llmtally")
    db, spill = tmp_path / "ledger.db", tmp_path / "spill.jsonl"
    url = f"sqlite:///{db}"
    tally = _tally(db, spill)
    with FakeProvider() as provider, CallLoop(provider.openai_base) as calls:
        time.sleep(1.0)
        for path in tmp_path.glob("ledger.db*"):  # rm ledger.db*
            path.unlink()
        deleted_at = time.time()
        time.sleep(2.0)
    assert calls.failures == []
    after = calls.ids_after(deleted_at)
    assert len(after) > 50
    assert tally.flush(10)
    stored = {call_id_of(row) for row in fetch_events(url)}
    # Open connections would have kept writing into the deleted file, where nobody sees them;
    # llmtally notices, creates a new ledger at the path, and writes every later event there
    # (including a batch that was being committed into the deleted file).
    assert set(after) <= stored
    assert db.stat().st_mode & 0o777 == 0o600
    assert len(_messages(caplog, "was deleted or replaced while in use")) == 1
    tally.close()
