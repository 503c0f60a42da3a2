"""One evaluation round: each rule's findings, read from the ledger.

Windows are read as the reports read periods (``_reporting/facts.py``): the whole hours from
the rollups, the rest from the events through the ``ts`` index, so a round costs a few small
queries however big the ledger is. Latency percentiles merge the hourly sketches with the
edges' events (within the sketches' 1 % error)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, func, select, true

from .._reporting.facts import Span, events_where, facts, hourly_where, sum_if
from .._reporting.health import AUTH_ERRORS, RATE_LIMIT_ERRORS, ends_with_any
from .._storage.rollups import LATENCY, SKETCH_DIMS, hour_of
from .._storage.sketch import bucket_of, percentile
from .._storage.tables import HourlyRollup, RollupSketch, UsageEvent
from .rules import AlertRule

__all__ = ["Finding", "evaluate"]

_E = UsageEvent.__table__.c
_R = HourlyRollup.__table__.c
_S = RollupSketch.__table__.c


@dataclass(frozen=True, slots=True)
class Finding:
    """A rule's condition holding for one subject (a provider, model or project)."""

    rule: AlertRule
    subject: str
    value: float          # the measured figure (a rate, a count, milliseconds, a cost)
    calls: int            # the calls it was measured on
    since: datetime       # the start of the window (naive UTC)
    details: dict[str, Any] = field(default_factory=dict)


def _span(rule: AlertRule, start: datetime, end: datetime) -> Span:
    return Span(((start, end),), filters=tuple(sorted(rule.scope.items())))


def evaluate(conn: Connection, rules: Sequence[AlertRule], now: datetime) -> list[Finding]:
    """Every finding of ``rules`` at ``now`` (naive UTC)."""
    found: list[Finding] = []
    for rule in rules:
        start = now - rule.window_delta
        if rule.kind == "error_rate":
            found += _error_rate(conn, rule, start, now)
        elif rule.kind in ("auth_failure", "rate_limited"):
            found += _failures(conn, rule, start, now)
        elif rule.kind == "latency_p95":
            found += _latency(conn, rule, start, now)
        elif rule.kind == "spend_spike":
            found += _spend_spike(conn, rule, now)
        else:
            found += _unpriced(conn, rule, start, now)
    return found


def _subject(value: Any) -> str:
    return "(none)" if value is None else str(value)


def _error_rate(conn: Connection, rule: AlertRule, start: datetime, now: datetime) -> list[Finding]:
    f = facts(_span(rule, start, now)).c
    subject = f[rule.group]
    sent = sum_if(f.status != "blocked", f.calls)
    errors = sum_if(f.status == "error", f.calls)
    rows = conn.execute(select(subject.label("subject"), sent.label("sent"), errors.label("errors"))
                        .group_by(subject))
    return [Finding(rule, _subject(row.subject), row.errors / row.sent, int(row.sent), start,
                    {"errors": int(row.errors)})
            for row in rows
            if row.sent >= rule.min_calls and row.errors / row.sent >= rule.limit]


def _failures(conn: Connection, rule: AlertRule, start: datetime, now: datetime) -> list[Finding]:
    names = AUTH_ERRORS if rule.kind == "auth_failure" else RATE_LIMIT_ERRORS
    f = facts(_span(rule, start, now)).c
    subject = f[rule.group]
    matching = and_(f.status == "error", ends_with_any(f.error_type, names))
    rows = conn.execute(select(subject.label("subject"), sum_if(matching, f.calls).label("failed"),
                               sum_if(f.status != "blocked", f.calls).label("sent"))
                        .group_by(subject))
    out = []
    for row in rows:
        if row.failed >= rule.limit:
            types: Any = conn.execute(
                select(f.error_type, func.sum(f.calls)).where(matching, subject == row.subject)
                .group_by(f.error_type)) if row.subject is not None else []
            out.append(Finding(rule, _subject(row.subject), float(row.failed), int(row.sent),
                               start, {"error_types": {str(t): int(n) for t, n in types}}))
    return out


def _latency(conn: Connection, rule: AlertRule, start: datetime, now: datetime) -> list[Finding]:
    span = _span(rule, start, now)
    counts: dict[str, dict[int, int]] = {}
    if all(name in SKETCH_DIMS for name in rule.scope) and rule.group in SKETCH_DIMS:
        subject = _S[rule.group]
        cells = select(subject, _S.bucket, func.sum(_S.calls)) \
            .where(_S.metric == LATENCY, hourly_where(span, _S.hour, _S)) \
            .group_by(subject, _S.bucket)
        for name, bucket, calls in conn.execute(cells):
            place = counts.setdefault(_subject(name), {})
            place[bucket] = place.get(bucket, 0) + int(calls)
        edge = events_where(span)
    else:  # the sketches do not keep this column: the window's events
        edge = and_(_E.ts >= start, _E.ts < now,
                    *(_E[name] == value for name, value in rule.scope.items()))
    rows = conn.execute(select(_E[rule.group], _E.latency_ms)
                        .where(edge, _E.status == "ok", _E.latency_ms.isnot(None)))
    for name, latency in rows:
        place = counts.setdefault(_subject(name), {})
        bucket = bucket_of(latency)
        place[bucket] = place.get(bucket, 0) + 1
    out = []
    for name, cells_of in counts.items():
        calls = sum(cells_of.values())
        p95 = percentile(cells_of, 95)
        if calls >= rule.min_calls and p95 is not None and p95 >= rule.limit:
            out.append(Finding(rule, name, p95, calls, start, {"p50_ms": percentile(cells_of, 50)}))
    return out


def _spend_spike(conn: Connection, rule: AlertRule, now: datetime) -> list[Finding]:
    hour = hour_of(now) - timedelta(hours=1)  # the last whole hour
    baseline = [hour - timedelta(days=day) for day in range(1, rule.baseline_days + 1)]
    subject = _R[rule.group]
    scope = and_(true(), *(_R[name] == value for name, value in rule.scope.items()))
    current = dict(conn.execute(
        select(subject, func.sum(_R.cost)).where(_R.hour == hour, scope).group_by(subject)).all())
    before = dict(conn.execute(
        select(subject, func.sum(_R.cost)).where(_R.hour.in_(baseline), scope)
        .group_by(subject)).all())
    calls = dict(conn.execute(
        select(subject, func.sum(_R.calls)).where(_R.hour == hour, scope).group_by(subject)).all())
    out = []
    for name, cost in current.items():
        cost = float(cost or 0)
        average = float(before.get(name) or 0) / rule.baseline_days
        if cost >= rule.min_cost and cost >= rule.limit * average:
            out.append(Finding(rule, _subject(name), cost, int(calls.get(name) or 0), hour,
                               {"baseline_average": average, "hour": hour.isoformat()}))
    return out


def _unpriced(conn: Connection, rule: AlertRule, start: datetime, now: datetime) -> list[Finding]:
    f = facts(_span(rule, start, now)).c
    rows = conn.execute(
        select(f.provider, f.model, func.sum(f.calls).label("calls"))
        .where(f.cost_status == "unpriced").group_by(f.provider, f.model))
    return [Finding(rule, f"{row.provider}/{row.model}" if row.provider else str(row.model),
                    float(row.calls), int(row.calls), start,
                    {"provider": row.provider, "model": row.model})
            for row in rows]
