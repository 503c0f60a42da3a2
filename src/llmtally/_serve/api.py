"""The JSON API under ``/api/v1/``: the figures of :meth:`~llmtally.Tally.summary` and of the
report, for a period and filters given in the query string.

Every endpoint reads; none writes. A value the ledger cannot answer for (an unknown ``by``, a
date that is not one, a cursor that was not ours) is a 400 with one line saying why; a
malformed parameter is FastAPI's 422.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import func, select

from .._alerts.history import recent
from .._alerts.status import channel_status
from .._errors import ConfigError
from .._reporting import data, live
from .._reporting.queries import GROUP_BY
from .._reporting.reading import FLUSH_BEFORE_READING_S
from .._reporting.render import price_key
from .._storage.rollups import as_datetime
from .._storage.tables import UsageEvent
from .._timeparse import parse_duration, parse_instant
from .source import LedgerView

__all__ = ["router", "Filters"]

router = APIRouter(prefix="/api/v1")
_NAME = 256  # the longest name a column holds
_MOMENT = 40


class Filters:
    """The period (``since``, ``until``) and the column filters shared by the endpoints."""

    def __init__(
        self,
        since: Annotated[str, Query(max_length=_MOMENT, description="7d, 24h, 2026-11-01…")] = "7d",
        until: Annotated[str | None, Query(max_length=_MOMENT, description="exclusive; default now")] = None,
        provider: Annotated[str | None, Query(max_length=_NAME)] = None,
        model: Annotated[str | None, Query(max_length=_NAME)] = None,
        project: Annotated[str | None, Query(max_length=_NAME)] = None,
        user: Annotated[str | None, Query(max_length=_NAME)] = None,
        status: Annotated[str | None, Query(pattern="^(ok|error|blocked)$")] = None,
    ) -> None:
        self.since, self.until = since, until
        self._bounds: tuple[datetime, datetime] | None = None
        self.columns = {name: value for name, value in (
            ("provider", provider), ("model", model), ("project", project), ("user", user),
            ("status", status)) if value is not None}

    def bounds(self, view: LedgerView) -> tuple[datetime, datetime]:
        """[start, end) as naive UTC, worked out once per request. Flushes the serving Tally
        first (mounted in an application that records, its own calls are in every answer)."""
        if self._bounds is None:
            view.flush(FLUSH_BEFORE_READING_S)
            now = view.now()
            start = parse_instant(self.since, now=now)
            end = parse_instant(self.until, now=now) or _naive(now)
            assert start is not None
            if end <= start:
                raise ConfigError(f"until ({end.isoformat()}) must be after since "
                                  f"({start.isoformat()})")
            self._bounds = (start, end)
        return self._bounds

    def rows(self, view: LedgerView) -> data.Range:
        """The period's calls as the report's queries read them (no previous period)."""
        start, end = self.bounds(view)
        return data.Range(start, end, start, start, tuple(sorted(self.columns.items())))

    def period(self, view: LedgerView) -> dict[str, Any]:
        start, end = self.bounds(view)
        return {"since": _iso(start), "until": _iso(end), "filters": self.columns,
                "currency": view.currency}


def _naive(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc).replace(tzinfo=None) if moment.tzinfo else moment


def _iso(naive_utc: datetime | None) -> str | None:
    return None if naive_utc is None else naive_utc.replace(tzinfo=timezone.utc).isoformat()


def _view(request: Request) -> LedgerView:
    view: LedgerView = request.app.state.view
    return view


View = Annotated[LedgerView, Depends(_view)]
Period = Annotated[Filters, Depends()]


@router.get("/health")
def health(view: View) -> JSONResponse:
    """The ledger answers: its kind, and the time of the newest event."""
    try:
        with view.store.connect() as conn:
            newest = conn.execute(select(func.max(UsageEvent.__table__.c.ts))).scalar()
    except Exception as exc:  # the database is down: say so, as a status, not a traceback
        return JSONResponse({"status": "down", "database": view.store.dialect,
                             "error": type(exc).__name__}, status_code=503)
    return JSONResponse({"status": "ok", "database": view.store.dialect,
                         "newest_event_at": _iso(as_datetime(newest)) if newest else None})


@router.get("/summary")
def summary(view: View, period: Period,
            by: Annotated[str, Query(pattern=f"^({'|'.join(GROUP_BY)})$")] = "model"
            ) -> dict[str, Any]:
    """Calls, tokens and cost per ``by`` value: the rows of ``tally.summary()``."""
    start, end = period.bounds(view)
    rows = view.tally.summary(since=start, until=end, by=by, **period.columns)
    return {**period.period(view), "by": by, "rows": [row.as_dict() for row in rows],
            "total": _total(rows)}


@router.get("/top")
def top(view: View, period: Period,
        by: Annotated[str, Query(pattern=f"^({'|'.join(GROUP_BY)})$")] = "model",
        n: Annotated[int, Query(ge=1, le=100)] = 10) -> dict[str, Any]:
    """The ``n`` most expensive ``by`` values, and one ``other`` row summing the rest."""
    start, end = period.bounds(view)
    rows = view.tally.summary(since=start, until=end, by=by, **period.columns)
    shown, rest = rows[:n], rows[n:]
    out = [row.as_dict() for row in shown]
    if rest:
        out.append({**_total(rest), "key": None, "other": len(rest)})
    return {**period.period(view), "by": by, "rows": out, "total": _total(rows)}


def _total(rows: Any) -> dict[str, Any]:
    fields = ("calls", "errors", "input_tokens", "output_tokens", "cache_read_tokens",
              "cache_write_tokens", "reasoning_tokens", "cost", "unpriced_calls", "estimated_calls")
    total = {name: sum(getattr(row, name) for row in rows) for name in fields}
    total["total_tokens"] = total["input_tokens"] + total["output_tokens"]
    return total


@router.get("/timeseries")
def timeseries(view: View, period: Period,
               step: Annotated[str, Query(pattern="^(hour|day)$")] = "day") -> dict[str, Any]:
    """Calls and cost per hour or per day (the ledger's time zone) of the period."""
    start, end = period.bounds(view)
    with view.store.connect() as conn:
        points = live.series(conn, start=start, end=end, filters=period.columns, step=step,
                             tz=view.tz)
    return {**period.period(view), "step": step,
            "points": [{"start": p.start.isoformat(), "calls": p.calls, "cost": p.cost}
                       for p in points]}


@router.get("/calls")
def calls(view: View, period: Period,
          limit: Annotated[int, Query(ge=1, le=live.MAX_PAGE)] = 50,
          cursor: Annotated[str | None, Query(max_length=600)] = None) -> dict[str, Any]:
    """Calls, newest first, a page at a time (``next_cursor`` reads the next page). Never a
    prompt or a response: the ledger has none."""
    start, end = period.bounds(view)
    with view.store.connect() as conn:
        page = live.recent_calls(conn, start=start, end=end, filters=period.columns,
                                 limit=limit, cursor=cursor)
    return {**period.period(view), "calls": [_call(call) for call in page.calls],
            "next_cursor": page.next_cursor}


def _call(call: data.CallRow) -> dict[str, Any]:
    return {**asdict(call), "ts": _iso(call.ts)}


@router.get("/errors")
def errors(view: View, period: Period) -> dict[str, Any]:
    """Failed calls per provider and error type."""
    with view.store.connect() as conn:
        found = data.errors(conn, period.rows(view))
    return {**period.period(view),
            "rows": [{"provider": r.provider, "error_type": r.error_type, "count": r.count}
                     for r in found]}


@router.get("/unpriced")
def unpriced(view: View, period: Period) -> dict[str, Any]:
    """Models recorded without a price, with the ``llmtally.toml`` key that prices them."""
    with view.store.connect() as conn:
        found = data.unpriced_models(conn, period.rows(view))
    return {**period.period(view), "rows": [
        {**asdict(row), "price_key": price_key(row.provider, row.model)} for row in found]}


@router.get("/budgets")
def budgets(view: View) -> dict[str, Any]:
    """Every budget in the ledger (each ``each=`` instance with use): used, limit, percent,
    status (normal, warning, critical, exceeded), reset time and run-out forecast."""
    view.flush(FLUSH_BEFORE_READING_S)
    now = view.now()
    out = []
    for state in view.budget_states():
        budget = state.budget
        scope = dict(budget.scope) | ({budget.each: state.instance} if budget.each else {})
        out.append({
            "budget": budget.label, "kind": budget.kind, "per": budget.per, "scope": scope,
            "spent": state.spent, "reserved": state.reserved, "used": state.used,
            "limit": budget.limit,
            "percent": 100 * state.used / budget.limit if budget.limit else None,
            "status": state.level, "warn_at": list(budget.warn_at), "action": budget.action,
            "resets_at": _iso(state.window.end), "runs_out_at": _iso(state.run_out(now)),
        })
    return {"currency": view.currency, "budgets": out}


@router.get("/status")
def status(view: View, window: Annotated[str, Query(pattern="^[0-9]{1,4}(m|h)$")] = "15m",
           by_model: bool = False) -> dict[str, Any]:
    """Each provider (``by_model``: and model) with calls in the last ``window``: ok,
    degraded, down (see docs/alerts.md), with its counts."""
    view.flush(FLUSH_BEFORE_READING_S)
    span = parse_duration(window)
    if not timedelta(minutes=1) <= span <= timedelta(days=7):
        raise ConfigError(f"window={window}: use 1m to 168h")
    now = _naive(view.now())
    with view.store.connect() as conn:
        found = channel_status(conn, now, window=span, by_model=by_model)
    return {"window": window, "at": _iso(now), "providers": [
        {"provider": s.provider, "model": s.model, "state": s.state, "sent": s.sent,
         "errors": s.errors, "error_rate": s.error_rate, "rate_limited": s.rate_limited,
         "auth_failures": s.auth_failures, "last_call_at": _iso(s.last_call_at)} for s in found]}


@router.get("/alerts")
def alerts(view: View,
           since: Annotated[str, Query(max_length=_MOMENT)] = "7d",
           open_only: Annotated[bool, Query(alias="open")] = False,
           limit: Annotated[int, Query(ge=1, le=500)] = 100) -> dict[str, Any]:
    """The alerts the rules sent, newest first (``open=true``: not acknowledged)."""
    now = _naive(view.now())
    with view.store.connect() as conn:
        found = recent(conn, since=parse_instant(since, now=now), open_only=open_only, limit=limit)
    return {"alerts": [{**asdict(a), "window_start": _iso(a.window_start),
                        "fired_at": _iso(a.fired_at), "acknowledged_at": _iso(a.acknowledged_at)}
                       for a in found]}
