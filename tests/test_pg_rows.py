"""PostgreSQL's batch path (``_storage/pg_rows.py``): events staged with ``COPY`` in a
temporary table and moved with one ``INSERT ... SELECT ... RETURNING id``; what the driver
raises there, a lost connection, many batches in one transaction, a role without the
``TEMPORARY`` privilege, a look-alike table on the search path, an aware timestamp."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from conftest import fetch_events, rollup_calls, rollups_mismatch
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DataError, OperationalError

from llmtally._storage.store import Store, normalize_url
from llmtally._storage.store_outage import is_outage
from llmtally._storage.writer_rows import first_line

START = datetime(2026, 11, 2, 9, 0)
ROW = dict(id="a", ts=START, source="manual", provider="openai", model="m", resolved_model=None,
           call_type="chat", streamed=False, status="ok", error_type=None, input_tokens=1,
           output_tokens=1, cache_read_tokens=0, cache_write_tokens=0, reasoning_tokens=0,
           cost=0.1, currency="USD", cost_status="priced", price_source=None, latency_ms=1.0,
           ttft_ms=None, project=None, user=None, session=None, tags=[], request_id=None,
           metadata={})


def test_what_the_driver_raises_under_copy_reaches_the_writer_as_sqlalchemy_s(pg_url):
    """What psycopg raises on its own cursor must reach the writer as SQLAlchemy's error, so
    a deadlock or a lost connection is retried as an outage and a bad row is set aside."""
    store = Store(pg_url)
    try:
        assert store.insert_many([ROW]) == 1
        with pytest.raises(DataError) as raised:
            store.insert_many([ROW, dict(ROW, id="b", currency="TOOLONG")])
        assert not is_outage(raised.value)
        # what the writer logs of it: the cause, not the row (COPY's context line names values)
        assert "too long" in first_line(raised.value) and "TOOLONG" not in first_line(raised.value)
        assert "[SQL: SELECT to_regclass('pg_temp.llmtally_incoming_events')" in str(raised.value)
        # a stored id, an id twice: the first row of each new id is stored, once
        assert store.insert_many([ROW, dict(ROW, id="b", input_tokens=7),
                                  dict(ROW, id="b", input_tokens=9)]) == 1
    finally:
        store.close()
    assert rollups_mismatch(pg_url) == [] and rollup_calls(pg_url) == 2
    assert [(e["id"], e["input_tokens"]) for e in fetch_events(pg_url)] == [("a", 1), ("b", 7)]


def test_a_connection_lost_mid_batch_is_an_outage_and_the_batch_is_written_once_after(pg_url):
    """The server ends the writer's session inside a batch's transaction: the COPY fails as
    a lost connection (an outage, retried), the pool drops that connection, and the retry
    stores every event once."""
    store = Store(pg_url)
    batch = [dict(ROW, id=f"x{i}") for i in range(1, 6)]
    killer = create_engine(normalize_url(pg_url), isolation_level="AUTOCOMMIT")
    try:
        assert store.insert_many([ROW]) == 1
        with pytest.raises(OperationalError) as raised, store.write() as conn:
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            with killer.connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            store.insert_rows(conn, batch)
        assert is_outage(raised.value) and raised.value.connection_invalidated
        assert store.insert_many(batch) == 5  # on a new connection
        assert store.insert_many(batch) == 0
    finally:
        store.close()
        killer.dispose()
    assert rollup_calls(pg_url) == 6 and rollups_mismatch(pg_url) == []


def test_many_batches_in_one_transaction_move_each_event_once(pg_url):
    """An import writes many batches in one transaction: each batch's stage is emptied by the
    move, so the next batch moves only its own rows (and a batch of already stored ids
    reports none)."""
    store = Store(pg_url)
    try:
        with store.write() as conn:
            for n in range(20):
                batch = [dict(ROW, id=f"b{n}-{i}", ts=START + timedelta(minutes=n)) for i in range(50)]
                assert store.insert_rows(conn, batch)[0] == 50
                assert store.insert_rows(conn, batch)[0] == 0
                staged = conn.exec_driver_sql(
                    "SELECT count(*) FROM pg_temp.llmtally_incoming_events").scalar()
                assert staged == 0
    finally:
        store.close()
    assert rollup_calls(pg_url) == 1000 and rollups_mismatch(pg_url) == []


def test_a_look_alike_table_on_the_search_path_gets_no_events(pg_url):
    """Anyone who may create tables in the ledger's schema could make one named like the
    stage, and a search path can put it before the session's temporary tables; events still
    go through the session's own temporary table, never into it."""
    pg_url += "%2Cpg_temp"  # search_path=<the test's schema>,pg_temp
    engine = create_engine(normalize_url(pg_url))
    store = Store(pg_url)
    try:
        store.ensure_schema()
        with engine.begin() as conn:
            # its own shape and a trigger that keeps what it is given: were it written to,
            # the batch would fail or its rows be kept
            conn.execute(text("CREATE TABLE llmtally_incoming_events (LIKE llmtally_events)"))
            conn.execute(text("CREATE TABLE kept (id text)"))
            conn.execute(text(
                "CREATE FUNCTION keep() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN INSERT INTO kept VALUES (NEW.id); RETURN NEW; END $$"))
            conn.execute(text("CREATE TRIGGER keep BEFORE INSERT ON llmtally_incoming_events "
                              "FOR EACH ROW EXECUTE FUNCTION keep()"))
        assert store.insert_many([ROW, dict(ROW, id="b")]) == 2
        assert store.insert_many([dict(ROW, id="c")]) == 1
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM kept")).scalar() == 0
    finally:
        store.close()
        engine.dispose()
    assert rollup_calls(pg_url) == 3 and rollups_mismatch(pg_url) == []


def test_an_aware_timestamp_is_stored_as_naive_utc_in_its_utc_hour(ledger_url):
    """Events carry naive UTC; an aware one (an import could hand one in) is stored as its
    UTC moment, in the rollup hour of that moment, on both databases."""
    store = Store(ledger_url)
    seoul = timezone(timedelta(hours=9))
    try:
        assert store.insert_many([dict(ROW, ts=datetime(2026, 11, 2, 18, 30, tzinfo=seoul))]) == 1
    finally:
        store.close()
    assert [str(e["ts"])[:19] for e in fetch_events(ledger_url)] == ["2026-11-02 09:30:00"]
    assert rollups_mismatch(ledger_url) == []


def test_an_autocommit_connection_is_refused_rather_than_losing_the_batch(pg_url):
    """In autocommit the COPY would commit and the stage be emptied before the move: the
    events would be lost silently. Refused loudly instead (llmtally never does it)."""
    store = Store(pg_url)
    store.ensure_schema()
    engine = create_engine(normalize_url(pg_url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn, pytest.raises(
                RuntimeError, match="^llmtally: events are written inside a transaction, "
                                    "not in autocommit$"):
            store.insert_rows(conn, [ROW])
    finally:
        engine.dispose()
        store.close()
    assert fetch_events(pg_url) == []


def test_a_role_without_the_temporary_privilege_writes_through_executemany(pg_url):
    """A role that may not create temporary tables (managed databases sometimes revoke
    TEMPORARY) must still store every event once, not see each batch refused and set aside
    as bad rows. In a database of its own, so no other test's sessions are affected."""
    suffix = uuid.uuid4().hex[:10]
    role, database = f"llmtally_no_temp_{suffix}", f"llmtally_no_temp_{suffix}"
    url = make_url(normalize_url(pg_url)).set(query={})
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN"))
        conn.execute(text(f"CREATE DATABASE {database}"))
        conn.execute(text(f"REVOKE TEMPORARY ON DATABASE {database} FROM PUBLIC"))
    inside = create_engine(url.set(database=database), isolation_level="AUTOCOMMIT")
    with inside.connect() as conn:
        conn.execute(text(f"GRANT USAGE, CREATE ON SCHEMA public TO {role}"))
    inside.dispose()
    role_url = url.set(database=database, username=role).render_as_string(hide_password=False)
    try:
        store = Store(role_url)
        try:
            with store.connect() as conn:
                assert conn.exec_driver_sql(
                    "SELECT has_database_privilege(current_database(), 'TEMPORARY')").scalar() is False
            assert store.insert_many([ROW, dict(ROW, id="b"), dict(ROW, id="a")]) == 2
            assert store.insert_many([dict(ROW, id="c"), dict(ROW, id="b")]) == 1
        finally:
            store.close()
        assert rollup_calls(role_url) == 3 and rollups_mismatch(role_url) == []
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
            conn.execute(text(f"DROP ROLE IF EXISTS {role}"))
        admin.dispose()


def test_the_first_row_of_a_repeated_id_is_the_one_stored_in_a_large_batch(pg_url):
    """500 ids, each twice, the second copy with other figures, in one batch: the first copy
    of each is stored and counted (the server's sort does not keep ties in order)."""
    rows = [dict(ROW, id=f"r{i:03}", input_tokens=1) for i in range(500)]
    rows += [dict(row, input_tokens=2) for row in reversed(rows)]
    store = Store(pg_url)
    try:
        assert store.insert_many(rows) == 500
    finally:
        store.close()
    assert {e["input_tokens"] for e in fetch_events(pg_url)} == {1}
    assert rollup_calls(pg_url) == 500 and rollups_mismatch(pg_url) == []


def test_rows_past_one_statement_are_upserted_in_several_and_counted(pg_url):
    """insert_values splits rows into statements of at most 256 rows (and 65,535 parameters)
    and returns how many rows they inserted or updated."""
    from llmtally._storage.pg_rows import insert_values

    engine = create_engine(normalize_url(pg_url))
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE counted (k int PRIMARY KEY, v int NOT NULL)"))
            head, tail = "INSERT INTO counted (k, v)", "ON CONFLICT (k) DO UPDATE SET v = counted.v + EXCLUDED.v"
            assert insert_values(conn, head, tail, [(k, 1) for k in range(600)]) == 600
            assert insert_values(conn, head, tail, [(k, 2) for k in range(0, 600, 2)]) == 300
            assert insert_values(conn, head, tail, []) == 0
            assert insert_values(conn, head, "ON CONFLICT (k) DO NOTHING", [(0, 5)]) == 0
            with pytest.raises(DataError, match=r"\[SQL: INSERT INTO counted \(k, v\) VALUES \.\.\. ON"):
                with conn.begin_nested():
                    insert_values(conn, head, tail, [(1, 2**40)])  # past int's range
            assert conn.execute(text("SELECT count(*), sum(v) FROM counted")).one() == (600, 1200)
            # 300 columns: 256 rows would be 76,800 parameters, past the protocol's 65,535
            columns = ", ".join(f"c{n} int" for n in range(1, 300))
            conn.execute(text(f"CREATE TABLE wide (k int PRIMARY KEY, {columns})"))
            names = ", ".join(["k"] + [f"c{n}" for n in range(1, 300)])
            wide = [(k, *range(299)) for k in range(300)]
            assert insert_values(conn, f"INSERT INTO wide ({names})", "", wide) == 300
    finally:
        engine.dispose()
