"""The dashboard: the report's page for a period (today, this week, this month…) and filters
chosen in the query string, with a page of recent calls and a refresh every few seconds."""

from __future__ import annotations

from datetime import timedelta, timezone
from typing import Any
from urllib.parse import urlencode

from .._alerts.history import recent
from .._alerts.status import DEFAULT_WINDOW, channel_status
from .._errors import ConfigError
from .._i18n import N_
from .._reporting import live
from .._reporting.render import render_html
from .._reporting.report import REPORT_FILTERS, build_report
from .source import LedgerView

__all__ = ["render_dashboard", "PERIODS", "CALLS_PER_PAGE"]

PERIODS = ("today", "week", "month", "24h", "7d", "30d")
PERIOD_LABELS = {"today": N_("Today"), "week": N_("This week"), "month": N_("This month"),
                 "24h": N_("24 h"), "7d": N_("7 days"), "30d": N_("30 days")}
CALLS_PER_PAGE = 50
ALERTS_SHOWN_FOR = timedelta(days=7)
MAX_ALERTS_SHOWN = 20
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
    arguments = _period_arguments(view, period, params.get("since") or None,
                                  params.get("until") or None)
    report = build_report(view, filters=filters, **arguments)
    start, end = report.period.utc_range
    now = view.now().astimezone(timezone.utc).replace(tzinfo=None)
    with view.store.connect() as conn:
        page = live.recent_calls(conn, start=start, end=end, filters=filters,
                                 limit=CALLS_PER_PAGE, cursor=params.get("cursor") or None)
        channels = channel_status(conn, now)
        alerts = recent(conn, since=now - ALERTS_SHOWN_FOR, limit=MAX_ALERTS_SHOWN)
    current = {name: params[name] for name in _KEPT if params.get(name)}

    def link(**changes: str | None) -> str:
        query = {**current, **changes}
        return f"{root}/?" + urlencode({k: v for k, v in query.items() if v})

    json_query = {"since": start.isoformat() + "Z", "until": end.isoformat() + "Z", **filters}
    choices = {column.column: [row.label for row in column.rows if not row.is_other]
               for column in report.breakdowns}
    return render_html(
        report, "dashboard.html.j2", root=root, refresh_seconds=refresh_seconds, page=page,
        link=link, periods=PERIOD_LABELS, period=None if params.get("since") else period,
        params=current, choices=choices, filter_names=REPORT_FILTERS,
        json_link=f"{root}/api/v1/summary?" + urlencode(json_query), channels=channels,
        alerts=alerts, status_window=DEFAULT_WINDOW)

