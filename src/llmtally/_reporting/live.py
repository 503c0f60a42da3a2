"""What a live view reads besides the report's figures: pages of recent calls (newest first,
through the ``ts`` index, with a cursor) and a time series of cost and calls."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo

from sqlalchemy import Connection, and_, or_, select

from .._errors import ConfigError
from .._storage.tables import UsageEvent
from .data import CallRow, Range, time_buckets

__all__ = ["CallPage", "SeriesPoint", "recent_calls", "series", "MAX_PAGE", "MAX_POINTS"]

_E = UsageEvent.__table__.c
MAX_PAGE = 500
MAX_POINTS = 10_000  # points of a series (27 years of days, 13 months of hours)
STEPS = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
_CURSOR_LIMIT = 600  # characters: a cursor is a timestamp and an id (ids are at most 256)


@dataclass(frozen=True, slots=True)
class CallPage:
    """One page of calls, newest first; ``next_cursor`` reads the page after it (None: last)."""

    calls: tuple[CallRow, ...]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class SeriesPoint:
    """Calls and cost in [start, start + one step) (``start`` in the ledger's time zone)."""

    start: datetime
    calls: int
    cost: float


def _encode(ts: datetime, event_id: str) -> str:
    text = f"{ts.isoformat()}|{event_id}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode(cursor: str) -> tuple[datetime, str]:
    try:
        if len(cursor) > _CURSOR_LIMIT:
            raise ValueError("too long")
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        moment, _, event_id = text.partition("|")
        if "\x00" in event_id:
            raise ValueError("NUL")
        return datetime.fromisoformat(moment).replace(tzinfo=None), event_id
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise ConfigError("cursor is not one this server gave out; start again without it") from None


def recent_calls(conn: Connection, *, start: datetime | None, end: datetime | None,
                 filters: Mapping[str, str], limit: int, cursor: str | None = None) -> CallPage:
    """The newest ``limit`` calls in [start, end) whose columns equal ``filters``, after
    ``cursor`` (the previous page's ``next_cursor``)."""
    if not 1 <= limit <= MAX_PAGE:
        raise ConfigError(f"limit={limit}: ask for 1 to {MAX_PAGE} calls a page")
    clauses = [_E[name] == value for name, value in filters.items()]
    if start is not None:
        clauses.append(_E.ts >= start)
    if end is not None:
        clauses.append(_E.ts < end)
    if cursor is not None:
        last_ts, last_id = _decode(cursor)
        clauses.append(or_(_E.ts < last_ts, and_(_E.ts == last_ts, _E.id < last_id)))
    statement = select(
        _E.id, _E.ts, _E.provider, _E.model, _E.resolved_model, _E.status, _E.input_tokens,
        _E.output_tokens, _E.cost, _E.cost_status, _E.project, _E.user, _E.session, _E.tags,
        _E.metadata, _E.error_type, _E.latency_ms,
    ).where(and_(*clauses)).order_by(_E.ts.desc(), _E.id.desc()).limit(limit + 1)
    rows = conn.execute(statement).all()
    calls = tuple(
        CallRow(id=row.id, ts=row.ts, provider=row.provider, model=row.model,
                resolved_model=row.resolved_model, status=row.status,
                input_tokens=int(row.input_tokens), output_tokens=int(row.output_tokens),
                cost=None if row.cost is None else float(row.cost), cost_status=row.cost_status,
                project=row.project, user=row.user, session=row.session,
                tags=list(row.tags or []), metadata=dict(row.metadata or {}),
                error_type=row.error_type, latency_ms=row.latency_ms)
        for row in rows[:limit])
    more = len(rows) > limit
    return CallPage(calls, _encode(calls[-1].ts, calls[-1].id) if more else None)


def series(conn: Connection, *, start: datetime, end: datetime, filters: Mapping[str, str],
           step: str, tz: tzinfo) -> list[SeriesPoint]:
    """Calls and cost per ``step`` ("hour" or "day") in [start, end) (naive UTC), from the
    rollups. Days are the ledger zone's days; hours are UTC hours shown in that zone (in a zone
    whose offset is not whole hours, such as +05:30, an hour runs from :30 to :30)."""
    if step not in ("hour", "day"):
        raise ConfigError(f"step={step!r}: use hour or day")
    if (end - start) / STEPS[step] > MAX_POINTS:
        raise ConfigError(f"the period holds more than {MAX_POINTS:,} {step}s: choose a shorter "
                          "period or a longer step")
    splits: tuple[datetime, ...] = ()
    minutes = False
    if step == "day":
        splits = tuple(_local_midnights(start, end, tz))
        minutes = any(moment.minute or moment.second for moment in splits)
    rows = Range(start, end, start, start, tuple(sorted(filters.items())), splits)
    points: dict[datetime, list[float]] = {}
    for moment, cost, calls in time_buckets(conn, rows, minutes=minutes):
        local = moment.replace(tzinfo=timezone.utc).astimezone(tz)
        key = local.replace(hour=0, minute=0, second=0, microsecond=0) if step == "day" else local
        point = points.setdefault(key, [0, 0.0])
        point[0] += calls
        point[1] += cost
    return [SeriesPoint(key, int(calls), cost) for key, (calls, cost) in sorted(points.items())]


def _local_midnights(start: datetime, end: datetime, tz: tzinfo) -> list[datetime]:
    """The local midnights strictly inside (start, end), as naive UTC."""
    out: list[datetime] = []
    day = start.replace(tzinfo=timezone.utc).astimezone(tz).date()
    while True:
        day += timedelta(days=1)
        midnight = datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(timezone.utc) \
            .replace(tzinfo=None)
        if midnight >= end:
            return out
        out.append(midnight)
