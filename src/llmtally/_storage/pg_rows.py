"""Many rows into PostgreSQL in a few round trips: events through ``COPY``, rollup rows in
multi-row ``VALUES`` statements.

psycopg's ``executemany`` pipelines one ``INSERT`` per row and lets go of the GIL around each
network write and read; a thread that wants the GIL back waits up to the switch interval
(5 ms) while another runs Python. While the caller's thread recorded calls, the writer thus
stored none of 30,000 events until the caller stopped, and ``executemany`` inserted 380
events/s next to a busy Python thread against 16,000 alone. ``COPY`` sends a batch in a few
large writes: 7,500 events/s next to a busy thread, 28,700 alone (``benchmarks/ingest.py``
measures the whole path). A 1,000-row ``VALUES`` statement of events was a quarter as fast as
``executemany``; for the rollups' ~100 rows a batch one statement is right, written with
``$n`` placeholders (psycopg's ``%s`` form is parsed with a regex on every execution of a
statement over 4 KB: 19 ms for one of 6,000 parameters).

Events are copied into a temporary table (one per session, created on first use) and moved
from there with ``WITH moved AS (DELETE ...) INSERT ... SELECT ... ON CONFLICT (id) DO NOTHING
RETURNING id`` in id order (concurrent writers lock ids in one order and cannot deadlock), so
the same round trip empties the stage and says which ids were new: a replay or an import needs
no second pass. A role that may not create temporary tables goes through ``executemany``.

A driver error is raised as SQLAlchemy would raise it, so the writer tells an outage (a lost
connection, a deadlock: retried) from a bad row (set aside).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import operator
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from .tables import EVENT_COLUMNS, EVENTS_TABLE, INSERT_EVENTS, QUOTED_EVENT_COLUMNS, SKIP_STORED_IDS

__all__ = ["copy_new_ids", "insert_values"]

_STAGE = "pg_temp.llmtally_incoming_events"  # qualified: never a table of that name elsewhere
_COLUMNS = QUOTED_EVENT_COLUMNS
# whether this session has its stage, or may create one (the privilege is checked at creation)
_STAGE_STATE = (f"SELECT to_regclass('{_STAGE}') IS NOT NULL, "
                "has_database_privilege(current_database(), 'TEMPORARY')")
# the events' columns, defaults and NOT NULLs; the key and checks act as rows move into them
_CREATE_STAGE = (f"CREATE TEMPORARY TABLE {_STAGE.removeprefix('pg_temp.')} "
                 f"(LIKE {EVENTS_TABLE} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
_COPY = f"COPY {_STAGE} ({_COLUMNS}) FROM STDIN"
# the stage is emptied by the statement that reads it: a transaction that writes many batches
# (an import) moves each once; ids in bytewise order, as Python sorts them for executemany
_MOVE = (f"WITH moved AS (DELETE FROM {_STAGE} RETURNING {_COLUMNS}) "
         f'{INSERT_EVENTS} SELECT {_COLUMNS} FROM moved ORDER BY id COLLATE "C" '
         f"{SKIP_STORED_IDS} RETURNING id")
_ID = EVENT_COLUMNS.index("id")
_ROW_ID = operator.itemgetter(_ID)
_CHUNK = 256  # rows a VALUES statement: 256 rollup rows take ~8,000 parameters
_MOST_PARAMETERS = 65_535  # PostgreSQL's protocol limit for one statement


def copy_new_ids(conn: Connection, rows: Sequence[Sequence[Any]]) -> set[str]:
    """Insert events (parameter tuples in ``EVENT_COLUMNS`` order) inside ``conn``'s
    transaction, skipping ids already stored and all but the first row of an id; returns the
    ids stored now.

    A role without the ``TEMPORARY`` privilege on the database (some managed databases revoke
    it) cannot stage: its events go in through ``executemany`` instead, slower but the same."""
    if conn.connection.dbapi_connection.autocommit:  # type: ignore[union-attr]
        # the COPY would commit, and ON COMMIT DELETE ROWS empty the stage before the move
        raise RuntimeError("llmtally: events are written inside a transaction, not in autocommit")
    first = _first_of_each_id(rows)
    with _cursor(conn, f"{_STAGE_STATE}; {_COPY}") as cursor:
        cursor.execute(_STAGE_STATE)
        staged, may_stage = cursor.fetchone()
        if staged or may_stage:
            if not staged:
                cursor.execute(_CREATE_STAGE)
            with cursor.copy(_COPY) as copy:
                for row in first:
                    copy.write_row(row)
            cursor.execute(_MOVE)
            return {found for (found,) in cursor.fetchall()}
        cursor.executemany(_ONE_ROW, sorted(first, key=_ROW_ID), returning=True)
        new: set[str] = set()
        while True:
            new.update(found for (found,) in cursor.fetchall())
            if not cursor.nextset():
                return new


def _first_of_each_id(rows: Sequence[Sequence[Any]]) -> list[Sequence[Any]]:
    seen: set[str] = set()
    first = []
    for row in rows:
        if row[_ID] not in seen:
            seen.add(row[_ID])
            first.append(row)
    return first


def insert_values(conn: Connection, head: str, tail: str, rows: Sequence[Sequence[Any]]) -> int:
    """``{head} VALUES (row), ... {tail}`` in statements of up to 256 rows and 65,535
    parameters (tuples of one width); returns the number of rows inserted or updated."""
    if not rows:
        return 0
    changed = 0
    width = len(rows[0])
    per_statement = max(1, min(_CHUNK, _MOST_PARAMETERS // width))
    with _cursor(conn, f"{head} VALUES ... {tail}") as cursor:
        for start in range(0, len(rows), per_statement):
            chunk = rows[start:start + per_statement]
            cursor.execute(_values(head, tail, width, len(chunk)),
                           tuple(itertools.chain.from_iterable(chunk)))
            changed += max(cursor.rowcount, 0)
    return changed


@functools.lru_cache(maxsize=64)
def _values(head: str, tail: str, width: int, count: int) -> str:
    rows = ("(" + ", ".join(f"${row * width + column}" for column in range(1, width + 1)) + ")"
            for row in range(count))
    return f"{head} VALUES {', '.join(rows)} {tail}"


_ONE_ROW = _values(INSERT_EVENTS, f"{SKIP_STORED_IDS} RETURNING id", len(EVENT_COLUMNS), 1)


@contextlib.contextmanager
def _cursor(conn: Connection, statement: str) -> Iterator[Any]:
    """A ``$n``-placeholder cursor on ``conn``'s connection; a driver error comes out as
    SQLAlchemy's, naming ``statement`` (not the parameters: they are events)."""
    import psycopg  # the postgres extra: only reached with a PostgreSQL ledger

    dbapi_connection = conn.connection.dbapi_connection
    cursor = psycopg.RawCursor(dbapi_connection)  # type: ignore[call-overload]
    try:
        yield cursor
    except psycopg.Error as exc:
        # a lost connection is found lost by the rollback that follows, and not pooled again
        raise DBAPIError.instance(statement, None, exc, psycopg.Error, hide_parameters=True,
                                  dialect=conn.dialect) from exc
    finally:
        cursor.close()
