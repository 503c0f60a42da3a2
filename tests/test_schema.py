"""Schema versions: upgraded in place, newer or foreign schemas refused and left untouched."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from conftest import fetch_events
from sqlalchemy import create_engine, inspect, text

from llmtally import LedgerError, Tally, UsageEvent
from llmtally._storage.migrations import MIGRATIONS, Migration
from llmtally._storage.store import Store

FIXTURES = Path(__file__).parent / "fixtures"


def _m002_add_note(conn) -> None:
    """A stand-in for the next real migration: adds a column, keeps every row."""
    conn.execute(text("ALTER TABLE llmtally_events ADD COLUMN note VARCHAR(50)"))


def _m002_broken(conn) -> None:
    conn.execute(text("ALTER TABLE llmtally_events ADD COLUMN note VARCHAR(50)"))
    raise RuntimeError("migration failed half-way")


NEXT = (*MIGRATIONS, Migration(len(MIGRATIONS) + 1, "test_note", _m002_add_note))
BROKEN = (*MIGRATIONS, Migration(len(MIGRATIONS) + 1, "test_broken", _m002_broken))


def _version(url: str) -> int:
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        version = conn.execute(text("SELECT max(version) FROM llmtally_schema")).scalar()
    engine.dispose()
    return version


def _columns(url: str) -> set[str]:
    engine = create_engine(url)
    names = {c["name"] for c in inspect(engine).get_columns("llmtally_events")}
    engine.dispose()
    return names


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_migrated_table_matches_the_model(ledger_url):
    Store(ledger_url).ensure_schema()
    engine = create_engine(ledger_url)
    columns = {c["name"]: c for c in inspect(engine).get_columns("llmtally_events")}
    indexes = {i["name"] for i in inspect(engine).get_indexes("llmtally_events")}
    engine.dispose()
    model = UsageEvent.__table__
    assert set(columns) == {c.name for c in model.columns}
    for column in model.columns:
        if not column.primary_key:
            assert columns[column.name]["nullable"] == column.nullable, column.name
    assert indexes == {i.name for i in model.indexes}


def test_a_v1_ledger_file_opens_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.db"
    shutil.copy(FIXTURES / "ledger-v1.sqlite", path)
    url = f"sqlite:///{path}"
    before = fetch_events(url)
    assert len(before) == 3
    with Tally(url, price_map="bundled", spill_path=tmp_path / "s.jsonl") as tally:
        assert sum(r.calls for r in tally.summary(since="2000-01-01")) == 3
    assert fetch_events(url) == before
    assert _version(url) == MIGRATIONS[-1].version


def test_an_older_ledger_is_upgraded_in_place(ledger_url, tmp_path):
    with Tally(ledger_url, price_map="bundled", spill_path=tmp_path / "s.jsonl") as tally:
        for i in range(5):
            tally.record(model="gpt-4o-mini", input_tokens=i)
    before = fetch_events(ledger_url)
    store = Store(ledger_url, migrations=NEXT)
    store.ensure_schema()
    store.close()
    assert _version(ledger_url) == NEXT[-1].version
    assert "note" in _columns(ledger_url)
    after = fetch_events(ledger_url)
    assert [{k: v for k, v in row.items() if k != "note"} for row in after] == before


def test_a_failed_migration_changes_nothing(ledger_url):
    Store(ledger_url).ensure_schema()
    with pytest.raises(RuntimeError, match="half-way"):
        Store(ledger_url, migrations=BROKEN).ensure_schema()
    assert _version(ledger_url) == MIGRATIONS[-1].version
    assert "note" not in _columns(ledger_url)


def test_a_newer_schema_is_refused(ledger_url):
    Store(ledger_url).ensure_schema()
    engine = create_engine(ledger_url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO llmtally_schema (version, name, applied_at) "
                          "VALUES (99, 'future', CURRENT_TIMESTAMP)"))
    engine.dispose()
    with pytest.raises(LedgerError, match=r"schema version 99.*newer llmtally.*Upgrade"):
        Store(ledger_url).ensure_schema()
    assert _version(ledger_url) == 99


def test_a_foreign_table_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "foreign.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE llmtally_events (id INTEGER, something TEXT)"))
        conn.execute(text("INSERT INTO llmtally_events VALUES (1, 'theirs')"))
    engine.dispose()
    digest = _digest(path)
    with pytest.raises(LedgerError, match="not created by llmtally"):
        Tally(f"sqlite:///{path}", spill_path=tmp_path / "s.jsonl")
    assert _digest(path) == digest


def test_a_foreign_schema_table_is_refused(tmp_path):
    path = tmp_path / "foreign2.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE llmtally_schema (what TEXT)"))
    engine.dispose()
    with pytest.raises(LedgerError, match="not written by llmtally"):
        Store(f"sqlite:///{path}")


def test_a_corrupted_sqlite_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.db"
    path.write_bytes(b"this is not a database, it is a shopping list\n" * 200)
    digest = _digest(path)
    with pytest.raises(LedgerError, match="not a usable SQLite database.*Move it aside"):
        Tally(f"sqlite:///{path}", spill_path=tmp_path / "s.jsonl")
    assert _digest(path) == digest


def test_a_path_that_cannot_be_created_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(LedgerError, match="cannot create the SQLite ledger.*LLMTALLY_DATABASE_URL"):
        Tally(f"sqlite:///{blocker / 'ledger.db'}")


def test_a_read_only_directory_is_a_clear_error(tmp_path):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    tmp_path.chmod(0o755)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop root (which ignores permissions), try, report through the pipe
        message = "no error"
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            Store(f"sqlite:///{readonly / 'ledger.db'}")  # (nobody may not read prices.json here)
        except LedgerError as exc:
            message = f"LedgerError: {exc}"
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            message = f"{type(exc).__name__}: {exc}"
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end) as pipe:
        message = pipe.read()
    assert message.startswith("LedgerError: cannot create the SQLite ledger"), message
    assert "Permission denied" in message and "LLMTALLY_DATABASE_URL" in message
    assert not (readonly / "ledger.db").exists()


def test_unknown_database_kinds_are_refused(tmp_path):
    from llmtally import ConfigError

    with pytest.raises(ConfigError, match="supports SQLite and PostgreSQL"):
        Tally("mysql://root@127.0.0.1/test")
    with pytest.raises(ConfigError, match="not a database URL"):
        Tally("::not a url::///")
    with pytest.raises(ConfigError, match="empty"):
        Tally("   ")


def test_every_declared_table_matches_what_the_migrations_made(ledger_url):
    """The live SQLModel declarations (events and budgets alike) and the migrations' frozen DDL
    agree on each table: columns, their types as the database reports them, nullability,
    primary keys and indexes."""
    from llmtally._budgets.tables import BudgetAlertSent, BudgetCounter, BudgetDefinition, BudgetHold

    Store(ledger_url).ensure_schema()
    engine = create_engine(ledger_url)
    seen = inspect(engine)
    for model in (UsageEvent, BudgetCounter, BudgetHold, BudgetAlertSent, BudgetDefinition):
        table = model.__table__
        columns = {c["name"]: c for c in seen.get_columns(table.name)}
        assert set(columns) == {c.name for c in table.columns}, table.name
        for column in table.columns:
            made = columns[column.name]
            declared = column.type.compile(dialect=engine.dialect)
            reported = made["type"].compile(dialect=engine.dialect).split("(")[0]
            # PostgreSQL reports FLOAT as its storage type
            assert {"DOUBLE PRECISION": "FLOAT"}.get(reported, reported) == declared.split("(")[0], \
                (table.name, column.name)
            assert getattr(made["type"], "length", None) == getattr(column.type, "length", None), \
                (table.name, column.name)
            if not column.primary_key:
                assert made["nullable"] == column.nullable, (table.name, column.name)
        assert seen.get_pk_constraint(table.name)["constrained_columns"] == \
            [c.name for c in table.primary_key.columns], table.name
        assert {i["name"] for i in seen.get_indexes(table.name)} == {i.name for i in table.indexes}
    engine.dispose()
