"""What budgets report: holds and reservations, counter states, threshold crossings, definitions
found in the ledger, drifts."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from .._events.event import as_utc_naive
from .budget import Budget, Window, zone

__all__ = ["Hold", "Reservation", "CounterState", "Crossing", "Drift", "UNIT_SCALE", "to_units"]

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

    @property
    def level(self) -> str:
        """``exceeded`` at the limit, ``critical`` past the highest of two or more ``warn_at``
        thresholds, ``warning`` past the lowest, else ``normal`` (held calls count as used)."""
        limit = self.budget.limit
        if limit > 0 and self.used >= limit:
            return "exceeded"
        thresholds = self.budget.warn_at
        if len(thresholds) >= 2 and self.used >= thresholds[-1] * limit:
            return "critical"
        if thresholds and self.used >= thresholds[0] * limit:
            return "warning"
        return "normal"

    def run_out(self, now: datetime) -> datetime | None:
        """When the limit is reached at this window's burn rate so far (naive UTC), or None
        if not before the window resets (or nothing has been spent yet)."""
        now = as_utc_naive(now)
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


def thresholds_reached(budget: Budget, spent: int) -> list[float]:
    """The warning thresholds ``spent`` units have reached (each is claimed once per window
    in the ledger, so one reached earlier — by a seed, an import — is still reported once)."""
    limit = to_units(budget.kind, budget.limit)
    if limit <= 0:
        return []
    return [t for t in budget.warn_at if t * limit <= spent]


UNIT_SCALE = {"usd": 10**9, "tokens": 1, "requests": 1}
"""Counters hold integers: nano-units of money, whole tokens, whole requests."""


def to_units(kind: str, amount: float) -> int:
    """An amount of ``kind`` as the integer the counters hold: rounded half up, exactly as the
    SQL that seeds a counter from the events rounds (see :func:`seed`)."""
    return math.floor(float(amount) * UNIT_SCALE[kind] + 0.5)




def aware(moment: datetime | None, tz: Any) -> datetime | None:
    return None if moment is None else moment.replace(tzinfo=timezone.utc).astimezone(tz)
