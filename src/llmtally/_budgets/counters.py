"""Budget counters kept equal to the ledger: seeded from the events, charged per stored event,
recounted, checked and repaired."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    and_,
    delete,
    exists,
    func,
    inspect,
    literal,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB

from .._errors import ConfigError
from .._events.event import as_utc_naive
from .._log import warn_limited
from .._storage.tables import UsageEvent
from .budget import Budget, Window, instance_for, window_for, zone
from .states import UNIT_SCALE, CounterState, Defined, Drift, Hold, to_units
from .tables import (
    CHARGE,
    COUNTERS,
    DEFINITIONS,
    PG_EXCLUSIVE_LOCK,
    RESERVATIONS,
    USE,
    E,
    half_up,
    insert_ignore,
)

if TYPE_CHECKING:  # a Store is passed in; _store -> _migrations -> this module at run time
    from .._storage.store import Store

__all__ = ["defined_budgets", "check_counters", "rebuild_counters_before", "unpriced_calls", "ledger_states"]

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
        ts = as_utc_naive(event["ts"]) if isinstance(event.get("ts"), datetime) else None
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
            conn.execute(CHARGE, {"key": key, "instance": instance, "start": window_start,
                                   "used": 0, "released": released[counter], "now": now})
    return released


def ensure_counter(conn: Connection, budget: Budget, instance: str, window: Window,
                   now: datetime) -> None:
    """Create the counter, seeded from the ledger's events, if it does not exist."""
    if conn.execute(USE, {"key": budget.key, "instance": instance,
                           "start": window.start}).first() is None:
        spent = seed(conn, budget, instance, window)
        conn.execute(insert_ignore(conn).values(
            budget_key=budget.key, instance=instance, window_start=window.start,
            window_end=window.end, spent=spent, reserved=0, updated_at=now))


def seed(conn: Connection, budget: Budget, instance: str, window: Window) -> int:
    """What the ledger's events spent in this window for this instance, in units: the
    ``GROUP BY`` a counter caches. Money is summed per event rounded to nano-units, as charges
    add it one event at a time, so a seed and a running counter agree to the unit."""
    amount = {"usd": func.coalesce(func.sum(half_up(conn, func.coalesce(E.cost, 0.0)
                                                     * UNIT_SCALE["usd"])), 0),
              "tokens": func.coalesce(func.sum(E.input_tokens + E.output_tokens), 0),
              "requests": func.count()}[budget.kind]
    statement = select(amount).select_from(UsageEvent.__table__).where(
        *_covered(conn, budget, instance, window))
    return int(conn.execute(statement).scalar() or 0)


def _covered(conn: Connection, budget: Budget, instance: str, window: Window) -> list[Any]:
    """The conditions on an event counted by this budget instance in this window."""
    conditions = [E.ts >= window.start, E.status != "blocked"]
    if window.end is not None:
        conditions.append(E.ts < window.end)
    for key, value in budget.scope.items():
        conditions.append(_has_tag(conn, value) if key == "tag" else E[key] == value)
    if budget.each:
        conditions.append(E[budget.each] == instance)
    return conditions


def unpriced_calls(conn: Connection, state: CounterState) -> int:
    """Calls in a budget instance's window to models with no price (a usd budget counts them
    as $0)."""
    statement = select(func.count()).select_from(UsageEvent.__table__).where(
        *_covered(conn, state.budget, state.instance, state.window),
        E.cost_status == "unpriced")
    return int(conn.execute(statement).scalar() or 0)


def defined_budgets(conn: Connection) -> list[Defined]:
    """Every budget defined in the ledger (by any process), in key order."""
    if not inspect(conn).has_table(DEFINITIONS.name):  # a ledger before migration 3
        return []
    rows = conn.execute(select(DEFINITIONS).order_by(DEFINITIONS.c.budget_key)).all()
    found: dict[str, tuple[bool, Defined]] = {}
    for row in rows:
        parsed = parse_definition(row.definition, row.timezone)
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
    return counter_states(conn, defined_budgets(conn), as_utc_naive(now))


def counter_states(conn: Connection, defined: Sequence[Defined], now: datetime) -> list[CounterState]:
    states: list[CounterState] = []
    for item in defined:
        budget = item.budget
        window = window_for(budget.per, now, item.tz)
        rows: Sequence[Sequence[Any]] = conn.execute(
            select(COUNTERS.c.instance, COUNTERS.c.spent, COUNTERS.c.reserved).where(
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
        conn.execute(PG_EXCLUSIVE_LOCK)
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
    now = as_utc_naive(datetime.now(timezone.utc))
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
        conn.execute(PG_EXCLUSIVE_LOCK)
    rows = conn.execute(select(DEFINITIONS)).all()
    keys = {row.budget_key for row in rows}
    named: set[str] = set()
    for row in rows:
        parsed = parse_definition(row.definition, row.timezone)
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
                                            COUNTERS.c.window_end <= as_utc_naive(now)))
        recount(conn, repair=True, budget_keys=named)


def rebuild_counters_before(store: Store, cutoff: datetime) -> int:
    """After events older than ``cutoff`` were deleted (prune): drop the counters of windows
    that ended by then and recompute those that straddle it. Returns the counters changed."""
    cutoff = as_utc_naive(cutoff)
    with store.write() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(PG_EXCLUSIVE_LOCK)
        dropped = conn.execute(delete(COUNTERS).where(
            COUNTERS.c.window_end.is_not(None), COUNTERS.c.window_end <= cutoff)).rowcount
    return max(dropped, 0) + len(check_counters(store, repair=True, window_starts_before=cutoff))


def definition_text(budget: Budget) -> str:
    return json.dumps(budget.to_dict(), sort_keys=True)


def parse_definition(definition: str, tz: str) -> Defined | None:
    try:
        budget = Budget.from_dict(json.loads(definition))
        zone(tz)
    except (ValueError, TypeError, ConfigError) as exc:
        warn_limited("budget-definition", "llmtally: a budget definition in the ledger cannot "
                     "be read (%s: %s); it is ignored", type(exc).__name__, exc,
                     level=logging.ERROR)
        return None
    return Defined(budget, tz)


def _counter_is(key: str, instance: str, window_start: datetime) -> Any:
    return and_(COUNTERS.c.budget_key == key, COUNTERS.c.instance == instance,
                COUNTERS.c.window_start == window_start)


def _has_tag(conn: Connection, tag: str) -> Any:
    if conn.dialect.name == "postgresql":
        return E.tags.op("@>")(literal([tag], type_=JSONB))
    each = func.json_each(E.tags).table_valued("value")
    return exists(select(literal(1)).select_from(each).where(each.c.value == tag))


def holds_json(holds: Iterable[Hold]) -> list[list[Any]]:
    return [[h.budget.key, h.instance, h.window.start.isoformat(), h.amount] for h in holds]


def counter_arrays(holds: Sequence[Hold]) -> dict[str, list[Any]]:
    """The unnest() arrays naming each hold's counter, and its held amount."""
    return {"keys": [h.budget.key for h in holds], "instances": [h.instance for h in holds],
            "starts": [h.window.start for h in holds], "amounts": [h.amount for h in holds]}


def _holds(raw: Any) -> Iterable[tuple[str, str, datetime, int]]:
    for key, instance, start, amount in (json.loads(raw) if isinstance(raw, str) else raw):
        yield key, instance, datetime.fromisoformat(start), int(amount)


def scope_of(budget: Budget, instance: str) -> dict[str, str]:
    scope = dict(budget.scope)
    if budget.each:
        scope[budget.each] = instance
    return scope
