"""The report's figures, each one SQL aggregate over the hourly rollups (``facts.py``).

Nothing here loads events into Python: every query is a ``SUM ... GROUP BY`` over the
rollups of the period's whole hours and the few events at its edges, whose result has a
bounded number of rows — one per model, provider, project, user, hour or error type seen in
the period — however many events it covers. Percentiles merge the latency sketches; only the
costliest calls are read from the events (through the ``ts`` index). The queries run
unchanged on SQLite and PostgreSQL.

The current and previous periods are read together: a row counts towards the current period
when ``ts >= start``, towards the previous one otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, String, and_, case, false, func, select, true
from sqlalchemy.sql import ColumnElement

from .._events.usage import TOKEN_FIELDS
from .._storage.rollups import LATENCY, SKETCH_DIMS, TTFT, as_datetime
from .._storage.sketch import bucket_of, percentile
from .._storage.tables import HourlyRollup, UsageEvent
from .facts import Span, events_where, facts, hourly_where, sketch_cells, sum_if, within

__all__ = ["Range", "Totals", "GroupRow", "Percentiles", "ErrorRow", "CallRow", "UnpricedModel",
           "totals", "group_totals", "model_totals", "time_buckets", "percentiles", "errors",
           "costliest_calls", "unpriced_models", "currencies", "PERCENTILES"]

_E = UsageEvent.__table__.c
PERCENTILES = (50, 95)


@dataclass(frozen=True, slots=True)
class Range:
    """The rows a report reads: [start, end) and [previous_start, previous_end), naive UTC,
    optionally only those whose columns equal ``filters`` (name, value) (a rollup column:
    provider, model, project, user, status...)."""

    start: datetime
    end: datetime
    previous_start: datetime
    previous_end: datetime
    filters: tuple[tuple[str, str], ...] = ()
    splits: tuple[datetime, ...] = ()  # chart boundaries (naive UTC), see facts.py

    def span(self) -> Span:
        """Both periods, for :func:`facts.facts` (the previous one may end before ``start``:
        this week so far)."""
        return Span(((self.previous_start, self.previous_end), (self.start, self.end)),
                    self.splits, self.filters)

    def current_span(self) -> Span:
        return Span(((self.start, self.end),), (), self.filters)

    def where_current(self) -> ColumnElement[bool]:
        """The events of the current period (for the few queries that read events)."""
        return and_(_E.ts >= self.start, _E.ts < self.end, self.where_filters())

    def where_filters(self) -> ColumnElement[bool]:
        return and_(true(), *(_E[name] == value for name, value in self.filters))


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
    cost: float | None  # None: unpriced
    cost_status: str
    project: str | None
    user: str | None
    session: str | None
    tags: list[str]
    metadata: dict[str, Any]
    error_type: str | None = None
    latency_ms: float | None = None


@dataclass(frozen=True, slots=True)
class UnpricedModel:
    provider: str | None
    model: str
    calls: int
    input_tokens: int
    output_tokens: int


def _sum(expression: Any) -> Any:
    return func.coalesce(func.sum(expression), 0)


def totals(conn: Connection, rows: Range) -> tuple[Totals, Totals]:
    """(current, previous) totals."""
    f = facts(rows.span()).c
    is_current = case((f.ts >= rows.start, 1), else_=0).label("is_current")
    statement = select(
        is_current,
        _sum(f.calls).label("calls"),
        sum_if(f.status == "error", f.calls).label("errors"),
        sum_if(f.status == "blocked", f.calls).label("blocked"),
        *(_sum(f[name]).label(name) for name in TOKEN_FIELDS),
        _sum(f.cost).label("cost"),
        sum_if(f.cost_status == "unpriced", f.calls).label("unpriced_calls"),
        sum_if(f.cost_status == "estimated", f.calls).label("estimated_calls"),
        sum_if(f.cost_status == "estimated", f.cost).label("estimated_cost"),
        _sum(f.streamed_calls).label("streamed_calls"),
    ).group_by(is_current)
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


def _both_periods(f: Any, rows: Range, extra: Sequence[Any] = ()) -> list[Any]:
    current = f.ts >= rows.start
    return [
        sum_if(current, f.calls).label("calls"),
        sum_if(and_(current, f.status == "error"), f.calls).label("errors"),
        sum_if(current, f.input_tokens).label("input_tokens"),
        sum_if(current, f.output_tokens).label("output_tokens"),
        sum_if(current, f.cost).label("cost"),
        sum_if(and_(current, f.cost_status == "unpriced"), f.calls).label("unpriced_calls"),
        sum_if(and_(current, f.cost_status == "estimated"), f.calls).label("estimated_calls"),
        sum_if(~current, f.calls).label("previous_calls"),
        sum_if(~current, f.cost).label("previous_cost"),
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
    f = facts(rows.span()).c
    column = f[by]
    statement = select(column.label("key"), *_both_periods(f, rows)).group_by(column)
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
    f = facts(rows.span()).c
    current = f.ts >= rows.start
    hit = and_(current, f.cache_hit == true())
    paid = and_(current, f.cost_status != "unpriced", f.status == "ok", f.cache_hit == false())
    extra = [
        # rows of calls without cache reads add 0 to each of these
        sum_if(paid, f.cache_read_tokens).label("cache_read_tokens"),
        sum_if(paid, f.cached_input_tokens).label("cached_calls_input_tokens"),
        sum_if(paid, f.cached_calls).label("cached_calls"),
        sum_if(hit, f.calls).label("hit_calls"),
        *(sum_if(hit, f[name]).label(f"hit_{name}") for name in TOKEN_FIELDS),
        sum_if(and_(current, f.cost_status == "estimated"), f.cost).label("estimated_cost"),
    ]
    statement = select(f.provider, f.model, *_both_periods(f, rows, extra)) \
        .group_by(f.provider, f.model)
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
    24 rows a day; in a zone whose offset is not a whole number of hours, the hours holding a
    local midnight (``rows.splits``) come from the events, by minute."""
    f = facts(rows.span()).c
    if conn.dialect.name == "sqlite":
        # ts is stored as 'YYYY-MM-DD HH:MM:SS.ffffff' (a rollup's hour as HH:00:00.000000)
        bucket: Any = func.substr(f.ts, 1, 16 if minutes else 13, type_=String)
    else:
        bucket = func.date_trunc("minute" if minutes else "hour", f.ts)
    bucket = bucket.label("bucket")
    statement = select(bucket, _sum(f.cost).label("cost"), _sum(f.calls).label("calls")) \
        .group_by(bucket)
    out = []
    for row in conn.execute(statement):
        moment = row.bucket
        if isinstance(moment, str):
            moment = datetime.fromisoformat(moment + (":00" if minutes else ":00:00"))
        out.append((moment, float(row.cost), int(row.calls)))
    return out


def percentiles(conn: Connection, rows: Range, column: str) -> list[Percentiles]:
    """p50 and p95 of ``latency_ms`` or ``ttft_ms`` (of streamed calls) per (provider, model)
    of the successful calls of the current period, within ``sketch.RELATIVE_ERROR`` (1 %) of
    the exact nearest-rank values: the sketches of its whole hours merged with the durations
    of the events at its edges."""
    metric = TTFT if column == "ttft_ms" else LATENCY
    span = rows.current_span()
    if any(name not in SKETCH_DIMS for name, _ in span.filters):
        # the sketches do not keep this column (a user, a status): the period's events
        span = Span(span.intervals, (), span.filters, events_only=True)
    found: dict[tuple[str | None, str], dict[int, int]] = {}
    for row in conn.execute(sketch_cells(span, metric)):
        counts = found.setdefault((row.provider, row.model), {})
        counts[row.bucket] = counts.get(row.bucket, 0) + int(row.calls)
    value = _E[column]
    edge = and_(events_where(span), _E.status == "ok", value.isnot(None))
    if metric == TTFT:  # as the sketches keep it: streams only
        edge = and_(edge, _E.streamed == true())
    for provider, model, duration in conn.execute(select(_E.provider, _E.model, value).where(edge)):
        counts = found.setdefault((provider, model), {})
        place = bucket_of(duration)
        counts[place] = counts.get(place, 0) + 1
    out = []
    for (provider, model), counts in found.items():
        p50, p95 = (percentile(counts, p) for p in PERCENTILES)
        if p50 is not None and p95 is not None:
            out.append(Percentiles(provider, model, sum(counts.values()), p50, p95))
    return sorted(out, key=lambda item: (-item.samples, item.model))


def errors(conn: Connection, rows: Range) -> list[ErrorRow]:
    """Failed calls per (provider, error type) in the current period, most first."""
    f = facts(rows.current_span()).c
    statement = select(f.provider, f.error_type, _sum(f.calls).label("count")) \
        .where(f.status == "error").group_by(f.provider, f.error_type)
    # Row.count is the "count" column at run time; its stubs see the tuple method
    found = [ErrorRow(row.provider, row.error_type, int(row.count))  # type: ignore[call-overload]
             for row in conn.execute(statement)]
    return sorted(found, key=lambda row: (-row.count, row.provider or "", row.error_type or ""))


MAX_CANDIDATE_HOURS = 48
"""Past this many candidate hours, the costliest calls are found by scanning the period."""


def costliest_calls(conn: Connection, rows: Range, limit: int) -> list[CallRow]:
    """The ``limit`` most expensive calls of the current period.

    Read from the events, but only in a few hours: each rollup row keeps its costliest call's
    cost, so the ``limit``-th largest of those, ``floor``, is at most the ``limit``-th largest
    call cost, and every call in the answer lies in an hour whose rollups reach ``floor`` (or
    in the period's edges, which facts.py reads from the events anyway)."""
    span = rows.current_span()
    r = HourlyRollup.__table__.c
    floor = conn.execute(
        select(r.max_cost).where(hourly_where(span, r.hour, r), r.max_cost > 0)
        .order_by(r.max_cost.desc()).offset(limit - 1).limit(1)).scalar()
    where = and_(rows.where_current(), _E.cost.isnot(None), _E.cost > 0)
    if floor is not None:
        hours = conn.execute(
            select(r.hour).where(hourly_where(span, r.hour, r), r.max_cost >= floor)
            .group_by(r.hour).limit(MAX_CANDIDATE_HOURS + 1)).scalars().all()
        if len(hours) <= MAX_CANDIDATE_HOURS:
            _, edges = span.pieces()
            ranges = [(as_datetime(hour), as_datetime(hour) + timedelta(hours=1))
                      for hour in hours]
            # only these ranges (all inside the period), so the planner reads them through
            # the ts index instead of the whole period's range
            where = and_(within(_E.ts, [*edges, *ranges]), _E.cost >= floor,
                         rows.where_filters())
    statement = select(
        _E.id, _E.ts, _E.provider, _E.model, _E.resolved_model, _E.status, _E.input_tokens,
        _E.output_tokens, _E.cost, _E.cost_status, _E.project, _E.user, _E.session, _E.tags,
        _E.metadata,
    ).where(where).order_by(_E.cost.desc(), _E.ts, _E.id).limit(limit)
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
    f = facts(rows.current_span()).c
    statement = select(
        f.provider, f.model, _sum(f.calls).label("calls"),
        _sum(f.input_tokens).label("input_tokens"), _sum(f.output_tokens).label("output_tokens"),
    ).where(f.cost_status == "unpriced").group_by(f.provider, f.model)
    found = [UnpricedModel(row.provider, row.model, int(row.calls), int(row.input_tokens),
                           int(row.output_tokens)) for row in conn.execute(statement)]
    return sorted(found, key=lambda row: (-row.calls, row.model))


def currencies(conn: Connection, rows: Range) -> dict[str, int]:
    """Calls per stored currency in the current period (normally just the ledger's one)."""
    f = facts(rows.current_span()).c
    statement = select(f.currency, _sum(f.calls).label("calls")).group_by(f.currency)
    return {row.currency: int(row.calls) for row in conn.execute(statement)}
