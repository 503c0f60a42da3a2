"""Budget accounting in the ledger: reserve before a call, settle after, in one transaction each.

Every (budget, instance, window) has a counter row with ``spent`` and ``reserved``. A call
reserves its estimate on every budget that covers it with one conditional update per counter::

    UPDATE llmtally_budget_counters SET reserved = reserved + :x
     WHERE <counter> AND spent + reserved + :x <= :limit

inside one transaction (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: the row lock makes a
concurrent update wait and re-check the condition). If any counter refuses, the whole
transaction rolls back and the call is blocked: concurrent callers never take a budget past its
limit by more than the error of their own estimates. Settling moves the hold from ``reserved``
to the real amount in ``spent``; a reservation whose process died expires after its TTL.

Amounts are integers — nano-units of the ledger's currency, tokens, requests — so a hundred
$0.01 calls add up to exactly $1.00 and the hundred-and-first is refused.

A counter created in a window that already has events starts from their sum, so a budget added
mid-month counts the month's spend so far.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import (JSON, BigInteger, Column, Connection, DateTime, Float, MetaData, String,
                        Table, and_, bindparam, exists, func, literal, select, text)
from sqlalchemy.dialects.postgresql import JSONB

from ._budgets import Budget, BudgetExceeded, Window, instance_for, window_for
from ._model import UsageEvent
from ._store import Store

__all__ = ["BudgetLedger", "Hold", "Reservation", "CounterState", "Crossing", "UNIT_SCALE",
           "to_units"]

UNIT_SCALE = {"usd": 10**9, "tokens": 1, "requests": 1}
"""Counters hold integers: nano-units of money, whole tokens, whole requests."""


def to_units(kind: str, amount: float) -> int:
    """An amount of ``kind`` as the integer the counters hold."""
    return int(round(float(amount) * UNIT_SCALE[kind]))

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
_SETTLE = text(
    f"UPDATE llmtally_budget_counters SET spent = spent + :used, reserved = reserved - :released, "
    f"updated_at = :now WHERE {_COUNTER} RETURNING spent, reserved").bindparams(*_TYPES)
_USE = text(f"SELECT spent, reserved FROM llmtally_budget_counters WHERE {_COUNTER}").bindparams(
    bindparam("start", type_=DateTime))
_DROP_RESERVATION = text("DELETE FROM llmtally_reservations WHERE id = :id")
_EXPIRY_INTERVAL = timedelta(seconds=5)  # how often a process looks for dead reservations


@dataclass(frozen=True, slots=True)
class Hold:
    """One budget's share of a reservation."""

    budget: Budget
    instance: str
    window: Window
    amount: int  # units


@dataclass(frozen=True, slots=True)
class Reservation:
    """What a call has reserved; settle or release it exactly once."""

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


Amounts = Mapping[str, float]  # {"usd": ..., "tokens": ..., "requests": ...}


class BudgetLedger:
    """Reserve, settle, release and expire budget holds in ``store``."""

    def __init__(self, store: Store, budgets: Sequence[Budget], *, tz: Any, currency: str,
                 reservation_ttl: timedelta, clock: Callable[[], datetime]) -> None:
        self.store = store
        self.currency = currency
        self.budgets = tuple(budgets)
        self.tz = tz
        self.reservation_ttl = reservation_ttl
        self._clock = clock
        self._by_key = {budget.key: budget for budget in self.budgets}
        self._known_counters: set[tuple[str, str, datetime]] = set()
        self._next_expiry = datetime.min
        if len(self._by_key) != len(self.budgets):
            from ._errors import ConfigError

            raise ConfigError("two budgets count the same thing (same kind, window, scope and "
                              "each=); keep one, with the limit you want")

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
        covering = self.covering(attributes, now)
        if not covering:
            return Reservation(reservation_id, ())
        holds: list[Hold] = []
        seen: list[tuple[str, str, datetime]] = []
        with self.store.write() as conn:
            self._fast_commit(conn)
            if now >= self._next_expiry:
                self._expire(conn, now)
                self._next_expiry = now + _EXPIRY_INTERVAL
            for budget, instance, window in covering:
                amount = to_units(budget.kind, estimate.get(budget.kind, 0.0))
                seen.append(self._ensure_counter(conn, budget, instance, window, now))
                counter = {"key": budget.key, "instance": instance, "start": window.start}
                hold = {**counter, "amount": amount, "now": now,
                        "limit": to_units(budget.kind, budget.limit)}
                if budget.action == "block":
                    updated = conn.execute(_RESERVE_IF_ROOM, hold).rowcount
                    if updated != 1:  # about to block: first release holds of dead processes
                        self._expire(conn, now)
                        updated = conn.execute(_RESERVE_IF_ROOM, hold).rowcount
                else:
                    updated = conn.execute(_RESERVE, hold).rowcount
                if updated != 1:
                    spent, reserved = conn.execute(_USE, counter).one()
                    scale = UNIT_SCALE[budget.kind]
                    raise BudgetExceeded(  # leaving the block rolls every hold back
                        budget, _scope_of(budget, instance), (spent + reserved) / scale,
                        amount / scale, _aware(window.end, self.tz), self._unit(budget))
                holds.append(Hold(budget, instance, window, amount))
            conn.execute(RESERVATIONS.insert(), {
                "id": reservation_id, "created_at": now, "expires_at": now + self.reservation_ttl,
                "holds": [[h.budget.key, h.instance, h.window.start.isoformat(), h.amount]
                          for h in holds]})
        # Only counters known to be committed are skipped from now on: a sibling thread must
        # not update a row this transaction had created but not yet committed.
        if len(self._known_counters) > 100_000:  # one per instance and window: keep it bounded
            self._known_counters.clear()
        self._known_counters.update(seen)
        return Reservation(reservation_id, tuple(holds))

    def settle(self, reservation: Reservation, actual: Amounts) -> list[Crossing]:
        """Replace the holds by what the call really used; returns thresholds newly crossed."""
        if not reservation.holds:
            return []
        now = _naive(self._clock())
        crossings: list[Crossing] = []
        with self.store.write() as conn:
            self._fast_commit(conn)
            still_held = conn.execute(_DROP_RESERVATION, {"id": reservation.id}).rowcount == 1
            for hold in reservation.holds:
                used = to_units(hold.budget.kind, actual.get(hold.budget.kind, 0.0))
                row = conn.execute(_SETTLE, {
                    "key": hold.budget.key, "instance": hold.instance, "start": hold.window.start,
                    "used": used, "now": now,
                    "released": hold.amount if still_held else 0,  # an expired hold was released
                }).first()
                if row is not None and hold.budget.warn_at:
                    crossings += self._crossings(conn, hold, int(row[0]) - used, int(row[0]),
                                                 int(row[1]), now)
        return crossings

    def release(self, reservation: Reservation, *, requests: float = 0.0) -> list[Crossing]:
        """The call failed or never went out: give the holds back (counting ``requests``)."""
        return self.settle(reservation, {"usd": 0.0, "tokens": 0.0, "requests": requests})

    def states(self, now: datetime | None = None) -> list[CounterState]:
        """Every budget instance with a counter in its current window (plus each budget
        without ``each=`` even if unused), for ``llmtally budgets``."""
        now = _naive(now or self._clock())
        states: list[CounterState] = []
        with self.store.connect() as conn:
            for budget in self.budgets:
                window = window_for(budget.per, now, self.tz)
                rows = conn.execute(select(COUNTERS.c.instance, COUNTERS.c.spent,
                                           COUNTERS.c.reserved).where(
                    COUNTERS.c.budget_key == budget.key,
                    COUNTERS.c.window_start == window.start).order_by(COUNTERS.c.instance)).all()
                if not rows and budget.each is None:
                    rows = [("", self._seed(conn, budget, "", window), 0)]
                states += [CounterState.from_units(budget, row[0], window, int(row[1]), int(row[2]))
                           for row in rows]
        return states

    # -- internals -----------------------------------------------------------------------

    def _unit(self, budget: Budget) -> str:
        return self.currency if budget.kind == "usd" else budget.kind

    def _ensure_counter(self, conn: Connection, budget: Budget, instance: str, window: Window,
                        now: datetime) -> tuple[str, str, datetime]:
        """Create the counter if it is new (starting from the ledger's events); returns its key."""
        known = (budget.key, instance, window.start)
        if known in self._known_counters:
            return known
        if conn.execute(_USE, {"key": budget.key, "instance": instance,
                               "start": window.start}).first() is None:
            spent = self._seed(conn, budget, instance, window)
            conn.execute(_insert_ignore(conn).values(
                budget_key=budget.key, instance=instance, window_start=window.start,
                window_end=window.end, spent=spent, reserved=0, updated_at=now))
        return known

    def _fast_commit(self, conn: Connection) -> None:
        """On PostgreSQL, budget transactions don't wait for the WAL flush (the row locks still
        serialise them); a database crash may forget the last few milliseconds of holds."""
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")

    def _seed(self, conn: Connection, budget: Budget, instance: str, window: Window) -> int:
        """What the events already in the ledger spent in this window for this instance."""
        amount = {"usd": func.coalesce(func.sum(_E.cost), 0.0),
                  "tokens": func.coalesce(func.sum(_E.input_tokens + _E.output_tokens), 0),
                  "requests": func.count()}[budget.kind]
        statement = select(amount).select_from(UsageEvent.__table__).where(
            _E.ts >= window.start, _E.status != "blocked")
        if window.end is not None:
            statement = statement.where(_E.ts < window.end)
        for key, value in budget.scope.items():
            statement = statement.where(_has_tag(conn, value) if key == "tag" else _E[key] == value)
        if budget.each:
            statement = statement.where(_E[budget.each] == instance)
        return to_units(budget.kind, conn.execute(statement).scalar() or 0)

    def _expire(self, conn: Connection, now: datetime) -> None:
        """Give back the holds of reservations whose process never settled them."""
        expired = conn.execute(select(RESERVATIONS.c.id, RESERVATIONS.c.holds).where(
            RESERVATIONS.c.expires_at < now).limit(500)).all()
        for reservation_id, holds in expired:
            if conn.execute(RESERVATIONS.delete().where(
                    RESERVATIONS.c.id == reservation_id)).rowcount != 1:
                continue
            for key, instance, start, amount in _holds(holds):  # amounts in units
                conn.execute(COUNTERS.update().where(_counter_is(key, instance, start)).values(
                    reserved=COUNTERS.c.reserved - amount, updated_at=now))

    def _crossings(self, conn: Connection, hold: Hold, before: int, spent: int, reserved: int,
                   now: datetime) -> list[Crossing]:
        """Thresholds this settlement moved ``spent`` across; each is claimed in the ledger so
        that only one process (and one call) reports it per window."""
        budget = hold.budget
        limit = to_units(budget.kind, budget.limit)
        if limit <= 0:
            return []
        crossed = []
        for threshold in budget.warn_at:
            mark = threshold * limit
            if not before < mark <= spent:
                continue
            claimed = conn.execute(_insert_ignore(conn, ALERTS).values(
                budget_key=budget.key, instance=hold.instance, window_start=hold.window.start,
                threshold=threshold, fired_at=now)).rowcount
            if claimed == 1:
                state = CounterState.from_units(budget, hold.instance, hold.window, spent, reserved)
                crossed.append(Crossing(state, threshold))
        return crossed


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

