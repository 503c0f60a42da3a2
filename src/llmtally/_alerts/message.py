"""A rule's alert as a message: what, where, how bad, since when, in the ledger's language."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone

from .._i18n import N_, translator
from .._notify.message import AlertMessage
from .history import Fired

__all__ = ["from_fired"]


_WHAT = {
    "error_rate": N_("error rate"),
    "auth_failure": N_("authentication failures (invalid or revoked key)"),
    "rate_limited": N_("rate limited / out of quota (429)"),
    "latency_p95": N_("slow: p95 latency"),
    "spend_spike": N_("spend spike"),
    "unpriced_model": N_("new model without a price"),
}
_SEVERITY = {"warning": N_("WARNING"), "critical": N_("CRITICAL")}


def _utc(naive: datetime) -> str:
    return f"{naive.replace(tzinfo=timezone.utc):%Y-%m-%d %H:%M} UTC"


def _measure(fired: Fired, gettext: Callable[[str], str], currency: str) -> str:
    value, threshold, calls = fired.value, fired.threshold, f"{fired.calls:,}"
    if fired.kind == "error_rate":
        return gettext("{rate:.0%} of {calls} calls failed (alert at {threshold:.0%})").format(
            rate=value, calls=calls, threshold=threshold)
    if fired.kind in ("auth_failure", "rate_limited"):
        line = gettext("{failed:,.0f} failed calls of {calls} (alert at {threshold:,.0f})").format(
            failed=value, calls=calls, threshold=threshold)
        types = ", ".join(f"{name} ×{count}" for name, count in fired.details.get("error_types", {}).items())
        return f"{line}: {types}" if types else line
    if fired.kind == "latency_p95":
        return gettext("p95 {p95:,.0f} ms over {calls} calls (alert at {threshold:,.0f} ms)").format(
            p95=value, calls=calls, threshold=threshold)
    if fired.kind == "spend_spike":
        return gettext("{cost:,.2f} {currency} spent in the hour, {average:,.2f} on average in "
                       "that hour before (alert at {threshold:g}×)").format(
            cost=value, currency=currency, threshold=threshold,
            average=float(fired.details.get("baseline_average", 0.0)))
    return gettext("{calls} calls recorded with no price (not in any cost)").format(calls=calls)


def from_fired(fired: Fired, *, link: str | None = None, currency: str = "USD",
               language: str = "en") -> AlertMessage:
    """A rule's alert as a message, in ``language``."""
    _ = translator(language)
    what = _(_WHAT.get(fired.kind, fired.kind))
    severity = _(_SEVERITY.get(fired.severity, fired.severity))
    title = f"[{severity}] {what}: {fired.subject}"
    lines = (_measure(fired, _, currency),
             _("rule: {rule}").format(rule=fired.rule),
             _("since {since}; alert {id}").format(since=_utc(fired.window_start), id=fired.id[:8]))
    data = {"kind": "rule", "rule": fired.rule, "rule_kind": fired.kind,
            "subject": fired.subject, "severity": fired.severity, "value": fired.value,
            "threshold": fired.threshold, "calls": fired.calls,
            "window_start": fired.window_start.isoformat(), "fired_at": fired.fired_at.isoformat(),
            "id": fired.id, "details": fired.details}
    return AlertMessage(fired.severity, title, lines, data, link)
