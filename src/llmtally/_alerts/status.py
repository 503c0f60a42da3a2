"""Each provider's (and each model's) status from its recent calls: ok, degraded, down or
idle (the rules are in ``_reporting/health.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, and_, func, select

from .._reporting.facts import Span, facts, sum_if
from .._reporting.health import AUTH_ERRORS, RATE_LIMIT_ERRORS, STATES, ends_with_any, state

__all__ = ["ChannelStatus", "channel_status", "DEFAULT_WINDOW", "STATES"]

DEFAULT_WINDOW = timedelta(minutes=15)


@dataclass(frozen=True, slots=True)
class ChannelStatus:
    """A provider's (``model`` None) or one of its models' recent calls, and its state."""

    provider: str | None
    model: str | None
    state: str
    sent: int
    errors: int
    rate_limited: int
    auth_failures: int
    last_call_at: datetime | None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.sent if self.sent else None


def channel_status(conn: Connection, now: datetime, *, window: timedelta = DEFAULT_WINDOW,
                   by_model: bool = False) -> list[ChannelStatus]:
    """The status of each provider (``by_model``: of each provider and model) with calls in
    the window, worst first."""
    f = facts(Span(((now - window, now),))).c
    keys = [f.provider, f.model] if by_model else [f.provider]
    failed = f.status == "error"
    rows = conn.execute(select(
        *keys,
        sum_if(f.status != "blocked", f.calls).label("sent"),
        sum_if(failed, f.calls).label("errors"),
        sum_if(and_(failed, ends_with_any(f.error_type, RATE_LIMIT_ERRORS)), f.calls).label("limited"),
        sum_if(and_(failed, ends_with_any(f.error_type, AUTH_ERRORS)), f.calls).label("auth"),
        func.max(f.last_ts).label("last"),
    ).group_by(*keys))
    out = []
    for row in rows:
        sent, errors, limited, auth = (int(row.sent), int(row.errors), int(row.limited), int(row.auth))
        last = row.last
        if isinstance(last, str):
            last = datetime.fromisoformat(last)
        out.append(ChannelStatus(row.provider, row.model if by_model else None,
                                 state(sent, errors, limited, auth), sent, errors, limited,
                                 auth, last))
    out.sort(key=lambda s: (STATES.index(s.state), -(s.error_rate or 0), s.provider or "",
                            s.model or ""))
    return out
