"""Hostile files for import/export (issue 12): gzip bombs of blank lines, lines and CSV records
past their caps, the SQLite write lock while junk is read, spreadsheet formulas in CSV cells;
file modes that follow the umask; the litellm pin."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import fetch_events, one_event_insert
from sqlalchemy import text
from test_transfer import cli, new_ledger, stores, typed_rows

from llmtally._storage.store import Store, driver_row
from llmtally._transfer.export import export_events
from llmtally._transfer.importing import import_events
from llmtally._transfer.reading import MAX_RECORD_BYTES
from llmtally._transfer.transfer import MAX_LINE_BYTES, TransferError
from llmtally._transfer.validation import validated_row

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime.now(timezone.utc).replace(microsecond=0)
RSS_BOUND_MB = 200
_FIXTURES = (new_ledger, stores)  # shared with test_transfer.py
BLANK_MIB = gzip.compress(b"\n" * (1 << 20), compresslevel=9)  # one member: 1 MiB of newlines


def _event(event_id: str, **fields) -> dict:
    return {"id": event_id, "ts": "2026-01-05T10:00:00Z", "model": "gpt-4o-mini",
            "input_tokens": 10, "output_tokens": 2, **fields}


def _member(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1)


def _import_in_subprocess(path: Path, db: Path, *args: str) -> tuple[dict, float]:
    """Import ``path`` in a fresh interpreter: its result, peak RSS (MB) and wall time (s)."""
    if not Path("/proc/self/status").exists():
        pytest.skip("the peak RSS is read from /proc (Linux)")
    script = (
        "import json, sys\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forked pytest process
        "def peak_mb():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmHWM:'):\n"
        "            return int(line.split()[1]) / 1024\n"
        "from llmtally._storage.store import Store\n"
        "from llmtally._transfer.importing import import_events\n"
        "store = Store(sys.argv[2])\n"
        "r = import_events(store, sys.argv[1], format=(sys.argv[3] if len(sys.argv) > 3 else None))\n"
        "store.close()\n"
        "print(json.dumps({'imported': r.imported, 'skipped': r.skipped, 'invalid': r.invalid,"
        " 'invalid_lines': r.invalid_lines,"
        " 'rss_mb': peak_mb()}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script, str(path), f"sqlite:///{db}", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout), elapsed


# -- bounded memory, bounded lines -------------------------------------------------------------


def test_a_normal_100k_line_file_imports_in_the_memory_bound(tmp_path):
    with open(tmp_path / "normal.jsonl", "w") as out:
        for i in range(100_000):
            out.write(json.dumps(_event(f"ev-{i:06d}", project=f"p{i % 5}", user=f"u{i % 17}",
                                        cost=0.0001 * (i % 7), tags=["a"], metadata={"k": i}))
                      + "\n")
    result, _ = _import_in_subprocess(tmp_path / "normal.jsonl", tmp_path / "normal.db")
    assert (result["imported"], result["invalid"]) == (100_000, 0)
    assert len(fetch_events(f"sqlite:///{tmp_path / 'normal.db'}")) == 100_000
    assert result["rss_mb"] < RSS_BOUND_MB  # measured: about 80 MB


def test_a_gzip_bomb_of_blank_lines_imports_in_bounded_memory_and_time(tmp_path):
    bomb = tmp_path / "bomb.jsonl.gz"
    with open(bomb, "wb") as out:  # 1 GiB of newlines in 1 MB: 1,024 copies of one member
        for _ in range(512):
            out.write(BLANK_MIB)
        out.write(_member(b'{"id": "no-ts", "model": "m"}\n'))
        for _ in range(512):
            out.write(BLANK_MIB)
        out.write(_member(json.dumps(_event("after-a-gib-of-blanks")).encode() + b"\n"))
    assert bomb.stat().st_size < 1_200_000
    result, elapsed = _import_in_subprocess(bomb, tmp_path / "bomb.db")
    assert (result["imported"], result["invalid"]) == (1, 1)
    # line numbers stay exact across the blank runs counted in bulk
    assert result["invalid_lines"] == [[(1 << 29) + 1, "ts is missing"]]
    assert [e["id"] for e in fetch_events(f"sqlite:///{tmp_path / 'bomb.db'}")] == [
        "after-a-gib-of-blanks"]
    assert result["rss_mb"] < RSS_BOUND_MB  # measured: about 70 MB (main: 6.9 GB at 64 MiB)
    assert elapsed < 120  # measured: 6.5 s on the loaded 2-core box (main: 113 s at 64 MiB)


def test_a_csv_bomb_and_a_gib_long_line_stay_bounded(tmp_path):
    bomb = tmp_path / "bomb.csv.gz"
    spaced = _member(b" \t\r\n" * (1 << 18))
    with open(bomb, "wb") as out:
        out.write(_member(b"id,ts,model,input_tokens\r\n"))
        for _ in range(128):
            out.write(BLANK_MIB)
            out.write(spaced)
        out.write(_member(b"csv-ok,2026-01-05T10:00:00Z,gpt-4o-mini,5\r\n"))
    result, _ = _import_in_subprocess(bomb, tmp_path / "csv.db")
    assert (result["imported"], result["invalid"]) == (1, 0)
    assert result["rss_mb"] < RSS_BOUND_MB

    long_line = tmp_path / "long.jsonl.gz"
    chunk = _member(b"a" * (1 << 24))
    with open(long_line, "wb") as out:  # one 256 MiB line, then an event
        out.write(_member(b'{"id": "x", "pad": "'))
        for _ in range(16):
            out.write(chunk)
        out.write(_member(b'"}\n' + json.dumps(_event("after-the-long-line")).encode() + b"\n"))
    result, _ = _import_in_subprocess(long_line, tmp_path / "long.db")
    assert result["invalid_lines"] == [[1, f"the line is longer than {MAX_LINE_BYTES:,} bytes"]]
    assert result["imported"] == 1 and result["rss_mb"] < RSS_BOUND_MB


def test_a_csv_record_past_its_cap_is_one_invalid_record(sqlite_url, tmp_path):
    path = tmp_path / "records.csv"
    with open(path, "w", newline="") as out:
        out.write("id,ts,model,metadata\r\n")
        out.write("first,2026-01-05T10:00:00Z,m,{}\r\n")                       # line 2
        # lines 3..: one record of many quoted fields, each on a line of its own and every
        # line and field under its cap, the whole past MAX_RECORD_BYTES
        out.write('runaway,2026-01-05T10:00:00Z,m,"' + ("x" * 60_000 + '","\n') * 80 + '"\r\n')
    assert 80 * 60_000 > MAX_RECORD_BYTES
    store = Store(sqlite_url)
    try:
        result = import_events(store, path)
    finally:
        store.close()
    assert result.invalid_lines[0] == (3, f"the record is longer than {MAX_RECORD_BYTES:,} bytes")
    assert {e["id"] for e in fetch_events(sqlite_url)} >= {"first"}
    assert "runaway" not in {e["id"] for e in fetch_events(sqlite_url)}


def test_a_jsonl_file_whose_first_line_is_too_long_is_still_jsonl(sqlite_url, tmp_path):
    path = tmp_path / "events.dat"  # no extension: the format comes from the content
    path.write_text(json.dumps(_event("big", metadata={"pad": "p" * MAX_LINE_BYTES})) + "\n"
                    + json.dumps(_event("small")) + "\n")
    store = Store(sqlite_url)
    try:
        result = import_events(store, path)
    finally:
        store.close()
    assert result.format == "jsonl" and result.imported == 1
    assert result.invalid_lines == [(1, f"the line is longer than {MAX_LINE_BYTES:,} bytes")]


# -- the write lock ----------------------------------------------------------------------------


class _Interrupting(io.RawIOBase):
    """A file-like source that runs ``during`` once, when half of it has been read (the
    first event and the junk after it)."""

    def __init__(self, data: bytes, during) -> None:
        self._data, self._pos, self._reads, self._during = data, 0, 0, during
        self.name = "junk.jsonl"

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self._reads += 1
        if self._during is not None and self._pos >= len(self._data) // 2:
            self._during, during = None, self._during
            during()
        size = len(self._data) - self._pos if size < 0 else size
        chunk = self._data[self._pos:self._pos + size]
        self._pos += len(chunk)
        return chunk


def _write_now(url: str, row: dict) -> None:
    """Insert one event on a connection of its own that does not wait for any lock."""
    store = Store(url)
    params = driver_row(validated_row(row), store.dialect == "sqlite")
    sql = one_event_insert(store.dialect)
    store.close()
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=0, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(sql, params)
            conn.execute("COMMIT")
        finally:
            conn.close()
        return
    store = Store(url)
    try:
        with store.engine.connect() as conn, conn.begin():
            conn.execute(text("SET LOCAL lock_timeout = '200ms'"))
            conn.exec_driver_sql(sql, params)
    finally:
        store.close()


def test_reading_junk_does_not_hold_the_write_lock(ledger_url):
    store = Store(ledger_url)
    store.ensure_schema()
    first = _event("shared-id")
    junk = b"".join([json.dumps(first).encode(), b"\n", b"not json\n" * 300_000,
                     b"\n" * (3 << 20), json.dumps(_event("last")).encode(), b"\n"])
    written = []

    def write_the_same_event_elsewhere() -> None:
        _write_now(ledger_url, first)  # raises "database is locked" / lock timeout if held
        written.append(True)

    try:
        # batch_size=1: an import that wrote as it read would hold "shared-id" by now
        result = import_events(store, _Interrupting(junk, write_the_same_event_elsewhere),
                               batch_size=1)
    finally:
        store.close()
    assert written == [True]
    assert (result.imported, result.skipped, result.invalid) == (1, 1, 300_000)
    assert sorted(e["id"] for e in fetch_events(ledger_url)) == ["last", "shared-id"]


def test_an_unreachable_ledger_is_found_before_the_file_is_read(tmp_path):
    source = _Interrupting(b"{}\n" * 10, lambda: None)
    store = Store("postgresql+psycopg://postgres@127.0.0.1:9/none")
    with pytest.raises(TransferError, match="nothing was changed"):
        import_events(store, source)
    assert source._reads == 0


def test_no_room_for_the_temporary_file_is_one_clear_error(sqlite_url, tmp_path, monkeypatch):
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps(_event("one")) + "\n")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    store = Store(sqlite_url)
    try:
        with pytest.raises(TransferError, match=r"temporary file in .*missing.*nothing was "
                                                r"imported.*TMPDIR"):
            import_events(store, path)
    finally:
        store.close()
    assert fetch_events(sqlite_url) == []


# -- spreadsheet formulas ------------------------------------------------------------------------


FORMULAS = ["=cmd|' /C calc'!A0", "+1", "-x", "@SUM(A1)", "\tTAB", "\rCR", "'genuine quote",
            "'=already quoted", "''", "-", "plain"]


def test_csv_export_neutralises_formulas_and_import_restores_them(ledger_url, make_tally,
                                                                    new_ledger, stores, tmp_path):
    tally = make_tally(ledger_url)
    for i, value in enumerate(FORMULAS):
        tally.record(id=f"f{i}", ts=NOW - timedelta(minutes=i), model=value, provider=value,
                     project=value, user=value, session=value, request_id=value,
                     error_type=value, status="error", tags=[value], metadata={"v": value},
                     input_tokens=5, output_tokens=1, latency_ms=12.5)
    assert tally.flush(10)
    with stores(ledger_url).engine.begin() as conn:  # a ledger written by other means
        conn.execute(text("UPDATE llmtally_events SET latency_ms = -3.5 WHERE id = 'f0'"))
    export_events(stores(ledger_url), tmp_path / "out.csv")

    with open(tmp_path / "out.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row, value in zip(sorted(rows, key=lambda r: int(r["id"][1:])), FORMULAS):
        for column in ("model", "provider", "project", "user", "session", "request_id",
                       "error_type"):
            cell = row[column]
            assert cell[0] not in "=+-@\t\r", (column, cell)
            expected = "'" + value if value[0] in "=+-@\t\r" or value in (
                "'=already quoted", "''") else value
            assert cell == expected
        assert row["tags"] == json.dumps([value], ensure_ascii=False, separators=(",", ":"))
        assert row["input_tokens"] == "5"
    assert rows[-1]["latency_ms"] == "-3.5"  # f0 is the newest: a number stays a number

    with stores(ledger_url).engine.begin() as conn:
        conn.execute(text("UPDATE llmtally_events SET latency_ms = 12.5 WHERE id = 'f0'"))
    export_events(stores(ledger_url), tmp_path / "again.csv")
    target = new_ledger(ledger_url)
    result = import_events(stores(target), tmp_path / "again.csv")
    assert (result.imported, result.invalid) == (len(FORMULAS), 0)
    assert typed_rows(stores(target)) == typed_rows(stores(ledger_url))
    assert {row["user"] for row in typed_rows(stores(target)).values()} == set(FORMULAS)


def test_jsonl_export_is_not_quoted(sqlite_url, make_tally, stores, tmp_path):
    tally = make_tally(sqlite_url)
    tally.record(id="j", model="=1+1", user="@me", input_tokens=1)
    assert tally.flush(10)
    export_events(stores(sqlite_url), tmp_path / "out.jsonl")
    line = json.loads((tmp_path / "out.jsonl").read_text())
    assert (line["model"], line["user"]) == ("=1+1", "@me")


# -- file modes --------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o077, 0o600), (0o022, 0o644), (0o002, 0o664)])
def test_report_and_export_files_take_the_umask(sqlite_url, make_tally, stores, tmp_path,
                                                umask, mode):
    tally = make_tally(sqlite_url)
    tally.record(id="u", model="gpt-4o-mini", user="alice", input_tokens=1)
    assert tally.flush(10)
    previous = os.umask(umask)
    try:
        report = tally.report(tmp_path / "report.html", since="30d")
        export_events(stores(sqlite_url), tmp_path / "events.jsonl.gz")
        replaced = tally.report(tmp_path / "report.html", since="30d")  # over an existing file
    finally:
        os.umask(previous)
    for path in (report, tmp_path / "events.jsonl.gz", replaced):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# -- supply chain ------------------------------------------------------------------------------


def test_the_litellm_extra_excludes_compromised_releases():
    from importlib.metadata import version

    from packaging.requirements import Requirement

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (spec,) = pyproject["project"]["optional-dependencies"]["litellm"]
    allowed = Requirement(spec).specifier
    for compromised in ("1.107.0", "1.107.1", "1.107.9"):
        assert compromised not in allowed
    assert "1.106.12" in allowed and "1.110.2" in allowed
    assert version("litellm") in allowed  # the installed one is not a compromised release


def test_cli_import_of_an_exported_formula_csv(tmp_path, make_tally):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    tally = make_tally(url)
    tally.record(id="c", model="=HYPERLINK(\"http://x\")", user="+1", input_tokens=1)
    assert tally.flush(10)
    exported = cli("export", "--format", "csv", "--db", url)
    assert exported.exit_code == 0 and "'=HYPERLINK" in exported.stdout
    target = f"sqlite:///{tmp_path / 'b.db'}"
    imported = cli("import", "-", "--format", "csv", "--db", target,
                   input=exported.stdout.encode())
    assert imported.exit_code == 0, imported.output
    (event,) = fetch_events(target)
    assert (event["model"], event["user"]) == ('=HYPERLINK("http://x")', "+1")


# -- found on the read-through -------------------------------------------------------------------


class _Terminal(io.BytesIO):
    def isatty(self) -> bool:
        return True


ESCAPES = "\x1b]0;PWNED\x07\x1b[2J\x9b31m\u2028\rover"


def test_export_to_a_terminal_cannot_drive_it(sqlite_url, make_tally, stores, new_ledger,
                                              tmp_path):
    tally = make_tally(sqlite_url)
    tally.record(id="t", model=ESCAPES, user="=x", input_tokens=1, metadata={"m": ESCAPES})
    assert tally.flush(10)
    screen = _Terminal()
    export_events(stores(sqlite_url), screen, format="csv")
    shown = screen.getvalue().decode()
    assert "\\x1b]0;PWNED\\x07\\x1b[2J\\x9b31m\\u2028\\x0dover" in shown
    assert not any(c in shown for c in "\x1b\x07\x9b\u2028") and "\rover" not in shown

    jsonl = _Terminal()  # JSONL escapes every control character, on a terminal or not
    export_events(stores(sqlite_url), jsonl, format="jsonl")
    assert not any(c in jsonl.getvalue().decode() for c in "\x1b\x07\x9b\u2028\r")
    target = new_ledger(sqlite_url)
    assert import_events(stores(target), io.BytesIO(jsonl.getvalue())).imported == 1
    assert typed_rows(stores(target)) == typed_rows(stores(sqlite_url))

    export_events(stores(sqlite_url), tmp_path / "file.csv")  # a file keeps the exact value
    again = new_ledger(sqlite_url)
    assert import_events(stores(again), tmp_path / "file.csv").imported == 1
    assert typed_rows(stores(again))["t"]["model"] == ESCAPES


def test_a_metadata_number_json_cannot_hold_is_one_invalid_line(ledger_url, stores, tmp_path):
    path = tmp_path / "inf.jsonl"
    path.write_text('{"id": "inf", "ts": "2026-01-05T10:00:00Z", "model": "m", '
                    '"metadata": {"x": [1e999]}}\n' + json.dumps(_event("fine")) + "\n")
    result = import_events(stores(ledger_url), path)  # PostgreSQL refused the whole import
    assert (result.imported, result.invalid_lines) == (1, [(1, "metadata holds a number too "
                                                               "large for JSON")])
    assert [e["id"] for e in fetch_events(ledger_url)] == ["fine"]
