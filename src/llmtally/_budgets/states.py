"""What budgets report: holds and reservations, counter states, threshold crossings, definitions
found in the ledger, drifts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
)

from .budget import Budget, Window, zone
from .tables import ALERTS, UNIT_SCALE, insert_ignore, naive, to_units

if TYPE_CHECKING:  # a Store is passed in; _store -> _migrations -> this module at run time
    pass

__all__ = ["Hold", "Reservation", "CounterState", "Crossing", "Drift"]

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
        now = naive(now)
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


def thresholds_reached(budget: Budget, spent: int) -> list[float]:
    """The warning thresholds ``spent`` units have reached (each is claimed once per window
    in the ledger, so one reached earlier — by a seed, an import — is still reported once)."""
    limit = to_units(budget.kind, budget.limit)
    if limit <= 0:
        return []
    return [t for t in budget.warn_at if t * limit <= spent]
