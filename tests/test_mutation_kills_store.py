"""The store's edges that its end-to-end tests pass over (each test here fails on a mutant that
survived `python benchmarks/mutation.py store`; benchmarks/RESULTS.md lists them): the whole
text of the errors a user reads when a ledger cannot be opened, tags that are not the cleaned
list of strings events carry (an import, a hand-built row), each SQLite connection's settings
and locks, an in-memory ledger shared by threads, and PostgreSQL's autocommit statements
(budget holds) on a lost connection."""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
import time
import uuid
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import fetch_events, pg_admin, rollup_calls, rollups_mismatch, wait_until
from sqlalchemy.exc import DatabaseError

from llmtally._errors import LedgerError
from llmtally._storage.migrations import Migration
from llmtally._storage.store import Store

FIX = "Move it aside, or point LLMTALLY_DATABASE_URL at another file."


def _opening_error(url: str, **options) -> str:
    with pytest.raises(LedgerError) as caught:
        Store(url, **options)
    return str(caught.value)


def test_a_file_that_is_no_database_is_named_with_its_fix(tmp_path):
    path = tmp_path / "list.db"
    path.write_bytes(b"this is not a database, it is a shopping list\n" * 200)
    assert _opening_error(f"sqlite:///{path}") == (
        f"{path} is not a usable SQLite database (file is not a database); it may be "
        f"corrupted. {FIX}")


def test_a_ledger_with_a_damaged_schema_is_named_as_corrupted(tmp_path):
    path = tmp_path / "damaged.db"
    Store(f"sqlite:///{path}").close()
    data = bytearray(path.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    data[page_size - 1000:page_size] = b"A" * 1000  # the end of page 1: the schema's own rows
    path.write_bytes(bytes(data))
    assert _opening_error(f"sqlite:///{path}") == (
        f"{path} is not a usable SQLite database (database disk image is malformed); it may "
        f"be corrupted. {FIX}")


@pytest.mark.parametrize(("url", "message"), [
    ("://nothing", "database_url '://nothing' is not a database URL; use a path such as "
     "'llmtally.db', 'sqlite:///path/to/ledger.db' or 'postgresql+psycopg://user@host/db'"),
    ("mysql://user:secret@host/db", "database_url 'mysql://user:***@host/db': llmtally "
     "supports SQLite and PostgreSQL, not 'mysql'"),
    ("postgresql+pg8000://user:secret@127.0.0.1/db", "database_url "
     "'postgresql+pg8000://user:***@127.0.0.1/db' needs a driver that is not installed "
     '(pip install "llmtally[postgres]"): No module named \'pg8000\''),
])
def test_a_url_llmtally_cannot_open_is_named_without_its_password(url, message):
    from llmtally._errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        Store(url)
    assert str(caught.value) == message


def _failing_migration(conn) -> None:
    conn.exec_driver_sql("SELECT * FROM no_such_table")


@pytest.mark.parametrize("where", ["file", "memory"])
def test_any_other_database_error_names_the_ledger_and_what_to_check(tmp_path, where):
    url, name = ((f"sqlite:///{tmp_path / 'ledger.db'}", str(tmp_path / "ledger.db"))
                 if where == "file" else ("sqlite://", ":memory:"))
    message = _opening_error(url, migrations=[Migration(1, "fails", _failing_migration)])
    assert message == (f"cannot open the SQLite ledger {name} (no such table: no_such_table); "
                       "check that the directory is writable, or point LLMTALLY_DATABASE_URL "
                       "at another file.")


BASE = {"ts": datetime(2026, 11, 25, 12), "source": "import", "provider": "openai",
        "model": "gpt-4o-mini", "call_type": "chat", "streamed": False, "status": "ok",
        "input_tokens": 1, "output_tokens": 1, "cache_read_tokens": 0, "cache_write_tokens": 0,
        "reasoning_tokens": 0, "cost": 0.0, "currency": "USD", "cost_status": "priced"}


def _stored_tags(path) -> dict[str, str]:
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT id, tags FROM llmtally_events"))


def test_tags_of_any_json_shape_are_stored_as_given(tmp_path):
    path = tmp_path / "ledger.db"
    # BASE has no resolved_model, tags, metadata...: missing keys are NULL
    rows = [dict(BASE, id="none"), dict(BASE, id="empty", tags=()),
            dict(BASE, id="tuple", tags=("a", "b")),
            dict(BASE, id="mixed", tags=["a", {"team": "x"}]),  # unhashable: no cache key
            dict(BASE, id="numbers", tags=[1, 2]),
            dict(BASE, id="objects", tags=[{"team": "x"}]),
            dict(BASE, id="plain", tags=["a", "b"]),
            dict(BASE, id="again", tags=["a", "b"])]  # the same list again: from the cache
    with closing(Store(f"sqlite:///{path}")) as store:
        assert store.insert_many(rows) == 8
        assert store.insert_many([]) == 0
    assert _stored_tags(path) == {"none": "[]", "empty": "[]", "tuple": '["a","b"]', "mixed": '["a",{"team":"x"}]',
                                  "numbers": "[1,2]", "objects": '[{"team":"x"}]', "plain": '["a","b"]', "again": '["a","b"]'}


@pytest.fixture
def seoul_clock(monkeypatch):
    """This process's local time zone is Seoul's (UTC+9), as on many users' machines."""
    monkeypatch.setenv("TZ", "Asia/Seoul")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_timestamps_are_stored_as_utc_whatever_the_machines_zone(ledger_url, seoul_clock):
    seoul = timezone(timedelta(hours=9))
    with closing(Store(ledger_url)) as store:
        assert store.insert_many([dict(BASE, id="naive", ts=datetime(2026, 11, 25, 12)),
                                  dict(BASE, id="aware", ts=datetime(2026, 11, 25, 21, tzinfo=seoul))]) == 2
    # (SQLite's driver gives the stored text, PostgreSQL's a datetime)
    assert {row["id"]: str(row["ts"])[:19] for row in fetch_events(ledger_url)} == {
        "naive": "2026-11-25 12:00:00", "aware": "2026-11-25 12:00:00"}
    assert rollups_mismatch(ledger_url) == []


def test_a_batch_of_more_than_500_ids_mostly_stored_tells_each_new_one(sqlite_url):
    with closing(Store(sqlite_url)) as store:
        assert store.insert_many([dict(BASE, id=f"s{n:04}") for n in range(1000)]) == 1000
        again = [dict(BASE, id=f"s{n:04}") for n in range(1000)] + [dict(BASE, id="new")]
        assert store.insert_many(again) == 1  # ids checked 500 at a time: the 501st too
    assert rollup_calls(sqlite_url) == len(fetch_events(sqlite_url)) == 1001
    assert rollups_mismatch(sqlite_url) == []


def _delete_ledger_file(path) -> None:
    """The SQLite file and its WAL companions gone, as a user's ``rm`` leaves them."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


class _DeletesTheFile:
    """Budget charges whose transaction finds the ledger file deleted under it, on the calls
    (1-based) named."""

    def __init__(self, path, on_calls):
        self.path, self.on_calls, self.calls = path, on_calls, 0

    def begin(self, conn, rows):
        self.calls += 1
        if self.calls in self.on_calls:
            _delete_ledger_file(self.path)
        return None

    def after_insert(self, conn, batch, inserted):
        return None


def test_a_batch_written_into_a_file_deleted_meanwhile_is_written_again(tmp_path, caplog):
    path = tmp_path / "ledger.db"
    charges = _DeletesTheFile(path, on_calls={1, 3})
    with closing(Store(f"sqlite:///{path}")) as store:
        with caplog.at_level(logging.WARNING, logger="llmtally"):
            assert store.insert_many([dict(BASE, id="a"), dict(BASE, id="b")], charges) == 2
        assert charges.calls == 2 and store.generation == 1
        assert [r.getMessage() for r in caplog.records] == [
            f"llmtally: the SQLite ledger {path} was deleted or replaced while in use; events "
            "now go to the file at that path (created if missing)"]
        assert store.insert_many([dict(BASE, id="c")], charges) == 1  # deleted again
        assert charges.calls == 4 and store.generation == 2
    assert [row["id"] for row in fetch_events(f"sqlite:///{path}")] == ["c"]


def test_a_deleted_ledger_that_cannot_be_made_again_is_an_outage(tmp_path):
    from llmtally._storage.store_outage import is_outage

    path = tmp_path / "ledger.db"
    with closing(Store(f"sqlite:///{path}")) as store:
        _delete_ledger_file(path)
        path.symlink_to(tmp_path / "missing" / "ledger.db")  # where nothing can be created
        with pytest.raises(OSError, match="cannot create the SQLite ledger") as caught:
            store.insert_many([dict(BASE, id="a")])
        assert is_outage(caught.value)  # the events wait in the writer, none is set aside


def test_migrations_run_holding_sqlites_write_lock_from_their_start(tmp_path):
    path = tmp_path / "ledger.db"
    Store(f"sqlite:///{path}", migrations=[]).close()  # a ledger at version 0
    seen: list[bool] = []
    probe = Migration(1, "probe", lambda conn: seen.append(_try_write_lock(path)))
    Store(f"sqlite:///{path}", migrations=[probe]).close()
    assert seen == [False]  # another process's migration waits for this one


def test_a_path_that_cannot_be_created_names_the_reason(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert _opening_error(f"sqlite:///{blocker / 'ledger.db'}") == (
        f"cannot create the SQLite ledger {blocker / 'ledger.db'} (File exists); choose a "
        "writable location with LLMTALLY_DATABASE_URL or Tally('sqlite:///path/to/ledger.db').")


def _try_write_lock(path) -> bool:
    """Whether another connection can take the file's write lock right now (no busy wait)."""
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError as exc:
        assert "locked" in str(exc)
        return False
    finally:
        other.close()


def test_a_write_takes_sqlites_lock_at_its_start_and_a_read_never_takes_it(tmp_path):
    path = tmp_path / "ledger.db"
    with closing(Store(f"sqlite:///{path}")) as store:
        assert _try_write_lock(path)
        with store.write():  # before any statement: writers queue here, not fail mid-way
            assert not _try_write_lock(path)
        assert _try_write_lock(path)
        with store.connect() as conn:  # a read transaction, open
            assert conn.exec_driver_sql("SELECT COUNT(*) FROM llmtally_events").scalar() == 0
            assert conn.in_transaction()
            assert _try_write_lock(path)  # a report never holds the writer up


@pytest.mark.parametrize(("options", "synchronous"), [({}, 1), ({"durable_commits": True}, 2)])
def test_each_sqlite_connection_waits_for_locks_and_syncs_as_asked(tmp_path, options, synchronous):
    with closing(Store(f"sqlite:///{tmp_path / 'ledger.db'}", **options)) as store:  # NORMAL, or FULL
        with store.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == synchronous
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000  # ms
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_an_in_memory_ledger_is_one_database_for_every_thread(url):
    written: list[int] = []
    with closing(Store(url)) as store:
        worker = threading.Thread(  # as the writer thread does
            target=lambda: written.append(store.insert_many([dict(BASE, id=f"m{n}") for n in range(3)])))
        worker.start()
        worker.join()
        assert written == [3]
        with store.connect() as conn:
            assert conn.exec_driver_sql("SELECT COUNT(*) FROM llmtally_events").scalar() == 3
        assert store.full_disk_note() == ""


def _migrating(path) -> sqlite3.Connection:
    """Another process creating the same new ledger: it holds the write lock (check_same_thread
    off, so a timer thread may end its transaction)."""
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("CREATE TABLE migrating (x)")
    return holder


def test_switching_to_wal_waits_while_another_connection_migrates(tmp_path):
    from sqlalchemy import create_engine

    from llmtally._storage.store_connections import use_wal

    path = tmp_path / "new.db"
    holder = _migrating(path)
    release = threading.Timer(0.3, holder.execute, ["COMMIT"])
    release.start()
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    try:
        use_wal(engine)  # "database is locked" at once, tried again until the lock is gone
        release.join()
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        release.cancel()
        engine.dispose()
        holder.close()


def test_switching_to_wal_under_a_lock_that_stays_is_an_error(tmp_path):
    from sqlalchemy import create_engine

    from llmtally._storage.store_connections import use_wal

    path = tmp_path / "new.db"
    holder = _migrating(path)
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            use_wal(engine)  # ~5 s of tries, then the error: never a ledger left out of WAL
    finally:
        engine.dispose()
        holder.close()


def test_switching_to_wal_gives_up_on_an_error_other_than_a_lock(tmp_path):
    from sqlalchemy import create_engine

    from llmtally._storage.store_connections import use_wal

    path = tmp_path / "list.db"
    path.write_bytes(b"not a database\n" * 200)
    engine = create_engine(f"sqlite:///{path}")
    try:
        with pytest.raises(sqlite3.DatabaseError, match="file is not a database"):
            use_wal(engine)
    finally:
        engine.dispose()


# -- PostgreSQL: the autocommit statements of budget holds -----------------------------------

def _session(store: Store) -> int:
    """The PostgreSQL backend serving the store's pooled connection."""
    with store.connect() as conn:
        return int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar())


def _terminate(backend: int) -> None:
    with pg_admin() as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [backend])


def _backends(name: str) -> int:
    with pg_admin() as admin:
        return admin.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                             [name]).fetchone()[0]


def _named(pg_url: str, name: str) -> str:
    return f"{pg_url}&application_name={name}"


def test_closing_a_store_closes_its_autocommit_connections_too(pg_url):
    name = f"llmtally-close-{uuid.uuid4().hex[:8]}"
    store = Store(_named(pg_url, name))
    assert store.run_statement("SELECT 1", {}) == [(1,)]
    assert _backends(name) == 2  # the engine that migrated, and the autocommit one
    store.close()
    assert wait_until(lambda: _backends(name) == 0, timeout=10)


def test_a_statement_on_a_dead_connection_runs_again_on_a_new_one(pg_url):
    name = f"llmtally-dead-{uuid.uuid4().hex[:8]}"
    with closing(Store(_named(pg_url, name))) as store:
        [(pid,)] = store.run_statement("SELECT pg_backend_pid()", {})
        _terminate(pid)
        assert wait_until(lambda: _backends(name) == 1, timeout=10)  # the migrator
        [(again,)] = store.run_statement("SELECT pg_backend_pid()", {})  # not an error
        assert again != pid


@pytest.mark.parametrize(("statement", "error", "tries"), [
    ("SELECT nextval('tries') / 0", "DataError: .*division by zero", 1),  # an error: once
    # a statement that loses its connection each time: the retry, then the error
    ("SELECT nextval('tries'), pg_terminate_backend(pg_backend_pid())",
     "OperationalError: .*terminat", 2),
], ids=["failing", "losing its connection"])
def test_a_statement_is_tried_again_only_on_a_new_connection(pg_url, statement, error, tries):
    with closing(Store(pg_url)) as store:
        with store.write() as conn:  # nextval is not undone with its statement: it counts tries
            conn.exec_driver_sql("CREATE SEQUENCE tries")
        with pytest.raises(DatabaseError) as caught:
            store.run_statement(statement, {})
        assert re.match(error, f"{type(caught.value).__name__}: {caught.value}")
        assert store.run_statement("SELECT last_value FROM tries", {}) == [(tries,)]


def test_a_forked_child_leaves_its_parents_connections_open(pg_url):
    with closing(Store(pg_url)) as store:
        before = _session(store)
        pid = os.fork()
        if pid == 0:  # the child: what Tally does after a fork (its writer restarts)
            try:
                store.forget_connections()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert _session(store) == before  # the child did not end it


def test_a_ledger_whose_directory_is_gone_is_not_called_full(tmp_path):
    import shutil

    with closing(Store(f"sqlite:///{tmp_path / 'gone' / 'ledger.db'}")) as store:
        shutil.rmtree(tmp_path / "gone")  # the outage message asks the disk: no answer, no note
        assert store.full_disk_note() == ""


def test_a_pooled_connection_the_server_ended_is_replaced_unseen(pg_url):
    with closing(Store(pg_url)) as store:
        before = _session(store)
        _terminate(before)  # a server restart, a proxy's idle cut
        assert _session(store) != before  # and no error


def test_a_server_that_never_answers_is_an_error_after_the_connect_timeout():
    import socket

    from sqlalchemy.exc import OperationalError

    silent = socket.socket()  # accepts TCP (the kernel's backlog) and never says a word
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    store = Store(f"postgresql+psycopg://u@127.0.0.1:{silent.getsockname()[1]}/db")
    started = time.monotonic()
    try:
        with pytest.raises(OperationalError, match="timeout"):
            store.connect()
        assert time.monotonic() - started < 30  # PG_CONNECT_TIMEOUT_S, 5 s; not a hang
    finally:
        store.close()
        silent.close()


def test_sqlite_urls_as_users_type_them(tmp_path, monkeypatch):
    from llmtally._storage.store_urls import normalize_url

    monkeypatch.chdir(tmp_path)
    assert normalize_url("sqlite:///") == "sqlite:///"  # SQLAlchemy's in-memory database
    assert normalize_url("rel/l.db") == f"sqlite:///{tmp_path}/rel/l.db"  # a bare path
    assert normalize_url("sqlite:///rel/l.db") == f"sqlite:///{tmp_path}/rel/l.db"
    assert normalize_url("sqlite:///my dir/l.db?timeout=5") == f"sqlite:///{tmp_path}/my dir/l.db?timeout=5"
    # only the first "?" starts the query: one inside a value stays where it is
    assert normalize_url("sqlite:///rel/l.db?timeout=5&note=a?b") == \
        f"sqlite:///{tmp_path}/rel/l.db?timeout=5&note=a?b"


def test_a_sqlite_driver_that_is_not_installed_is_named_without_a_wrong_hint(tmp_path):
    from llmtally._errors import ConfigError

    url = f"sqlite+pysqlcipher:///{tmp_path / 'ledger.db'}"
    with pytest.raises(ConfigError) as caught:
        Store(url)
    assert str(caught.value) == (f"database_url {url!r} needs a driver that is not installed: "
                                 "No module named 'pysqlcipher3'")
