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

Events are copied into a temporary table (one per session, emptied at each commit) and moved
from there with ``INSERT ... SELECT ... ON CONFLICT (id) DO NOTHING RETURNING id`` in id order
(concurrent writers lock ids in one order and cannot deadlock), so the same round trip says
which ids were new: a replay or an import needs no second pass.

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

from .tables import EVENT_COLUMNS, EVENTS_TABLE

__all__ = ["copy_new_ids", "insert_values"]

_STAGE = "llmtally_incoming_events"
_COLUMNS = ", ".join(f'"{name}"' for name in EVENT_COLUMNS)
# INCLUDING DEFAULTS only: the events table's constraints are checked as rows move into it
_CREATE_STAGE = (f"CREATE TEMPORARY TABLE IF NOT EXISTS {_STAGE} "
                 f"(LIKE {EVENTS_TABLE} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
_COPY = f"COPY {_STAGE} ({_COLUMNS}) FROM STDIN"
_MOVE = (f"INSERT INTO {EVENTS_TABLE} ({_COLUMNS}) SELECT {_COLUMNS} FROM {_STAGE} "
         "ORDER BY id ON CONFLICT (id) DO NOTHING RETURNING id")
_ID = EVENT_COLUMNS.index("id")
_ROW_ID = operator.itemgetter(_ID)
_CAN_STAGE = "SELECT has_database_privilege(current_database(), 'TEMPORARY')"
_MAY_STAGE = "llmtally_may_stage"  # in the pooled connection's info: _CAN_STAGE's answer
_ONE_ROW = (f"INSERT INTO {EVENTS_TABLE} ({_COLUMNS}) VALUES "
            f"({', '.join(f'${n}' for n in range(1, len(EVENT_COLUMNS) + 1))}) "
            "ON CONFLICT (id) DO NOTHING RETURNING id")
_CHUNK = 256  # rows a VALUES statement: 256 rollup rows take ~8,000 of its 65,535 parameters


def copy_new_ids(conn: Connection, rows: Sequence[Sequence[Any]]) -> set[str]:
    """Insert events (parameter tuples in ``EVENT_COLUMNS`` order) inside ``conn``'s
    transaction, skipping ids already stored and all but the first row of an id; returns the
    ids stored now.

    A role without the ``TEMPORARY`` privilege on the database (some managed databases revoke
    it) cannot stage: its events go in through ``executemany`` instead, slower but the same."""
    may_stage = conn.info.get(_MAY_STAGE)
    if may_stage is None:  # once per connection
        may_stage = conn.info[_MAY_STAGE] = bool(conn.exec_driver_sql(_CAN_STAGE).scalar())
    first = _first_of_each_id(rows)
    if not may_stage:
        with _cursor(conn, _ONE_ROW) as cursor:
            cursor.executemany(_ONE_ROW, first, returning=True)
            new: set[str] = set()
            while True:
                new.update(found for (found,) in cursor.fetchall())
                if not cursor.nextset():
                    return new
    with _cursor(conn, _COPY) as cursor:
        cursor.execute(_CREATE_STAGE)
        with cursor.copy(_COPY) as copy:
            for row in first:
                copy.write_row(row)
        cursor.execute(_MOVE)
        return {found for (found,) in cursor.fetchall()}


def _first_of_each_id(rows: Sequence[Sequence[Any]]) -> list[Sequence[Any]]:
    seen: set[str] = set()
    first = []
    for row in rows:
        if row[_ID] not in seen:
            seen.add(row[_ID])
            first.append(row)
    return sorted(first, key=_ROW_ID)  # one lock order for concurrent writers


def insert_values(conn: Connection, head: str, tail: str, rows: Sequence[Sequence[Any]]) -> int:
    """``{head} VALUES (row), ... {tail}`` in statements of up to 256 rows (tuples of one
    width); returns the number of rows inserted or updated."""
    changed = 0
    with _cursor(conn, f"{head} VALUES ... {tail}") as cursor:
        for start in range(0, len(rows), _CHUNK):
            chunk = rows[start:start + _CHUNK]
            cursor.execute(_values(head, tail, len(chunk[0]), len(chunk)),
                           tuple(itertools.chain.from_iterable(chunk)))
            changed += max(cursor.rowcount, 0)
    return changed


@functools.lru_cache(maxsize=64)
def _values(head: str, tail: str, width: int, count: int) -> str:
    rows = ("(" + ", ".join(f"${row * width + column}" for column in range(1, width + 1)) + ")"
            for row in range(count))
    return f"{head} VALUES {', '.join(rows)} {tail}"


@contextlib.contextmanager
def _cursor(conn: Connection, statement: str) -> Iterator[Any]:
    """A ``$n``-placeholder cursor on ``conn``'s connection; a driver error comes out as
    SQLAlchemy's, naming ``statement`` (not the parameters: they are events)."""
    import psycopg  # the postgres extra: only reached with a PostgreSQL ledger

    dbapi_connection = conn.connection.dbapi_connection
    cursor = psycopg.RawCursor(dbapi_connection)  # type: ignore[arg-type]
    try:
        yield cursor
    except psycopg.Error as exc:
        # a lost connection is found lost by the rollback that follows, and not pooled again
        raise DBAPIError.instance(statement, None, exc, psycopg.Error, hide_parameters=True,
                                  dialect=conn.dialect) from exc
    finally:
        cursor.close()
