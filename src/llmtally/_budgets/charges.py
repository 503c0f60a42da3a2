"""Charging budgets in the transaction that stores events: each inserted event charged once, its
hold released."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    select,
)

from .._events.event import as_utc_naive
from .budget import Window, window_for
from .counters import charges_of, parse_definition, release_reservations
from .states import CounterState, Crossing, Defined, Hold, thresholds_reached
from .tables import ALERTS, CHARGE, DEFINITIONS, PG_SHARED_LOCK, insert_ignore

__all__ = ["EventCharges"]

@dataclass
class _Batch:
    """What an inserting transaction needs to charge its events (from :meth:`EventCharges.begin`)."""

    definitions: list[Defined]
    reservation_ids: list[str] = field(default_factory=list)


class EventCharges:
    """Charges newly inserted events to every budget defined in the ledger, and releases the
    holds they settle, inside the transaction that inserts them (see the module docstring).

    ``begin(conn, rows)`` runs first in that transaction (on PostgreSQL it takes the shared
    lock and reads the definitions); it returns None when there is nothing to do, and the store
    then inserts as plainly as ever. ``after_insert(conn, batch, inserted)`` gets the rows that
    were really inserted (ids already stored are not charged again) and returns an action to run
    once the transaction committed (delivering the warnings crossed), or None.
    """

    def __init__(self, clock: Callable[[], datetime],
                 on_crossings: Callable[[list[Crossing]], None] | None = None) -> None:
        self._clock = clock
        self.on_crossings = on_crossings
        self._parsed: dict[tuple[str, str], Defined | None] = {}
        # warnings known to be claimed in the ledger (counter, threshold): not asked again
        self._claimed: set[tuple[str, str, datetime, float]] = set()

    def begin(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> _Batch | None:
        if conn.dialect.name == "postgresql":
            conn.execute(PG_SHARED_LOCK)
        definitions = self._definitions(conn)
        reservation_ids = [row["_reservation"] for row in rows if row.get("_reservation")]
        if not definitions and not reservation_ids:
            return None
        return _Batch(definitions, reservation_ids)

    def after_insert(self, conn: Connection, batch: _Batch,
                     inserted: Sequence[Mapping[str, Any]]) -> Callable[[], None] | None:
        now = as_utc_naive(self._clock())
        used = charges_of(batch.definitions, inserted)
        released = release_reservations(conn, batch.reservation_ids, now, apply=False)
        crossings: list[Crossing] = []
        asked: list[tuple[str, str, datetime, float]] = []
        by_key = {d.budget.key: d for d in batch.definitions}
        for counter in sorted(set(used) | set(released)):  # one global lock order
            amount = used.get(counter, 0)
            key, instance, start = counter
            row = conn.execute(CHARGE, {"key": key, "instance": instance, "start": start,
                                         "used": amount, "released": released.get(counter, 0),
                                         "now": now}).first()
            if row is None or not amount or self.on_crossings is None:
                continue  # no counter yet (it is seeded from the ledger, these events
                # included), or no one to tell: a threshold stays unclaimed for the next charge
            defined = by_key.get(key)
            if defined is not None and defined.budget.warn_at:
                window = window_for(defined.budget.per, start, defined.tz) \
                    if defined.budget.per != "total" else Window(start, None)
                if window.end is None or window.end > now:  # warn about open windows only
                    hold = Hold(defined.budget, instance, window, 0)
                    reached = [t for t in thresholds_reached(defined.budget, int(row[0]))
                               if (key, instance, start, t) not in self._claimed]
                    if reached:
                        crossings += record_crossings(conn, hold, reached, int(row[0]), int(row[1]), now)
                        asked += [(key, instance, start, t) for t in reached]
        if not asked:
            return None
        deliver = self.on_crossings

        def after_commit() -> None:
            if len(self._claimed) > 100_000:
                self._claimed.clear()
            self._claimed.update(asked)  # claimed now, by this transaction or an earlier one
            if crossings and deliver is not None:
                deliver(crossings)
        return after_commit

    def _definitions(self, conn: Connection) -> list[Defined]:
        rows = conn.execute(select(DEFINITIONS.c.definition, DEFINITIONS.c.timezone)).all()
        out = []
        for definition, tz in rows:
            parsed = self._parsed.get((definition, tz), ...)
            if parsed is ...:
                parsed = parse_definition(definition, tz)
                if len(self._parsed) > 10_000:
                    self._parsed.clear()
                self._parsed[(definition, tz)] = parsed
            if parsed is not None:
                out.append(parsed)
        return out


def record_crossings(conn: Connection, hold: Hold, thresholds: Sequence[float], spent: int,
                     reserved: int, now: datetime) -> list[Crossing]:
    """The ``thresholds`` reached that this transaction is first to claim in the ledger, so
    that only one process (and one event) reports each per window."""
    budget = hold.budget
    crossed = []
    for threshold in thresholds:
        # RETURNING says whether this insert won (psycopg reports rowcount -1 for it)
        claimed = conn.execute(insert_ignore(conn, ALERTS).values(
            budget_key=budget.key, instance=hold.instance, window_start=hold.window.start,
            threshold=threshold, fired_at=now).returning(ALERTS.c.threshold)).first()
        if claimed is not None:
            state = CounterState.from_units(budget, hold.instance, hold.window, spent, reserved)
            crossed.append(Crossing(state, threshold))
    return crossed
