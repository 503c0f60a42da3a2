"""The CLI against hostile ledgers: values that carry terminal escapes, and ledgers that are
unreachable, missing, corrupted or newer. Output never holds a raw control character; every
failure is one line on stderr with exit code 2."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import random
import subprocess
import sys
import unicodedata
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import CLOSED_PORT_URL, fetch_events

from llmtally import Tally
from llmtally._terminal import printable
from llmtally.cli import main

# An OSC title change with BEL, a clear-screen CSI, an 8-bit CSI (C1), DEL and a bidi override.
HOSTILE = "\x1b]0;PWNED\x07\x1b[2J\x9b31m\x7f\u202e"
HOSTILE_SHOWN = "\\x1b]0;PWNED\\x07\\x1b[2J\\x9b31m\\x7f\\u202e"
NOW = datetime.now(timezone.utc)


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), env=env)


def assert_inert(text: str) -> None:
    """No character that a terminal would act on: only printable ones, spaces and newlines."""
    bad = sorted({f"U+{ord(ch):04X}" for ch in text
                  if ch != "\n" and not ch.isprintable() and unicodedata.category(ch) != "Zs"})
    assert not bad, f"raw control characters in the output: {bad}"


def test_printable_shows_every_kind_of_control_and_keeps_text():
    assert printable(HOSTILE) == HOSTILE_SHOWN
    assert printable("tab\there\nnl\r") == "tab\\there\\nnl\\r"
    assert printable("\u2066iso\u2069 \u200bzw \u2028ls \ud800 \U000e0041") == \
        "\\u2066iso\\u2069 \\u200bzw \\u2028ls \\ud800 \\U000e0041"
    plain = "gpt-4o-mini 用户 Ünïcödé émoji 🙂 a\u00a0b"
    assert printable(plain) == plain  # letters, symbols and spaces of any script are kept
    assert printable(printable(HOSTILE)) == HOSTILE_SHOWN  # idempotent


@pytest.fixture
def hostile(ledger_url, tmp_path):
    """A ledger (SQLite and PostgreSQL) whose names carry escapes, with a per-user budget."""
    config = tmp_path / "llmtally.toml"
    config.write_text(f"""
database_url = {json.dumps(ledger_url)}
price_map = "bundled"
spill_path = {json.dumps(str(tmp_path / "spill.jsonl"))}
[[budgets]]
tokens = 100000
per = "month"
each = "user"
name = {json.dumps("team" + HOSTILE)}
""")
    with Tally.from_config(config) as tally:
        names = {"provider": "prov" + HOSTILE, "model": "evil" + HOSTILE,
                 "user": "mallory" + HOSTILE}
        for hours in (1, 2):
            held = tally.reserve(**names, input_tokens=1000, max_tokens=10)
            tally.record(**names, project="proj" + HOSTILE, session="sess" + HOSTILE,
                         input_tokens=1000, output_tokens=10, ts=NOW - timedelta(hours=hours),
                         reservation=held)
    assert len(fetch_events(ledger_url)) == 2
    return ledger_url, str(config)


@pytest.mark.parametrize("args", [
    ["summary", "--by", "model"], ["summary", "--by", "user"], ["summary", "--by", "project"],
    ["summary", "--by", "provider"], ["summary", "--by", "session"],
    ["summary", "--by", "user", "--csv"], ["unpriced"], ["budgets"],
], ids=" ".join)
def test_tables_show_hostile_names_with_escapes_visible(hostile, args):
    _, config = hostile
    result = run(*args, "--config", config)
    assert result.exit_code == 0, result.output
    assert_inert(result.output)
    assert HOSTILE_SHOWN in result.output  # shown, not dropped
    if args[0] == "summary" and "--csv" not in args:
        row = next(line for line in result.output.splitlines() if HOSTILE_SHOWN in line)
        assert row.split()[-7:-5] == ["2", "0"]  # calls, errors: the row is still aligned


@pytest.mark.parametrize("args", [["summary", "--by", "user"], ["unpriced"], ["budgets"]],
                         ids=" ".join)
def test_json_output_is_valid_ascii_and_exact(hostile, args):
    _, config = hostile
    result = run(*args, "--json", "--config", config)
    assert result.exit_code == 0, result.output
    assert result.output.isascii()  # escaped by the JSON encoder, so inert on a terminal
    rows = json.loads(result.output)
    values = {value for row in rows for value in row.values() if isinstance(value, str)}
    assert values & {"mallory" + HOSTILE, "evil" + HOSTILE, "team" + HOSTILE}  # exact values
    if args[0] == "budgets":
        [row] = rows
        assert row["budget"] == "team" + HOSTILE and row["scope"] == {"user": "mallory" + HOSTILE}
        assert row["used"] == 2020


def test_report_prune_and_errors_echo_nothing_raw(hostile, tmp_path):
    url, config = hostile
    result = run("report", "--since", "30d", "--project", "proj" + HOSTILE,
                 "-o", str(tmp_path / "r.html"), "--config", config)
    assert result.exit_code == 0, result.output
    assert f"project proj{HOSTILE_SHOWN}" in result.output
    assert_inert(result.output)
    result = run("prune", "--older-than", "1d", "--dry-run", "--archive",
                 str(tmp_path / f"a{HOSTILE}.jsonl.gz"), "--config", config)
    assert result.exit_code == 0, result.output
    assert_inert(result.output)
    result = run("summary", "--since", "7d" + HOSTILE, "--config", config)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert_inert(result.stderr)
    assert len(fetch_events(url)) == 2


def test_import_lists_hostile_reasons_and_file_names_visibly(tmp_path):
    source = tmp_path / f"in{HOSTILE}.csv"
    source.write_text("id,ts,model,input_tokens\n"
                      f"a1,2026-01-01T00:00:00Z,evil{HOSTILE},5\n"
                      f"a2,2026-01-01T00:00:00Z,m,{HOSTILE}\n")
    db = tmp_path / "imported.db"
    result = run("import", str(source), "--db", str(db))
    assert result.exit_code == 1, result.output  # one line invalid, the other imported
    assert "imported 1 events" in result.output and "line 3: input_tokens" in result.output
    assert_inert(result.output)
    [row] = fetch_events(f"sqlite:///{db}")
    assert row["model"] == "evil" + HOSTILE  # the ledger keeps the value as it came


def test_prices_shows_a_hostile_override_visibly(tmp_path):
    config = tmp_path / "llmtally.toml"
    config.write_text(f'[prices.{json.dumps("m" + HOSTILE)}]\ninput = 1\noutput = 2\n')
    result = run("prices", "m" + HOSTILE, "--config", str(config), "--price-map", "bundled")
    assert result.exit_code == 0, result.output
    assert f"model:        m{HOSTILE_SHOWN}" in result.output
    assert_inert(result.output)
    result = run("prices", "nothing" + HOSTILE, "--price-map", "bundled")
    assert result.exit_code == 2 and "no price known" in result.stderr
    assert_inert(result.stderr)


def _read_all(fd: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return out
        if not chunk:
            return out
        out += chunk


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_export_to_a_terminal_is_inert_and_to_a_pipe_exact(hostile, fmt):
    url, config = hostile
    command = [sys.executable, "-m", "llmtally.cli", "export", "--format", fmt, "--config", config]
    primary, secondary = pty.openpty()
    try:
        child = subprocess.Popen(command, stdout=secondary, stderr=subprocess.PIPE, env=os.environ)
        os.close(secondary)
        shown = _read_all(primary).decode("utf-8")
        assert child.wait(timeout=60) == 0, child.stderr.read()
    finally:
        os.close(primary)
    assert_inert(shown.replace("\r\n", "\n"))
    assert shown.count("evil") == 2 and "PWNED" in shown
    piped = subprocess.run(command, capture_output=True, timeout=60)
    assert piped.returncode == 0, piped.stderr
    text = piped.stdout.decode("utf-8")
    rows = ([json.loads(line) for line in text.splitlines()] if fmt == "jsonl"
            else list(csv.DictReader(io.StringIO(text))))
    assert [(row["model"], row["user"]) for row in rows] == \
        [("evil" + HOSTILE, "mallory" + HOSTILE)] * 2  # a pipe gets the data unchanged


# -- the error contract: one line on stderr, exit code 2, nothing created ---------------------

LEDGER_COMMANDS = [
    ["summary"], ["summary", "--by", "user", "--json"], ["unpriced"], ["budgets"],
    ["report", "--week", "last"], ["export"], ["prune", "--older-than", "90d", "--dry-run"],
    ["import", "-"],
]
READ_COMMANDS = [args for args in LEDGER_COMMANDS if args[0] != "import"]


def _corrupted(tmp_path: Path) -> Path:
    path = tmp_path / "random.db"
    path.write_bytes(random.Random(7).randbytes(64 * 1024))
    return path


def _half_overwritten(tmp_path: Path) -> Path:
    """A real ledger whose later pages (its events) were overwritten: it opens, queries fail."""
    path = tmp_path / "damaged.db"
    with Tally(f"sqlite:///{path}", price_map="bundled", spill_path=tmp_path / "d.jsonl") as tally:
        for number in range(2000):
            tally.record(model=f"m{number % 5}", user=f"u{number}", input_tokens=number, ts=NOW)
    data = bytearray(path.read_bytes())
    noise = random.Random(3)
    for index in range(len(data) // 2, len(data)):
        data[index] = noise.randrange(256)
    path.write_bytes(bytes(data))
    return path


def _newer(url: str, tmp_path: Path) -> str:
    from sqlalchemy import create_engine, text

    from llmtally._storage.store import normalize_url

    with Tally(url, price_map="bundled", spill_path=tmp_path / "n.jsonl") as tally:
        tally.record(model="m", input_tokens=1)
    engine = create_engine(normalize_url(url))
    with engine.begin() as conn:  # what a later llmtally's migration 99 would leave
        conn.execute(text("INSERT INTO llmtally_schema (version, name, applied_at) "
                          "VALUES (99, 'from-the-future', '2030-01-01 00:00:00')"))
    engine.dispose()
    return url


def _assert_one_line_error(result, *phrases: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in result.stderr


@pytest.mark.parametrize("args", LEDGER_COMMANDS, ids=" ".join)
def test_closed_port(args):
    result = run(*args, "--db", CLOSED_PORT_URL)
    _assert_one_line_error(result, "the ledger postgresql+psycopg://postgres@127.0.0.1:1/test "
                           "cannot be reached", "Connection refused", "Check --db")


@pytest.mark.parametrize("args", READ_COMMANDS, ids=" ".join)
def test_missing_sqlite_file_is_not_created(args, tmp_path):
    missing = tmp_path / "nope" / "ledger.db"
    result = run(*args, "--db", str(missing))
    _assert_one_line_error(result, f"the ledger {missing} does not exist", "--db")
    assert not missing.exists() and not missing.parent.exists()


def test_import_creates_a_missing_ledger(tmp_path):
    target = tmp_path / "new.db"
    line = json.dumps({"id": "x1", "ts": "2026-01-01T00:00:00Z", "model": "m"})
    result = CliRunner().invoke(main, ["import", "-", "--db", str(target)], input=line + "\n")
    assert result.exit_code == 0, result.output
    assert [row["id"] for row in fetch_events(f"sqlite:///{target}")] == ["x1"]


@pytest.mark.parametrize("args", LEDGER_COMMANDS, ids=" ".join)
def test_corrupted_file(args, tmp_path):
    path = _corrupted(tmp_path)
    before = path.read_bytes()
    result = run(*args, "--db", str(path))
    _assert_one_line_error(result, "not a usable SQLite database", "corrupted")
    assert path.read_bytes() == before  # left as it was


@pytest.mark.parametrize("args", [["summary", "--by", "user"], ["unpriced"], ["export"]],
                         ids=" ".join)
def test_damaged_pages_found_by_a_query(args, tmp_path):
    result = run(*args, "--since", "1d", "--db", str(_half_overwritten(tmp_path)))
    _assert_one_line_error(result, "database disk image is malformed")


@pytest.mark.parametrize("args", LEDGER_COMMANDS, ids=" ".join)
def test_newer_schema(args, ledger_url, tmp_path):
    url = _newer(ledger_url, tmp_path)
    result = run(*args, "--db", url)
    _assert_one_line_error(result, "schema version 99", "pip install -U llmtally")
    assert len(fetch_events(url)) == 1  # nothing changed


@pytest.mark.parametrize("case", ["closed port", "missing", "corrupted", "newer"])
def test_the_installed_command_prints_one_line_and_no_traceback(case, tmp_path):
    """As users run it: a real process, its real stderr (nothing else printed at exit)."""
    db = {"closed port": lambda: CLOSED_PORT_URL, "missing": lambda: str(tmp_path / "missing.db"),
          "corrupted": lambda: str(_corrupted(tmp_path)),
          "newer": lambda: _newer(f"sqlite:///{tmp_path / 'newer.db'}", tmp_path)}[case]()
    for command in (["summary"], ["report"], ["unpriced"]):
        result = subprocess.run([sys.executable, "-m", "llmtally.cli", *command, "--db", db],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stdout == ""


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch):
    db = tmp_path / "ok.db"
    Tally(f"sqlite:///{db}", price_map="bundled", spill_path=tmp_path / "s.jsonl").close()

    def broken(*_args, **_kwargs):
        raise TypeError("simulated bug")

    monkeypatch.setattr(Tally, "unpriced", broken)
    result = run("unpriced", "--db", str(db))
    _assert_one_line_error(result, "internal error (TypeError: simulated bug)", "LLMTALLY_DEBUG=1")
    result = run("unpriced", "--db", str(db), env={"LLMTALLY_DEBUG": "1"})
    assert result.exit_code == 2 and "Traceback" in result.stderr


def test_library_warnings_during_a_command_reach_stderr_inert():
    code = ("import logging; from llmtally._terminal import _log_printably; _log_printably(); "
            f"logging.getLogger('llmtally').warning('ledger %s is down', {HOSTILE!r})")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.stderr == f"ledger {HOSTILE_SHOWN} is down\n"
