"""Hourly rollups, kept in the same transaction as the events they sum.

Every write of events goes through :meth:`Store.insert_rows`, which folds the rows it really
inserted (an id already stored adds nothing) into a :class:`Delta` and adds it here, before
the commit; ``prune`` deletes the rollups of the hours it empties and rebuilds the hour its
cutoff cuts, in its own transaction. So the rollups cannot disagree with the events: both
commit or neither does. ``llmtally rollups --check`` compares them; ``--rebuild`` (and the
migration that creates them) folds the events again.

Two tables (``tables.py``): :class:`HourlyRollup`, sums per hour and grouping columns, and
:class:`RollupSketch`, latency and time-to-first-token bucket counts per hour, provider, model
and project (``sketch.py``). Rows are added in key order, so concurrent PostgreSQL writers
lock them in the same order and never deadlock.
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, literal_column, select

from .many_rows import execute_rows
from .sketch import bucket_of
from .tables import EVENT_COLUMNS, ROLLUPS_TABLE, SKETCHES_TABLE, HourlyRollup, RollupSketch, UsageEvent

__all__ = ["Delta", "DIMS", "SUMS", "LATENCY", "TTFT", "add", "rebuild", "differences",
           "hour_of", "next_hour", "as_datetime", "lock", "SKETCH_DIMS"]

DIMS = ("provider", "model", "project", "user", "status", "error_type", "currency",
        "cost_status", "source", "call_type", "cache_hit")
"""The grouping columns of a rollup row (``cache_hit``: the event's price_source is
``cache-hit``)."""
SUMS = ("calls", "streamed_calls", "input_tokens", "output_tokens", "cache_read_tokens",
        "cache_write_tokens", "reasoning_tokens", "cost", "cached_calls", "cached_input_tokens",
        "latency_calls", "latency_ms_sum", "ttft_calls", "ttft_ms_sum")
_EXTREMES = ("max_cost", "first_ts", "last_ts")
LATENCY, TTFT = 0, 1  # RollupSketch.metric
SKETCH_DIMS = ("provider", "model", "project")
"""The grouping columns of a sketch row (of successful calls only)."""
_ONE_HOUR = timedelta(hours=1)
_LAST_HOUR = datetime.max.replace(minute=0, second=0, microsecond=0)
_READ_CHUNK = 20_000  # events folded per round when rebuilding


def hour_of(moment: datetime) -> datetime:
    """The UTC hour a (naive UTC) moment is in."""
    return moment.replace(minute=0, second=0, microsecond=0)


def next_hour(moment: datetime) -> datetime:
    """The first whole hour at or after ``moment`` (``datetime.max`` in the last hour of 9999)."""
    start = hour_of(moment)
    if start == moment:
        return start
    return start + _ONE_HOUR if start < _LAST_HOUR else datetime.max


def dims_key(dims: tuple[Any, ...]) -> str:
    """The digest a rollup row is stored under: the same grouping columns, the same key, in
    every process and version (JSON of the values, BLAKE2b, 128 bits)."""
    text = json.dumps(dims, ensure_ascii=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode("ascii"), digest_size=16).hexdigest()


class Delta:
    """What a set of events adds to the rollups: sums per (hour, grouping columns) and sketch
    counts per (hour, provider, model, project, metric, bucket).

    It folds driver rows (``store.driver_row``: the values in ``EVENT_COLUMNS`` order), and
    keeps times as the database takes them: text in SQLAlchemy's form for SQLite (so the
    hour is a slice of the text), datetimes for PostgreSQL."""

    __slots__ = ("sums", "sketch", "_text_ts")

    def __init__(self, sqlite: bool) -> None:
        self.sums: dict[tuple[Any, ...], list[Any]] = {}
        self.sketch: dict[tuple[Any, ...], int] = {}
        self._text_ts = sqlite

    def __bool__(self) -> bool:
        return bool(self.sums)

    def add_all(self, rows: Iterable[Sequence[Any]]) -> Delta:
        for row in rows:
            self.add(row)
        return self

    def add(self, row: Sequence[Any]) -> None:
        """Fold one event in (a driver row: the values in ``EVENT_COLUMNS`` order)."""
        (ts, source, provider, model, call_type, streamed, status, error_type, input_tokens,
         output_tokens, cache_read, cache_write, reasoning, cost, currency, cost_status,
         price_source, latency, ttft, project, user) = _FOLDED_VALUES(row)
        if self._text_ts:
            if not isinstance(ts, str) or len(ts) != 26 or ts[10] != " ":
                ts = _sqlite_ts(ts if isinstance(ts, datetime) else datetime.fromisoformat(ts))
            hour: Any = ts[:13] + ":00:00.000000"
        else:
            if isinstance(ts, str):
                ts = datetime.fromisoformat(ts)
            hour = ts.replace(minute=0, second=0, microsecond=0)
        key = (hour, provider, model, project, user, status, error_type, currency, cost_status,
               source, call_type, price_source == "cache-hit")  # (hour, *DIMS)
        # sums: the SUMS in order, then max_cost, first_ts, last_ts
        sums = self.sums.get(key)
        if sums is None:
            sums = self.sums[key] = [0, 0, 0, 0, 0, 0, 0, 0.0, 0, 0, 0, 0.0, 0, 0.0, None, ts, ts]
        else:
            if ts < sums[15]:
                sums[15] = ts
            if ts > sums[16]:
                sums[16] = ts
        sums[0] += 1
        input_tokens, cache_read = input_tokens or 0, cache_read or 0
        sums[2] += input_tokens
        sums[3] += output_tokens or 0
        sums[4] += cache_read
        sums[5] += cache_write or 0
        sums[6] += reasoning or 0
        if cost is not None:
            sums[7] += cost
            if sums[14] is None or cost > sums[14]:
                sums[14] = cost
        if cache_read > 0:
            sums[8] += 1
            sums[9] += input_tokens
        if latency is not None:
            sums[10] += 1
            sums[11] += latency
        if streamed:
            sums[1] += 1
            if ttft is not None:
                sums[12] += 1
                sums[13] += ttft
        if status == "ok":
            if latency is not None:
                place = (hour, provider, model, project, LATENCY, bucket_of(latency))
                self.sketch[place] = self.sketch.get(place, 0) + 1
            if streamed and ttft is not None:
                place = (hour, provider, model, project, TTFT, bucket_of(ttft))
                self.sketch[place] = self.sketch.get(place, 0) + 1


_FOLDED_VALUES = operator.itemgetter(*(EVENT_COLUMNS.index(name) for name in (
    "ts", "source", "provider", "model", "call_type", "streamed", "status", "error_type",
    "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
    "reasoning_tokens", "cost", "currency", "cost_status", "price_source", "latency_ms",
    "ttft_ms", "project", "user")))


def add(conn: Connection, delta: Delta) -> None:
    """Add ``delta`` to the stored rollups, inside the caller's transaction."""
    if not delta:
        return
    sums = sorted((key[0], dims_key(key[1:]), *key[1:], *values)
                  for key, values in delta.sums.items())
    execute_rows(conn, *_UPSERT, sums)
    if delta.sketch:
        cells = sorted((key[0], dims_key(key[1:4]), key[4], key[5], *key[1:4], calls)
                       for key, calls in delta.sketch.items())
        execute_rows(conn, *_SKETCH_UPSERT, cells)


def _sqlite_ts(moment: datetime) -> str:
    return moment.isoformat(sep=" ", timespec="microseconds")  # SQLAlchemy's SQLite form


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(f'"{name}"' for name in names)


def _upsert() -> tuple[str, str]:
    table = ROLLUPS_TABLE
    sums = ", ".join(f'"{name}" = {table}."{name}" + excluded."{name}"' for name in SUMS)
    return (
        f"INSERT INTO {table} ({_quoted(('hour', 'dims', *DIMS, *SUMS, *_EXTREMES))})",
        f"ON CONFLICT (hour, dims) DO UPDATE SET {sums}, "
        f"max_cost = CASE WHEN {table}.max_cost IS NULL OR excluded.max_cost > {table}.max_cost "
        f"THEN excluded.max_cost ELSE {table}.max_cost END, "
        f"first_ts = CASE WHEN excluded.first_ts < {table}.first_ts THEN excluded.first_ts "
        f"ELSE {table}.first_ts END, "
        f"last_ts = CASE WHEN excluded.last_ts > {table}.last_ts THEN excluded.last_ts "
        f"ELSE {table}.last_ts END",
    )


# an INSERT's head and its ON CONFLICT tail, around the VALUES that many_rows writes
_UPSERT = _upsert()
_SKETCH_UPSERT = (
    f"INSERT INTO {SKETCHES_TABLE} "
    f"({_quoted(('hour', 'dims', 'metric', 'bucket', 'provider', 'model', 'project', 'calls'))})",
    f"ON CONFLICT (hour, dims, metric, bucket) DO UPDATE SET "
    f"calls = {SKETCHES_TABLE}.calls + excluded.calls",
)


_E = UsageEvent.__table__.c
_UNUSED = {"id", "resolved_model", "session", "tags", "request_id", "metadata"}
# the events' columns in EVENT_COLUMNS order (a driver row), those the fold does not read as NULL
_FOLDED = tuple(literal_column("NULL").label(name) if name in _UNUSED else _E[name]
                for name in EVENT_COLUMNS)


def _hours(start: datetime | None, end: datetime | None) -> tuple[datetime | None, datetime | None]:
    """The whole hours that [start, end) touches."""
    return (None if start is None else hour_of(start), None if end is None else next_hour(end))


def _event_rows(conn: Connection, start: datetime | None = None, end: datetime | None = None,
                *, each: int = _READ_CHUNK) -> Iterable[Sequence[Any]]:
    """The events with ``start <= ts < end`` as driver rows, ``each`` at a time (streamed)."""
    statement = select(*_FOLDED).order_by(_E.ts)
    if start is not None:
        statement = statement.where(_E.ts >= start)
    if end is not None:
        statement = statement.where(_E.ts < end)
    # on the statement: a Connection's execution_options() would change the caller's connection
    result = conn.execute(statement.execution_options(stream_results=True, yield_per=each))
    yield from result.partitions(each)


def lock(conn: Connection) -> None:
    """PostgreSQL: keep every writer from adding to the rollups until this transaction ends
    (SQLite's write lock already does). A rebuild needs it: a writer that committed a new
    rollup row between its delete and its read of the events would be counted twice. Take it
    before the transaction's first read, so a REPEATABLE READ snapshot comes after it."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"LOCK TABLE {ROLLUPS_TABLE}, {SKETCHES_TABLE} "
                             "IN SHARE ROW EXCLUSIVE MODE")


def rebuild(conn: Connection, start: datetime | None = None, end: datetime | None = None) -> int:
    """Recompute the rollups of the hours that [start, end) touches (every hour by default)
    from the events, inside the caller's write transaction (taking :func:`lock` first).
    Returns the events folded."""
    lock(conn)
    first, last = _hours(start, end)
    for table in (HourlyRollup.__table__, RollupSketch.__table__):
        statement = delete(table)
        if first is not None:
            statement = statement.where(table.c.hour >= first)
        if last is not None:
            statement = statement.where(table.c.hour < last)
        conn.execute(statement)
    events = 0
    sqlite = conn.dialect.name == "sqlite"
    for chunk in _event_rows(conn, first, last):  # one Delta a chunk: memory stays flat
        events += len(chunk)
        add(conn, Delta(sqlite).add_all(chunk))
    return events


def differences(conn: Connection, *, limit: int = 20) -> list[str]:
    """Where the stored rollups differ from the events folded again (at most ``limit``
    descriptions; an empty list when they agree)."""
    expected = Delta(conn.dialect.name == "sqlite")
    for chunk in _event_rows(conn):
        expected.add_all(chunk)
    want = {(as_datetime(key[0]), *key[1:]):
            [*values[:15], as_datetime(values[15]), as_datetime(values[16])]
            for key, values in expected.sums.items()}
    stored = {(row.hour, *(getattr(row, name) for name in DIMS)): row
              for row in conn.execute(select(HourlyRollup.__table__))}
    found: list[str] = []
    for key in sorted(set(want) | set(stored), key=repr):
        wanted, row = want.get(key), stored.get(key)
        if wanted is None:
            found.append(f"{key}: only in the rollups")
        elif row is None:
            found.append(f"{key}: missing from the rollups")
        elif not _equal(wanted, row):
            found.append(f"{key}: rollup {[getattr(row, n) for n in SUMS]} != events {wanted[:14]}")
    cells = {(row.hour, row.provider, row.model, row.project, row.metric, row.bucket): row.calls
             for row in conn.execute(select(RollupSketch.__table__))}
    want_cells = {(as_datetime(key[0]), *key[1:]): calls
                  for key, calls in expected.sketch.items()}
    if cells != want_cells:
        found.append(f"the latency sketches differ in "
                     f"{len(set(cells.items()) ^ set(want_cells.items()))} cells")
    return found[:limit]


def as_datetime(value: Any) -> datetime:
    """A time read back from the ledger: SQLite gives text where no column type converts it
    (a rollup key, or ``min``/``max`` over a UNION); PostgreSQL a datetime."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def _equal(want: list[Any], row: Any) -> bool:
    for index, name in enumerate(SUMS):
        have = getattr(row, name)
        if isinstance(want[index], float):
            if abs(have - want[index]) > 1e-9 * max(1.0, abs(want[index])):
                return False
        elif have != want[index]:
            return False
    return (row.max_cost == want[14] or (row.max_cost is not None and want[14] is not None
            and abs(row.max_cost - want[14]) <= 1e-12 * max(1.0, abs(want[14])))) \
        and row.first_ts == want[15] and row.last_ts == want[16]

