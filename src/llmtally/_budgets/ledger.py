"""Budget accounting in the ledger: holds before a call, charges in the transaction that stores it.

Every (budget, instance, window) has a counter row with ``spent`` and ``reserved``.

**The ledger is the truth.** ``spent`` is a cache of a ``GROUP BY`` over the events: the sum
over the window's events that the budget covers (blocked calls aside). It changes in two
places only, each in the transaction that changes what it summarises:

- the transaction that inserts events (the writer's batch, a spill replay, an import) adds
  every newly inserted event to every covering counter that exists
  (:class:`EventCharges`), whatever path recorded it — a settled hold, ``record()``, an
  unguarded call, a call let through while the ledger was down — and releases the holds of the
  reservations those events settle;
- a counter that does not exist yet is created seeded from the ledger's events.

On PostgreSQL the two are serialised by an advisory lock (shared by inserting transactions,
exclusive while a counter or definition is created), so a seed never misses an event that a
concurrent transaction is inserting. On SQLite the write lock does that.

A call reserves its estimate on every budget that covers it with one conditional update per
counter::

    UPDATE llmtally_budget_counters SET reserved = reserved + :x
     WHERE <counter> AND spent + reserved + :x <= :limit

inside one transaction (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: one statement that locks the
counters in a global order). If any counter refuses, nothing is held and the call is blocked:
concurrent callers never take a budget past its limit by more than the error of their own
estimates. A reservation whose process died expires after its TTL.

Budget definitions live in the ledger (``llmtally_budgets``): every process charges every
budget defined there, and ``llmtally budgets`` shows them all. When two processes define one
budget (same kind, window, scope and ``each=``) with different limits, the definition
published last wins for every process (each re-reads the definitions every few seconds) and
the change is logged by both.

Amounts are integers — nano-units of the ledger's currency, tokens, requests — so a hundred
$0.01 calls add up to exactly $1.00 and the hundred-and-first is refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import (JSON, BigInteger, Column, Connection, DateTime, Float, MetaData, String,
                        Table, Text, and_, bindparam, cast, delete, exists, func, inspect, literal,
                        select, text)
from sqlalchemy.dialects.postgresql import JSONB

from .budget import Budget, BudgetExceeded, Window, instance_for, window_for, zone
from .._errors import ConfigError
from .._log import logger, warn_limited
from .._storage.tables import UsageEvent

if TYPE_CHECKING:  # a Store is passed in; _store -> _migrations -> this module at run time
    from .._storage.store import Store

__all__ = ["BudgetLedger", "EventCharges", "Hold", "Reservation", "CounterState", "Crossing",
           "Drift", "UNIT_SCALE", "to_units", "defined_budgets", "check_counters",
           "rebuild_counters_before", "unpriced_calls", "ledger_states"]

UNIT_SCALE = {"usd": 10**9, "tokens": 1, "requests": 1}
"""Counters hold integers: nano-units of money, whole tokens, whole requests."""


def to_units(kind: str, amount: float) -> int:
    """An amount of ``kind`` as the integer the counters hold: rounded half up, exactly as the
    SQL that seeds a counter from the events rounds (see :func:`seed`)."""
    return math.floor(float(amount) * UNIT_SCALE[kind] + 0.5)


_meta = MetaData()
COUNTERS = Table(
    "llmtally_budget_counters", _meta,
    Column("budget_key", String(512), primary_key=True),
    Column("instance", String(256), primary_key=True),
    Column("window_start", DateTime, primary_key=True),
    Column("window_end", DateTime),
    Column("spent", BigInteger, nullable=False),
    Column("reserved", BigInteger, nullable=False),
    Column("updated_at", DateTime, nullable=False),
)
RESERVATIONS = Table(
    "llmtally_reservations", _meta,
    Column("id", String(64), primary_key=True),
    Column("created_at", DateTime, nullable=False),
    Column("expires_at", DateTime, nullable=False),
    Column("holds", JSON().with_variant(JSONB(), "postgresql"), nullable=False),
)
ALERTS = Table(
    "llmtally_budget_alerts", _meta,
    Column("budget_key", String(512), primary_key=True),
    Column("instance", String(256), primary_key=True),
    Column("window_start", DateTime, primary_key=True),
    Column("threshold", Float, primary_key=True),
    Column("fired_at", DateTime, nullable=False),
)
DEFINITIONS = Table(
    "llmtally_budgets", _meta,
    Column("budget_key", String(512), primary_key=True),
    Column("definition", Text, nullable=False),
    Column("timezone", String(64), nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Column("updated_by", String(256), nullable=False),
)
_E = UsageEvent.__table__.c

# The hot path runs these few statements, built once (building SQLAlchemy expressions per call
# costs more than running them).
_COUNTER = "budget_key = :key AND instance = :instance AND window_start = :start"
_TYPES = (bindparam("start", type_=DateTime), bindparam("now", type_=DateTime))
_RESERVE_IF_ROOM = text(
    f"UPDATE llmtally_budget_counters SET reserved = reserved + :amount, updated_at = :now "
    f"WHERE {_COUNTER} AND spent + reserved + :amount <= :limit").bindparams(*_TYPES)
_RESERVE = text(
    f"UPDATE llmtally_budget_counters SET reserved = reserved + :amount, updated_at = :now "
    f"WHERE {_COUNTER}").bindparams(*_TYPES)
_CHARGE = text(
    f"UPDATE llmtally_budget_counters SET spent = spent + :used, reserved = reserved - :released, "
    f"updated_at = :now WHERE {_COUNTER} RETURNING spent, reserved").bindparams(*_TYPES)
_USE = text(f"SELECT spent, reserved FROM llmtally_budget_counters WHERE {_COUNTER}").bindparams(
    bindparam("start", type_=DateTime))
_EXPIRY_INTERVAL = timedelta(seconds=5)  # how often a process looks for dead reservations
_REFRESH_INTERVAL = timedelta(seconds=5)  # and re-reads the budget definitions

# PostgreSQL: inserting events takes this lock shared, creating a counter or a definition takes
# it exclusive (per schema: tests and tenants may share a database).
_PG_LOCK = "hashtext(current_schema() || '.llmtally_budget_counters')"
_PG_SHARED_LOCK = text(f"SELECT pg_advisory_xact_lock_shared({_PG_LOCK})")
_PG_EXCLUSIVE_LOCK = text(f"SELECT pg_advisory_xact_lock({_PG_LOCK})")

# PostgreSQL: reserve in one statement (one round trip, committed on its own). The counters are
# locked in one global order first (ORDER BY ... FOR UPDATE), so two calls covering the same
# counters never deadlock; a hold goes in only if every counter has room.
_PG_COUNTERS = ("%(keys)s::text[], %(instances)s::text[], %(starts)s::timestamp[], "
                "%(amounts)s::bigint[]")  # each hold's counter and held amount
_PG_TO_RESERVE = (f"SELECT * FROM unnest({_PG_COUNTERS}, %(limits)s::bigint[], %(blocks)s::bool[]) "
                  "AS w(budget_key, instance, window_start, amount, lim, block)")
_PG_LOCKED = ("SELECT c.budget_key, c.instance, c.window_start, c.spent, c.reserved "
              "FROM llmtally_budget_counters c JOIN wanted w "
              "USING (budget_key, instance, window_start) "
              "ORDER BY c.budget_key, c.instance, c.window_start FOR UPDATE OF c")
_PG_SAME_COUNTER = ("c.budget_key = r.budget_key AND c.instance = r.instance "
                    "AND c.window_start = r.window_start")
_PG_RESERVE = f"""
WITH wanted AS ({_PG_TO_RESERVE}),
locked AS ({_PG_LOCKED}),
room AS (SELECT w.* FROM locked l JOIN wanted w USING (budget_key, instance, window_start)
         WHERE NOT w.block OR l.spent + l.reserved + w.amount <= w.lim),
decision AS (SELECT count(*) = %(n)s AS ok FROM room),
held AS (UPDATE llmtally_budget_counters c
            SET reserved = c.reserved + r.amount, updated_at = %(now)s
           FROM room r WHERE (SELECT ok FROM decision) AND {_PG_SAME_COUNTER}
         RETURNING 1),
saved AS (INSERT INTO llmtally_reservations (id, created_at, expires_at, holds)
          SELECT %(id)s, %(now)s, %(expires)s, %(holds)s::jsonb WHERE (SELECT ok FROM decision)
          RETURNING 1)
SELECT (SELECT count(*) FROM held), (SELECT count(*) FROM saved)
"""


@dataclass(frozen=True, slots=True)
class Hold:
    """One budget's share of a reservation."""

    budget: Budget
    instance: str
    window: Window
    amount: int  # units


@dataclass(frozen=True, slots=True)
class Reservation:
    """What a call has reserved. The event that records the call releases it (``record(...,
    reservation=...)``), in the transaction that stores the event; :meth:`Tally.release`
    gives it back when no call was made."""

    id: str
    holds: tuple[Hold, ...]


@dataclass(frozen=True, slots=True)
class CounterState:
    """A budget instance's use in its current window (for ``llmtally budgets`` and alerts)."""

    budget: Budget
    instance: str
    window: Window
    spent: float     # in the budget's own terms (currency, tokens, requests)
    reserved: float

    @property
    def used(self) -> float:
        return self.spent + self.reserved

    def run_out(self, now: datetime) -> datetime | None:
        """When the limit is reached at this window's burn rate so far (naive UTC), or None
        if not before the window resets (or nothing has been spent yet)."""
        now = _naive(now)
        elapsed = (now - self.window.start).total_seconds()
        if self.spent <= 0 or elapsed <= 0 or self.window.end is None:
            return None
        if self.used >= self.budget.limit:
            return now
        moment = now + timedelta(seconds=(self.budget.limit - self.used) * elapsed / self.spent)
        return moment if moment < self.window.end else None

    @classmethod
    def from_units(cls, budget: Budget, instance: str, window: Window, spent: int,
                   reserved: int) -> CounterState:
        scale = UNIT_SCALE[budget.kind]
        return cls(budget, instance, window, spent / scale, reserved / scale)


@dataclass(frozen=True, slots=True)
class Crossing:
    """A warning threshold crossed for the first time in a window (deduplicated in the ledger)."""

    state: CounterState
    threshold: float


@dataclass(frozen=True, slots=True)
class Defined:
    """A budget as the ledger defines it, with the time zone its windows are counted in."""

    budget: Budget
    timezone: str
    updated_by: str = ""
    updated_at: datetime | None = None

    @property
    def tz(self) -> Any:
        return zone(self.timezone)


@dataclass(frozen=True, slots=True)
class Drift:
    """A counter that disagrees with the ledger (``llmtally budgets --check``)."""

    budget: Budget
    instance: str
    window_start: datetime
    spent: float
    expected_spent: float
    reserved: float
    expected_reserved: float


Amounts = Mapping[str, float]  # {"usd": ..., "tokens": ..., "requests": ...}


class BudgetLedger:
    """Reserve, release and expire budget holds in ``store`` for this process's budgets."""

    def __init__(self, store: Store, budgets: Sequence[Budget], *, tz: Any, currency: str,
                 reservation_ttl: timedelta, clock: Callable[[], datetime],
                 timezone_name: str = "UTC") -> None:
        self.store = store
        self.currency = currency
        self.budgets = tuple(budgets)
        self.tz = tz
        self.timezone_name = timezone_name
        self.reservation_ttl = reservation_ttl
        self._clock = clock
        self._by_key = {budget.key: budget for budget in self.budgets}
        self._known_counters: set[tuple[str, str, datetime]] = set()
        self._next_expiry = datetime.min
        self._next_refresh = datetime.min
        self._published = False
        self._generation = store.generation
        if len(self._by_key) != len(self.budgets):
            raise ConfigError("two budgets count the same thing (same kind, window, scope and "
                              "each=); keep one, with the limit you want")

    # -- definitions ---------------------------------------------------------------------

    def publish(self) -> None:
        """Write this process's budget definitions to the ledger (once). A definition that
        differs from the one stored replaces it — the latest published wins — and is logged."""
        if self._published:
            return
        now = _naive(self._clock())
        me = _whoami()
        with self.store.write() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(_PG_EXCLUSIVE_LOCK)
            stored = {row.budget_key: row for row in conn.execute(select(DEFINITIONS).where(
                DEFINITIONS.c.budget_key.in_(list(self._by_key)))).all()}
            for budget in self.budgets:
                definition = _definition_text(budget)
                old = stored.get(budget.key)
                if old is None:
                    conn.execute(DEFINITIONS.insert().values(
                        budget_key=budget.key, definition=definition,
                        timezone=self.timezone_name, updated_at=now, updated_by=me))
                    continue
                if old.definition != definition or old.timezone != self.timezone_name:
                    logger.warning(
                        "llmtally: budget '%s' was defined in the ledger as %s (timezone %s, by "
                        "%s at %s); this process defines %s (timezone %s). The latest definition "
                        "wins: every process now enforces this one", budget.label,
                        old.definition, old.timezone, old.updated_by, old.updated_at,
                        definition, self.timezone_name)
                conn.execute(DEFINITIONS.update().where(
                    DEFINITIONS.c.budget_key == budget.key).values(
                    definition=definition, timezone=self.timezone_name, updated_at=now,
                    updated_by=me))
        self._published = True
        self._next_refresh = now + _REFRESH_INTERVAL

    def _refresh(self, now: datetime) -> None:
        """Adopt a definition of one of our budgets that another process published since."""
        self._next_refresh = now + _REFRESH_INTERVAL
        with self.store.connect() as conn:
            rows = conn.execute(select(DEFINITIONS.c.budget_key, DEFINITIONS.c.definition,
                                       DEFINITIONS.c.updated_by).where(
                DEFINITIONS.c.budget_key.in_(list(self._by_key)))).all()
        changed = False
        for key, definition, updated_by in rows:
            mine = self._by_key.get(key)
            if mine is None or _definition_text(mine) == definition:
                continue
            try:
                theirs = Budget.from_dict(json.loads(definition))
            except (ValueError, TypeError, ConfigError):
                continue
            if theirs.key != key:
                continue
            logger.warning("llmtally: budget '%s' was redefined in the ledger by %s as %s; this "
                           "process enforces that definition from now on", mine.label,
                           updated_by, definition)
            self._by_key[key] = theirs
            changed = True
        if changed:
            self.budgets = tuple(self._by_key[budget.key] for budget in self.budgets)

    # -- holds ---------------------------------------------------------------------------

    def covering(self, attributes: Mapping[str, Any], now: datetime) -> list[tuple[Budget, str, Window]]:
        """The budget instances and windows a call with these attributes counts against, in one
        global order (so two transactions never lock the same counters in opposite orders)."""
        out = []
        for budget in self.budgets:
            instance = instance_for(budget, attributes)
            if instance is not None:
                out.append((budget, instance, window_for(budget.per, now, self.tz)))
        return sorted(out, key=lambda item: (item[0].key, item[1]))

    def reserve(self, reservation_id: str, attributes: Mapping[str, Any],
                estimate: Amounts) -> Reservation:
        """Hold ``estimate`` on every covering budget, or raise BudgetExceeded (nothing held)."""
        now = _naive(self._clock())
        if self._generation != self.store.generation:  # the SQLite file was replaced
            self._generation = self.store.generation
            self._known_counters.clear()
            self._published = False
        if not self._published:
            self.publish()
        elif now >= self._next_refresh:
            self._refresh(now)
        covering = self.covering(attributes, now)
        if not covering:
            return Reservation(reservation_id, ())
        if self.store.dialect == "postgresql":
            self._ensure_counters_pg(covering, now)
            if now < self._next_expiry:
                fast = self._reserve_in_one_statement(reservation_id, covering, estimate, now)
                if fast is not None:
                    return fast
            # Some budget has no room (or expiry is due): the transaction below expires dead
            # holds, retries, and names the budget that refuses.
        if now >= self._next_expiry:
            self._expire(now)
        try:
            return self._reserve_in_transaction(reservation_id, covering, estimate, now)
        except BudgetExceeded:
            if not self._expire(now):  # about to block: first release holds of dead processes
                raise
            return self._reserve_in_transaction(reservation_id, covering, estimate, now)

    def _reserve_in_transaction(self, reservation_id: str,
                                covering: Sequence[tuple[Budget, str, Window]],
                                estimate: Amounts, now: datetime) -> Reservation:
        """Hold on every covering counter (locked in their global order), or raise."""
        holds: list[Hold] = []
        seen: list[tuple[str, str, datetime]] = []
        with self.store.write() as conn:
            self._fast_commit(conn)
            for budget, instance, window in covering:
                amount = to_units(budget.kind, estimate.get(budget.kind, 0.0))
                seen.append(self._ensure_counter(conn, budget, instance, window, now))
                counter = {"key": budget.key, "instance": instance, "start": window.start}
                hold = {**counter, "amount": amount, "now": now,
                        "limit": to_units(budget.kind, budget.limit)}
                if budget.action == "block":
                    updated = conn.execute(_RESERVE_IF_ROOM, hold).rowcount
                else:
                    updated = conn.execute(_RESERVE, hold).rowcount
                if updated != 1:
                    found = conn.execute(_USE, counter).first()
                    if found is None:  # cannot happen once created; never a silent pass
                        self._known_counters.discard((budget.key, instance, window.start))
                        raise RuntimeError(f"the counter of budget '{budget.label}' is missing")
                    spent, reserved = found
                    scale = UNIT_SCALE[budget.kind]
                    raise BudgetExceeded(  # leaving the block rolls every hold back
                        budget, _scope_of(budget, instance), (spent + reserved) / scale,
                        amount / scale, _aware(window.end, self.tz), self._unit(budget))
                holds.append(Hold(budget, instance, window, amount))
            conn.execute(RESERVATIONS.insert(), {
                "id": reservation_id, "created_at": now, "expires_at": now + self.reservation_ttl,
                "holds": _holds_json(holds)})
        self._remember(seen)
        return Reservation(reservation_id, tuple(holds))

    def release(self, reservation: Reservation) -> None:
        """Give the holds back (the call was not made, or its event will not be written)."""
        if not reservation.holds:
            return
        with self.store.write() as conn:
            self._fast_commit(conn)
            release_reservations(conn, [reservation.id], _naive(self._clock()))

    def states(self, now: datetime | None = None) -> list[CounterState]:
        """Every budget instance with a counter in its current window (plus each budget
        without ``each=`` even if unused), for ``llmtally budgets``."""
        now = _naive(now or self._clock())
        defined = [Defined(budget, self.timezone_name) for budget in self.budgets]
        with self.store.connect() as conn:
            return _states(conn, defined, now)

    # -- internals -----------------------------------------------------------------------

    def _remember(self, seen: Iterable[tuple[str, str, datetime]]) -> None:
        # Only counters known to be committed are skipped from now on: a sibling thread must
        # not update a row this transaction had created but not yet committed.
        if len(self._known_counters) > 100_000:  # one per instance and window: keep it bounded
            self._known_counters.clear()
        self._known_counters.update(seen)

    def _ensure_counters_pg(self, covering: Sequence[tuple[Budget, str, Window]],
                            now: datetime) -> None:
        """PostgreSQL: create missing counters in a transaction of their own, holding the
        exclusive lock (a reserve transaction must not wait for it while holding row locks)."""
        missing = [(b, i, w) for b, i, w in covering if (b.key, i, w.start) not in self._known_counters]
        if not missing:
            return
        with self.store.write() as conn:
            conn.execute(_PG_EXCLUSIVE_LOCK)
            seen = [self._ensure_counter(conn, b, i, w, now) for b, i, w in missing]
        self._remember(seen)

    def _reserve_in_one_statement(self, reservation_id: str,
                                  covering: Sequence[tuple[Budget, str, Window]],
                                  estimate: Amounts, now: datetime) -> Reservation | None:
        """Hold on every counter in one round trip; None if any budget has no room."""
        holds = tuple(Hold(budget, instance, window,
                           to_units(budget.kind, estimate.get(budget.kind, 0.0)))
                      for budget, instance, window in covering)
        params = {
            **_counter_arrays(holds),
            "limits": [to_units(h.budget.kind, h.budget.limit) for h in holds],
            "blocks": [h.budget.action == "block" for h in holds],
            "n": len(holds), "id": reservation_id, "now": now,
            "expires": now + self.reservation_ttl, "holds": json.dumps(_holds_json(holds)),
        }
        held, saved = self.store.run_statement(_PG_RESERVE, params)[0]
        return Reservation(reservation_id, holds) if held == len(holds) and saved == 1 else None

    def _unit(self, budget: Budget) -> str:
        return self.currency if budget.kind == "usd" else budget.kind

    def _ensure_counter(self, conn: Connection, budget: Budget, instance: str, window: Window,
                        now: datetime) -> tuple[str, str, datetime]:
        """Create the counter if it is new, starting from the ledger's events; returns its key.
        (On PostgreSQL the caller holds the exclusive lock.)"""
        known = (budget.key, instance, window.start)
        if known in self._known_counters:
            return known
        ensure_counter(conn, budget, instance, window, now)
        return known

    def _fast_commit(self, conn: Connection) -> None:
        """On PostgreSQL, budget transactions don't wait for the WAL flush (the row locks still
        serialise them); a database crash may forget the last few milliseconds of holds."""
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")

    def _expire(self, now: datetime) -> bool:
        """Give back the holds of reservations whose process never settled them, in a
        transaction of their own (counters locked in their global order). True if any."""
        self._next_expiry = now + _EXPIRY_INTERVAL
        with self.store.connect() as conn:
            expired = conn.execute(select(RESERVATIONS.c.id).where(
                RESERVATIONS.c.expires_at < now).limit(500)).scalars().all()
        if not expired:
            return False
        with self.store.write() as conn:
            self._fast_commit(conn)
            return bool(release_reservations(conn, list(expired), now))


# -- charging events: in the transaction that inserts them ------------------------------------


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
            conn.execute(_PG_SHARED_LOCK)
        definitions = self._definitions(conn)
        reservation_ids = [row["_reservation"] for row in rows if row.get("_reservation")]
        if not definitions and not reservation_ids:
            return None
        return _Batch(definitions, reservation_ids)

    def after_insert(self, conn: Connection, batch: _Batch,
                     inserted: Sequence[Mapping[str, Any]]) -> Callable[[], None] | None:
        now = _naive(self._clock())
        used = charges_of(batch.definitions, inserted)
        released = release_reservations(conn, batch.reservation_ids, now, apply=False)
        crossings: list[Crossing] = []
        asked: list[tuple[str, str, datetime, float]] = []
        by_key = {d.budget.key: d for d in batch.definitions}
        for counter in sorted(set(used) | set(released)):  # one global lock order
            amount = used.get(counter, 0)
            key, instance, start = counter
            row = conn.execute(_CHARGE, {"key": key, "instance": instance, "start": start,
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
                    reached = [t for t in _thresholds_reached(defined.budget, int(row[0]))
                               if (key, instance, start, t) not in self._claimed]
                    if reached:
                        crossings += _crossings(conn, hold, reached, int(row[0]), int(row[1]), now)
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
                parsed = _parse_definition(definition, tz)
                if len(self._parsed) > 10_000:
                    self._parsed.clear()
                self._parsed[(definition, tz)] = parsed
            if parsed is not None:
                out.append(parsed)
        return out


def charges_of(definitions: Sequence[Defined],
               events: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, datetime], int]:
    """What ``events`` add to each counter (key, instance, window start), in units."""
    used: dict[tuple[str, str, datetime], int] = {}
    if not definitions:
        return used
    zones = {d.timezone: d.tz for d in definitions}
    for event in events:
        if event.get("status") == "blocked":
            continue
        ts = _naive(event["ts"]) if isinstance(event.get("ts"), datetime) else None
        if ts is None:
            continue
        for defined in definitions:
            budget = defined.budget
            instance = instance_for(budget, event)
            if instance is None:
                continue
            window = window_for(budget.per, ts, zones[defined.timezone])
            amount = _amount_of(budget.kind, event)
            counter = (budget.key, instance, window.start)
            used[counter] = used.get(counter, 0) + amount
    return used


def _amount_of(kind: str, event: Mapping[str, Any]) -> int:
    if kind == "usd":
        return to_units("usd", event.get("cost") or 0.0)
    if kind == "tokens":
        return int(event.get("input_tokens") or 0) + int(event.get("output_tokens") or 0)
    return 1


def release_reservations(conn: Connection, ids: Sequence[str], now: datetime, *,
                         apply: bool = True) -> dict[tuple[str, str, datetime], int]:
    """Delete these reservations (those still there: each is released once) and return the
    amounts they held per counter; ``apply`` takes them off the counters' ``reserved`` now."""
    released: dict[tuple[str, str, datetime], int] = {}
    for start in range(0, len(ids), 500):
        chunk = list(dict.fromkeys(ids[start:start + 500]))
        rows = conn.execute(delete(RESERVATIONS).where(RESERVATIONS.c.id.in_(chunk))
                            .returning(RESERVATIONS.c.holds)).all()
        for (holds,) in rows:
            for key, instance, window_start, amount in _holds(holds):
                counter = (key, instance, window_start)
                released[counter] = released.get(counter, 0) + amount
    if apply:
        for counter in sorted(released):
            key, instance, window_start = counter
            conn.execute(_CHARGE, {"key": key, "instance": instance, "start": window_start,
                                   "used": 0, "released": released[counter], "now": now})
    return released


def ensure_counter(conn: Connection, budget: Budget, instance: str, window: Window,
                   now: datetime) -> None:
    """Create the counter, seeded from the ledger's events, if it does not exist."""
    if conn.execute(_USE, {"key": budget.key, "instance": instance,
                           "start": window.start}).first() is None:
        spent = seed(conn, budget, instance, window)
        conn.execute(_insert_ignore(conn).values(
            budget_key=budget.key, instance=instance, window_start=window.start,
            window_end=window.end, spent=spent, reserved=0, updated_at=now))


def seed(conn: Connection, budget: Budget, instance: str, window: Window) -> int:
    """What the ledger's events spent in this window for this instance, in units: the
    ``GROUP BY`` a counter caches. Money is summed per event rounded to nano-units, as charges
    add it one event at a time, so a seed and a running counter agree to the unit."""
    amount = {"usd": func.coalesce(func.sum(_half_up(conn, func.coalesce(_E.cost, 0.0)
                                                     * UNIT_SCALE["usd"])), 0),
              "tokens": func.coalesce(func.sum(_E.input_tokens + _E.output_tokens), 0),
              "requests": func.count()}[budget.kind]
    statement = select(amount).select_from(UsageEvent.__table__).where(
        *_covered(conn, budget, instance, window))
    return int(conn.execute(statement).scalar() or 0)


def _covered(conn: Connection, budget: Budget, instance: str, window: Window) -> list[Any]:
    """The conditions on an event counted by this budget instance in this window."""
    conditions = [_E.ts >= window.start, _E.status != "blocked"]
    if window.end is not None:
        conditions.append(_E.ts < window.end)
    for key, value in budget.scope.items():
        conditions.append(_has_tag(conn, value) if key == "tag" else _E[key] == value)
    if budget.each:
        conditions.append(_E[budget.each] == instance)
    return conditions


def unpriced_calls(conn: Connection, state: CounterState) -> int:
    """Calls in a budget instance's window to models with no price (a usd budget counts them
    as $0)."""
    statement = select(func.count()).select_from(UsageEvent.__table__).where(
        *_covered(conn, state.budget, state.instance, state.window),
        _E.cost_status == "unpriced")
    return int(conn.execute(statement).scalar() or 0)


# -- reading the ledger's budgets (llmtally budgets, reports, --check) --------------------------


def defined_budgets(conn: Connection) -> list[Defined]:
    """Every budget defined in the ledger (by any process), in key order."""
    if not inspect(conn).has_table(DEFINITIONS.name):  # a ledger before migration 3
        return []
    rows = conn.execute(select(DEFINITIONS).order_by(DEFINITIONS.c.budget_key)).all()
    found: dict[str, tuple[bool, Defined]] = {}
    for row in rows:
        parsed = _parse_definition(row.definition, row.timezone)
        if parsed is None:
            continue
        # A row written before a budget's key was normalised (one name per provider) parses
        # to the same budget as its newer row: keep one, the row stored under its own key.
        current = row.budget_key == parsed.budget.key
        if parsed.budget.key not in found or current and not found[parsed.budget.key][0]:
            found[parsed.budget.key] = (current, Defined(parsed.budget, parsed.timezone, row.updated_by,
                                                         row.updated_at))
    return [defined for _, defined in sorted(found.values(), key=lambda item: item[1].budget.key)]


def ledger_states(conn: Connection, now: datetime) -> list[CounterState]:
    """:meth:`BudgetLedger.states` for every budget defined in the ledger."""
    return _states(conn, defined_budgets(conn), _naive(now))


def _states(conn: Connection, defined: Sequence[Defined], now: datetime) -> list[CounterState]:
    states: list[CounterState] = []
    for item in defined:
        budget = item.budget
        window = window_for(budget.per, now, item.tz)
        rows = conn.execute(select(COUNTERS.c.instance, COUNTERS.c.spent,
                                   COUNTERS.c.reserved).where(
            COUNTERS.c.budget_key == budget.key,
            COUNTERS.c.window_start == window.start).order_by(COUNTERS.c.instance)).all()
        if not rows and budget.each is None:
            rows = [("", seed(conn, budget, "", window), 0)]
        states += [CounterState.from_units(budget, row[0], window, int(row[1]), int(row[2]))
                   for row in rows]
    return states


def check_counters(store: Store, *, repair: bool = False,
                   window_starts_before: datetime | None = None) -> list[Drift]:
    """Compare every counter with the ledger's events (``spent``) and open reservations
    (``reserved``); ``repair`` rewrites those that differ. Returns the drifts found.

    Runs in one write transaction (on PostgreSQL holding the exclusive lock, so no insert is
    half-charged meanwhile). ``window_starts_before`` limits it to older windows (prune)."""
    with store.write() as conn:
        return recount(conn, repair=repair, window_starts_before=window_starts_before)


def recount(conn: Connection, *, repair: bool = False,
            window_starts_before: datetime | None = None,
            budget_keys: Iterable[str] | None = None) -> list[Drift]:
    """:func:`check_counters` inside the caller's write transaction (also used by a migration),
    for every budget or only those of ``budget_keys``."""
    drifts: list[Drift] = []
    if conn.dialect.name == "postgresql":
        conn.execute(_PG_EXCLUSIVE_LOCK)
    by_key = {d.budget.key: d for d in defined_budgets(conn)}
    query = select(COUNTERS).order_by(COUNTERS.c.budget_key, COUNTERS.c.instance,
                                      COUNTERS.c.window_start)
    if window_starts_before is not None:
        query = query.where(COUNTERS.c.window_start < window_starts_before)
    if budget_keys is not None:
        query = query.where(COUNTERS.c.budget_key.in_(list(budget_keys)))
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    counters = conn.execute(query).all()
    held: dict[tuple[str, str, datetime], int] = {}
    for (holds,) in conn.execute(select(RESERVATIONS.c.holds)).all():
        for key, instance, start, amount in _holds(holds):
            held[(key, instance, start)] = held.get((key, instance, start), 0) + amount
    now = _naive(datetime.now(timezone.utc))
    for row in counters:
        defined = by_key.get(row.budget_key)
        if defined is None:
            continue  # a budget no longer defined: nothing charges it, nothing reads it
        budget = defined.budget
        window = Window(row.window_start, row.window_end)
        expected = seed(conn, budget, row.instance, window)
        expected_reserved = held.get((row.budget_key, row.instance, row.window_start), 0)
        if int(row.spent) == expected and int(row.reserved) == expected_reserved:
            continue
        scale = UNIT_SCALE[budget.kind]
        drifts.append(Drift(budget, row.instance, row.window_start, int(row.spent) / scale,
                            expected / scale, int(row.reserved) / scale,
                            expected_reserved / scale))
        if repair:
            conn.execute(COUNTERS.update().where(_counter_is(
                row.budget_key, row.instance, row.window_start)).values(
                spent=expected, reserved=expected_reserved, updated_at=now))
    return drifts


def rename_budgets(conn: Connection, now: datetime) -> None:
    """After a change of how budget keys are written (migration 4): store each definition
    under its budget's key now, drop its counters under the old key (they are seeded again
    from the events when next used) and those of ended windows of budgets that scope or split
    by provider or model (their names were rewritten), and recount the open windows of those."""
    if conn.dialect.name == "postgresql":
        conn.execute(_PG_EXCLUSIVE_LOCK)
    rows = conn.execute(select(DEFINITIONS)).all()
    keys = {row.budget_key for row in rows}
    named: set[str] = set()
    for row in rows:
        parsed = _parse_definition(row.definition, row.timezone)
        if parsed is None:
            continue
        budget = parsed.budget
        if {"provider", "model"} & (set(budget.scope) | {budget.each}):
            named.add(budget.key)
        if budget.key == row.budget_key:
            continue
        conn.execute(delete(COUNTERS).where(COUNTERS.c.budget_key == row.budget_key))
        if budget.key in keys:
            conn.execute(delete(DEFINITIONS).where(DEFINITIONS.c.budget_key == row.budget_key))
        else:
            conn.execute(DEFINITIONS.update().where(DEFINITIONS.c.budget_key == row.budget_key).values(
                budget_key=budget.key, definition=json.dumps(budget.to_dict())))
            keys.add(budget.key)
    if named:
        conn.execute(delete(COUNTERS).where(COUNTERS.c.budget_key.in_(sorted(named)),
                                            COUNTERS.c.window_end.is_not(None),
                                            COUNTERS.c.window_end <= _naive(now)))
        recount(conn, repair=True, budget_keys=named)


def rebuild_counters_before(store: Store, cutoff: datetime) -> int:
    """After events older than ``cutoff`` were deleted (prune): drop the counters of windows
    that ended by then and recompute those that straddle it. Returns the counters changed."""
    cutoff = _naive(cutoff)
    with store.write() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(_PG_EXCLUSIVE_LOCK)
        dropped = conn.execute(delete(COUNTERS).where(
            COUNTERS.c.window_end.is_not(None), COUNTERS.c.window_end <= cutoff)).rowcount
    return max(dropped, 0) + len(check_counters(store, repair=True, window_starts_before=cutoff))


# -- helpers -----------------------------------------------------------------------------------


def _half_up(conn: Connection, value: Any) -> Any:
    """floor(value + 0.5) in SQL, as :func:`to_units` rounds (SQL's own round() differs between
    SQLite and PostgreSQL at .5); SQLite's CAST truncates, which is floor for costs >= 0."""
    if conn.dialect.name == "postgresql":
        return func.floor(value + 0.5)
    return cast(value + 0.5, BigInteger)


def _crossings(conn: Connection, hold: Hold, thresholds: Sequence[float], spent: int,
               reserved: int, now: datetime) -> list[Crossing]:
    """The ``thresholds`` reached that this transaction is first to claim in the ledger, so
    that only one process (and one event) reports each per window."""
    budget = hold.budget
    crossed = []
    for threshold in thresholds:
        # RETURNING says whether this insert won (psycopg reports rowcount -1 for it)
        claimed = conn.execute(_insert_ignore(conn, ALERTS).values(
            budget_key=budget.key, instance=hold.instance, window_start=hold.window.start,
            threshold=threshold, fired_at=now).returning(ALERTS.c.threshold)).first()
        if claimed is not None:
            state = CounterState.from_units(budget, hold.instance, hold.window, spent, reserved)
            crossed.append(Crossing(state, threshold))
    return crossed


def _thresholds_reached(budget: Budget, spent: int) -> list[float]:
    """The warning thresholds ``spent`` units have reached (each is claimed once per window
    in the ledger, so one reached earlier — by a seed, an import — is still reported once)."""
    limit = to_units(budget.kind, budget.limit)
    if limit <= 0:
        return []
    return [t for t in budget.warn_at if t * limit <= spent]


def _definition_text(budget: Budget) -> str:
    return json.dumps(budget.to_dict(), sort_keys=True)


def _parse_definition(definition: str, tz: str) -> Defined | None:
    try:
        budget = Budget.from_dict(json.loads(definition))
        zone(tz)
    except (ValueError, TypeError, ConfigError) as exc:
        warn_limited("budget-definition", "llmtally: a budget definition in the ledger cannot "
                     "be read (%s: %s); it is ignored", type(exc).__name__, exc,
                     level=logging.ERROR)
        return None
    return Defined(budget, tz)


def _whoami() -> str:
    return f"{socket.gethostname()[:200]}:{os.getpid()}"


def _counter_is(key: str, instance: str, window_start: datetime) -> Any:
    return and_(COUNTERS.c.budget_key == key, COUNTERS.c.instance == instance,
                COUNTERS.c.window_start == window_start)


def _insert_ignore(conn: Connection, table: Table = COUNTERS) -> Any:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table).on_conflict_do_nothing()


def _has_tag(conn: Connection, tag: str) -> Any:
    if conn.dialect.name == "postgresql":
        return _E.tags.op("@>")(literal([tag], type_=JSONB))
    each = func.json_each(_E.tags).table_valued("value")
    return exists(select(literal(1)).select_from(each).where(each.c.value == tag))


def _holds_json(holds: Iterable[Hold]) -> list[list[Any]]:
    return [[h.budget.key, h.instance, h.window.start.isoformat(), h.amount] for h in holds]


def _counter_arrays(holds: Sequence[Hold]) -> dict[str, list[Any]]:
    """The unnest() arrays naming each hold's counter, and its held amount."""
    return {"keys": [h.budget.key for h in holds], "instances": [h.instance for h in holds],
            "starts": [h.window.start for h in holds], "amounts": [h.amount for h in holds]}


def _holds(raw: Any) -> Iterable[tuple[str, str, datetime, int]]:
    for key, instance, start, amount in (json.loads(raw) if isinstance(raw, str) else raw):
        yield key, instance, datetime.fromisoformat(start), int(amount)


def _scope_of(budget: Budget, instance: str) -> dict[str, str]:
    scope = dict(budget.scope)
    if budget.each:
        scope[budget.each] = instance
    return scope


def _naive(moment: datetime) -> datetime:
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment


def _aware(moment: datetime | None, tz: Any) -> datetime | None:
    return None if moment is None else moment.replace(tzinfo=timezone.utc).astimezone(tz)
