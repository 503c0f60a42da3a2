"""Reading the ledger: every figure is a SQL aggregate over the hourly rollups and the events at
the edges of the period (``facts.py``), never a Python loop over events."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Date, cast, func, select
from sqlalchemy.sql import ColumnElement

from .._errors import ConfigError
from .._events.usage import TOKEN_FIELDS
from .._storage.rollups import as_datetime
from .._timeparse import parse_instant
from .facts import Span, facts, sum_if

__all__ = ["SummaryRow", "UnpricedRow", "summarize", "unpriced_models", "GROUP_BY"]

GROUP_BY = ("model", "provider", "project", "user", "session", "source", "status", "call_type",
            "currency", "day")
FILTERS = ("model", "provider", "project", "user", "session", "source", "status", "call_type")


@dataclass(frozen=True, slots=True)
class SummaryRow:
    """Totals for one group. ``cost`` sums priced and estimated calls; unpriced calls are
    counted in ``unpriced_calls`` and contribute no cost (they have none known)."""

    key: str | None
    calls: int
    errors: int
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    cost: float
    unpriced_calls: int
    estimated_calls: int
    currency: str | None

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_tokens": self.total_tokens}


@dataclass(frozen=True, slots=True)
class UnpricedRow:
    provider: str | None
    model: str
    calls: int
    input_tokens: int
    output_tokens: int
    first_seen: datetime
    last_seen: datetime

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "first_seen": self.first_seen.isoformat(),
                "last_seen": self.last_seen.isoformat()}


def _group_column(conn: Connection, f: Any, by: str) -> ColumnElement[Any]:
    if by == "day":
        if conn.dialect.name == "sqlite":
            return func.date(f.ts)
        return cast(f.ts, Date)
    column: ColumnElement[Any] = f[by]
    return column


def _span(since: Any, until: Any, now: datetime, filters: Mapping[str, str] | None = None,
          events_only: bool = False) -> Span:
    for name in filters or {}:
        if name not in FILTERS:
            raise ConfigError(f"cannot filter on {name!r}; filter on one of: {', '.join(FILTERS)}")
    return Span(((parse_instant(since, now=now), parse_instant(until, now=now)),),
                filters=tuple((filters or {}).items()), events_only=events_only)


def summarize(conn: Connection, *, since: Any = None, until: Any = None, by: str = "model",
              now: datetime, filters: Mapping[str, str] | None = None) -> list[SummaryRow]:
    """Totals per ``by`` value in [since, until), most expensive first: from the hourly
    rollups and the events at the edges (sessions, which rollups do not keep, from the
    events alone)."""
    if by not in GROUP_BY:
        raise ConfigError(f"by={by!r} is not allowed; group by one of: {', '.join(GROUP_BY)}")
    events_only = by == "session" or "session" in (filters or {})
    f = facts(_span(since, until, now, filters, events_only)).c
    key = _group_column(conn, f, by).label("key")
    cost = func.coalesce(func.sum(f.cost), 0.0)
    statement = select(
        key,
        func.sum(f.calls).label("calls"),
        sum_if(f.status == "error", f.calls).label("errors"),
        *(func.coalesce(func.sum(f[name]), 0).label(name) for name in TOKEN_FIELDS),
        cost.label("cost"),
        sum_if(f.cost_status == "unpriced", f.calls).label("unpriced_calls"),
        sum_if(f.cost_status == "estimated", f.calls).label("estimated_calls"),
        func.min(f.currency).label("currency"),
    ).group_by(key)
    rows = conn.execute(statement.order_by(cost.desc(), key))
    return [
        SummaryRow(
            key=None if row.key is None else str(row.key), calls=int(row.calls),
            errors=int(row.errors), input_tokens=int(row.input_tokens),
            output_tokens=int(row.output_tokens), cache_read_tokens=int(row.cache_read_tokens),
            cache_write_tokens=int(row.cache_write_tokens),
            reasoning_tokens=int(row.reasoning_tokens), cost=float(row.cost),
            unpriced_calls=int(row.unpriced_calls), estimated_calls=int(row.estimated_calls),
            currency=row.currency,
        )
        for row in rows
    ]


def unpriced_models(conn: Connection, *, since: Any = None, now: datetime) -> list[UnpricedRow]:
    """Each (provider, model) recorded without a price, with its calls and tokens."""
    f = facts(_span(since, None, now)).c
    statement = select(
        f.provider, f.model, func.sum(f.calls).label("calls"),
        func.sum(f.input_tokens).label("input_tokens"),
        func.sum(f.output_tokens).label("output_tokens"),
        func.min(f.first_ts).label("first_seen"), func.max(f.last_ts).label("last_seen"),
    ).where(f.cost_status == "unpriced").group_by(f.provider, f.model)
    rows = conn.execute(statement.order_by(func.sum(f.calls).desc(), f.model))
    return [
        UnpricedRow(provider=row.provider, model=row.model, calls=int(row.calls),
                    input_tokens=int(row.input_tokens or 0), output_tokens=int(row.output_tokens or 0),
                    first_seen=as_datetime(row.first_seen), last_seen=as_datetime(row.last_seen))
        for row in rows
    ]
