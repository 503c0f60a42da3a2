"""Off-peak prices (DeepSeek's discount hours): the windows of a week in which a model costs less."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

__all__ = ["OffPeak"]

_WEEKDAY_NAMES = {
    "mon": 1, "monday": 1, "tue": 2, "tues": 2, "tuesday": 2, "wed": 3, "wednesday": 3,
    "thu": 4, "thur": 4, "thurs": 4, "thursday": 4, "fri": 5, "friday": 5,
    "sat": 6, "saturday": 6, "sun": 7, "sunday": 7,
}


_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


def weekday(value: Any) -> int | None:
    """ISO weekday 1-7 from 1-7 or a name (``"mon"``, ``"Sunday"``); None if neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 1 <= value <= 7 else None
    if isinstance(value, str):
        return _WEEKDAY_NAMES.get(value.strip().lower())
    return None


def _window(text: str) -> tuple[int, int] | None:
    """``"16:30-00:30"`` as (start, end) minutes of the day; None if malformed."""
    found = _WINDOW.match(text)
    if not found:
        return None
    h1, m1, h2, m2 = map(int, found.groups())
    if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
        return None
    return h1 * 60 + m1, h2 * 60 + m2


def _in_windows(minute: int, windows: tuple[tuple[int, int], ...]) -> bool:
    """Start inclusive, end exclusive; a window may wrap past midnight; start == end is all day."""
    for start, end in windows:
        if start < end:
            if start <= minute < end:
                return True
        elif minute >= start or minute < end:
            return True
    return False


@dataclass(frozen=True, slots=True)
class OffPeak:
    """Rates that replace a model's standard ones inside UTC time windows (LiteLLM's ``off_peak_pricing``).

    ``every_day`` windows apply daily; each of ``rules`` applies on its ISO weekdays (None:
    every day), read on the calendar of ``weekday_timezone`` (default UTC). ``rates`` are per
    token in the book's currency; None keeps the standard rate.
    """

    rates: tuple[float | None, float | None, float | None, float | None, float | None]
    every_day: tuple[tuple[int, int], ...] = ()
    rules: tuple[tuple[frozenset[int] | None, tuple[tuple[int, int], ...]], ...] = ()
    weekday_timezone: str | None = None

    def applies(self, at: datetime) -> bool:
        """Whether ``at`` (aware, or naive UTC) falls in an off-peak window."""
        try:
            utc = at.astimezone(timezone.utc) if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)
            minute = utc.hour * 60 + utc.minute
            if _in_windows(minute, self.every_day):
                return True
            if not self.rules:
                return False
            weekday = utc.astimezone(_calendar(self.weekday_timezone)).isoweekday()
        except (OverflowError, ValueError):  # a moment at the edge of datetime's range
            return False
        return any(
            (days is None or weekday in days) and _in_windows(minute, windows)
            for days, windows in self.rules
        )


@functools.lru_cache(maxsize=64)
def _calendar(name: str | None) -> Any:
    """The zone whose calendar says the weekday (LiteLLM's ``weekday_timezone``); UTC if unknown."""
    if name and name.strip():
        try:
            from zoneinfo import ZoneInfo

            return ZoneInfo(name.strip())
        except (ValueError, KeyError, OSError):
            pass
    return timezone.utc


def windows_of(value: Any) -> tuple[tuple[int, int], ...]:
    return tuple(map(_window, slim_windows(value)))  # type: ignore[arg-type]


def slim_windows(value: Any) -> list[str]:
    windows = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [window for window in windows if isinstance(window, str) and _window(window)]
