"""The report's figures, each one SQL aggregate over the ``ts`` range (and ``project``) indexes.

Nothing here loads events into Python: every query is a ``GROUP BY`` (or a window function
for percentiles, or a ``LIMIT``) whose result has a bounded number of rows — one per model,
provider, project, user, hour or error type seen in the period — however many events it
covers. The queries run unchanged on SQLite and PostgreSQL.

The current and previous periods are read together: a row counts towards the current period
when ``ts >= start``, towards the previous one otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, String, and_, case, func, or_, select
from sqlalchemy.sql import ColumnElement

from .._events.usage import TOKEN_FIELDS
from .._storage.tables import UsageEvent

__all__ = ["Range", "Totals", "GroupRow", "Percentiles", "ErrorRow", "CallRow", "UnpricedModel",
           "totals", "group_totals", "model_totals", "time_buckets", "percentiles", "errors",
           "costliest_calls", "unpriced_models", "currencies", "PERCENTILES"]

_E = UsageEvent.__table__.c
PERCENTILES = (50, 95)


@dataclass(frozen=True, slots=True)
class Range:
    """The rows a report reads: [start, end) and [previous_start, previous_end), naive UTC,
    optionally one project."""

    start: datetime
    end: datetime
    previous_start: datetime
    previous_end: datetime
    project: str | None = None

    def where(self) -> ColumnElement[bool]:
        """Rows of either period (the previous one may end before ``start``: this week so far)."""
        clause = and_(_E.ts >= self.previous_start, _E.ts < self.end,
                      or_(_E.ts >= self.start, _E.ts < self.previous_end))
        if self.project is not None:
            clause = and_(clause, _E.project == self.project)
        return clause

    def where_current(self) -> ColumnElement[bool]:
        clause = and_(_E.ts >= self.start, _E.ts < self.end)
        if self.project is not None:
            clause = and_(clause, _E.project == self.project)
        return clause

    def current(self) -> ColumnElement[bool]:
        """True for a row of the current period, among the rows :meth:`where` selects."""
        return _E.ts >= self.start


@dataclass(frozen=True, slots=True)
class Totals:
    """One period's totals. ``cost`` sums priced and estimated calls (unpriced calls have no
    cost); ``calls`` counts every attempt, blocked ones included."""

    calls: int = 0
    errors: int = 0
    blocked: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost: float = 0.0
    unpriced_calls: int = 0
    estimated_calls: int = 0
    estimated_cost: float = 0.0
    streamed_calls: int = 0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def sent(self) -> int:
        """Calls that reached a provider (not blocked by a budget)."""
        return self.calls - self.blocked

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.sent if self.sent else None


@dataclass(frozen=True, slots=True)
class GroupRow:
    """Totals of one provider, model, project or user, in both periods."""

    key: str | None
    calls: int
    errors: int
    input_tokens: int
    output_tokens: int
    cost: float
    unpriced_calls: int
    estimated_calls: int
    previous_calls: int
    previous_cost: float
    provider: str | None = None   # for model rows
    members: int = 1              # for the "other" row: how many groups it sums
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class Percentiles:
    """p50/p95 of a duration (ms) for one (provider, model) over the calls that have it."""

    provider: str | None
    model: str
    samples: int
    p50: float
    p95: float


@dataclass(frozen=True, slots=True)
class ErrorRow:
    provider: str | None
    error_type: str | None
    count: int


@dataclass(frozen=True, slots=True)
class CallRow:
    id: str
    ts: datetime
    provider: str | None
    model: str
    resolved_model: str | None
    status: str
    input_tokens: int
    output_tokens: int
    cost: float
    cost_status: str
    project: str | None
    user: str | None
    session: str | None
    tags: list[str]
    metadata: dict[str, Any]


@dataclass(frozen=True, slots=True)
class UnpricedModel:
    provider: str | None
    model: str
    calls: int
    input_tokens: int
    output_tokens: int


def _sum(expression: Any) -> Any:
    return func.coalesce(func.sum(expression), 0)


def _count_if(condition: ColumnElement[bool]) -> Any:
    return _sum(case((condition, 1), else_=0))


def totals(conn: Connection, rows: Range) -> tuple[Totals, Totals]:
    """(current, previous) totals."""
    current = rows.current()
    is_current = case((current, 1), else_=0).label("is_current")
    statement = select(
        is_current,
        func.count().label("calls"),
        _count_if(_E.status == "error").label("errors"),
        _count_if(_E.status == "blocked").label("blocked"),
        *(_sum(_E[name]).label(name) for name in TOKEN_FIELDS),
        _sum(_E.cost).label("cost"),
        _count_if(_E.cost_status == "unpriced").label("unpriced_calls"),
        _count_if(_E.cost_status == "estimated").label("estimated_calls"),
        _sum(case((_E.cost_status == "estimated", _E.cost), else_=0.0)).label("estimated_cost"),
        _count_if(_E.streamed).label("streamed_calls"),
    ).where(rows.where()).group_by(is_current)
    found = {row.is_current: row for row in conn.execute(statement)}

    def one(row: Any) -> Totals:
        if row is None:
            return Totals()
        return Totals(
            calls=int(row.calls), errors=int(row.errors), blocked=int(row.blocked),
            **{name: int(getattr(row, name)) for name in TOKEN_FIELDS},
            cost=float(row.cost), unpriced_calls=int(row.unpriced_calls),
            estimated_calls=int(row.estimated_calls), estimated_cost=float(row.estimated_cost),
            streamed_calls=int(row.streamed_calls))

    return one(found.get(1)), one(found.get(0))


def _both_periods(rows: Range, extra: Sequence[Any] = ()) -> list[Any]:
    current = rows.current()
    return [
        _count_if(current).label("calls"),
        _count_if(and_(current, _E.status == "error")).label("errors"),
        _sum(case((current, _E.input_tokens), else_=0)).label("input_tokens"),
        _sum(case((current, _E.output_tokens), else_=0)).label("output_tokens"),
        _sum(case((current, _E.cost), else_=0.0)).label("cost"),
        _count_if(and_(current, _E.cost_status == "unpriced")).label("unpriced_calls"),
        _count_if(and_(current, _E.cost_status == "estimated")).label("estimated_calls"),
        _count_if(~current).label("previous_calls"),
        _sum(case((~current, _E.cost), else_=0.0)).label("previous_cost"),
        *extra,
    ]


def _group_row(row: Any, key: Any, provider: str | None = None,
               extra: dict[str, float] | None = None) -> GroupRow:
    return GroupRow(
        key=None if key is None else str(key), calls=int(row.calls), errors=int(row.errors),
        input_tokens=int(row.input_tokens), output_tokens=int(row.output_tokens),
        cost=float(row.cost), unpriced_calls=int(row.unpriced_calls),
        estimated_calls=int(row.estimated_calls), previous_calls=int(row.previous_calls),
        previous_cost=float(row.previous_cost), provider=provider, extra=extra or {})


def group_totals(conn: Connection, rows: Range, by: str) -> list[GroupRow]:
    """Totals per ``provider``, ``project`` or ``user`` (both periods), most expensive first;
    groups seen only in the previous period are included (with 0 calls now)."""
    column = _E[by]
    statement = select(column.label("key"), *_both_periods(rows)).where(rows.where()) \
        .group_by(column)
    found = [_group_row(row, row.key) for row in conn.execute(statement)]
    return sorted(found, key=_expensive_first)


_MODEL_EXTRA = (
    # prompt-cache reads of calls that were paid for (not LiteLLM cache hits, not unpriced)
    "cache_read_tokens", "cached_calls_input_tokens", "cached_calls",
    # LiteLLM cache hits: what they would have cost at full price
    "hit_calls", "hit_input_tokens", "hit_output_tokens", "hit_cache_read_tokens",
    "hit_cache_write_tokens", "hit_reasoning_tokens",
    # for the "estimated" flag
    "estimated_cost",
)


def model_totals(conn: Connection, rows: Range) -> list[GroupRow]:
    """Totals per (provider, model), with what cache savings need in ``extra``."""
    current = rows.current()
    paid = and_(current, _E.cost_status != "unpriced", _E.status == "ok",
                or_(_E.price_source.is_(None), _E.price_source != "cache-hit"))
    with_cache = and_(paid, _E.cache_read_tokens > 0)
    hit = and_(current, _E.price_source == "cache-hit")
    extra = [
        _sum(case((with_cache, _E.cache_read_tokens), else_=0)).label("cache_read_tokens"),
        _sum(case((with_cache, _E.input_tokens), else_=0)).label("cached_calls_input_tokens"),
        _count_if(with_cache).label("cached_calls"),
        _count_if(hit).label("hit_calls"),
        *(_sum(case((hit, _E[name]), else_=0)).label(f"hit_{name}") for name in TOKEN_FIELDS),
        _sum(case((and_(current, _E.cost_status == "estimated"), _E.cost), else_=0.0))
        .label("estimated_cost"),
    ]
    statement = select(_E.provider, _E.model, *_both_periods(rows, extra)) \
        .where(rows.where()).group_by(_E.provider, _E.model)
    found = [
        _group_row(row, row.model, row.provider,
                   {name: float(getattr(row, name) or 0) for name in _MODEL_EXTRA})
        for row in conn.execute(statement)
    ]
    return sorted(found, key=_expensive_first)


def _expensive_first(row: GroupRow) -> tuple[float, int, float, str]:
    return (-row.cost, -row.calls, -row.previous_cost, row.key or "")


def time_buckets(conn: Connection, rows: Range, *, minutes: bool = False
                 ) -> list[tuple[datetime, float, int]]:
    """(UTC hour — or minute — , cost, calls) for both periods, for the daily chart. At most
    24 rows a day (1,440 for a zone whose offset is not a whole number of hours)."""
    if conn.dialect.name == "sqlite":
        # ts is stored as 'YYYY-MM-DD HH:MM:SS.ffffff'
        bucket: Any = func.substr(_E.ts, 1, 16 if minutes else 13, type_=String)
    else:
        bucket = func.date_trunc("minute" if minutes else "hour", _E.ts)
    bucket = bucket.label("bucket")
    statement = select(bucket, _sum(_E.cost).label("cost"), func.count().label("calls")) \
        .where(rows.where()).group_by(bucket)
    out = []
    for row in conn.execute(statement):
        moment = row.bucket
        if isinstance(moment, str):
            moment = datetime.fromisoformat(moment + (":00" if minutes else ":00:00"))
        out.append((moment, float(row.cost), int(row.calls)))
    return out


def percentiles(conn: Connection, rows: Range, column: str, *, streamed_only: bool = False
                ) -> list[Percentiles]:
    """Nearest-rank p50 and p95 of ``latency_ms`` or ``ttft_ms`` per (provider, model) in the
    current period, from a window function (ROW_NUMBER over each model's values): the
    database sorts, and only two rows per model come back."""
    value = _E[column]
    partition = (_E.provider, _E.model)
    where = and_(rows.where_current(), value.isnot(None), _E.status == "ok")
    if streamed_only:
        where = and_(where, _E.streamed)
    ranked = select(
        _E.provider, _E.model, value.label("value"),
        func.row_number().over(partition_by=partition, order_by=value).label("rank"),
        func.count().over(partition_by=partition).label("samples"),
    ).where(where).subquery()
    # rank = ceil(p * n / 100), in integers: 100 * (rank - 1) < p * n <= 100 * rank
    wanted = or_(*(and_(ranked.c.rank * 100 >= p * ranked.c.samples,
                        (ranked.c.rank - 1) * 100 < p * ranked.c.samples) for p in PERCENTILES))
    statement = select(ranked.c.provider, ranked.c.model, ranked.c.samples, ranked.c.rank,
                       ranked.c.value).where(wanted)
    found: dict[tuple[str | None, str], dict[str | int, Any]] = {}
    for row in conn.execute(statement):
        entry = found.setdefault((row.provider, row.model), {"samples": int(row.samples)})
        for p in PERCENTILES:
            if row.rank * 100 >= p * row.samples and (row.rank - 1) * 100 < p * row.samples:
                entry[p] = float(row.value)
    return sorted(
        (Percentiles(provider, model, entry["samples"], entry[50], entry[95])
         for (provider, model), entry in found.items()),
        key=lambda item: (-item.samples, item.model))


def errors(conn: Connection, rows: Range) -> list[ErrorRow]:
    """Failed calls per (provider, error type) in the current period, most first."""
    statement = select(_E.provider, _E.error_type, func.count().label("count")) \
        .where(and_(rows.where_current(), _E.status == "error")) \
        .group_by(_E.provider, _E.error_type)
    # Row.count is the "count" column at run time; its stubs see the tuple method
    found = [ErrorRow(row.provider, row.error_type, int(row.count))  # type: ignore[call-overload]
             for row in conn.execute(statement)]
    return sorted(found, key=lambda row: (-row.count, row.provider or "", row.error_type or ""))


def costliest_calls(conn: Connection, rows: Range, limit: int) -> list[CallRow]:
    """The ``limit`` most expensive calls of the current period."""
    statement = select(
        _E.id, _E.ts, _E.provider, _E.model, _E.resolved_model, _E.status, _E.input_tokens,
        _E.output_tokens, _E.cost, _E.cost_status, _E.project, _E.user, _E.session, _E.tags,
        _E.metadata,
    ).where(and_(rows.where_current(), _E.cost.isnot(None), _E.cost > 0)) \
        .order_by(_E.cost.desc(), _E.ts, _E.id).limit(limit)
    return [
        CallRow(id=row.id, ts=row.ts, provider=row.provider, model=row.model,
                resolved_model=row.resolved_model, status=row.status,
                input_tokens=int(row.input_tokens), output_tokens=int(row.output_tokens),
                cost=float(row.cost), cost_status=row.cost_status, project=row.project,
                user=row.user, session=row.session, tags=list(row.tags or []),
                metadata=dict(row.metadata or {}))
        for row in conn.execute(statement)
    ]


def unpriced_models(conn: Connection, rows: Range) -> list[UnpricedModel]:
    """Each (provider, model) with unpriced calls in the current period, most calls first."""
    statement = select(
        _E.provider, _E.model, func.count().label("calls"),
        _sum(_E.input_tokens).label("input_tokens"), _sum(_E.output_tokens).label("output_tokens"),
    ).where(and_(rows.where_current(), _E.cost_status == "unpriced")) \
        .group_by(_E.provider, _E.model)
    found = [UnpricedModel(row.provider, row.model, int(row.calls), int(row.input_tokens),
                           int(row.output_tokens)) for row in conn.execute(statement)]
    return sorted(found, key=lambda row: (-row.calls, row.model))


def currencies(conn: Connection, rows: Range) -> dict[str, int]:
    """Calls per stored currency in the current period (normally just the ledger's one)."""
    statement = select(_E.currency, func.count().label("calls")) \
        .where(rows.where_current()).group_by(_E.currency)
    return {row.currency: int(row.calls) for row in conn.execute(statement)}
