"""Budgets: what a limit is, which calls it covers, and the calendar window it counts in.

A :class:`Budget` is a plain value. Which calls it covers is decided by :func:`instance_for`
(its ``scope`` must match; ``each=`` splits it into one budget per distinct value), and the
window a moment falls in by :func:`window_for` — calendar windows in the budget's time zone,
weeks starting on Monday, so a day is 23 or 25 hours long across a DST change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .._errors import ConfigError
from .._pricing.names import canonical_provider, split_route

__all__ = ["DEFAULT_RESERVATION_TTL_S", "DEFAULT_MAX_OUTPUT_ESTIMATE",
           "Budget", "BudgetExceeded", "Window", "window_for", "instance_for", "zone",
           "PERIODS", "SCOPE_KEYS", "EACH_KEYS"]

PERIODS = ("minute", "hour", "day", "week", "month", "total")
SCOPE_KEYS = ("project", "user", "session", "provider", "model", "tag")
EACH_KEYS = ("project", "user", "session", "provider", "model")
ACTIONS = ("block", "warn")
_EPOCH = datetime(1970, 1, 1)


# what reserve() holds for a call: a hold never settled (its process died) is released after
# this many seconds; a call that sets no max_tokens is assumed to write this many tokens
DEFAULT_RESERVATION_TTL_S = 900.0
DEFAULT_MAX_OUTPUT_ESTIMATE = 4096

@dataclass(frozen=True, kw_only=True)
class Budget:
    """A limit on cost (``usd``), ``tokens`` or ``requests`` per calendar window.

    >>> Budget(usd=50, per="month")                                  # the whole ledger
    >>> Budget(usd=2, per="day", each="user")                        # $2 a day for every user
    >>> Budget(tokens=200_000, per="minute", scope={"project": "search"})   # a TPM limit

    ``usd`` is in the ledger's currency (USD unless ``Tally(currency=...)`` says otherwise).
    ``warn_at`` are fractions of the limit at which a warning fires (once per window);
    ``action="warn"`` budgets warn but never block.
    """

    usd: float | None = None
    tokens: int | None = None
    requests: int | None = None
    per: str = "month"
    scope: Mapping[str, str] = field(default_factory=dict)
    each: str | None = None
    warn_at: Sequence[float] = (0.8, 0.9)
    action: str = "block"
    name: str | None = None

    def __post_init__(self) -> None:
        limits = {k: v for k, v in (("usd", self.usd), ("tokens", self.tokens),
                                    ("requests", self.requests)) if v is not None}
        if len(limits) != 1:
            raise ConfigError(f"{self._label_for_errors()}: give exactly one of usd=, tokens=, "
                              f"requests= (got {', '.join(limits) or 'none'})")
        (kind, limit), = limits.items()
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or \
                not math.isfinite(limit) or limit < 0:
            raise ConfigError(f"{self._label_for_errors()}: {kind}={limit!r} must be a number >= 0")
        if kind != "usd" and not float(limit).is_integer():
            raise ConfigError(f"{self._label_for_errors()}: {kind}={limit!r} must be a whole number")
        if self.per not in PERIODS:
            raise ConfigError(f"{self._label_for_errors()}: per={self.per!r} is not a window; "
                              f"use one of {', '.join(PERIODS)}")
        if not isinstance(self.scope, Mapping):
            raise ConfigError(f"{self._label_for_errors()}: scope must be a mapping such as "
                              "{'project': 'search'}")
        for key, value in self.scope.items():
            if key not in SCOPE_KEYS:
                raise ConfigError(f"{self._label_for_errors()}: scope key {key!r} is unknown; "
                                  f"use {', '.join(SCOPE_KEYS)}")
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{self._label_for_errors()}: scope[{key!r}]={value!r} must be "
                                  "a non-empty string")
        if self.each is not None and self.each not in EACH_KEYS:
            raise ConfigError(f"{self._label_for_errors()}: each={self.each!r} is not a field "
                              f"calls can be split by; use one of {', '.join(EACH_KEYS)}")
        if self.action not in ACTIONS:
            raise ConfigError(f"{self._label_for_errors()}: action={self.action!r}; use "
                              "'block' or 'warn'")
        thresholds = tuple(self.warn_at or ())
        for threshold in thresholds:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or \
                    not 0 < threshold <= 1:
                raise ConfigError(f"{self._label_for_errors()}: warn_at={self.warn_at!r}: each "
                                  "threshold is a fraction of the limit, > 0 and <= 1")
        scope = dict(self.scope)
        # The ledger stores one name per provider and each model without its provider route
        # (docs/prices.md): a scope written either way means the same calls.
        if "provider" in scope:
            scope["provider"] = canonical_provider(scope["provider"]) or scope["provider"]
        if "model" in scope:
            model, routed = split_route(scope["model"])
            if routed is not None and scope.get("provider", routed) == routed:
                scope["model"] = model
        object.__setattr__(self, "scope", MappingProxyType(scope))
        object.__setattr__(self, "warn_at", tuple(sorted(set(float(t) for t in thresholds))))

    @property
    def kind(self) -> str:
        """``usd``, ``tokens`` or ``requests``."""
        return "usd" if self.usd is not None else "tokens" if self.tokens is not None else "requests"

    @property
    def limit(self) -> float:
        return float(self.usd if self.usd is not None else
                     self.tokens if self.tokens is not None else self.requests)  # type: ignore[arg-type]

    @property
    def key(self) -> str:
        """Identity in the ledger: what it counts, not how much — raising a limit keeps the
        window's spend."""
        scope = ",".join(f"{k}={v}" for k, v in sorted(self.scope.items()))
        return f"{self.kind}/{self.per}/{scope}/{self.each or ''}"

    @property
    def label(self) -> str:
        """A readable name: the given ``name``, else e.g. ``usd 50/month project=search each user``."""
        if self.name:
            return self.name
        amount = f"{self.limit:g}"
        parts = [f"{self.kind} {amount}/{self.per}"]
        parts += [f"{k}={v}" for k, v in sorted(self.scope.items())]
        if self.each:
            parts.append(f"each {self.each}")
        return " ".join(parts)

    def _label_for_errors(self) -> str:
        return f"Budget({self.name!r})" if self.name else "Budget"

    def to_dict(self) -> dict[str, Any]:
        """The definition as plain JSON values (how the ledger stores it)."""
        return {self.kind: self.usd if self.kind == "usd" else int(self.limit), "per": self.per,
                "scope": dict(self.scope), "each": self.each, "warn_at": list(self.warn_at),
                "action": self.action, "name": self.name}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Budget:
        """A Budget from :meth:`to_dict`'s form (ConfigError if it is not a valid definition)."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"a budget definition must be a table, not {type(values).__name__}")
        known = {"usd", "tokens", "requests", "per", "scope", "each", "warn_at", "action", "name"}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"budget definition has unknown keys {sorted(unknown)}")
        return cls(**{key: value for key, value in values.items()
                      if value is not None or key in ("usd", "tokens", "requests")})


class BudgetExceeded(Exception):
    """A call was stopped before it was sent: it would take a budget over its limit.

    Attributes: ``budget`` (the :class:`Budget`; None when the ledger could not be reached with
    ``fail_closed=True``, or for a model with no price under ``unpriced="block"``, whose budget
    is ``unpriced_under``), ``scope`` (what it applied to, e.g.
    ``{"user": "alice"}``), ``used`` (spent + reserved in this window), ``requested`` (this
    call's estimate), ``limit``, ``resets_at`` (aware datetime, None for ``per="total"``).
    """

    def __init__(self, budget: Budget, scope: Mapping[str, str], used: float, requested: float,
                 resets_at: datetime | None, unit: str) -> None:
        self.budget: Budget | None = budget  # None: unavailable() and unpriced()
        self.unpriced_under: Budget | None = None
        self.scope = dict(scope)
        self.used = used
        self.requested = requested
        self.limit = budget.limit
        self.resets_at = resets_at
        where = ", ".join(f"{k}={v}" for k, v in self.scope.items()) or "all calls"
        reset = f"resets {resets_at.isoformat()}" if resets_at else "never resets (per='total')"
        super().__init__(
            f"llmtally budget '{budget.label}' for {where} would be exceeded: "
            f"{_amount(used, unit)} of {_amount(budget.limit, unit)} used, this call needs "
            f"{_amount(requested, unit)}; {reset}")


    @classmethod
    def unavailable(cls, cause: BaseException) -> BudgetExceeded:
        """The ledger could not be reached and ``fail_closed=True``: block rather than guess."""
        error = cls.__new__(cls)
        reason = (str(cause).strip().splitlines() or [""])[0]
        Exception.__init__(error, f"llmtally could not check budgets ({type(cause).__name__}: "
                                  f"{reason}) and fail_closed=True, so the call is blocked")
        error.budget, error.scope, error.used, error.requested = None, {}, 0.0, 0.0
        error.limit, error.resets_at = 0.0, None
        return error

    @classmethod
    def unpriced(cls, model: str, budget: Budget) -> BudgetExceeded:
        """A call of a model with no price under a usd budget, with ``unpriced="block"``."""
        error = cls.__new__(cls)
        Exception.__init__(error, f"llmtally: {model!r} has no price, so budget '{budget.label}' "
                                  "cannot count it and unpriced=\"block\" stops the call; add a "
                                  f"price override for {model!r} (prices=) to allow it")
        error.budget, error.scope, error.used, error.requested = None, {}, 0.0, 0.0
        error.limit, error.resets_at = budget.limit, None
        error.unpriced_under = budget
        return error


def _amount(value: float, unit: str) -> str:
    if unit in ("tokens", "requests"):
        return f"{value:,.0f} {unit}"
    return f"{value:,.2f} {unit}" if value == 0 or abs(value) >= 0.01 else f"{value:.6f} {unit}"


@dataclass(frozen=True, slots=True)
class Window:
    """[start, end) in naive UTC (the ledger's ``ts`` form); ``end`` is None for ``total``."""

    start: datetime
    end: datetime | None


def zone(name: str | None) -> ZoneInfo | timezone:
    """The time zone windows are counted in; ConfigError for an unknown name."""
    if name in (None, "", "UTC", "utc"):
        return timezone.utc
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"timezone={name!r} is not a known time zone; use an IANA name such "
                          "as 'UTC', 'Europe/Berlin' or 'Asia/Shanghai'") from None


def window_for(per: str, now: datetime, tz: ZoneInfo | timezone = timezone.utc) -> Window:
    """The calendar window of ``per`` that ``now`` (aware, or naive UTC) falls in."""
    if per == "total":
        return Window(_EPOCH, None)
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    local = now.astimezone(tz)
    if per == "minute":
        start = local.replace(second=0, microsecond=0)
        end = start + timedelta(minutes=1)
    elif per == "hour":
        start = local.replace(minute=0, second=0, microsecond=0)
        end = start + timedelta(hours=1)
    else:
        day = local.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
        if per == "day":
            first, following = day, day + timedelta(days=1)
        elif per == "week":
            first = day - timedelta(days=day.weekday())
            following = first + timedelta(days=7)
        elif per == "month":
            first = day.replace(day=1)
            following = (first + timedelta(days=32)).replace(day=1)
        else:
            raise ConfigError(f"per={per!r} is not a window; use one of {', '.join(PERIODS)}")
        # Midnights are wall-clock times: attach the zone so DST days are 23 or 25 hours.
        start, end = first.replace(tzinfo=tz), following.replace(tzinfo=tz)
    return Window(_naive_utc(start), _naive_utc(end))


def _naive_utc(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc).replace(tzinfo=None)


def instance_for(budget: Budget, attributes: Mapping[str, Any]) -> str | None:
    """The budget instance a call counts against, or None if the budget does not cover it.

    ``attributes`` has project, user, session, provider, model and tags (a sequence). With
    ``each=``, a call without that attribute is not covered (a per-user budget needs a user).
    """
    for key, wanted in budget.scope.items():
        if key == "tag":
            if wanted not in (attributes.get("tags") or ()):
                return None
        elif attributes.get(key) != wanted:
            return None
    if budget.each is None:
        return ""
    value = attributes.get(budget.each)
    return str(value) if value else None
