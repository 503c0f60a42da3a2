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

# PostgreSQL: reserve and settle as one statement each (one round trip, committed on its own).
# The counters are locked in one global order first (ORDER BY ... FOR UPDATE), so two calls
# covering the same counters never deadlock; a hold goes in only if every counter has room.
_PG_COUNTERS = ("%(keys)s::text[], %(instances)s::text[], %(starts)s::timestamp[], "
                "%(amounts)s::bigint[]")  # each hold's counter and held amount
_PG_TO_RESERVE = (f"SELECT * FROM unnest({_PG_COUNTERS}, %(limits)s::bigint[], %(blocks)s::bool[]) "
                  "AS w(budget_key, instance, window_start, amount, lim, block)")
_PG_TO_SETTLE = (f"SELECT * FROM unnest({_PG_COUNTERS}, %(used)s::bigint[]) "
                 "AS w(budget_key, instance, window_start, amount, used)")
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
_PG_SETTLE = f"""
WITH wanted AS ({_PG_TO_SETTLE}),
dropped AS (DELETE FROM llmtally_reservations WHERE id = %(id)s RETURNING 1),
locked AS ({_PG_LOCKED})
UPDATE llmtally_budget_counters c
   SET spent = c.spent + r.used,
       reserved = c.reserved - CASE WHEN EXISTS (SELECT 1 FROM dropped) THEN r.amount ELSE 0 END,
       updated_at = %(now)s
  FROM wanted r WHERE (SELECT count(*) FROM locked) >= 0 AND {_PG_SAME_COUNTER}
RETURNING c.budget_key, c.instance, c.spent, c.reserved
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
    """What a call has reserved; settle or release it exactly once."""

    id: str
    holds: tuple[Hold, ...]
    # Set when the budgets could not be checked (ledger down, fail open): the call's real use
    # is charged to the covering budgets when it settles, so the spend is not lost to them.
    unchecked: Mapping[str, Any] | None = None


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
        if self._one_statement_ok(covering, now):
            fast = self._reserve_in_one_statement(reservation_id, covering, estimate, now)
            if fast is not None:
                return fast
            # Some budget has no room: the transaction below expires dead holds, retries, and
            # names the budget that refuses.
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
                "holds": _holds_json(holds)})
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
        if self.store.dialect == "postgresql":
            return self._settle_in_one_statement(reservation, actual, now)
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

    def charge(self, attributes: Mapping[str, Any], actual: Amounts, when: datetime,
               event_id: str) -> list[Crossing]:
        """Add a call's real use to every budget covering it, without a limit check (the call
        went out while the budgets could not be checked). A counter created here starts from
        the ledger's events without ``event_id``, so the call is counted once either way."""
        when = _naive(when)
        crossings: list[Crossing] = []
        with self.store.write() as conn:
            for budget, instance, window in self.covering(attributes, when):
                self._ensure_counter(conn, budget, instance, window, when, without=event_id)
                used = to_units(budget.kind, actual.get(budget.kind, 0.0))
                row = conn.execute(_SETTLE, {"key": budget.key, "instance": instance,
                                             "start": window.start, "used": used, "released": 0,
                                             "now": when}).first()
                if row is not None:
                    crossings += self._crossings(conn, Hold(budget, instance, window, 0),
                                                 int(row[0]) - used, int(row[0]), int(row[1]), when)
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

    def _one_statement_ok(self, covering: Sequence[tuple[Budget, str, Window]],
                          now: datetime) -> bool:
        """PostgreSQL, every counter already created, and no expiry sweep due."""
        return (self.store.dialect == "postgresql" and now < self._next_expiry
                and all((b.key, i, w.start) in self._known_counters for b, i, w in covering))

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

    def _settle_in_one_statement(self, reservation: Reservation, actual: Amounts,
                                 now: datetime) -> list[Crossing]:
        holds = reservation.holds
        used = [to_units(h.budget.kind, actual.get(h.budget.kind, 0.0)) for h in holds]
        rows = self.store.run_statement(_PG_SETTLE, {
            **_counter_arrays(holds), "used": used, "id": reservation.id, "now": now})
        after = {(key, instance): (int(spent), int(reserved)) for key, instance, spent, reserved in rows}
        crossings: list[Crossing] = []
        for hold, amount in zip(holds, used):
            spent, reserved = after.get((hold.budget.key, hold.instance), (0, 0))
            if _thresholds_crossed(hold.budget, spent - amount, spent):  # rare: claim them
                with self.store.write() as conn:
                    crossings += self._crossings(conn, hold, spent - amount, spent, reserved, now)
        return crossings

    def _unit(self, budget: Budget) -> str:
        return self.currency if budget.kind == "usd" else budget.kind

    def _ensure_counter(self, conn: Connection, budget: Budget, instance: str, window: Window,
                        now: datetime, without: str | None = None) -> tuple[str, str, datetime]:
        """Create the counter if it is new (starting from the ledger's events, leaving out the
        event ``without``); returns its key."""
        known = (budget.key, instance, window.start)
        if known in self._known_counters:
            return known
        if conn.execute(_USE, {"key": budget.key, "instance": instance,
                               "start": window.start}).first() is None:
            spent = self._seed(conn, budget, instance, window, without=without)
            conn.execute(_insert_ignore(conn).values(
                budget_key=budget.key, instance=instance, window_start=window.start,
                window_end=window.end, spent=spent, reserved=0, updated_at=now))
        return known

    def _fast_commit(self, conn: Connection) -> None:
        """On PostgreSQL, budget transactions don't wait for the WAL flush (the row locks still
        serialise them); a database crash may forget the last few milliseconds of holds."""
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")

    def _seed(self, conn: Connection, budget: Budget, instance: str, window: Window,
              without: str | None = None) -> int:
        """What the events already in the ledger spent in this window for this instance
        (leaving out the event ``without``)."""
        amount = {"usd": func.coalesce(func.sum(_E.cost), 0.0),
                  "tokens": func.coalesce(func.sum(_E.input_tokens + _E.output_tokens), 0),
                  "requests": func.count()}[budget.kind]
        statement = select(amount).select_from(UsageEvent.__table__).where(
            _E.ts >= window.start, _E.status != "blocked")
        if without is not None:
            statement = statement.where(_E.id != without)
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
        crossed = []
        for threshold in _thresholds_crossed(budget, before, spent):
            # RETURNING says whether this insert won (psycopg reports rowcount -1 for it)
            claimed = conn.execute(_insert_ignore(conn, ALERTS).values(
                budget_key=budget.key, instance=hold.instance, window_start=hold.window.start,
                threshold=threshold, fired_at=now).returning(ALERTS.c.threshold)).first()
            if claimed is not None:
                state = CounterState.from_units(budget, hold.instance, hold.window, spent, reserved)
                crossed.append(Crossing(state, threshold))
        return crossed


def _thresholds_crossed(budget: Budget, before: int, spent: int) -> list[float]:
    """The warning thresholds that going from ``before`` to ``spent`` units passes."""
    limit = to_units(budget.kind, budget.limit)
    if limit <= 0:
        return []
    return [t for t in budget.warn_at if before < t * limit <= spent]


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

