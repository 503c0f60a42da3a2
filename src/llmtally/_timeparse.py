"""Turning what people type ("7d", "24h", "2026-11-01") into UTC datetimes."""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone

from ._errors import ConfigError

__all__ = ["parse_instant", "parse_duration"]

DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """``"90d"``, ``"24h"``, ``"30m"``, ``"2w"``, ``"45s"`` as a timedelta."""
    match = DURATION.match(text)
    if not match:
        raise ConfigError(f"{text!r} is not a duration; use a number and a unit, e.g. 30m, 24h, 7d, 2w")
    return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()])


def parse_instant(value: str | datetime | date | None, *, now: datetime) -> datetime | None:
    """A point in time as a naive UTC datetime (the ledger's ``ts`` form).

    Accepts a datetime (naive means UTC), a date (its midnight UTC), an ISO 8601 string, or a
    duration meaning "that long before ``now``" ("7d").
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    else:
        text = str(value).strip()
        if DURATION.match(text):
            moment = now - parse_duration(text)
        else:
            try:
                moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                raise ConfigError(f"{text!r} is neither a date (2026-11-01, 2026-11-01T09:00) nor "
                                  "a duration (7d, 24h, 30m)") from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment
