"""What aggregates read: the hourly rollups for whole UTC hours, the events for the rest.

A period rarely starts and ends on a UTC hour ("the last 24 h", a report in a zone whose
offset is not whole hours, such as India's +05:30). Its whole hours come from the rollups;
the pieces of an hour at its edges, and the hours that contain a chart boundary (a local
midnight at 18:30 UTC), come from the events, read through the ``ts`` index: a few hours of
events at most, however long the period. Both are shaped alike, as rows of sums ("facts"),
so one ``SUM`` over them gives the exact figure an aggregate over the events would.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Float,
    Integer,
    String,
    and_,
    case,
    cast,
    false,
    func,
    literal,
    or_,
    select,
    union_all,
)
from sqlalchemy.sql import Subquery

from .._errors import ConfigError
from .._events.usage import TOKEN_FIELDS
from .._storage.rollups import DIMS, hour_of, next_hour
from .._storage.tables import HourlyRollup, RollupSketch, UsageEvent

__all__ = ["Span", "facts", "hourly_where", "events_where", "sketch_cells", "within", "sum_if"]

_E = UsageEvent.__table__.c
_R = HourlyRollup.__table__.c
_S = RollupSketch.__table__.c
_HOUR = timedelta(hours=1)
MAX_SPLIT_HOURS = 500
"""Each split hour is one more OR'd interval in the queries, and SQLite refuses an expression
deeper than 1,000: a daily chart in a +05:30 zone can span 500 days."""
Interval = tuple[datetime | None, datetime | None]


@dataclass(frozen=True, slots=True)
class Span:
    """The [start, end) intervals read (naive UTC; None is unbounded), the instants whose
    hour must come from the events (chart boundaries), and column filters (``name == value``
    on a grouping column, or ``session`` with ``events_only``)."""

    intervals: tuple[Interval, ...]
    splits: tuple[datetime, ...] = ()
    filters: tuple[tuple[str, Any], ...] = ()
    events_only: bool = False  # for what the rollups do not keep (sessions)

    def pieces(self) -> tuple[list[tuple[datetime | None, datetime | None]], list[Interval]]:
        """(whole-hour ranges to read from the rollups, pieces to read from the events)."""
        _disjoint(self.intervals)
        if self.events_only:
            return [], _merged(self.intervals)
        hourly: list[Interval] = []
        edges: list[Interval] = []
        for start, end in self.intervals:
            first = None if start is None else next_hour(start)
            last = None if end is None else hour_of(end)
            if first is not None and last is not None and first > last:
                edges.append((start, end))  # inside one hour
                continue
            if start is not None and start < first:  # type: ignore[operator]
                edges.append((start, first))
            if end is not None and last < end:  # type: ignore[operator]
                edges.append((last, end))
            hourly.append((first, last))
            for hour in self.split_hours():
                if (first is None or hour >= first) and (last is None or hour < last):
                    edges.append((hour, hour + _HOUR))
        return hourly, _merged(edges)

    def split_hours(self) -> list[datetime]:
        """The hours the splits cut (read from the events, never from the rollups)."""
        hours = sorted({hour_of(s) for s in self.splits if hour_of(s) != s})
        if len(hours) > MAX_SPLIT_HOURS:
            raise ConfigError(f"this period has {len(hours):,} day or chart boundaries inside an "
                              f"hour (the time zone's offset is not whole hours); at most "
                              f"{MAX_SPLIT_HOURS} can be read: choose a shorter period")
        return hours


def _disjoint(intervals: Sequence[Interval]) -> None:
    """Intervals that overlap would count the calls they share twice: refuse them."""
    ordered = sorted(intervals, key=lambda p: (p[0] is not None, p[0]))
    for (_, end), (start, _) in zip(ordered, ordered[1:]):
        if end is None or start is None or start < end:
            raise ValueError(f"the intervals of a Span overlap: {intervals!r}")


def _merged(pieces: Iterable[Interval]) -> list[Interval]:
    out: list[list[Any]] = []
    for start, end in sorted(pieces, key=lambda p: (p[0] is not None, p[0])):
        if out and (out[-1][1] is None or start is None or start <= out[-1][1]):
            if out[-1][1] is not None and (end is None or end > out[-1][1]):
                out[-1][1] = end
            continue
        out.append([start, end])
    return [(start, end) for start, end in out]


def within(column: Any, intervals: Sequence[Interval]) -> ColumnElement[bool]:
    """``column`` in any of the [start, end) intervals (False for none)."""
    clauses = []
    for start, end in intervals:
        parts = []
        if start is not None:
            parts.append(column >= start)
        if end is not None:
            parts.append(column < end)
        clauses.append(and_(*parts) if parts else literal(True))
    return or_(*clauses) if clauses else false()


def hourly_where(span: Span, hour: Any, table: Any) -> ColumnElement[bool]:
    """The rollup (or sketch) rows of ``span``'s whole hours, filters applied."""
    hourly, _ = span.pieces()
    if not hourly:
        return false()
    clause = within(hour, hourly)
    splits = span.split_hours()
    if splits:
        clause = and_(clause, hour.notin_(splits))
    for name, value in span.filters:
        clause = and_(clause, table[name] == value)
    return clause


def events_where(span: Span) -> ColumnElement[bool]:
    """The events of ``span`` that no whole hour of the rollups holds, filters applied."""
    _, edges = span.pieces()
    clause = within(_E.ts, edges)
    for name, value in span.filters:
        clause = and_(clause, _E[name] == value)
    return clause


def sum_if(condition: ColumnElement[bool], value: Any) -> Any:
    """``SUM(value)`` over the facts where ``condition`` holds (0 when none does)."""
    return func.coalesce(func.sum(case((condition, value), else_=0)), 0)


def _when(condition: ColumnElement[bool], value: Any, otherwise: Any = 0) -> Any:
    return case((condition, value), else_=otherwise)


def facts(span: Span) -> Subquery:
    """Rows of sums (the rollups' columns, ``ts`` for the hour or the event's time) that
    together hold exactly the calls of ``span``."""
    hourly = select(
        _R.hour.label("ts"), *(_R[name] for name in DIMS),
        _R.calls, _R.streamed_calls, *(_R[name] for name in TOKEN_FIELDS), _R.cost, _R.max_cost,
        _R.cached_calls, _R.cached_input_tokens, _R.latency_calls, _R.latency_ms_sum,
        _R.ttft_calls, _R.ttft_ms_sum, _R.first_ts, _R.last_ts,
        literal(None, String).label("session"),
    ).where(hourly_where(span, _R.hour, _R))
    cached = _E.cache_read_tokens > 0
    streamed = _E.streamed == True  # noqa: E712 (SQL, not Python)
    events = select(
        _E.ts, *(_E[name] for name in DIMS if name != "cache_hit"),
        cast(func.coalesce(_E.price_source, "") == "cache-hit", Boolean).label("cache_hit"),
        literal(1, Integer).label("calls"), _when(streamed, 1).label("streamed_calls"),
        *(_E[name] for name in TOKEN_FIELDS),
        func.coalesce(_E.cost, 0.0).label("cost"), _E.cost.label("max_cost"),
        _when(cached, 1).label("cached_calls"),
        _when(cached, _E.input_tokens).label("cached_input_tokens"),
        _when(_E.latency_ms.isnot(None), 1).label("latency_calls"),
        cast(func.coalesce(_E.latency_ms, 0.0), Float).label("latency_ms_sum"),
        _when(and_(streamed, _E.ttft_ms.isnot(None)), 1).label("ttft_calls"),
        cast(_when(streamed, func.coalesce(_E.ttft_ms, 0.0), 0.0), Float).label("ttft_ms_sum"),
        _E.ts.label("first_ts"), _E.ts.label("last_ts"), _E.session,
    ).where(events_where(span))
    return union_all(hourly, events).subquery("facts")


def sketch_cells(span: Span, metric: int) -> Any:
    """(provider, model, bucket, calls) of ``metric``'s sketches over ``span``'s whole hours."""
    return select(_S.provider, _S.model, _S.bucket, func.sum(_S.calls).label("calls")) \
        .where(_S.metric == metric, hourly_where(span, _S.hour, _S)) \
        .group_by(_S.provider, _S.model, _S.bucket)
