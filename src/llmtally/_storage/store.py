"""The ledger database: opening it (SQLite or PostgreSQL), migrating it, writing batches.

SQLite files are created with mode 0600 in a directory created on demand, run in WAL mode,
and take the write lock up front (``BEGIN IMMEDIATE``) so concurrent writers queue instead
of failing (store_connections.py sets that up). PostgreSQL is reached through psycopg 3
(``pip install "llmtally[postgres]"``). What users type as a URL: store_urls.py.
"""

from __future__ import annotations

import contextlib
import functools
import json
import operator
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, NoSuchModuleError
from sqlalchemy.pool import StaticPool

from .._errors import ConfigError, LedgerError
from .._log import warn_limited
from . import rollups
from .many_rows import execute_rows
from .migrations import MIGRATIONS, Migration, migrate
from .pg_rows import copy_new_ids
from .store_connections import (
    PG_CONNECT_TIMEOUT_S,
    SQLITE_BUSY_TIMEOUT_S,
    create_private_file,
    listen_pg_autocommit,
    listen_sqlite,
    use_wal,
)
from .store_urls import normalize_url
from .tables import EVENT_COLUMNS, EVENTS_TABLE, INSERT_EVENTS, SKIP_STORED_IDS

__all__ = ["Store", "InsertHook", "normalize_url"]  # normalize_url: defined in store_urls


class InsertHook(Protocol):
    """What runs inside an inserting transaction (the budgets' :class:`EventCharges`)."""

    def begin(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> Any | None: ...

    def after_insert(self, conn: Connection, batch: Any,
                     inserted: Sequence[Mapping[str, Any]]) -> Callable[[], None] | None: ...


class Store:
    """A migrated ledger database that events can be written to in batches.

    SQLite is opened and migrated at construction (a bad path or file is a clear error right
    away). PostgreSQL is migrated on first successful use, so an application starts even while
    its database is down; events wait in the writer meanwhile.
    """

    def __init__(self, url: str, *, migrations: Sequence[Migration] = MIGRATIONS,
                 durable_commits: bool = False) -> None:
        self.url = normalize_url(url)
        self._migrations = migrations
        self._migrated = False
        self._durable_commits = durable_commits  # SQLite synchronous=FULL (durability="sync")
        self._file_id: tuple[int, int] | None = None  # the SQLite file's (device, inode)
        self.generation = 0  # +1 each time the SQLite file was replaced under us
        try:
            parsed = make_url(self.url)
        except ArgumentError as exc:
            raise ConfigError(
                f"database_url {url!r} is not a database URL; use a path such as 'llmtally.db', "
                "'sqlite:///path/to/ledger.db' or 'postgresql+psycopg://user@host/db'"
            ) from exc
        self.dialect = parsed.get_backend_name()
        self.display_url = parsed.render_as_string(hide_password=True)
        if self.dialect == "sqlite":
            self.engine = self._open_sqlite(parsed.database or "")
            self.ensure_schema()
        elif self.dialect == "postgresql":
            self.engine = self._create_engine(
                self.url, pool_pre_ping=True,
                connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S},
            )
        else:
            raise ConfigError(
                f"database_url {self.display_url!r}: llmtally supports SQLite and PostgreSQL, "
                f"not {self.dialect!r}"
            )

    # -- opening -------------------------------------------------------------------------

    def _create_engine(self, url: str, **kwargs: Any) -> Engine:
        try:
            return create_engine(url, **kwargs)
        except (NoSuchModuleError, ModuleNotFoundError) as exc:
            hint = ' (pip install "llmtally[postgres]")' if self.dialect == "postgresql" else ""
            raise ConfigError(
                f"database_url {self.display_url!r} needs a driver that is not installed{hint}: {exc}"
            ) from exc

    def _open_sqlite(self, database: str) -> Engine:
        if database in ("", ":memory:"):
            # One shared connection, so the writer thread sees the same in-memory database.
            engine = self._create_engine(
                "sqlite://", poolclass=StaticPool,
                connect_args={"check_same_thread": False},
            )
        else:
            path = Path(database)
            self.path = path
            self._file_id = create_private_file(path)
            engine = self._create_engine(
                self.url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
            )
        listen_sqlite(engine, durable_commits=self._durable_commits)
        return engine

    def ensure_schema(self) -> None:
        """Create or upgrade the schema (once per Store); raise LedgerError if it cannot be used."""
        if self._migrated:
            return
        try:
            with self.engine.connect().execution_options(sqlite_immediate=True) as conn:
                with conn.begin():
                    migrate(conn, self._migrations)
            if self.dialect == "sqlite":
                use_wal(self.engine)  # only now that the file is known to be ours
        except LedgerError:
            raise
        except DatabaseError as exc:
            if self.dialect == "sqlite":
                raise LedgerError(self._sqlite_problem(exc)) from exc
            raise
        self._migrated = True

    def _sqlite_problem(self, exc: DatabaseError) -> str:
        cause = str(getattr(exc, "orig", exc))
        where = getattr(self, "path", ":memory:")
        if "not a database" in cause or "malformed" in cause:
            return (f"{where} is not a usable SQLite database ({cause}); it may be corrupted. "
                    "Move it aside, or point LLMTALLY_DATABASE_URL at another file.")
        return (f"cannot open the SQLite ledger {where} ({cause}); check that the directory "
                "is writable, or point LLMTALLY_DATABASE_URL at another file.")

    # -- writing -------------------------------------------------------------------------

    def insert_many(self, rows: Sequence[Mapping[str, Any]],
                    charges: InsertHook | None = None) -> int:
        """Insert events in one transaction; ids already stored are skipped. Returns rows inserted.

        Rows go to the driver as tuples, converted here once (timestamps in SQLAlchemy's SQLite
        format, JSON as text), in as few statements as it takes (many_rows.py).
        ``charges`` (budgets) sees the rows really inserted, in the same transaction; what it
        asks to run after the commit runs then.
        """
        if not rows:
            return 0
        self._follow_moved_file()
        self.ensure_schema()
        with self.write() as conn:
            inserted, after = self.insert_rows(conn, rows, charges)
        if self._follow_moved_file():  # deleted or replaced while we wrote: write it again
            self.ensure_schema()
            with self.write() as conn:
                inserted, after = self.insert_rows(conn, rows, charges)
        if after is not None:
            after()
        return inserted

    def insert_rows(self, conn: Connection, rows: Sequence[Mapping[str, Any]],
                    charges: InsertHook | None = None) -> tuple[int, Callable[[], None] | None]:
        """:meth:`insert_many` inside the caller's write transaction: returns the number of
        rows inserted and the action ``charges`` wants run after the commit (or None).

        The rows really inserted (the first row of each id not stored before) are added to the
        hourly rollups and charged to the budgets, in this transaction."""
        params = [driver_row(row, self._sqlite_ts) for row in rows]
        batch = charges.begin(conn, rows) if charges is not None else None
        fresh = self._insert_new(conn, rows, params)
        if fresh is None:  # every row
            rollups.add(conn, rollups.Delta(self._sqlite_ts).add_all(params))
            fresh_rows = rows
        else:
            rollups.add(conn, rollups.Delta(self._sqlite_ts).add_all(params[i] for i in fresh))
            fresh_rows = [rows[i] for i in fresh]
        if batch is None:
            return len(fresh_rows), None
        return len(fresh_rows), charges.after_insert(  # type: ignore[union-attr]
            conn, batch, fresh_rows)

    def _insert_new(self, conn: Connection, rows: Sequence[Mapping[str, Any]],
                    params: list[tuple[Any, ...]]) -> list[int] | None:
        """Insert, returning the positions of the rows stored (the first of each id not
        stored before), or None when every row was.

        PostgreSQL: ``COPY`` through a temporary table says which ids were new (pg_rows.py).
        SQLite: almost always every row is new: one insert whose row count says so. When it
        says otherwise (a replay, an import, an id twice in the batch), the insert is undone
        to a savepoint and done again, telling new ids from stored ones; this transaction
        holds the write lock, so what is stored cannot change meanwhile."""
        if self.dialect == "postgresql":
            new_ids = copy_new_ids(conn, params)
            return None if len(new_ids) == len(rows) else _first_rows(rows, new_ids)
        conn.exec_driver_sql("SAVEPOINT llmtally_insert")
        if execute_rows(conn, INSERT_EVENTS, SKIP_STORED_IDS, params) == len(params):
            conn.exec_driver_sql("RELEASE SAVEPOINT llmtally_insert")
            return None
        conn.exec_driver_sql("ROLLBACK TO SAVEPOINT llmtally_insert")
        conn.exec_driver_sql("RELEASE SAVEPOINT llmtally_insert")
        ids = list(dict.fromkeys(row["id"] for row in rows))
        stored: set[str] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            stored.update(found for (found,) in conn.exec_driver_sql(
                f"SELECT id FROM {EVENTS_TABLE} WHERE id IN ({', '.join('?' * len(chunk))})",
                tuple(chunk)))
        execute_rows(conn, INSERT_EVENTS, SKIP_STORED_IDS, params)
        return _first_rows(rows, set(ids) - stored)

    def _follow_moved_file(self) -> bool:
        """SQLite: if the ledger file was deleted, renamed or replaced while open, stop writing
        into the old file (on Linux an open connection would keep writing into the unlinked
        inode, and those events would be lost) and open, or create, the file now at the path.
        Returns True if it had moved. An unusable new file raises, like any outage."""
        if self._file_id is None:
            return False
        try:
            info = os.stat(self.path)
            if (info.st_dev, info.st_ino) == self._file_id:
                return False
        except FileNotFoundError:
            pass
        warn_limited("ledger-moved", "llmtally: the SQLite ledger %s was deleted or replaced "
                     "while in use; events now go to the file at that path (created if missing)",
                     self.path)
        self.engine.dispose()  # closes (and checkpoints) the connections to the old file
        self.generation += 1  # what was known of the old file (budget counters...) is not so
        self._file_id = create_private_file(self.path, error=OSError)
        self._migrated = False
        return True

    def full_disk_note(self) -> str:
        """``"; its disk is full"`` when the SQLite ledger's file system has less than 1 MiB
        left, else ``""``: for the outage message, as SQLite reports some writes refused for
        space (growing the WAL index, say) as a plain "disk I/O error"."""
        if getattr(self, "path", None) is None:
            return ""
        try:
            space = os.statvfs(self.path.parent)
        except OSError:
            return ""
        return "; its disk is full" if space.f_bavail * space.f_frsize < _NEARLY_FULL else ""

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A connection in a write transaction (SQLite takes its lock up front); commits at the
        end of the block, rolls back if it raises."""
        self.ensure_schema()
        with self.engine.connect().execution_options(sqlite_immediate=True) as conn:
            with conn.begin():
                yield conn

    def run_statement(self, sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """PostgreSQL only: run one statement as its own transaction and return its rows.

        Budget holds use this: a statement that does all its work (CTEs) commits in a single
        round trip, and it does not wait for the WAL flush (``synchronous_commit=off``: a
        database crash may forget the last few milliseconds of holds; row locks still
        serialise them). A connection found dead is replaced and the statement tried once more.
        """
        self.ensure_schema()
        for attempt in (1, 2):
            try:
                with self._autocommit_engine.connect() as conn:
                    return [tuple(row) for row in conn.exec_driver_sql(sql, params)]
            except DatabaseError as exc:
                if attempt == 2 or not getattr(exc, "connection_invalidated", False):
                    raise
        raise AssertionError("unreachable")

    @functools.cached_property
    def _autocommit_engine(self) -> Engine:
        engine = self._create_engine(self.url, isolation_level="AUTOCOMMIT",
                                     connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S})
        listen_pg_autocommit(engine)
        return engine

    @property
    def _sqlite_ts(self) -> bool:
        return self.dialect == "sqlite"

    def connect(self) -> Connection:
        """A connection for reading (the schema is ensured first)."""
        self.ensure_schema()
        return self.engine.connect()

    def forget_connections(self) -> None:
        """After a fork: drop the parent's pooled connections without closing them under it."""
        for engine in self._engines():
            engine.dispose(close=False)

    def close(self) -> None:
        for engine in self._engines():
            engine.dispose()

    def _engines(self) -> list[Engine]:
        extra = self.__dict__.get("_autocommit_engine")
        return [self.engine] + ([extra] if extra is not None else [])


_NEARLY_FULL = 1 << 20  # bytes: less free space than this counts as a full disk
_ROW_VALUES = operator.itemgetter(*EVENT_COLUMNS)
_TS, _TAGS, _METADATA = (EVENT_COLUMNS.index(name) for name in ("ts", "tags", "metadata"))


def _first_rows(rows: Sequence[Mapping[str, Any]], new_ids: set[str]) -> list[int]:
    """The positions in ``rows`` of the first row of each id in ``new_ids`` (the one stored)."""
    fresh: list[int] = []
    for position, row in enumerate(rows):
        if row["id"] in new_ids:
            new_ids.discard(row["id"])
            fresh.append(position)
    return fresh


def driver_row(row: Mapping[str, Any], sqlite_ts: bool) -> tuple[Any, ...]:
    """One event as DB-API parameters in column order (missing keys are NULL)."""
    try:
        values = list(_ROW_VALUES(row))
    except KeyError:
        values = [row.get(name) for name in EVENT_COLUMNS]
    tags, metadata = values[_TAGS], values[_METADATA]
    values[_TAGS] = _tags_text(tags) if tags else "[]"
    values[_METADATA] = _json_text(metadata) if metadata else "{}"
    ts = values[_TS]
    if isinstance(ts, datetime):
        if ts.tzinfo is not None:  # events carry naive UTC; an aware one (an import) is made so
            ts = values[_TS] = ts.astimezone(timezone.utc).replace(tzinfo=None)
        if sqlite_ts:
            values[_TS] = ts.isoformat(sep=" ", timespec="microseconds")  # SQLAlchemy's SQLite form
    return tuple(values)


_json_text = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_tag_texts: dict[tuple[Any, ...], str] = {}


def _tags_text(tags: Any) -> str:
    """Tags as JSON text. The same few tag lists come back on most events, and encoding one
    costs more than the rest of the row, so up to 256 are kept (all dropped when full)."""
    if type(tags) is not list or not all(type(tag) is str for tag in tags):
        return _json_text(tags)  # not the cleaned list of strings events carry
    key = tuple(tags)
    text = _tag_texts.get(key)
    if text is None:
        if len(_tag_texts) >= 256:
            _tag_texts.clear()
        text = _tag_texts[key] = _json_text(tags)
    return text
