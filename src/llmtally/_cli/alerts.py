"""``llmtally status`` (each provider's state from its recent calls) and ``llmtally alerts``
(the alert history: list, acknowledge)."""

from __future__ import annotations

import getpass
import socket
from typing import Any

import click

from .._i18n import translator
from .._terminal import CommandError, echo, iso, print_json, print_table
from .ledger import ledger_options

__all__ = ["status", "alerts"]

@click.command("status")
@click.option("--window", default="15m", show_default=True,
              help="How far back to look: 15m, 1h...")
@click.option("--by-model", is_flag=True, help="One line per provider and model.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@ledger_options
def status(tally: Any, window: str, by_model: bool, as_json: bool) -> None:
    """Each provider: ok, degraded (10 % or more failed, or rate limited), down (half or more
    failed, or every call refused its key) or idle, from its calls in the last --window.

    \b
    Example:
      llmtally status
      llmtally status --window 1h --by-model --json
    """
    from datetime import timedelta, timezone

    from .._alerts.status import channel_status
    from .._timeparse import parse_duration

    span = parse_duration(window)
    if not timedelta(minutes=1) <= span <= timedelta(days=7):
        raise CommandError(f"--window {window}: use 1m to 7d")
    tally.flush(10)
    now = tally.now().astimezone(timezone.utc).replace(tzinfo=None)
    with tally.store.connect() as conn:
        found = channel_status(conn, now, window=span, by_model=by_model)
    if as_json:
        print_json([{"provider": s.provider, "model": s.model, "state": s.state, "sent": s.sent,
                     "errors": s.errors, "error_rate": s.error_rate,
                     "rate_limited": s.rate_limited, "auth_failures": s.auth_failures,
                     "last_call_at": iso(s.last_call_at)} for s in found])
        return
    _ = translator(tally.language)
    if not found:
        echo(_("No calls in the last {window}.").format(window=window))
        return
    header = [_("provider"), *([_("model")] if by_model else []), _("state"), _("sent"),
              _("errors"), _("rate"), _("429s"), _("auth"), _("last call")]
    print_table(header, [[s.provider or "-", *([s.model or "-"] if by_model else []), _(s.state),
                          s.sent, s.errors,
                          "-" if s.error_rate is None else f"{s.error_rate:.0%}",
                          s.rate_limited, s.auth_failures, iso(s.last_call_at) or "-"]
                         for s in found], left=3 if by_model else 2)


@click.command("alerts")
@click.option("--since", default="7d", show_default=True, help="Alerts sent since (7d, 2026-11-01).")
@click.option("--open", "open_only", is_flag=True, help="Only those not acknowledged.")
@click.option("--ack", "ack", multiple=True, metavar="ID",
              help="Acknowledge this alert (an id or its first 8+ characters); repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@ledger_options
def alerts(tally: Any, since: str, open_only: bool, ack: tuple[str, ...], as_json: bool) -> None:
    """The alerts the rules sent (kept in the ledger, whichever process sent them), newest
    first; --ack marks them acknowledged.

    \b
    Example:
      llmtally alerts --open
      llmtally alerts --ack 3f2a9c1e
    """
    from datetime import timezone

    from .._alerts.history import acknowledge, recent
    from .._timeparse import parse_instant

    now = tally.now().astimezone(timezone.utc).replace(tzinfo=None)
    _ = translator(tally.language)
    if ack:
        bad = [given for given in ack if len(given) < 8]
        if bad:
            raise CommandError(f"--ack {bad[0]}: give at least 8 characters of the alert's id")
        who = f"{getpass.getuser()}@{socket.gethostname()}"
        with tally.store.write() as conn:
            done = acknowledge(conn, ack, by=who, now=now)
        echo(_("acknowledged: {count}").format(count=done))
        if not done:
            raise SystemExit(1)
        return
    with tally.store.connect() as conn:
        found = recent(conn, since=parse_instant(since, now=now), open_only=open_only, limit=500)
    if as_json:
        print_json([{**{k: getattr(a, k) for k in ("id", "rule", "kind", "subject", "severity",
                                                     "value", "threshold", "calls", "details",
                                                     "acknowledged_by")},
                     "window_start": iso(a.window_start), "fired_at": iso(a.fired_at),
                     "acknowledged_at": iso(a.acknowledged_at)} for a in found])
        return
    if not found:
        echo(_("No alerts since {since}.").format(since=since))
        return
    print_table([_("id"), _("sent"), _("severity"), _("kind"), _("subject"), _("value"),
                 _("acknowledged")],
                [[a.id[:8], iso(a.fired_at), _(a.severity), a.kind, a.subject[:60],
                  f"{a.value:,.4g}", _("yes") if a.acknowledged_at else "-"] for a in found],
                left=5)
