"""Batches written as few statements (``_storage/many_rows.py``): every row of every size of
batch is stored once, the padding never is, and the counts returned are the rows inserted."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine

from llmtally._storage.many_rows import execute_rows
from llmtally._storage.store import normalize_url


@pytest.fixture
def table(ledger_url):
    engine = create_engine(normalize_url(ledger_url))
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS many_rows_test")
        columns = ", ".join(f"c{i} TEXT" for i in range(1, 40))
        conn.exec_driver_sql(f"CREATE TABLE many_rows_test (id TEXT NOT NULL PRIMARY KEY, "
                             f"{columns})")
    yield engine
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE many_rows_test")
    engine.dispose()


@pytest.mark.parametrize("count", [0, 1, 2, 3, 511, 1024, 1025, 2100])
def test_every_row_once_and_no_padding(table, count):
    head = "INSERT INTO many_rows_test (id, c1, c2)"
    tail = "ON CONFLICT (id) DO NOTHING"
    rows = [(f"r{n}", str(n), None) for n in range(count)]
    with table.begin() as conn:
        execute_rows(conn, head, tail, rows[:1])  # stored before: not counted again
        inserted = execute_rows(conn, head, tail, rows + rows[:2])  # two ids twice
        stored = conn.exec_driver_sql("SELECT id, c1, c2 FROM many_rows_test").all()
    assert inserted == max(count - 1, 0)
    assert sorted(stored) == sorted(rows)  # nothing else: no row of padding NULLs


def test_a_wide_batch_is_cut_into_chunks(table):
    columns = ", ".join(["id"] + [f"c{i}" for i in range(1, 40)])
    rows = [(f"w{n}", *(f"{n}-{i}" for i in range(1, 40))) for n in range(2000)]
    with table.begin() as conn:
        inserted = execute_rows(conn, f"INSERT INTO many_rows_test ({columns})",
                                "ON CONFLICT (id) DO NOTHING", rows)
        assert conn.exec_driver_sql("SELECT count(*), max(c39) FROM many_rows_test").one() \
            == (2000, "999-39")
    assert inserted == 2000


def test_a_row_without_its_key_is_refused_not_dropped(table):
    """The padding is cut by count: a real row with a NULL key still meets the constraint
    (the writer then sets that row aside) instead of vanishing while counted."""
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError), table.begin() as conn:
        execute_rows(conn, "INSERT INTO many_rows_test (id, c1)", "ON CONFLICT (id) DO NOTHING",
                     [("a", "x"), (None, "y"), ("c", "z")])


def test_an_upsert_adds_to_the_row_it_meets(table):
    head = "INSERT INTO many_rows_test (id, c1)"
    tail = "ON CONFLICT (id) DO UPDATE SET c1 = many_rows_test.c1 || excluded.c1"
    with table.begin() as conn:
        execute_rows(conn, head, tail, [("a", "x"), ("b", "y")])
        execute_rows(conn, head, tail, [("b", "z"), ("c", "w")])
        assert conn.exec_driver_sql("SELECT id, c1 FROM many_rows_test ORDER BY id").all() \
            == [("a", "x"), ("b", "yz"), ("c", "w")]


def test_a_batch_is_a_few_statements_padded_to_a_power_of_two(tmp_path):
    """The point of the module: one statement per chunk of up to 512 rows (fewer GIL
    handovers), in a few cacheable forms, never past the connection's parameter limit."""
    import sqlite3

    from sqlalchemy import event

    engine = create_engine(f"sqlite:///{tmp_path / 'rows.db'}")
    columns = ["id"] + [f"c{i}" for i in range(1, 40)]
    seen: list[tuple[int, int]] = []  # (rows in the statement's VALUES, parameters bound)
    event.listen(engine, "before_cursor_execute", lambda _conn, _cursor, statement, params,
                 *_: seen.append((statement.count("(?"), len(params))))
    with engine.begin() as conn:
        dbapi = conn.connection.dbapi_connection
        dbapi.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 32766)  # the default, not the build's
        conn.exec_driver_sql(f"CREATE TABLE t ({', '.join(columns)})")
        seen.clear()

        def insert(rows, width):
            seen.clear()
            execute_rows(conn, f"INSERT INTO t ({', '.join(columns[:width])})", "", rows)
            return list(seen)

        # (rows in the VALUES, parameters: theirs and the LIMIT)
        assert insert([(f"a{n}", "x", "y") for n in range(1000)], 3) == [(512, 1537)] * 2
        assert insert([(f"b{n}", "x", "y") for n in range(3)], 3) == [(4, 13)]
        assert insert([(f"c{n}", "x", "y") for n in range(1025)], 3) == [(512, 1537)] * 2 + [(1, 4)]
        wide = [(f"d{n}", *("v",) * 39) for n in range(2000)]
        assert insert(wide, 40) == [(512, 512 * 40 + 1)] * 4  # the last 464 rows padded
        dbapi.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)  # SQLite before 3.32
        narrow = [(f"e{n}", *("v",) * 39) for n in range(100)]
        assert insert(narrow, 40) == [(16, 641)] * 6 + [(4, 161)]  # 24 rows fit: chunks of 16
        for limit, rows in ((641, 16), (640, 8), (81, 2), (80, 1), (41, 1)):  # at the edges
            dbapi.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, limit)
            edge = [(f"f{limit}-{n}", *("v",) * 39) for n in range(16)]
            assert insert(edge, 40) == [(rows, rows * 40 + 1)] * (16 // rows)
        assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar() \
            == 1000 + 3 + 1025 + 2000 + 100 + 5 * 16
