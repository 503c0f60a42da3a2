"""Many rows in one ``INSERT``, instead of the driver's ``executemany``.

sqlite3's ``executemany`` lets go of the GIL around each row's step, and a thread that wants
the GIL back while another runs Python waits up to the switch interval (5 ms). While the
caller's thread records calls faster than the ledger takes them, the writer thus stored 0 to
1,183 events of 30,000 until the caller stopped (``benchmarks/ingest.py``). One
statement per chunk of up to 512 rows is bound at once and stepped with the GIL released
throughout, so SQLite's work overlaps the caller's. Chunks are padded to a power of two with
rows of NULLs that a ``LIMIT`` drops: a connection's statement cache (128) then holds the
few forms a table needs, and preparing a 1,000-row statement afresh would cost more than
inserting its rows. The prepared forms cost a writing connection up to 7 MB more (every
size of batch, each with as many rollup rows: 69 MB RSS against 62; 76 with chunks of
1,024, which were no faster). PostgreSQL: pg_rows.py.
"""

from __future__ import annotations

import functools
import itertools
import sqlite3
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection

from .pg_rows import insert_values

__all__ = ["execute_rows"]

_LARGEST_CHUNK = 512


def execute_rows(conn: Connection, head: str, tail: str, rows: Sequence[Sequence[Any]]) -> int:
    """``{head} VALUES (row), ... {tail}`` for ``rows`` (parameter tuples of one width; an
    upsert's rows must not share a key). Returns the number of rows inserted or updated."""
    if not rows:
        return 0
    width = len(rows[0])
    if conn.dialect.name != "sqlite":
        return insert_values(conn, head, tail, rows)
    # this connection's limit on parameters (32,766 by default since SQLite 3.32, 999 before;
    # builds and setlimit() change it), one of them the LIMIT
    limit = conn.connection.dbapi_connection.getlimit(  # type: ignore[union-attr]
        sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    most = max(1, (limit - 1) // width)
    largest = min(_LARGEST_CHUNK, 1 << (most.bit_length() - 1))
    changed = 0
    for start in range(0, len(rows), largest):
        chunk = rows[start:start + largest]
        size = 1 << (len(chunk) - 1).bit_length()  # padded to a power of two
        params = list(itertools.chain.from_iterable(chunk))
        params.extend(itertools.repeat(None, (size - len(chunk)) * width))
        params.append(len(chunk))
        changed += max(conn.exec_driver_sql(_statement(head, tail, width, size), tuple(params))
                       .rowcount, 0)
    return changed


@functools.lru_cache(maxsize=64)
def _statement(head: str, tail: str, width: int, rows: int) -> str:
    one = "(" + ", ".join(["?"] * width) + ")"
    # LIMIT drops the padding rows (VALUES yields its rows in order); the WHERE is SQLite's
    # rule for a SELECT followed by ON CONFLICT
    return f"{head} SELECT * FROM (VALUES {', '.join([one] * rows)}) WHERE 1 LIMIT ? {tail}"
