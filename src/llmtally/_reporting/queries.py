"""Reading the ledger: every figure is a SQL aggregate over indexed columns, never a Python loop."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Date, case, cast, func, select
from sqlalchemy.sql import ColumnElement

from .._errors import ConfigError
from .._events.usage import TOKEN_FIELDS
from .._storage.tables import UsageEvent
from .._timeparse import parse_instant

__all__ = ["SummaryRow", "UnpricedRow", "summarize", "unpriced_models", "GROUP_BY"]

_E = UsageEvent.__table__.c
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


def _group_column(conn: Connection, by: str) -> ColumnElement[Any]:
    if by == "day":
        if conn.dialect.name == "sqlite":
            return func.date(_E.ts)
        return cast(_E.ts, Date)
    if by not in GROUP_BY:
        raise ConfigError(f"by={by!r} is not allowed; group by one of: {', '.join(GROUP_BY)}")
    return _E[by]


def _time_range(statement: Any, since: Any, until: Any, now: datetime) -> Any:
    start = parse_instant(since, now=now)
    end = parse_instant(until, now=now)
    if start is not None:
        statement = statement.where(_E.ts >= start)
    if end is not None:
        statement = statement.where(_E.ts < end)
    return statement


def summarize(conn: Connection, *, since: Any = None, until: Any = None, by: str = "model",
              now: datetime, filters: Mapping[str, str] | None = None) -> list[SummaryRow]:
    """Totals per ``by`` value in [since, until), most expensive first."""
    key = _group_column(conn, by).label("key")
    statement = select(
        key,
        func.count().label("calls"),
        func.sum(case((_E.status == "error", 1), else_=0)).label("errors"),
        *(func.coalesce(func.sum(_E[name]), 0).label(name) for name in TOKEN_FIELDS),
        func.coalesce(func.sum(_E.cost), 0.0).label("cost"),
        func.sum(case((_E.cost_status == "unpriced", 1), else_=0)).label("unpriced_calls"),
        func.sum(case((_E.cost_status == "estimated", 1), else_=0)).label("estimated_calls"),
        func.min(_E.currency).label("currency"),
    ).group_by(key)
    statement = _time_range(statement, since, until, now)
    for name, value in (filters or {}).items():
        if name not in FILTERS:
            raise ConfigError(f"cannot filter on {name!r}; filter on one of: {', '.join(FILTERS)}")
        statement = statement.where(_E[name] == value)
    rows = conn.execute(statement.order_by(func.coalesce(func.sum(_E.cost), 0.0).desc(), key))
    return [
        SummaryRow(
            key=None if row.key is None else str(row.key), calls=row.calls, errors=row.errors or 0,
            input_tokens=int(row.input_tokens), output_tokens=int(row.output_tokens),
            cache_read_tokens=int(row.cache_read_tokens),
            cache_write_tokens=int(row.cache_write_tokens),
            reasoning_tokens=int(row.reasoning_tokens), cost=float(row.cost),
            unpriced_calls=row.unpriced_calls or 0, estimated_calls=row.estimated_calls or 0,
            currency=row.currency,
        )
        for row in rows
    ]


def unpriced_models(conn: Connection, *, since: Any = None, now: datetime) -> list[UnpricedRow]:
    """Each (provider, model) recorded without a price, with its calls and tokens."""
    statement = select(
        _E.provider, _E.model, func.count().label("calls"),
        func.sum(_E.input_tokens).label("input_tokens"),
        func.sum(_E.output_tokens).label("output_tokens"),
        func.min(_E.ts).label("first_seen"), func.max(_E.ts).label("last_seen"),
    ).where(_E.cost_status == "unpriced").group_by(_E.provider, _E.model)
    statement = _time_range(statement, since, None, now)
    rows = conn.execute(statement.order_by(func.count().desc(), _E.model))
    return [
        UnpricedRow(provider=row.provider, model=row.model, calls=row.calls,
                    input_tokens=int(row.input_tokens or 0), output_tokens=int(row.output_tokens or 0),
                    first_seen=row.first_seen, last_seen=row.last_seen)
        for row in rows
    ]
