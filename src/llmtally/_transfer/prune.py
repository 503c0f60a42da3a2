"""Prune: events older than a cutoff deleted (optionally archived first), budget counters rebuilt."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, case, delete, func, select

from .._budgets.counters import rebuild_counters_before
from .._errors import ConfigError
from .._storage import rollups
from .._storage.store import Store
from .._timeparse import parse_instant
from .export import atomic_output, write_events
from .transfer import (
    DEFAULT_CHUNK_ROWS,
    EVENTS,
    PruneResult,
    TransferError,
    ledger_errors,
)

__all__ = ["prune_events"]

def prune_events(
    store: Store,
    older_than: str | datetime | date | None,
    *,
    archive: str | os.PathLike[str] | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
) -> PruneResult:
    """Delete the events older than ``older_than`` ("90d", "2026-01-01", a datetime).

    With ``archive`` (a new file; ``.gz`` compresses) they are first written there in the export
    JSONL format; the file is in place before the deletion commits. ``dry_run`` only counts.
    """
    cutoff = _cutoff(older_than, now)
    archive_path = None if archive is None else Path(archive)
    if archive_path is not None and archive_path.exists():
        raise TransferError(f"{archive_path} already exists; give --archive a new file name "
                            "(an archive is never overwritten)")
    old = EVENTS.c.ts < cutoff
    with ledger_errors(store, "the prune"):
        if dry_run:
            with store.connect() as conn:
                events, cost, unpriced = _old_totals(conn, old)
        else:
            with _snapshot(store) as conn:
                events, cost, unpriced = _old_totals(conn, old)
                _delete_old(conn, old, events, archive_path)
                # the rollups of the emptied hours go, the hour the cutoff cuts is summed again
                # (a writer adding to those hours meanwhile makes this fail, never miscount)
                rollups.rebuild(conn, end=cutoff)
            # Budget counters cache a GROUP BY over the events: drop those of pruned windows,
            # recompute those the cutoff splits (after the delete committed, under the lock).
            rebuild_counters_before(store, cutoff)
    return PruneResult(cutoff=cutoff, events=events, cost=cost, unpriced=unpriced,
                       archive=archive_path, dry_run=dry_run)


def _cutoff(older_than: Any, now: datetime | None) -> datetime:
    now = now or datetime.now(timezone.utc)
    if older_than is None or older_than == "":
        raise ConfigError("prune needs --older-than (e.g. 90d or 2026-01-01): it deletes events, "
                          "so it never guesses a cutoff")
    cutoff = parse_instant(older_than, now=now)
    if cutoff is None or cutoff > now.astimezone(timezone.utc).replace(tzinfo=None):
        raise ConfigError(f"--older-than {older_than!r} is in the future; give an age such as "
                          "90d or a past date")
    return cutoff


def _old_totals(conn: Connection, old: Any) -> tuple[int, dict[str, float], int]:
    rows = conn.execute(
        select(EVENTS.c.currency, func.count(), func.coalesce(func.sum(EVENTS.c.cost), 0.0),
               func.sum(case((EVENTS.c.cost_status == "unpriced", 1), else_=0)))
        .where(old).group_by(EVENTS.c.currency)).all()
    events = sum(int(row[1]) for row in rows)
    cost = {row[0]: float(row[2]) for row in rows}
    return events, cost, sum(int(row[3]) for row in rows)


def _delete_old(conn: Connection, old: Any, events: int, archive: Path | None) -> None:
    """Archive (if asked), then delete, checking that both saw the same events."""
    if archive is None:
        _checked_delete(conn, old, events)
        return
    with atomic_output(archive, exclusive=True) as out:
        archived = write_events(conn, select(EVENTS).where(old), out, "jsonl", None,
                                 DEFAULT_CHUNK_ROWS)
        _checked_delete(conn, old, archived)


def _checked_delete(conn: Connection, old: Any, expected: int) -> None:
    deleted = conn.execute(delete(EVENTS).where(old)).rowcount
    if deleted != expected:  # cannot happen in a snapshot; refuse rather than lose events
        raise TransferError(f"the ledger changed during the prune ({expected} events read, "
                            f"{deleted} to delete); nothing was deleted, run it again")


@contextlib.contextmanager
def _snapshot(store: Store) -> Iterator[Connection]:
    """A write transaction whose reads and deletes see the same events: SQLite takes its
    write lock up front; PostgreSQL runs REPEATABLE READ (new events stay invisible to it)."""
    if store.dialect == "sqlite":
        with store.write() as conn:
            yield conn
        return
    store.ensure_schema()
    with store.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
        with conn.begin():
            yield conn
