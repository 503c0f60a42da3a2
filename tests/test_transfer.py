"""export / import / prune: round trips on real SQLite and PostgreSQL, idempotency, archives,
one-line errors with nothing half-written, flat export memory, and fuzzed import files."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tracemalloc
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import PG_URL, fetch_events, pg_admin, require_postgres
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text

from llmtally import Budget, Tally
from llmtally._storage.store import Store
from llmtally._storage.tables import EVENT_COLUMNS, MAX_ID, MAX_TEXT, UsageEvent
from llmtally._transfer.export import count_events, export_events
from llmtally._transfer.importing import import_events
from llmtally._transfer.prune import prune_events
from llmtally._transfer.transfer import TransferError
from llmtally.cli import main

NOW = datetime.now(timezone.utc).replace(microsecond=0)
EVENTS = UsageEvent.__table__
TEXT_BOUNDS = {"id": MAX_ID, "session": MAX_ID, "request_id": MAX_ID, "provider": MAX_TEXT,
               "model": MAX_TEXT, "resolved_model": MAX_TEXT, "error_type": MAX_TEXT,
               "price_source": MAX_TEXT, "project": MAX_TEXT, "user": MAX_TEXT}
NASTY = ["'); DROP TABLE llmtally_events; --", "<script>alert(1)</script>",
         '"><img src=x onerror=alert(1)>', "a,b;c\"d'e", "line\nbreak\r\nand\rcr",
         "\x01\x1b[31mred\x7f", "ünïcödé ✓ 数据 🚀", "=SUM(A1:A9)", "\\N", "NULL", " "]


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def new_ledger(tmp_path: Path) -> Iterator:
    """Make further empty ledgers of the same kind (SQLite file / PostgreSQL schema) as a URL."""
    schemas: list[str] = []

    def make(like: str) -> str:
        if like.startswith("sqlite"):
            return f"sqlite:///{tmp_path / f'ledger-{uuid.uuid4().hex[:8]}.db'}"
        require_postgres()
        schema = f"t_{uuid.uuid4().hex[:12]}"
        with pg_admin() as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        schemas.append(schema)
        sep = "&" if "?" in PG_URL else "?"
        return f"{PG_URL}{sep}options=-csearch_path%3D{schema}"

    yield make
    if schemas:
        with pg_admin() as conn:
            for schema in schemas:
                conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def stores() -> Iterator:
    """Open Stores on URLs; all closed after the test."""
    opened: list[Store] = []

    def open_store(url: str) -> Store:
        store = Store(url)
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


def typed_rows(store: Store) -> dict[str, dict]:
    """Every event with Python values (datetime, bool, list, dict), by id."""
    with store.connect() as conn:
        return {row.id: dict(row._mapping) for row in conn.execute(select(EVENTS))}


def cli(*args: str, input: bytes | None = None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def record_variety(tally: Tally, project: str, count: int = 12, *, days_apart: float = 1.0) -> None:
    """Events that use every column, with awkward text, over ``count`` days."""
    for i in range(count):
        tally.record(
            id=f"{project}-{i}", ts=NOW - timedelta(days=i * days_apart, microseconds=i * 7),
            provider=["openai", "anthropic", None][i % 3],
            model=["gpt-4o-mini", "claude-sonnet-4-5", "acme-llm"][i % 3],
            resolved_model=NASTY[i % len(NASTY)] if i % 2 else None,
            call_type=["chat", "embedding", "completion"][i % 3], streamed=bool(i % 2),
            status=["ok", "ok", "error", "blocked"][i % 4],
            error_type="openai.RateLimitError" if i % 4 == 2 else None,
            input_tokens=1000 + i, output_tokens=200 + i, cache_read_tokens=100 * (i % 3),
            cache_write_tokens=10 * (i % 2), reasoning_tokens=5 * (i % 4),
            latency_ms=850.25 + i if i % 5 else None, ttft_ms=120.5 if i % 2 else None,
            estimated=i % 6 == 1, project=project, user=NASTY[(i + 3) % len(NASTY)],
            session=f"s-{i % 2}", tags=["beta", NASTY[i % len(NASTY)].strip() or "x"],
            request_id=f"req-{i}", metadata={"attempt": i, "nested": {"list": [1, 2.5, None]},
                                             "text": NASTY[(i + 5) % len(NASTY)]},
        )
    assert tally.flush(10)


def totals(tally: Tally) -> list[tuple]:
    return sorted((r.key, r.calls, r.errors, r.input_tokens, r.output_tokens,
                   r.cache_read_tokens, r.cache_write_tokens, r.reasoning_tokens,
                   round(r.cost, 12), r.unpriced_calls, r.estimated_calls)
                  for r in tally.summary(since="3650d", by="model"))


# -- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_round_trip_gives_identical_rows_and_totals(ledger_url, new_ledger, make_tally, stores,
                                                    tmp_path, fmt):
    source = make_tally(ledger_url)
    record_variety(source, "search")
    path = tmp_path / f"usage.{fmt}"
    exported = export_events(source.store, path)
    assert (exported.rows, exported.format) == (12, fmt)

    target_url = new_ledger(ledger_url)
    result = import_events(stores(target_url), path)
    assert (result.imported, result.skipped, result.invalid, result.format) == (12, 0, 0, fmt)
    assert fetch_events(target_url) == fetch_events(ledger_url)  # every column, as stored
    assert typed_rows(stores(target_url)) == typed_rows(source.store)
    assert totals(make_tally(target_url)) == totals(source)
    assert len(totals(source)) == 3


def test_sqlite_ledger_moves_to_postgresql_and_back(sqlite_url, new_ledger, make_tally, stores,
                                                     tmp_path):
    source = make_tally(sqlite_url)
    record_variety(source, "etl", 9)
    export_events(source.store, tmp_path / "all.jsonl.gz")
    pg_url = new_ledger("postgresql")
    assert import_events(stores(pg_url), tmp_path / "all.jsonl.gz").imported == 9
    export_events(stores(pg_url), tmp_path / "back.csv")
    back_url = new_ledger("sqlite")
    assert import_events(stores(back_url), tmp_path / "back.csv").imported == 9
    assert typed_rows(stores(pg_url)) == typed_rows(source.store)
    assert typed_rows(stores(back_url)) == typed_rows(source.store)  # JSONB reorders keys


def test_importing_twice_adds_nothing(ledger_url, new_ledger, make_tally, stores, tmp_path):
    record_variety(make_tally(ledger_url), "search", 7)
    export_events(stores(ledger_url), tmp_path / "usage.jsonl")
    target = stores(new_ledger(ledger_url))
    first = import_events(target, tmp_path / "usage.jsonl")
    before = typed_rows(target)
    second = import_events(target, tmp_path / "usage.jsonl")
    assert (first.imported, first.skipped) == (7, 0)
    assert (second.imported, second.skipped, second.invalid) == (0, 7, 0)
    assert typed_rows(target) == before
    # the source ledger itself already holds them all
    again = import_events(stores(ledger_url), tmp_path / "usage.jsonl")
    assert (again.imported, again.skipped) == (0, 7)


def test_merging_two_projects_ledgers(ledger_url, new_ledger, make_tally, tmp_path):
    search_url, etl_url = new_ledger(ledger_url), new_ledger(ledger_url)
    search, etl = make_tally(search_url), make_tally(etl_url)
    record_variety(search, "search", 10)
    record_variety(etl, "etl", 6)
    etl.record(id="search-3", model="dup", ts=NOW)  # an id both ledgers hold: kept once
    etl.flush(10)
    assert cli("export", "--db", search_url, "-o", str(tmp_path / "search.jsonl")).exit_code == 0
    assert cli("export", "--db", etl_url, "-o", str(tmp_path / "etl.csv")).exit_code == 0

    merged_url = ledger_url
    first = cli("import", str(tmp_path / "search.jsonl"), "--db", merged_url)
    second = cli("import", str(tmp_path / "etl.csv"), "--db", merged_url)
    assert first.exit_code == second.exit_code == 0
    assert "imported 10 events" in first.stdout
    assert "imported 6 events" in second.stdout and "skipped 1 already" in second.stdout
    merged = make_tally(merged_url)
    by_project = {r.key: r for r in merged.summary(since="3650d", by="project")}
    for name, ledger in (("search", search), ("etl", etl)):
        [alone] = [r for r in ledger.summary(since="3650d", by="project") if r.key == name]
        assert (by_project[name].calls, by_project[name].input_tokens) == \
            (alone.calls, alone.input_tokens)
        assert by_project[name].cost == pytest.approx(alone.cost, abs=1e-12)
    assert len(fetch_events(merged_url)) == 16


def test_export_filters_and_count(ledger_url, make_tally, stores, tmp_path):
    tally = make_tally(ledger_url)
    record_variety(tally, "search", 10)           # days 0..9
    record_variety(tally, "etl", 4, days_apart=10)  # days 0, 10, 20, 30
    store = stores(ledger_url)
    assert count_events(store) == 14
    assert count_events(store, since=NOW - timedelta(days=5, minutes=5)) == 6 + 1  # search 0..5, etl 0
    assert count_events(store, since="25d", until="5d", project="etl") == 2  # days 10 and 20
    out = io.BytesIO()
    assert export_events(store, out, format="csv", project="search", until="2d").rows == 8
    rows = list(csv.DictReader(io.StringIO(out.getvalue().decode("utf-8"))))
    assert len(rows) == 8 and list(rows[0]) == list(EVENT_COLUMNS)
    assert [r["ts"] for r in rows] == sorted(r["ts"] for r in rows)  # oldest first
    assert all(r["ts"].endswith("Z") and r["project"] == "search" for r in rows)
    assert json.loads(rows[0]["metadata"])["nested"] == {"list": [1, 2.5, None]}


def test_cli_pipes_export_into_import(tmp_path, make_tally):
    """The console scripts, as a user types them: export | import -."""
    source = tmp_path / "a.db"
    record_variety(make_tally(f"sqlite:///{source}"), "search", 5)
    exe = shutil.which("llmtally") or os.path.join(os.path.dirname(sys.executable), "llmtally")
    export = subprocess.Popen([exe, "export", "--db", str(source)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    imported = subprocess.run([exe, "import", "-", "--db", str(tmp_path / "b.db")],
                              stdin=export.stdout, capture_output=True, text=True, timeout=60)
    export.stdout.close()
    assert export.wait(60) == 0 and export.stderr.read() == b""  # no progress bar off a terminal
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith("imported 5 events from - (jsonl); skipped 0")
    assert fetch_events(f"sqlite:///{tmp_path / 'b.db'}") == fetch_events(f"sqlite:///{source}")


# -- prune -------------------------------------------------------------------------------------


def test_prune_archives_then_deletes_and_reimport_restores(ledger_url, make_tally, stores,
                                                           tmp_path):
    tally = make_tally(ledger_url, budgets=[Budget(usd=100, per="total")])
    held = tally.reserve(model="gpt-4o-mini", input_tokens=1000, max_tokens=100)
    tally.record(model="gpt-4o-mini", input_tokens=1000, output_tokens=80, reservation=held,
                 ts=NOW - timedelta(days=200))
    record_variety(tally, "search", 12, days_apart=20)  # days 0, 20, ... 220
    store = stores(ledger_url)
    before = typed_rows(store)
    counters = _counter_rows(store)
    assert counters and counters[0][0] > 0

    result = prune_events(store, "90d", archive=tmp_path / "old.jsonl.gz")
    assert (result.events, result.dry_run) == (8, False)  # days 100..220 and the one at 200
    old_ids = {i for i, row in before.items() if row["ts"] < result.cutoff}
    assert len(old_ids) == 8
    assert set(typed_rows(store)) == set(before) - old_ids
    assert result.cost["USD"] == pytest.approx(
        sum(before[i]["cost"] or 0 for i in old_ids), abs=1e-12)
    assert result.unpriced == sum(before[i]["cost_status"] == "unpriced" for i in old_ids)
    with gzip.open(tmp_path / "old.jsonl.gz", "rt", encoding="utf-8") as archive:
        assert {json.loads(line)["id"] for line in archive} == old_ids
    # budget counters cache a GROUP BY over the events: the pruned spend leaves the total
    from llmtally._budgets.counters import check_counters

    assert check_counters(store) == []
    assert _counter_rows(store)[0][0] < counters[0][0]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    restored = import_events(store, tmp_path / "old.jsonl.gz")
    assert (restored.imported, restored.invalid) == (8, 0)
    assert typed_rows(store) == before
    assert _counter_rows(store) == counters  # the re-import is charged back, exactly


def _counter_rows(store: Store) -> list[tuple]:
    with store.connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT spent, reserved, budget_key FROM llmtally_budget_counters ORDER BY budget_key"))]


def test_prune_dry_run_deletes_nothing(ledger_url, make_tally, stores, tmp_path):
    record_variety(make_tally(ledger_url), "search", 10, days_apart=30)
    before = fetch_events(ledger_url)
    result = cli("prune", "--older-than", "100d", "--dry-run", "--archive",
                 str(tmp_path / "a.jsonl.gz"), "--db", ledger_url)
    assert result.exit_code == 0, result.output
    cutoff = NOW.replace(tzinfo=None) - timedelta(days=100)
    old = [r for r in typed_rows(stores(ledger_url)).values() if r["ts"] < cutoff]
    cost = sum(r["cost"] or 0 for r in old)
    assert result.stdout.startswith(f"would delete {len(old)} events older than ")
    assert len(old) == 6 and f"cost {cost:.6f} USD" in result.stdout
    assert "nothing deleted (--dry-run)" in result.stdout
    assert fetch_events(ledger_url) == before
    assert not (tmp_path / "a.jsonl.gz").exists()
    real = cli("prune", "--older-than", "100d", "--db", ledger_url)
    assert real.exit_code == 0 and real.stdout.startswith("deleted 6 events older than ")
    assert len(fetch_events(ledger_url)) == 4


def test_prune_refuses_without_older_than(tmp_path):
    db = tmp_path / "never-created.db"
    result = cli("prune", "--db", str(db))
    assert result.exit_code == 2
    assert result.stderr == ("Error: prune needs --older-than (e.g. 90d or 2026-01-01): it "
                             "deletes events, so it never guesses a cutoff\n")
    assert not db.exists()
    Tally(f"sqlite:///{db}", price_map="bundled", spill_path=tmp_path / "s.jsonl").close()
    future = cli("prune", "--older-than", "2999-01-01", "--db", str(db))
    assert future.exit_code == 2 and "is in the future" in future.stderr


def test_prune_never_overwrites_an_archive_and_leaves_no_temp_file(ledger_url, make_tally,
                                                                    tmp_path):
    record_variety(make_tally(ledger_url), "search", 6, days_apart=50)
    before = fetch_events(ledger_url)
    (tmp_path / "old.jsonl.gz").write_bytes(b"an older archive")
    result = cli("prune", "--older-than", "90d", "--archive", str(tmp_path / "old.jsonl.gz"),
                 "--db", ledger_url)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "already exists" in result.stderr
    assert (tmp_path / "old.jsonl.gz").read_bytes() == b"an older archive"
    missing_dir = tmp_path / "no" / "such" / "dir" / "old.jsonl.gz"
    result = cli("prune", "--older-than", "90d", "--archive", str(missing_dir), "--db", ledger_url)
    assert result.exit_code == 2 and result.stderr.startswith(f"Error: cannot write {missing_dir}")
    assert fetch_events(ledger_url) == before
    assert sorted(p.name for p in tmp_path.iterdir() if "old" in p.name) == ["old.jsonl.gz"]


# -- errors: one line, exit 2, nothing half-written --------------------------------------------


def test_import_errors_are_one_line_and_write_nothing(tmp_path, sqlite_url, stores):
    db = ["--db", sqlite_url]
    cases = {
        "missing.jsonl": (None, "cannot read"),
        "ledger.jsonl": (b"SQLite format 3\x00" + bytes(range(256)) * 8, "is not JSONL"),
        "image.csv": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8, "is not an llmtally CSV"),
        "other.csv": (b"name,amount\nalice,3\n", "lacks id, ts, model"),
        "list.jsonl": (b"[1, 2]\n\"text\"\n", "is not JSONL"),
    }
    for name, (content, message) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        result = cli("import", str(tmp_path / name), *db)
        assert result.exit_code == 2, (name, result.output)
        assert result.stderr.count("\n") == 1 and message in result.stderr, (name, result.stderr)
        assert "Traceback" not in result.output
    assert fetch_events(sqlite_url) == []
    for name in ("empty.csv", "empty.jsonl"):
        (tmp_path / name).write_bytes(b"\n\n")
        result = cli("import", str(tmp_path / name), *db)
        assert result.exit_code == 0 and "imported 0 events" in result.stdout


def test_a_truncated_archive_imports_nothing(ledger_url, make_tally, stores, new_ledger, tmp_path):
    record_variety(make_tally(ledger_url), "search", 40)
    export_events(stores(ledger_url), tmp_path / "full.jsonl.gz")
    data = (tmp_path / "full.jsonl.gz").read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) - 30])
    target_url = new_ledger(ledger_url)
    with pytest.raises(TransferError, match="cannot read .*nothing was imported"):
        import_events(stores(target_url), tmp_path / "cut.jsonl.gz", batch_size=5)
    assert fetch_events(target_url) == []  # batches already sent were rolled back
    result = cli("import", str(tmp_path / "cut.jsonl.gz"), "--db", target_url)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1


def test_an_unreachable_database_is_one_line(tmp_path):
    down = "postgresql+psycopg://nobody@127.0.0.1:9/nowhere"
    (tmp_path / "e.jsonl").write_text('{"id": "a", "ts": "2026-01-01T00:00:00Z", "model": "m"}\n')
    for args in (["export", "-o", str(tmp_path / "out.jsonl")], ["import", str(tmp_path / "e.jsonl")],
                 ["prune", "--older-than", "90d"]):
        result = cli(*args, "--db", down)
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("Error: the ledger postgresql+psycopg://nobody@127.0.0.1:9/")
        assert result.stderr.count("\n") == 1 and "nothing was changed" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.jsonl"]  # no partial export


def test_export_to_an_unwritable_place_is_one_line(sqlite_url, make_tally, tmp_path):
    record_variety(make_tally(sqlite_url), "search", 3)
    result = cli("export", "--db", sqlite_url, "-o", str(tmp_path / "nope" / "x.jsonl"))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "cannot write" in result.stderr
    bad = cli("export", "--db", sqlite_url, "--since", "last tuesday")
    assert bad.exit_code == 2 and "neither a date" in bad.stderr


def test_invalid_lines_are_listed_and_the_rest_imported(sqlite_url, stores, tmp_path):
    good = {"ts": "2026-11-01T10:00:00+01:00", "model": "gpt-4o-mini", "input_tokens": 5}
    lines = [json.dumps({**good, "id": "ok-1"}), "", "not json at all",
             json.dumps({**good, "id": "bad-1", "input_tokens": -3}),
             json.dumps({**good, "id": "ok-2", "source": "somewhere-else", "cost": 0.5}),
             json.dumps({**good, "id": "bad-2", "status": "exploded"}),
             json.dumps({**good, "id": "bad-3", "model": "m" * (MAX_TEXT + 1)}), "   "]
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    result = cli("import", str(tmp_path / "mixed.jsonl"), "--db", sqlite_url)
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        f"imported 2 events from {tmp_path / 'mixed.jsonl'} (jsonl); skipped 0 already in the "
        "ledger; invalid lines: 4",
        "  line 3: not JSON (Expecting value)",
        "  line 4: input_tokens: -3 is not a token count (0 to 10^12)",
        "  line 6: status: 'exploded' is not one of blocked, error, ok",
        f"  line 7: model is {MAX_TEXT + 1} characters long (at most {MAX_TEXT})",
    ]
    rows = typed_rows(stores(sqlite_url))
    assert set(rows) == {"ok-1", "ok-2"}
    assert rows["ok-1"]["ts"] == datetime(2026, 11, 1, 9, 0)  # converted to UTC
    assert (rows["ok-1"]["source"], rows["ok-1"]["cost"], rows["ok-1"]["cost_status"]) == \
        ("import", None, "unpriced")
    assert (rows["ok-2"]["cost"], rows["ok-2"]["cost_status"]) == (0.5, "priced")
    again = cli("import", str(tmp_path / "mixed.jsonl"), "--db", sqlite_url)
    assert again.exit_code == 1 and "imported 0 events" in again.stdout
    assert "skipped 2 already" in again.stdout


def test_hostile_strings_are_stored_verbatim_or_refused(ledger_url, stores, tmp_path):
    store = stores(ledger_url)
    base = {"ts": "2026-11-01T10:00:00Z", "cost": 0.25}
    values = NASTY + ["x" * MAX_TEXT]
    lines = [json.dumps({**base, "id": f"h-{i}", "model": value, "user": value,
                         "tags": [value.strip() or "t"], "metadata": {"v": value, value: [value]}})
             for i, value in enumerate(values)]
    lines.append(json.dumps({**base, "id": "big-meta", "model": "m",
                             "metadata": {"blob": "y" * 100_000}}))
    refused = [
        json.dumps({**base, "id": "r-long", "model": "z" * 100_000}),
        json.dumps({**base, "id": "r-nul", "model": "a\x00b"}),
        json.dumps({**base, "id": "r-nul-meta", "model": "m", "metadata": {"k": "\x00"}}),
        json.dumps({**base, "id": "r-surrogate", "model": "\ud800"}),
        '{"id": "r-nan", "ts": "2026-11-01T10:00:00Z", "model": "m", "cost": NaN}',
        '{"id": "r-huge", "ts": "2026-11-01T10:00:00Z", "model": "m", "cost": 1e400}',
        json.dumps({**base, "id": "r-tokens", "model": "m", "input_tokens": 10**13}),
        json.dumps({**base, "id": "r-deep", "model": "m", "metadata": _nested(100)}),
    ]
    raw = ("\n".join(lines + refused) + "\n").encode("utf-8")
    raw += b'{"id": "r-bytes", "ts": "2026-11-01T10:00:00Z", "model": "\xff\xfe"}\n'
    (tmp_path / "hostile.jsonl").write_bytes(raw)
    result = import_events(store, tmp_path / "hostile.jsonl")
    assert (result.imported, result.invalid) == (len(values) + 1, len(refused) + 1)
    rows = typed_rows(store)
    assert set(rows) == {f"h-{i}" for i in range(len(values))} | {"big-meta"}
    for i, value in enumerate(values):
        assert (rows[f"h-{i}"]["model"], rows[f"h-{i}"]["user"]) == (value, value)
        assert rows[f"h-{i}"]["metadata"] == {"v": value, value: [value]}
    assert rows["big-meta"]["metadata"]["blob"] == "y" * 100_000
    _assert_bounded(store)


def _nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"d": value}
    return value


def _assert_bounded(store: Store) -> None:
    with store.connect() as conn:
        for name, bound in TEXT_BOUNDS.items():
            longest = conn.execute(select(EVENTS.c[name]).order_by(
                EVENTS.c[name].is_(None))).scalars().all()
            assert max((len(v) for v in longest if v is not None), default=0) <= bound, name


# -- export memory -----------------------------------------------------------------------------


def _synthetic(count: int, start: int = 0) -> Iterator[dict]:
    base = datetime(2026, 1, 1)
    for i in range(start, start + count):
        yield {"id": f"m-{i:08d}", "ts": base + timedelta(seconds=i), "source": "manual",
               "provider": "openai", "model": "gpt-4o-mini", "resolved_model": None,
               "call_type": "chat", "streamed": False, "status": "ok", "error_type": None,
               "input_tokens": 1000 + i % 300, "output_tokens": 200, "cache_read_tokens": 0,
               "cache_write_tokens": 0, "reasoning_tokens": 0, "cost": 1e-4 + i * 1e-9,
               "currency": "USD", "cost_status": "priced", "price_source": "test",
               "latency_ms": 800.5, "ttft_ms": None, "project": f"p{i % 4}", "user": f"u{i % 40}",
               "session": None, "tags": ["prod"], "request_id": None,
               "metadata": {"route": "search", "n": i, "pad": "x" * 200}}


class _CountingSink(io.RawIOBase):
    def __init__(self) -> None:
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.size += len(data)
        return len(data)


def _export_peak(store: Store) -> tuple[int, int, int]:
    """Rows exported, bytes written and the peak of Python allocations while exporting."""
    sink = _CountingSink()
    tracemalloc.start()
    try:
        rows = export_events(store, sink, chunk_rows=500).rows
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return rows, sink.size, peak


def test_export_memory_does_not_grow_with_the_ledger(ledger_url, stores):
    """2,000 then 10,000 events: the export's peak memory stays that of a few chunks, the same
    for both, and far below the export's size (a non-streaming export holds every row)."""
    store = stores(ledger_url)
    store.insert_many(list(_synthetic(2000)))
    small_rows, _, small_peak = _export_peak(store)
    for start in range(2000, 10_000, 4000):
        store.insert_many(list(_synthetic(4000, start)))
    big_rows, big_size, big_peak = _export_peak(store)
    assert (small_rows, big_rows) == (2000, 10_000)
    assert big_size > 5_000_000
    assert big_peak < small_peak * 1.25 + 256 * 1024, (small_peak, big_peak)
    assert big_peak < big_size / 2, (big_peak, big_size)


# -- fuzz --------------------------------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=30)
_any_text = _text | st.sampled_from(NASTY[:-1]) | st.just("w" * MAX_TEXT)
_json_scalar = (st.none() | st.booleans() | st.integers(-10**15, 10**15) | _text
                # PostgreSQL's JSONB keeps numbers as decimals: floats stay exact within ±1e15
                | st.floats(-1e15, 1e15, allow_nan=False, allow_infinity=False))
_metadata = st.dictionaries(_text, st.recursive(
    _json_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=6), max_size=4)
_floats = st.floats(0, 1e6, allow_nan=False, allow_infinity=False)


@st.composite
def valid_events(draw) -> dict:
    """A consistent event, every column present (JSON types; ts as ISO 8601)."""
    cache_read, cache_write, reasoning = (draw(st.integers(0, 10**6)) for _ in range(3))
    unpriced = draw(st.booleans())
    ts = draw(st.datetimes(datetime(2000, 1, 1), datetime(2100, 1, 1)))
    return {
        "ts": ts.isoformat(timespec="microseconds") + draw(st.sampled_from(["Z", "+00:00", ""])),
        "source": draw(st.sampled_from(["litellm", "langchain", "manual", "import"])),
        "provider": draw(st.none() | _any_text), "model": draw(_any_text),
        "resolved_model": draw(st.none() | _any_text),
        "call_type": draw(st.sampled_from(["chat", "embedding", "image", "other"])),
        "streamed": draw(st.booleans()), "status": draw(st.sampled_from(["ok", "error", "blocked"])),
        "error_type": draw(st.none() | _any_text),
        "input_tokens": cache_read + cache_write + draw(st.integers(0, 10**9)),
        "output_tokens": reasoning + draw(st.integers(0, 10**9)),
        "cache_read_tokens": cache_read, "cache_write_tokens": cache_write,
        "reasoning_tokens": reasoning,
        "cost": None if unpriced else draw(_floats), "currency": draw(st.sampled_from(["USD", "CNY"])),
        "cost_status": "unpriced" if unpriced else draw(st.sampled_from(["priced", "estimated"])),
        "price_source": draw(st.none() | _any_text), "latency_ms": draw(st.none() | _floats),
        "ttft_ms": draw(st.none() | _floats), "project": draw(st.none() | _any_text),
        "user": draw(st.none() | _any_text), "session": draw(st.none() | _text),
        "tags": draw(st.lists(_any_text, max_size=3)), "request_id": draw(st.none() | _text),
        "metadata": draw(_metadata),
    }


# Values that make a line invalid, as JSON values, raw JSON text, and CSV cells.
_BAD_JSON_VALUES = [
    ("input_tokens", "12"), ("input_tokens", 1.5), ("input_tokens", True), ("input_tokens", -1),
    ("input_tokens", 10**13), ("input_tokens", 10**40), ("output_tokens", []),
    ("cost", -0.5), ("cost", "free"), ("latency_ms", -3), ("ttft_ms", {}),
    ("model", 123), ("model", ""), ("model", None), ("model", "x" * (MAX_TEXT + 1)),
    ("model", "z" * 100_000), ("model", "nul\x00"), ("user", ["a"]), ("id", "i" * (MAX_ID + 1)),
    ("ts", "yesterday"), ("ts", 1700000000), ("ts", "2026-13-01T00:00:00"), ("ts", None),
    ("status", "exploded"), ("status", 1), ("cost_status", "free"), ("call_type", "bogus"),
    ("currency", "usd"), ("currency", "EURO"), ("streamed", "yes"), ("streamed", 2),
    ("tags", "beta"), ("tags", [1]), ("tags", [""]), ("tags", ["t" * 300]),
    ("metadata", []), ("metadata", "text"), ("metadata", {"k": "\x00"}),
    ("reasoning_tokens", 10**11),  # more than output_tokens (at most ~10**9): parts within whole
]
_RAW_BAD = [("cost", b"NaN"), ("cost", b"Infinity"), ("latency_ms", b"-Infinity"),
            ("cost", b"1e400"), ("model", b'"\\ud800"'), ("model", b'"raw\x01control"'),
            ("model", b'"\xff\xfe"'), ("tags", b'["a", "\xc3"]')]
_BAD_CSV_CELLS = [
    ("input_tokens", "12.5"), ("input_tokens", "-1"), ("input_tokens", "1e3"),
    ("input_tokens", "9" * 30), ("input_tokens", "\u0663"), ("cost", "nan"), ("cost", "inf"),
    ("cost", "-1"), ("cost", "1e400"), ("cost", "abc"), ("latency_ms", "1_000"),
    ("ts", "yesterday"), ("ts", "2026-02-30T00:00:00"), ("model", "x" * (MAX_TEXT + 1)),
    ("model", "z" * 100_000), ("model", "a\x00b"), ("streamed", "maybe"), ("tags", "not json"),
    ("tags", '["'), ("tags", "[1]"), ("metadata", "[]"), ("metadata", "{"),
    ("metadata", '{"n": NaN}'), ("status", "bad"), ("cost_status", "free"), ("currency", "$$$"),
    ("id", "i" * (MAX_ID + 1)), ("model", b"\xff\xfe"), ("user", b"\xc3"),
    ("reasoning_tokens", str(10**11)),
]
_junk_bytes = st.binary(min_size=1, max_size=200).map(
    lambda b: b.replace(b"\n", b"").replace(b"\r", b"").replace(b'"', b"")).filter(
    lambda b: b.decode("utf-8", "replace").strip() != "" and not b.startswith(b"\xef\xbb\xbf"))
_junk_text = st.text(st.characters(codec="utf-8", exclude_characters='"\r\n'),
                     min_size=1, max_size=300).filter(lambda t: t.strip() != "")
_ID = "@@ID@@"
_MARK = "@@MARK@@"


@st.composite
def fuzz_items(draw, bad_line) -> list[tuple[str, object]]:
    """("valid", event without id) / ("bad", line bytes with @@ID@@) / ("blank", bytes)."""
    items: list[tuple[str, object]] = [
        ("valid", event) for event in draw(st.lists(valid_events(), min_size=1, max_size=6))]
    items += [("bad", draw(bad_line())) for _ in range(draw(st.integers(0, 8)))]
    items += [("blank", b"")] * draw(st.integers(0, 2))
    return draw(st.permutations(items))


@st.composite
def bad_jsonl_lines(draw) -> bytes:
    choice = draw(st.integers(0, 2))
    if choice == 0:
        return draw(_junk_bytes)
    event = {**draw(valid_events()), "id": _ID}
    if choice == 1:
        name, value = draw(st.sampled_from(_BAD_JSON_VALUES))
        return json.dumps({**event, name: value}).encode("utf-8")
    name, raw = draw(st.sampled_from(_RAW_BAD))
    return json.dumps({**event, name: _MARK}).encode("utf-8").replace(f'"{_MARK}"'.encode(), raw)


@st.composite
def bad_csv_lines(draw) -> bytes:
    if draw(st.booleans()):
        return draw(_junk_bytes | _junk_text.map(lambda t: t.encode("utf-8")))
    event = {**draw(valid_events()), "id": _ID}
    name, cell = draw(st.sampled_from(_BAD_CSV_CELLS))
    if isinstance(cell, bytes):
        return _csv_row({**event, name: _MARK}).replace(_MARK.encode(), cell)
    cells = [_csv_cell(event[column]) for column in EVENT_COLUMNS]
    cells[EVENT_COLUMNS.index(name)] = cell
    return _csv_line(cells)


def _csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return repr(value) if isinstance(value, float) else str(value)


def _csv_row(event: dict) -> bytes:
    return _csv_line([_csv_cell(event[name]) for name in EVENT_COLUMNS])


def _csv_line(cells: list[str]) -> bytes:
    """One CSV record without its line end ("\r\n" as terminator, so "\r" and "\n" are quoted)."""
    out = io.StringIO()
    csv.writer(out).writerow(cells)
    return out.getvalue().removesuffix("\r\n").encode("utf-8")


def _render(items, prefix: str, fmt: str, ensure_ascii: bool) -> tuple[bytes, list[int]]:
    """The file's bytes and the (first) line number of each bad item."""
    lines = [",".join(EVENT_COLUMNS).encode()] if fmt == "csv" else []
    bad_numbers = []
    for index, (kind, payload) in enumerate(items):
        event_id = f"{'bad-' if kind == 'bad' else ''}{prefix}-{index}"
        if kind == "valid":
            event = {**payload, "id": event_id}  # type: ignore[dict-item]
            line = (_csv_row(event) if fmt == "csv"
                    else json.dumps(event, ensure_ascii=ensure_ascii).encode("utf-8"))
        else:
            line = payload.replace(_ID.encode(), event_id.encode())  # type: ignore[union-attr]
        if kind == "bad":
            bad_numbers.append(1 + sum(chunk.count(b"\n") + 1 for chunk in lines))
        lines.append(line)
    return b"\n".join(lines) + b"\n", bad_numbers


def _check_fuzzed_import(store: Store, path: Path, items, fmt: str, ensure_ascii: bool) -> None:
    prefix = f"f{uuid.uuid4().hex[:10]}"
    content, bad_numbers = _render(items, prefix, fmt, ensure_ascii)
    path.write_bytes(content)
    result = import_events(store, path)  # never raises for these files
    valid = {f"{prefix}-{i}": e for i, (kind, e) in enumerate(items) if kind == "valid"}
    assert (result.imported, result.skipped, result.invalid) == (len(valid), 0, len(bad_numbers))
    assert [line for line, _ in result.invalid_lines] == bad_numbers[:20]
    with store.connect() as conn:
        stored = {r.id: dict(r._mapping) for r in conn.execute(
            select(EVENTS).where(EVENTS.c.id.like(f"%{prefix}-%")))}
    assert set(stored) == set(valid)  # no bad line left anything behind
    for event_id, event in valid.items():
        assert stored[event_id] == {**event, "id": event_id, "ts": _naive_utc(event["ts"])}


def _naive_utc(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment.astimezone(timezone.utc).replace(tzinfo=None) if moment.tzinfo else moment


_FUZZ = settings(max_examples=40, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                        HealthCheck.data_too_large, HealthCheck.large_base_example])


@pytest.fixture
def fuzz_store(ledger_url, stores) -> Store:
    """One ledger for all of a fuzz test's examples (each example uses ids of its own)."""
    return stores(ledger_url)


@_FUZZ
@given(items=fuzz_items(bad_jsonl_lines), ensure_ascii=st.booleans())
def test_fuzzed_jsonl_counts_every_invalid_line(fuzz_store, tmp_path, items, ensure_ascii):
    _check_fuzzed_import(fuzz_store, tmp_path / "fuzz.jsonl", items, "jsonl", ensure_ascii)


@_FUZZ
@given(items=fuzz_items(bad_csv_lines))
def test_fuzzed_csv_counts_every_invalid_record(fuzz_store, tmp_path, items):
    _check_fuzzed_import(fuzz_store, tmp_path / "fuzz.csv", items, "csv", False)


def test_fuzzed_files_leave_strings_bounded(fuzz_store, tmp_path):
    """After hostile imports, no stored text exceeds the model's bounds (checked in SQL)."""
    items = [("valid", {**e}) for e in (_example_event(), _example_event())]
    items.append(("bad", json.dumps({**_example_event(), "id": _ID, "model": "q" * 5000}).encode()))
    _check_fuzzed_import(fuzz_store, tmp_path / "b.jsonl", items, "jsonl", False)
    _assert_bounded(fuzz_store)


def _example_event() -> dict:
    return {"ts": "2026-11-01T00:00:00Z", "source": "manual", "provider": "p", "model": "m",
            "resolved_model": None, "call_type": "chat", "streamed": False, "status": "ok",
            "error_type": None, "input_tokens": 3, "output_tokens": 1, "cache_read_tokens": 0,
            "cache_write_tokens": 0, "reasoning_tokens": 0, "cost": 0.5, "currency": "USD",
            "cost_status": "priced", "price_source": None, "latency_ms": None, "ttft_ms": None,
            "project": "x" * MAX_TEXT, "user": None, "session": "s" * MAX_ID, "tags": [],
            "request_id": None, "metadata": {}}


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_overlong_lines_are_invalid_not_fatal(sqlite_url, stores, tmp_path, fmt):
    event = {**_example_event(), "project": None, "session": None}
    items = [("valid", event), ("bad", json.dumps({**event, "id": _ID, "metadata": {
        "pad": "p" * (1 << 20)}}).encode()), ("valid", event)]
    if fmt == "csv":
        items[1] = ("bad", b"x," * (1 << 19) + b"x")
    _check_fuzzed_import(stores(sqlite_url), tmp_path / f"long.{fmt}", items, fmt, False)
