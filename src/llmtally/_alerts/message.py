"""A rule's alert as a message: what, where, how bad, since when."""

from __future__ import annotations

from datetime import datetime, timezone

from .._notify.message import AlertMessage
from .history import Fired

__all__ = ["from_fired"]

_WHAT = {
    "error_rate": "error rate",
    "auth_failure": "authentication failures (invalid or revoked key)",
    "rate_limited": "rate limited / out of quota (429)",
    "latency_p95": "slow: p95 latency",
    "spend_spike": "spend spike",
    "unpriced_model": "new model without a price",
}


def _utc(naive: datetime) -> str:
    return f"{naive.replace(tzinfo=timezone.utc):%Y-%m-%d %H:%M} UTC"


def _measure(fired: Fired) -> str:
    value, threshold = fired.value, fired.threshold
    if fired.kind == "error_rate":
        return (f"{value:.0%} of {fired.calls:,} calls failed (alert at {threshold:.0%})")
    if fired.kind in ("auth_failure", "rate_limited"):
        types = ", ".join(f"{name} ×{count}" for name, count in fired.details.get("error_types", {}).items())
        return f"{value:,.0f} failed calls of {fired.calls:,} (alert at {threshold:,.0f})" + \
            (f": {types}" if types else "")
    if fired.kind == "latency_p95":
        return f"p95 {value:,.0f} ms over {fired.calls:,} calls (alert at {threshold:,.0f} ms)"
    if fired.kind == "spend_spike":
        average = float(fired.details.get("baseline_average", 0.0))
        return (f"{value:,.2f} spent in the hour, {average:,.2f} on average in that hour "
                f"before (alert at {threshold:g}×)")
    return f"{fired.calls:,} calls recorded with no price (not in any cost)"


def from_fired(fired: Fired, *, link: str | None = None, currency: str = "USD") -> AlertMessage:
    """A rule's alert as a message."""
    what = _WHAT.get(fired.kind, fired.kind)
    title = f"[{fired.severity.upper()}] {what}: {fired.subject}"
    lines = (_measure(fired) + (f" {currency}" if fired.kind == "spend_spike" else ""),
             f"rule: {fired.rule}", f"since {_utc(fired.window_start)}; alert {fired.id[:8]}")
    data = {"kind": "rule", "rule": fired.rule, "rule_kind": fired.kind,
            "subject": fired.subject, "severity": fired.severity, "value": fired.value,
            "threshold": fired.threshold, "calls": fired.calls,
            "window_start": fired.window_start.isoformat(), "fired_at": fired.fired_at.isoformat(),
            "id": fired.id, "details": fired.details}
    return AlertMessage(fired.severity, title, lines, data, link)
