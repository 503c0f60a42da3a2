"""Alert rules: what to watch, where, over which window, and how often to say so.

Each rule has a kind, a ``per`` (the column whose values are alerted on separately:
``provider``, ``model`` or ``project``), an optional ``scope`` (only calls matching it), a
``window`` and a ``cooldown``: one alert per subject per cool-down, however many processes
evaluate the rule (the ledger keeps the history and refuses a second one).

====================  =========================================================  ============
kind                  fires when, in the last ``window``                          threshold
====================  =========================================================  ============
``error_rate``        failed / sent >= threshold, with at least ``min_calls`` sent   0.2
``auth_failure``      failed with an authentication or permission error >= threshold 1
``rate_limited``      failed with a rate-limit / quota error (429) >= threshold      5
``latency_p95``       p95 latency (ms) of successful calls >= threshold, at least
                      ``min_calls`` of them                                           (required)
``spend_spike``       the last whole hour's cost >= threshold × the average of the same
                      hour on the previous ``baseline_days`` days, and >= ``min_cost``  3.0
``unpriced_model``    a model with no price is seen for the first time             —
====================  =========================================================  ============
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from .._errors import ConfigError
from .._timeparse import parse_duration

__all__ = ["AlertRule", "KINDS", "SEVERITIES", "PER", "rules_from_config"]

KINDS = ("error_rate", "auth_failure", "rate_limited", "latency_p95", "spend_spike",
         "unpriced_model")
SEVERITIES = ("warning", "critical")
PER = ("provider", "model", "project")
SCOPE_KEYS = ("provider", "model", "project", "user", "source")
_DEFAULT_THRESHOLD = {"error_rate": 0.2, "auth_failure": 1, "rate_limited": 5,
                      "spend_spike": 3.0, "unpriced_model": 1}
_DEFAULT_PER = {"latency_p95": "model", "unpriced_model": "model"}
_DEFAULT_SEVERITY = {"auth_failure": "critical"}
MIN_WINDOW = timedelta(minutes=1)
MAX_WINDOW = timedelta(days=7)
_FIELDS = ("kind", "threshold", "per", "scope", "window", "min_calls", "cooldown", "severity",
           "name", "min_cost", "baseline_days")


def _duration(key: str, value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return timedelta(seconds=float(value))
    if isinstance(value, str):
        return parse_duration(value)
    raise ConfigError(f"{key}={value!r}: give a duration such as '15m', '1h' or seconds")


@dataclass(frozen=True)
class AlertRule:
    """One alert rule (see the table in this module's docs, and docs/alerts.md).

    >>> AlertRule("error_rate", threshold=0.2, min_calls=20, window="15m")
    >>> AlertRule("latency_p95", threshold=8000, per="model", scope={"provider": "openai"})
    >>> AlertRule("spend_spike", threshold=3, min_cost=5, per="project")
    """

    kind: str
    threshold: float | None = None
    per: str | None = None
    scope: Mapping[str, str] = field(default_factory=dict)
    window: timedelta | str | float = "15m"
    min_calls: int = 20
    cooldown: timedelta | str | float = "1h"
    severity: str | None = None
    name: str | None = None
    min_cost: float = 1.0        # spend_spike: ignore hours cheaper than this
    baseline_days: int = 7       # spend_spike: how many previous days' same hour to average

    def __post_init__(self) -> None:
        label = f"alert rule {self.name or self.kind!r}"
        if self.kind not in KINDS:
            raise ConfigError(f"{label}: kind={self.kind!r}; use one of {', '.join(KINDS)}")
        threshold = self.threshold if self.threshold is not None else _DEFAULT_THRESHOLD.get(self.kind)
        if threshold is None:
            raise ConfigError(f"{label}: threshold is required for {self.kind} (milliseconds, "
                              "e.g. threshold = 8000)")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                or not threshold > 0 or threshold != threshold or threshold == float("inf"):
            raise ConfigError(f"{label}: threshold={threshold!r} must be a positive number")
        if self.kind == "error_rate" and threshold > 1:
            raise ConfigError(f"{label}: threshold={threshold!r} is a fraction of the calls "
                              "sent: 0 < threshold <= 1 (0.2 for 20 %)")
        per = self.per or _DEFAULT_PER.get(self.kind, "provider")
        if per not in PER:
            raise ConfigError(f"{label}: per={per!r}; use one of {', '.join(PER)}")
        scope = dict(self.scope or {})
        for key, value in scope.items():
            if key not in SCOPE_KEYS:
                raise ConfigError(f"{label}: scope key {key!r}; use {', '.join(SCOPE_KEYS)}")
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{label}: scope[{key!r}]={value!r} must be a non-empty name")
        window = _duration(f"{label}: window", self.window)
        if not MIN_WINDOW <= window <= MAX_WINDOW:
            raise ConfigError(f"{label}: window={self.window!r}: use 1m to 7d")
        cooldown = _duration(f"{label}: cooldown", self.cooldown)
        if not timedelta(minutes=1) <= cooldown <= timedelta(days=365):
            raise ConfigError(f"{label}: cooldown={self.cooldown!r}: use 1m to 365d")
        for key, low in (("min_calls", 1), ("baseline_days", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{label}: {key}={value!r} must be a whole number >= {low}")
        if self.baseline_days > 90:
            raise ConfigError(f"{label}: baseline_days={self.baseline_days!r}: at most 90")
        if isinstance(self.min_cost, bool) or not isinstance(self.min_cost, (int, float)) \
                or not self.min_cost >= 0:
            raise ConfigError(f"{label}: min_cost={self.min_cost!r} must be >= 0")
        severity = self.severity or _DEFAULT_SEVERITY.get(self.kind, "warning")
        if severity not in SEVERITIES:
            raise ConfigError(f"{label}: severity={severity!r}; use warning or critical")
        normalised: dict[str, object] = {
            "threshold": float(threshold), "per": per, "scope": scope, "window": window,
            "cooldown": cooldown, "severity": severity}
        for field_name, field_value in normalised.items():
            object.__setattr__(self, field_name, field_value)

    # the values as normalised in __post_init__, typed
    @property
    def limit(self) -> float:
        return float(self.threshold or 0)

    @property
    def group(self) -> str:
        return str(self.per)

    @property
    def level(self) -> str:
        return str(self.severity)

    @property
    def window_delta(self) -> timedelta:
        return _duration("window", self.window)

    @property
    def cooldown_delta(self) -> timedelta:
        return _duration("cooldown", self.cooldown)

    @property
    def key(self) -> str:
        """Stable across processes: the same rule anywhere has the same key."""
        text = json.dumps([self.kind, self.limit, self.group, sorted(self.scope.items()),
                           self.window_delta.total_seconds(), self.min_calls, self.min_cost,
                           self.baseline_days], sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        scope = "".join(f" {k}={v}" for k, v in sorted(self.scope.items()))
        return f"{self.kind} per {self.per}{scope}"


def rules_from_config(items: Any) -> tuple[AlertRule, ...]:
    """``[[alert_rules]]`` tables of llmtally.toml (or AlertRule values) as rules."""
    if items is None:
        return ()
    if not isinstance(items, (list, tuple)):
        raise ConfigError("alert_rules must be a list of [[alert_rules]] tables or AlertRule values")
    rules = []
    for number, item in enumerate(items):
        if isinstance(item, AlertRule):
            rules.append(item)
            continue
        if not isinstance(item, Mapping):
            raise ConfigError(f"alert_rules[{number}]: {item!r} is not a table")
        unknown = sorted(set(item) - set(_FIELDS))
        if unknown:
            raise ConfigError(f"alert_rules[{number}]: unknown key {unknown[0]!r}; the keys are "
                              f"{', '.join(_FIELDS)}")
        if "kind" not in item:
            raise ConfigError(f"alert_rules[{number}]: kind is required ({', '.join(KINDS)})")
        try:
            rules.append(AlertRule(**item))
        except ConfigError as exc:
            raise ConfigError(f"alert_rules[{number}]: {exc}") from None
        except TypeError as exc:
            raise ConfigError(f"alert_rules[{number}]: {exc}") from None
    return tuple(rules)
