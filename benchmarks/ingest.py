"""Ingest throughput: events/s into the ledger through llmtally vs raw DB-API executemany.

    python benchmarks/ingest.py [--events 50000] [--postgres URL]

Same rows, same schema (llmtally's own, with its indexes), same run; three rounds of the three,
the best of each kept. Three figures per database:

- raw:    the driver's executemany of pre-built tuples (sqlite3 / psycopg), batches of 1000
- store:  llmtally's writer path, Store.insert_many() of event dicts, batches of 1000
- record: the whole path, Tally.record() on the caller's thread + background writer + flush()

and how many events the writer had stored when the last record() returned: the writer's work
overlapping the caller's (see _storage/many_rows.py for why it once did not); and, for the
record path, the CPU time per event of the caller's thread (record()) and of the writer's thread
(Linux: read from /proc), which bound what overlap can win.

Targets: store >= 0.7x raw (issue 3), record+flush >= 0.8x raw (issue 14).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta

from _postgres import DEFAULT_URL, scratch_schema
from sqlalchemy import create_engine, text

from llmtally import Tally
from llmtally._storage.store import Store
from llmtally._storage.tables import EVENT_COLUMNS

BATCH = 1000


def make_rows(count: int) -> list[dict]:
    base = datetime(2026, 11, 1)
    models = ["gpt-4o-mini", "claude-sonnet-4-5", "deepseek/deepseek-chat", "gemini/gemini-2.5-flash"]
    return [{
        "id": uuid.uuid4().hex, "ts": base + timedelta(seconds=i), "source": "manual",
        "provider": "openai", "model": models[i % 4], "resolved_model": None, "call_type": "chat",
        "streamed": False, "status": "ok", "error_type": None, "input_tokens": 1000 + i % 500,
        "output_tokens": 200, "cache_read_tokens": 0, "cache_write_tokens": 0,
        "reasoning_tokens": 0, "cost": 0.00027, "currency": "USD", "cost_status": "priced",
        "price_source": "litellm-map:2026-11-25", "latency_ms": 850.0, "ttft_ms": None,
        "project": f"p{i % 5}", "user": f"u{i % 50}", "session": None, "tags": ["bench"],
        "request_id": None, "metadata": {},
    } for i in range(count)]


def as_tuples(rows: list[dict]) -> list[tuple]:
    out = []
    for row in rows:
        values = dict(row, tags=json.dumps(row["tags"]), metadata=json.dumps(row["metadata"]))
        out.append(tuple(values[c] for c in EVENT_COLUMNS))
    return out


def fresh_store(url: str) -> Store:
    store = Store(url)
    store.ensure_schema()
    return store


def time_raw(url: str, rows: list[dict]) -> float:
    """The driver alone: executemany of ready tuples into the same table."""
    store = fresh_store(url)
    tuples = as_tuples(rows)
    columns = ", ".join(f'"{c}"' for c in EVENT_COLUMNS)
    raw = store.engine.raw_connection()
    try:
        cursor = raw.cursor()
        marks = ", ".join(["?" if store.dialect == "sqlite" else "%s"] * len(EVENT_COLUMNS))
        sql = f"INSERT INTO llmtally_events ({columns}) VALUES ({marks}) ON CONFLICT (id) DO NOTHING"
        started = time.perf_counter()
        for start in range(0, len(tuples), BATCH):
            if store.dialect == "sqlite":
                cursor.execute("BEGIN IMMEDIATE")
            cursor.executemany(sql, tuples[start:start + BATCH])
            raw.commit() if store.dialect != "sqlite" else cursor.execute("COMMIT")
        return time.perf_counter() - started
    finally:
        raw.close()
        store.close()


def time_store(url: str, rows: list[dict]) -> float:
    store = fresh_store(url)
    started = time.perf_counter()
    for start in range(0, len(rows), BATCH):
        store.insert_many(rows[start:start + BATCH])
    elapsed = time.perf_counter() - started
    store.close()
    return elapsed


OVERLAP: list[int] = []  # per record run: events stored while record() was still being called
CPU: list[tuple[float, float]] = []  # per record run: caller's and writer's CPU seconds


def thread_cpu_seconds(native_id: int | None) -> float:
    """A thread's CPU time so far (Linux /proc; NaN elsewhere)."""
    try:
        with open(f"/proc/self/task/{native_id}/schedstat") as stat:
            return int(stat.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return float("nan")


def time_record(url: str, count: int, spill: str) -> float:
    fresh_store(url).close()  # an existing ledger, as for raw and store (PostgreSQL's Store
    # would otherwise create its tables on the writer's first batch, inside the timing)
    with Tally(url, price_map="bundled", spill_path=spill) as tally:
        writer = tally._writer._thread.native_id
        writer_before, caller_before = thread_cpu_seconds(writer), time.thread_time()
        started = time.perf_counter()
        for i in range(count):
            tally.record(model="gpt-4o-mini", provider="openai", input_tokens=1000 + i % 500,
                         output_tokens=200, project=f"p{i % 5}", user=f"u{i % 50}")
        OVERLAP.append(tally._writer.written)
        caller = time.thread_time() - caller_before
        tally.flush()
        elapsed = time.perf_counter() - started
        CPU.append((caller, thread_cpu_seconds(writer) - writer_before))
        return elapsed


def reset(url: str) -> None:
    if url.startswith("sqlite:///"):
        for suffix in ("", "-wal", "-shm"):
            try:
                os.remove(url[len("sqlite:///"):] + suffix)
            except FileNotFoundError:
                pass
        return
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS llmtally_events, llmtally_schema, "
                          "llmtally_budget_counters, llmtally_reservations, llmtally_budget_alerts, "
                          "llmtally_budgets, llmtally_rollups, llmtally_rollup_sketches"))
    engine.dispose()


def bench(name: str, url: str, count: int, workdir: str) -> None:
    rows = make_rows(count)
    OVERLAP.clear()
    CPU.clear()
    runs = (("raw", lambda: time_raw(url, rows)), ("store", lambda: time_store(url, rows)),
            ("record", lambda: time_record(url, count, os.path.join(workdir, "s.jsonl"))))
    best = {label: float("inf") for label, _ in runs}
    for _ in range(3):  # rounds of all three: the machine's drift hits each alike
        for label, run in runs:
            reset(url)
            best[label] = min(best[label], run())
    results = {label: count / seconds for label, seconds in best.items()}
    print(f"{name:10} raw {results['raw']:>9,.0f} ev/s   store {results['store']:>9,.0f} ev/s "
          f"({results['store'] / results['raw']:.2f}x raw)   record+flush {results['record']:>9,.0f} ev/s "
          f"({results['record'] / results['raw']:.2f}x raw)   stored while recording "
          f"{'/'.join(f'{n:,}' for n in OVERLAP)}")
    caller, writer = (min(run[i] for run in CPU) / count * 1e6 for i in (0, 1))
    print(f"{'':10} record path CPU per event (least of 3): caller {caller:.1f} µs, writer "
          f"{writer:.1f} µs; raw {1e6 / results['raw']:.1f} µs wall")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--postgres", default=DEFAULT_URL,
        help="PostgreSQL URL ('' to skip); its llmtally tables are dropped and recreated")
    args = parser.parse_args()
    print(f"ingest: {args.events:,} events, batches of {BATCH}, best of 3, python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as workdir:
        bench("sqlite", f"sqlite:///{workdir}/bench.db", args.events, workdir)
        if args.postgres:
            with scratch_schema(args.postgres, "llmtally_bench") as url:
                bench("postgresql", url, args.events, workdir)

if __name__ == "__main__":
    main()
