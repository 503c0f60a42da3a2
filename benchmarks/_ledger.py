"""A big sample ledger for a benchmark: events written in bulk, rollups kept as in production."""

from __future__ import annotations

import time
from datetime import datetime, timedelta


def fill(url: str, count: int, recent_start: datetime, recent_end: datetime, *,
         recent_share: float, span_days: int) -> tuple[float, int]:
    """Write ``count`` sample events (``llmtally._sample.bulk_load``, through
    ``Store.insert_many``): ``recent_share`` of them in [recent_start, recent_end), the rest in
    the ``span_days`` before it. On PostgreSQL, VACUUM ANALYZE the tables afterwards (what
    autovacuum does by itself on a ledger in use). Returns (seconds, events in the recent range)."""
    from sqlalchemy import DateTime, bindparam, inspect, text

    from llmtally._pricing.book import PriceBook
    from llmtally._sample import bulk_load
    from llmtally._storage.store import Store

    store = Store(url)
    prices = PriceBook(None, price_map="bundled")
    recent = round(count * recent_share)
    started = time.perf_counter()
    if count > recent:
        bulk_load(store, prices, recent_start - timedelta(days=span_days), recent_start,
                  count=count - recent, batch_size=5000)
    bulk_load(store, prices, recent_start, recent_end, count=recent, batch_size=5000, seed=2)
    elapsed = time.perf_counter() - started
    if store.dialect == "postgresql":
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for table in ("llmtally_events", "llmtally_rollups", "llmtally_rollup_sketches"):
                if inspect(conn).has_table(table):
                    conn.execute(text(f"VACUUM ANALYZE {table}"))
    with store.engine.begin() as conn:
        stored = conn.execute(
            text("SELECT COUNT(*) FROM llmtally_events WHERE ts >= :a AND ts < :b").bindparams(
                bindparam("a", type_=DateTime), bindparam("b", type_=DateTime)),
            {"a": recent_start.replace(tzinfo=None), "b": recent_end.replace(tzinfo=None)}).scalar()
    store.close()
    return elapsed, int(stored)
