"""How the store's connections are set up: the SQLite file (private, in WAL mode) and each new
connection's settings, SQLite's and those of PostgreSQL's autocommit engine."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, event

from .._errors import LedgerError

__all__ = ["PG_CONNECT_TIMEOUT_S", "SQLITE_BUSY_TIMEOUT_S", "create_private_file", "use_wal",
           "listen_sqlite", "listen_pg_autocommit"]

PG_CONNECT_TIMEOUT_S = 5
SQLITE_BUSY_TIMEOUT_S = 30
_WAL_ATTEMPTS = 100  # 50 ms apart


def create_private_file(path: Path, error: type[Exception] = LedgerError) -> tuple[int, int]:
    """Create the SQLite file (and its directory) readable by its owner only; return its
    (device, inode), which identifies it while it is in use.

    SQLite gives its -wal and -shm files the main file's permissions, so they stay private too.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            info = os.fstat(fd)
        finally:
            os.close(fd)
        return info.st_dev, info.st_ino
    except OSError as exc:
        raise error(
            f"cannot create the SQLite ledger {path} ({exc.strerror or exc}); choose a writable "
            "location with LLMTALLY_DATABASE_URL or Tally('sqlite:///path/to/ledger.db')."
        ) from exc


def listen_sqlite(engine: Engine, *, durable_commits: bool) -> None:
    """Set up each new SQLite connection of ``engine``: SQLAlchemy emits BEGIN (IMMEDIATE for
    a connection run with ``sqlite_immediate=True``); ``synchronous`` is NORMAL, or FULL with
    ``durable_commits`` (durability="sync")."""
    event.listen(engine, "connect", _sqlite_on_connect)
    if durable_commits:
        event.listen(engine, "connect", _sqlite_full_sync)
    event.listen(engine, "begin", _sqlite_on_begin)


def listen_pg_autocommit(engine: Engine) -> None:
    """Set up each new connection of PostgreSQL's autocommit engine: no wait for the WAL flush."""
    event.listen(engine, "connect", _pg_no_commit_wait)


def _sqlite_on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite's own handling defers it).
    dbapi_conn.isolation_level = None
    dbapi_conn.execute("PRAGMA synchronous=NORMAL")


def _pg_no_commit_wait(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.autocommit = True
    dbapi_conn.execute("SET synchronous_commit TO OFF")


def _sqlite_full_sync(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
    dbapi_conn.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns


def use_wal(engine: Engine) -> None:
    """Switch the file to WAL (persistent; readers then never block the writer).

    The switch needs the file to itself, and SQLite answers "database is locked" at once,
    without its busy wait, when another process is opening the same new ledger at that moment
    (its migration holds the write lock): so it is tried again for up to ~5 s.
    """
    for attempt in range(_WAL_ATTEMPTS):
        raw = engine.raw_connection()
        try:
            # a new pool connection always has its driver connection
            raw.driver_connection.execute("PRAGMA journal_mode=WAL")  # type: ignore[union-attr]
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == _WAL_ATTEMPTS - 1:
                raise
        finally:
            raw.close()
        time.sleep(0.05)


def _sqlite_on_begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get("sqlite_immediate", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
