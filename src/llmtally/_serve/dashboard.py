"""The dashboard: the report's page for a period (today, this week, this month…) and filters
chosen in the query string, with a page of recent calls and a refresh every few seconds."""

from __future__ import annotations

from datetime import timezone
from typing import Any
from urllib.parse import urlencode

from .._errors import ConfigError
from .._reporting import live
from .._reporting.render import render_html
from .._reporting.report import REPORT_FILTERS, build_report
from .source import LedgerView

__all__ = ["render_dashboard", "PERIODS", "CALLS_PER_PAGE"]

PERIODS = ("today", "week", "month", "24h", "7d", "30d")
PERIOD_LABELS = {"today": "Today", "week": "This week", "month": "This month", "24h": "24 h",
                 "7d": "7 days", "30d": "30 days"}
CALLS_PER_PAGE = 50
_KEPT = ("period", "since", "until", *REPORT_FILTERS)  # what links carry over


def _period_arguments(view: LedgerView, period: str, since: str | None,
                      until: str | None) -> dict[str, Any]:
    if since:
        return {"since": since, "until": until}
    if until:
        raise ConfigError("until needs since")
    now = view.now()
    today = (now if now.tzinfo else now.replace(tzinfo=timezone.utc)).astimezone(view.tz).date()
    if period == "today":
        return {"since": today.isoformat()}
    if period == "week":
        return {"week": "this"}
    if period == "month":
        return {"since": today.replace(day=1).isoformat()}
    if period in PERIODS:
        return {"since": period}
    raise ConfigError(f"period={period!r}: use one of {', '.join(PERIODS)}, or since/until")


def render_dashboard(view: LedgerView, params: dict[str, str], *, root: str,
                     refresh_seconds: int) -> str:
    """The page for these query parameters (period, since, until, the filters, cursor)."""
    period = params.get("period") or "today"
    filters = {name: params[name] for name in REPORT_FILTERS if params.get(name)}
    report = build_report(view, filters=filters,
                          **_period_arguments(view, period, params.get("since") or None,
                                              params.get("until") or None))
    start, end = report.period.utc_range
    with view.store.connect() as conn:
        page = live.recent_calls(conn, start=start, end=end, filters=filters,
                                 limit=CALLS_PER_PAGE, cursor=params.get("cursor") or None)
    current = {name: params[name] for name in _KEPT if params.get(name)}

    def link(**changes: str | None) -> str:
        query = {**current, **changes}
        return f"{root}/?" + urlencode({k: v for k, v in query.items() if v})

    choices = {column.column: [row.label for row in column.rows if not row.is_other]
               for column in report.breakdowns}
    return render_html(
        report, "dashboard.html.j2", root=root, refresh_seconds=refresh_seconds, page=page,
        link=link, periods=PERIOD_LABELS, period=None if params.get("since") else period,
        params=current, choices=choices, filter_names=REPORT_FILTERS)

