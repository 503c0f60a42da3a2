"""The alert history in the ledger: each alert sent is a row, whose id (rule, subject,
cool-down slot) lets many processes evaluating the same rules send each alert once; rows
can be listed and acknowledged (``llmtally alerts``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import BigInteger, Column, Connection, DateTime, Float, Text, func, select, update
from sqlmodel import Field

from .._storage.rollups import as_datetime
from .._storage.tables import LedgerModel
from .evaluate import Finding

__all__ = ["AlertRecord", "Fired", "record", "recent", "acknowledge", "ALERTS"]


class AlertRecord(LedgerModel, table=True):
    """One alert sent (migration 6 holds the DDL that created it)."""

    __tablename__ = "llmtally_alerts"
    id: str = Field(primary_key=True, max_length=32)
    rule_key: str = Field(max_length=32)
    rule: str = Field(max_length=256)
    kind: str = Field(max_length=32)
    subject: str = Field(max_length=600)
    severity: str = Field(max_length=16)
    value: float = Field(sa_column=Column("value", Float, nullable=False))
    threshold: float
    calls: int = Field(sa_type=BigInteger)
    window_start: datetime = Field(sa_type=DateTime)
    fired_at: datetime = Field(sa_type=DateTime, index=True)
    details: str = Field(sa_column=Column("details", Text, nullable=False))
    acknowledged_at: datetime | None = Field(default=None, sa_type=DateTime)
    acknowledged_by: str | None = Field(default=None, max_length=256)


ALERTS = AlertRecord.__table__


@dataclass(frozen=True, slots=True)
class Fired:
    """An alert as the history holds it."""

    id: str
    rule: str
    kind: str
    subject: str
    severity: str
    value: float
    threshold: float
    calls: int
    window_start: datetime
    fired_at: datetime
    details: dict[str, Any]
    acknowledged_at: datetime | None = None
    acknowledged_by: str | None = None


def _slot(finding: Finding, now: datetime) -> int:
    if finding.rule.kind == "unpriced_model":
        return 0  # once per model, ever
    if finding.rule.kind == "spend_spike":  # once per hour measured, however often evaluated
        return int(finding.since.replace(tzinfo=timezone.utc).timestamp() // 3600)
    # ``now`` is naive UTC: read as UTC, not as this process's local time (another process
    # in another time zone must land in the same slot)
    return int(now.replace(tzinfo=timezone.utc).timestamp()
               // finding.rule.cooldown_delta.total_seconds())


def alert_id(finding: Finding, now: datetime) -> str:
    text = json.dumps([finding.rule.key, finding.subject, _slot(finding, now)])
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def record(conn: Connection, findings: Sequence[Finding], now: datetime) -> list[Fired]:
    """Store each finding not yet alerted in its cool-down slot; return those stored (the
    ones to send). ``conn`` commits; a concurrent process storing the same id first wins."""
    from .._budgets.tables import insert_ignore

    fired = []
    for finding in findings:
        if finding.rule.kind != "unpriced_model" and conn.execute(
                select(ALERTS.c.id).where(ALERTS.c.rule_key == finding.rule.key,
                                          ALERTS.c.subject == finding.subject[:600],
                                          ALERTS.c.fired_at > now - finding.rule.cooldown_delta)
                .limit(1)).first() is not None:
            continue  # sent in the last cool-down (in the previous slot, by any process)
        row = Fired(id=alert_id(finding, now), rule=finding.rule.label[:256],
                    kind=finding.rule.kind, subject=finding.subject[:600],
                    severity=finding.rule.level, value=float(finding.value),
                    threshold=finding.rule.limit, calls=finding.calls,
                    window_start=finding.since, fired_at=now, details=finding.details)
        values = {**{name: getattr(row, name) for name in Fired.__slots__},
                  "rule_key": finding.rule.key,
                  "details": json.dumps(finding.details, default=str, ensure_ascii=False)}
        # RETURNING says whether this insert won (psycopg's rowcount does not, here)
        statement = insert_ignore(conn, ALERTS).values(**values).returning(ALERTS.c.id)
        if conn.execute(statement).first() is not None:
            fired.append(row)
    return fired


def _fired(row: Any) -> Fired:
    return Fired(id=row.id, rule=row.rule, kind=row.kind, subject=row.subject,
                 severity=row.severity, value=float(row.value), threshold=float(row.threshold),
                 calls=int(row.calls), window_start=as_datetime(row.window_start),
                 fired_at=as_datetime(row.fired_at), details=json.loads(row.details or "{}"),
                 acknowledged_at=None if row.acknowledged_at is None else as_datetime(row.acknowledged_at),
                 acknowledged_by=row.acknowledged_by)


def recent(conn: Connection, *, since: datetime | None = None, open_only: bool = False,
           limit: int = 100) -> list[Fired]:
    """Alerts newest first (``open_only``: not acknowledged)."""
    statement = select(ALERTS)
    if since is not None:
        statement = statement.where(ALERTS.c.fired_at >= since)
    if open_only:
        statement = statement.where(ALERTS.c.acknowledged_at.is_(None))
    rows = conn.execute(statement.order_by(ALERTS.c.fired_at.desc(), ALERTS.c.id).limit(limit))
    return [_fired(row) for row in rows]


def acknowledge(conn: Connection, ids: Sequence[str], *, by: str, now: datetime) -> int:
    """Mark these alerts (ids, or prefixes of 6+ characters that match one alert only)
    acknowledged; return how many were. ``conn`` commits."""
    done = 0
    for given in ids:
        prefix = given.strip().lower()
        if len(prefix) < 6 or any(c not in "0123456789abcdef" for c in prefix):
            continue
        matching = ALERTS.c.id.startswith(prefix, autoescape=True)
        if conn.execute(select(func.count()).where(matching)).scalar() != 1:
            continue  # none, or more than one: say the whole id
        done += conn.execute(
            update(ALERTS).where(ALERTS.c.id.startswith(prefix, autoescape=True),
                                 ALERTS.c.acknowledged_at.is_(None))
            .values(acknowledged_at=now, acknowledged_by=by[:256])).rowcount
    return done
