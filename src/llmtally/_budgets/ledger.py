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
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    select,
)

from .._errors import ConfigError
from .._events.event import as_utc_naive
from .._log import logger
from .budget import Budget, BudgetExceeded, Window, instance_for, window_for
from .counters import (
    counter_arrays,
    counter_states,
    definition_text,
    ensure_counter,
    holds_json,
    release_reservations,
    scope_of,
)
from .states import UNIT_SCALE, Amounts, CounterState, Defined, Hold, Reservation, aware, to_units
from .tables import DEFINITIONS, PG_EXCLUSIVE_LOCK, RESERVATIONS, RESERVE, RESERVE_IF_ROOM, USE, whoami

if TYPE_CHECKING:  # a Store is passed in; _store -> _migrations -> this module at run time
    from .._storage.store import Store

__all__ = ["BudgetLedger"]


_EXPIRY_INTERVAL = timedelta(seconds=5)  # how often a process looks for dead reservations
_REFRESH_INTERVAL = timedelta(seconds=5)  # and re-reads the budget definitions

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
        now = as_utc_naive(self._clock())
        me = whoami()
        with self.store.write() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(PG_EXCLUSIVE_LOCK)
            stored = {row.budget_key: row for row in conn.execute(select(DEFINITIONS).where(
                DEFINITIONS.c.budget_key.in_(list(self._by_key)))).all()}
            for budget in self.budgets:
                definition = definition_text(budget)
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
            if mine is None or definition_text(mine) == definition:
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
        now = as_utc_naive(self._clock())
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
                    updated = conn.execute(RESERVE_IF_ROOM, hold).rowcount
                else:
                    updated = conn.execute(RESERVE, hold).rowcount
                if updated != 1:
                    found = conn.execute(USE, counter).first()
                    if found is None:  # cannot happen once created; never a silent pass
                        self._known_counters.discard((budget.key, instance, window.start))
                        raise RuntimeError(f"the counter of budget '{budget.label}' is missing")
                    spent, reserved = found
                    scale = UNIT_SCALE[budget.kind]
                    raise BudgetExceeded(  # leaving the block rolls every hold back
                        budget, scope_of(budget, instance), (spent + reserved) / scale,
                        amount / scale, aware(window.end, self.tz), self._unit(budget))
                holds.append(Hold(budget, instance, window, amount))
            conn.execute(RESERVATIONS.insert(), {
                "id": reservation_id, "created_at": now, "expires_at": now + self.reservation_ttl,
                "holds": holds_json(holds)})
        self._remember(seen)
        return Reservation(reservation_id, tuple(holds))

    def release(self, reservation: Reservation) -> None:
        """Give the holds back (the call was not made, or its event will not be written)."""
        if not reservation.holds:
            return
        with self.store.write() as conn:
            self._fast_commit(conn)
            release_reservations(conn, [reservation.id], as_utc_naive(self._clock()))

    def states(self, now: datetime | None = None) -> list[CounterState]:
        """Every budget instance with a counter in its current window (plus each budget
        without ``each=`` even if unused), for ``llmtally budgets``."""
        now = as_utc_naive(now or self._clock())
        defined = [Defined(budget, self.timezone_name) for budget in self.budgets]
        with self.store.connect() as conn:
            return counter_states(conn, defined, now)

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
            conn.execute(PG_EXCLUSIVE_LOCK)
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
            **counter_arrays(holds),
            "limits": [to_units(h.budget.kind, h.budget.limit) for h in holds],
            "blocks": [h.budget.action == "block" for h in holds],
            "n": len(holds), "id": reservation_id, "now": now,
            "expires": now + self.reservation_ttl, "holds": json.dumps(holds_json(holds)),
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


# -- reading the ledger's budgets (llmtally budgets, reports, --check) --------------------------


# -- helpers -----------------------------------------------------------------------------------
