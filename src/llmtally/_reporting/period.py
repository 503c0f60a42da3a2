"""Which stretch of time a report covers, the one it is compared with, and its chart buckets.

Reports are calendar documents: weeks start on Monday and days at local midnight in the
Tally's time zone. ``week="last"`` is the last complete week, ``"this"`` the current one so
far, ``"2026-W47"`` an ISO week; or ``since``/``until``. The previous period is the same
stretch one period earlier (for the current week: last week up to the same weekday and hour),
so the comparison is like with like.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone, tzinfo
from typing import Literal

from .._errors import ConfigError
from .._i18n import N_, strftime, translator
from .._timeparse import DURATION, parse_duration

__all__ = ["Period", "resolve_period", "MAX_DAY_BUCKETS", "MAX_WEEK_BUCKETS"]

MAX_DAY_BUCKETS = 62
"""A period longer than this many days is charted by week (and past two years by month)."""
MAX_WEEK_BUCKETS = 105
_ISO_WEEK = re.compile(r"^\s*(\d{4})-?W(\d{1,2})\s*$", re.IGNORECASE)
Granularity = Literal["day", "week", "month"]


@dataclass(frozen=True, slots=True)
class Period:
    """[start, end) and the previous period [previous_start, previous_end), aware in ``tz``.

    ``buckets`` are the chart's [start, end) steps (days, weeks or months) and
    ``previous_buckets`` the matching steps of the previous period.
    """

    label: str
    slug: str
    previous_label: str
    start: datetime
    end: datetime
    previous_start: datetime
    previous_end: datetime
    tz: tzinfo
    granularity: Granularity
    buckets: tuple[tuple[datetime, datetime], ...]
    previous_buckets: tuple[tuple[datetime, datetime], ...]
    partial: bool = False   # the current week so far

    @property
    def utc_range(self) -> tuple[datetime, datetime]:
        """[start, end) as naive UTC (the ledger's ``ts`` form)."""
        return naive_utc(self.start), naive_utc(self.end)

    @property
    def previous_utc_range(self) -> tuple[datetime, datetime]:
        return naive_utc(self.previous_start), naive_utc(self.previous_end)

    def utc_boundaries(self) -> tuple[datetime, ...]:
        """Where the chart's buckets of both periods start and end, as naive UTC."""
        steps = self.buckets + self.previous_buckets
        return tuple(sorted({naive_utc(moment) for step in steps for moment in step}))

    @property
    def whole_hour_offsets(self) -> bool:
        """True when the zone's UTC offset is a whole number of hours throughout (so hourly
        UTC buckets fall entirely inside one local day)."""
        moments = (self.previous_start, self.previous_end, self.start, self.end)
        return all((m.utcoffset() or timedelta()).total_seconds() % 3600 == 0 for m in moments)


def resolve_period(*, week: str | None, since: str | datetime | date | None,
                   until: str | datetime | date | None, now: datetime, tz: tzinfo,
                   language: str = "en") -> Period:
    """The report's period from ``week`` or ``since``/``until`` (default: last week).

    ``since``/``until`` take a duration back from now ("7d"), a date or an ISO datetime
    (strings and dates without a zone are in ``tz``; naive datetimes are UTC, as everywhere in
    llmtally). ``until`` is exclusive and defaults to now. Labels are in ``language``.
    """
    now = _aware(now, timezone.utc).astimezone(tz)
    if week is not None and (since is not None or until is not None):
        raise ConfigError("give either week= or since=/until=, not both")
    if week is None and since is None:
        if until is not None:
            raise ConfigError("until= needs since=: e.g. since='2026-11-01', until='2026-11-15'")
        week = "last"
    if week is not None:
        return _week_period(str(week), now, tz, language)
    assert since is not None  # week=None and since=None became week="last" above
    start = _instant(since, now, tz, "since")
    end = now if until is None else _instant(until, now, tz, "until")
    if end <= start:
        raise ConfigError(f"until ({end.isoformat()}) must be after since ({start.isoformat()})")
    span = end - start
    previous_start, previous_end = start - span, start
    label = f"{_short(start)} – {_short(end, closing=True)}"
    slug = f"{_slug_moment(start)}_{_slug_moment(end, closing=True)}"
    granularity = _granularity(span)
    buckets = _buckets(start, end, granularity, tz)
    previous_buckets = tuple((a - span, b - span) for a, b in buckets)
    return Period(label=label, slug=slug,
                  previous_label=f"{_short(previous_start)} – {_short(previous_end, closing=True)}",
                  start=start, end=end, previous_start=previous_start, previous_end=previous_end,
                  tz=tz, granularity=granularity, buckets=buckets,
                  previous_buckets=previous_buckets)


def _week_period(text: str, now: datetime, tz: tzinfo, language: str) -> Period:
    value = text.strip().lower()
    today = now.date()
    this_monday = today - timedelta(days=today.weekday())
    if value in ("last", "previous"):
        monday = this_monday - timedelta(days=7)
    elif value in ("this", "current"):
        monday = this_monday
    else:
        match = _ISO_WEEK.match(text)
        if not match:
            raise ConfigError(f"week={text!r} is not a week; use 'last', 'this' or an ISO week "
                              "such as '2026-W47'")
        try:
            monday = date.fromisocalendar(int(match.group(1)), int(match.group(2)), 1)
        except ValueError:
            raise ConfigError(f"week={text!r}: {match.group(1)} has no week {match.group(2)}; "
                              "ISO weeks run from W01 to W52 (W53 in some years)") from None
    start = _local_midnight(monday, tz)
    end = _local_midnight(monday + timedelta(days=7), tz)
    previous_start = _local_midnight(monday - timedelta(days=7), tz)
    previous_end = start
    partial = now < end
    if partial:
        end = max(now, start)
        previous_end = _shift_days(end, -7, tz)
    year, number, _ = monday.isocalendar()
    previous_year, previous_number, _ = (monday - timedelta(days=7)).isocalendar()
    days = tuple((_local_midnight(monday + timedelta(days=i), tz),
                  _local_midnight(monday + timedelta(days=i + 1), tz)) for i in range(7))
    previous_days = tuple((_shift_days(a, -7, tz), _shift_days(b, -7, tz)) for a, b in days)
    slug = f"{year}-W{number:02d}"
    sunday = monday + timedelta(days=6)
    _ = translator(language)
    first_day = strftime(monday, N_("%a %d %b"), language)
    last_day = strftime(sunday, N_("%a %d %b %Y"), language)
    label = f"{slug} ({first_day} – {last_day})"
    if partial:
        label = _("{week} so far (since {start}, up to {end})").format(
            week=slug, start=first_day, end=strftime(end, N_("%a %d %b %H:%M"), language))
    previous_label = f"{previous_year}-W{previous_number:02d}"
    if partial:
        previous_label = _("{week} up to {end}").format(
            week=previous_label, end=strftime(previous_end, N_("%a %H:%M"), language))
    return Period(label=label, slug=slug, previous_label=previous_label, start=start, end=end,
                  previous_start=previous_start, previous_end=previous_end, tz=tz,
                  granularity="day", buckets=days, previous_buckets=previous_days,
                  partial=partial)


def _instant(value: str | datetime | date, now: datetime, tz: tzinfo, name: str) -> datetime:
    if isinstance(value, datetime):
        return _aware(value, timezone.utc).astimezone(tz)
    if isinstance(value, date):
        return _local_midnight(value, tz)
    text = str(value).strip()
    if DURATION.match(text):
        return now - parse_duration(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{name}={text!r} is neither a date (2026-11-01, 2026-11-01T09:00) nor "
                          "a duration back from now (7d, 24h)") from None
    return _aware(moment, tz).astimezone(tz)


def _granularity(span: timedelta) -> Granularity:
    if span <= timedelta(days=MAX_DAY_BUCKETS):
        return "day"
    if span <= timedelta(weeks=MAX_WEEK_BUCKETS):
        return "week"
    return "month"


def _buckets(start: datetime, end: datetime, granularity: Granularity,
             tz: tzinfo) -> tuple[tuple[datetime, datetime], ...]:
    """Calendar steps covering [start, end); the first and last are cut to the period."""
    day = start.date()
    if granularity == "week":
        day -= timedelta(days=day.weekday())
    elif granularity == "month":
        day = day.replace(day=1)
    out = []
    edge = _local_midnight(day, tz)
    while edge < end:
        if granularity == "day":
            day += timedelta(days=1)
        elif granularity == "week":
            day += timedelta(days=7)
        else:
            day = (day.replace(day=1) + timedelta(days=32)).replace(day=1)
        following = _local_midnight(day, tz)
        out.append((max(edge, start), min(following, end)))
        edge = following
    return tuple(out)


def _local_midnight(day: date, tz: tzinfo) -> datetime:
    # A wall-clock midnight: normalised through UTC so a DST gap lands on a real instant.
    return datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(timezone.utc).astimezone(tz)


def _shift_days(moment: datetime, days: int, tz: tzinfo) -> datetime:
    """The same wall-clock time ``days`` days away (so a week back across DST is still Monday 00:00)."""
    wall = moment.replace(tzinfo=None) + timedelta(days=days)
    return wall.replace(tzinfo=tz).astimezone(timezone.utc).astimezone(tz)


def _aware(moment: datetime, default: tzinfo) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=default)


def naive_utc(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc).replace(tzinfo=None)


def _is_midnight(moment: datetime) -> bool:
    return (moment.hour, moment.minute, moment.second, moment.microsecond) == (0, 0, 0, 0)


def _short(moment: datetime, *, closing: bool = False) -> str:
    """A date for whole days (the last day included, for a closing midnight), else date and time."""
    if _is_midnight(moment):
        return f"{(moment - timedelta(days=1)) if closing else moment:%Y-%m-%d}"
    return f"{moment:%Y-%m-%d %H:%M}"


def _slug_moment(moment: datetime, *, closing: bool = False) -> str:
    return _short(moment, closing=closing).replace(" ", "T").replace(":", "")
