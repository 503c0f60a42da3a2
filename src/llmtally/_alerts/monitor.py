"""Evaluating alert rules in the background: a daemon thread runs a round every
``interval_s`` seconds (and :meth:`AlertMonitor.check` runs one now). A round reads the
ledger, stores the new alerts (the history refuses one already sent in its cool-down, so many
processes evaluating the same rules send each once), and hands them to the notifier, which
delivers on its own thread. Nothing here runs on a caller's thread or slows a call."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone

from .._errors import ConfigError
from .._log import warn_limited
from .._notify.notifier import Notifier
from .._storage.store import Store
from .evaluate import evaluate
from .history import Fired, record
from .message import from_fired
from .rules import AlertRule

__all__ = ["AlertMonitor", "check_rules"]


def check_rules(rules: Sequence[AlertRule], interval_s: float, known_providers: frozenset[str],
                seen_providers: Callable[[], set[str]]) -> None:
    """Refuse a rule that cannot be evaluated: a window shorter than the evaluation interval,
    a provider in its scope that is neither LiteLLM's nor in the ledger."""
    for number, rule in enumerate(rules):
        where = f"alert_rules[{number}] ({rule.label})"
        if rule.window_delta < timedelta(seconds=interval_s):
            raise ConfigError(f"{where}: window {rule.window_delta} is shorter than the evaluation "
                              f"interval (alert_interval_s={interval_s:g}): make the window longer "
                              "or the interval shorter")
        provider = rule.scope.get("provider")
        if provider and provider not in known_providers and provider not in seen_providers():
            import difflib

            close = difflib.get_close_matches(provider, sorted(known_providers), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: scope provider {provider!r} is unknown{hint}: neither a "
                              "LiteLLM provider nor one recorded in the ledger")


class AlertMonitor:
    """Runs alert rounds for ``rules`` over ``store`` and sends what fires to ``notifier``."""

    def __init__(self, store: Store, rules: Sequence[AlertRule], notifier: Notifier, *,
                 interval_s: float, clock: Callable[[], datetime], currency: str,
                 link: str | None = None, language: str = "en") -> None:
        self.store = store
        self.rules = tuple(rules)
        self.notifier = notifier
        self.interval_s = interval_s
        self.clock = clock
        self.currency = currency
        self.link = link
        self.language = language
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._round = threading.Lock()

    def check(self) -> list[Fired]:
        """One round now: the alerts it sent (an alert already sent in its cool-down, by this
        process or another, is not sent again)."""
        now = self.clock().astimezone(timezone.utc).replace(tzinfo=None)
        with self._round:
            with self.store.connect() as conn:
                findings = evaluate(conn, self.rules, now)
            if not findings:
                return []
            with self.store.write() as conn:  # SQLite: BEGIN IMMEDIATE (it reads, then writes)
                fired = record(conn, findings, now)
        for alert in fired:
            self.notifier.notify(from_fired(alert, link=self.link, currency=self.currency,
                                            language=self.language))
        return fired

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llmtally-alert-rules",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception as exc:  # the ledger is down: try again next round
                warn_limited("alert-rules", "llmtally: alert rules could not be evaluated "
                             "(%s: %s); will try again", type(exc).__name__, exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
