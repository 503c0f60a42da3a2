"""Many rows in one ``INSERT`` on SQLite, instead of the driver's ``executemany``.

sqlite3's ``executemany`` lets go of the GIL around each row's step, and a thread that wants
the GIL back while another runs Python waits up to the switch interval (5 ms). While the
caller's thread records calls faster than the ledger takes them, the writer thus stored one
event in 30,000 until the caller stopped (``benchmarks/ingest.py``: nothing overlapped). One
statement per chunk of up to 1,024 rows is bound at once and stepped with the GIL released
throughout, so SQLite's work overlaps the caller's. Chunks are padded to a power of two with
rows of NULLs that a ``WHERE`` drops: a connection's statement cache (128) then holds the
few forms a table needs, and preparing a 1,000-row statement afresh would cost more than
inserting its rows. PostgreSQL keeps ``executemany``: psycopg pipelines it, and one
1,000-row ``VALUES`` statement was a quarter as fast there (3,500–4,000 events/s against
10,000–15,500 through the store).
"""

from __future__ import annotations

import functools
import itertools
import sqlite3
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection

__all__ = ["execute_rows"]

# SQLite binds at most this many parameters in one statement (999 before 3.32)
MAX_PARAMETERS = 32766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999
_LARGEST_CHUNK = 1024


def execute_rows(conn: Connection, head: str, tail: str, rows: Sequence[Sequence[Any]]) -> int:
    """``{head} VALUES (row), ... {tail}`` for ``rows`` (parameter tuples of one width, the
    first value never NULL). Returns the number of rows the statement inserted or updated."""
    if not rows:
        return 0
    width = len(rows[0])
    if conn.dialect.name != "sqlite":
        return max(conn.exec_driver_sql(f"{head} VALUES ({', '.join(['%s'] * width)}) {tail}",
                                        list(rows)).rowcount, 0)
    largest = min(_LARGEST_CHUNK, 1 << ((MAX_PARAMETERS // width).bit_length() - 1))
    changed = 0
    for start in range(0, len(rows), largest):
        chunk = rows[start:start + largest]
        size = 1 << (len(chunk) - 1).bit_length()  # padded to a power of two with NULL rows
        params = list(itertools.chain.from_iterable(chunk))
        params.extend(itertools.repeat(None, (size - len(chunk)) * width))
        changed += max(conn.exec_driver_sql(_statement(head, tail, width, size), tuple(params))
                       .rowcount, 0)
    return changed


@functools.lru_cache(maxsize=64)
def _statement(head: str, tail: str, width: int, rows: int) -> str:
    one = "(" + ", ".join(["?"] * width) + ")"
    # WHERE drops the padding rows (a first column is never NULL); SQLite needs a WHERE
    # between an INSERT's SELECT and its ON CONFLICT anyway
    return (f"{head} SELECT * FROM (VALUES {', '.join([one] * rows)}) "
            f"WHERE column1 IS NOT NULL {tail}")
