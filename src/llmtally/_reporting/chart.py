"""The report's cost chart: hourly or daily bars on a readable scale, as SVG coordinates."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from datetime import datetime

from .._i18n import N_, strftime, translator
from .figures import Chart, ChartBar
from .numbers import format_money
from .period import Period, naive_utc

_CHART_WIDTH, _CHART_HEIGHT = 720, 260


_CHART_LEFT, _CHART_RIGHT, _CHART_TOP, _CHART_BOTTOM = 64, 12, 14, 30


def cost_chart(period: Period, buckets: Sequence[tuple[datetime, float, int]], currency: str,
               language: str = "en",
               ) -> tuple[Chart, tuple[tuple[str, float, float | None, int], ...]]:
    """Cost per day (or week, month) as bars, the previous period as a dashed line; labels in
    ``language``."""
    _ = translator(language)
    edges = [naive_utc(start) for start, _end in period.buckets]
    previous_edges = [naive_utc(start) for start, _end in period.previous_buckets]
    start, end = period.utc_range
    previous_start, previous_end = period.previous_utc_range
    count = len(edges)
    cost, calls, before = [0.0] * count, [0] * count, [0.0] * count
    for moment, amount, n in buckets:
        if start <= moment < end:
            index = bisect.bisect_right(edges, moment) - 1
            cost[index] += amount
            calls[index] += n
        elif previous_start <= moment < previous_end:
            index = bisect.bisect_right(previous_edges, moment) - 1
            if 0 <= index < count:
                before[index] += amount
    future = [bucket_start >= period.end for bucket_start, _end in period.buckets]
    has_before = [not future[i] and period.previous_buckets[i][0] < period.previous_end
                  for i in range(count)]
    top_value, steps = _nice_scale(max(cost + [b for b, shown in zip(before, has_before) if shown]
                                       + [0.0]))
    plot_width = _CHART_WIDTH - _CHART_LEFT - _CHART_RIGHT
    plot_height = _CHART_HEIGHT - _CHART_TOP - _CHART_BOTTOM
    bottom = _CHART_TOP + plot_height
    step = plot_width / max(count, 1)

    def y_of(value: float) -> float:
        return bottom - (value / top_value * plot_height if top_value else 0.0)

    bars, points, dots, daily = [], [], [], []
    for index, (bucket_start, _bucket_end) in enumerate(period.buckets):
        label = _bucket_label(bucket_start, period.granularity, language)
        previous = before[index] if has_before[index] else None
        long_label = _bucket_label(bucket_start, period.granularity, language, long=True)
        title = _("{when}: {cost}, {calls:,} calls").format(
            when=long_label, cost=format_money(cost[index], currency), calls=calls[index])
        x = _CHART_LEFT + index * step
        height = bottom - y_of(cost[index])
        bars.append(ChartBar(label=label, title=title, x=round(x + step * 0.18, 2),
                             width=round(step * 0.64, 2), y=round(bottom - height, 2),
                             height=round(height, 2), cost=cost[index], previous=previous,
                             future=future[index]))
        if previous is not None:
            center = (round(x + step / 2, 2), round(y_of(previous), 2))
            points.append(f"{center[0]},{center[1]}")
            dots.append((center[0], center[1], long_label))
        if not future[index]:
            daily.append((long_label, cost[index], previous, calls[index]))
    ticks = tuple((round(y_of(top_value * i / steps), 2), top_value * i / steps)
                  for i in range(steps + 1))
    chart = Chart(width=_CHART_WIDTH, height=_CHART_HEIGHT, left=_CHART_LEFT, top=_CHART_TOP,
                  plot_height=plot_height, bottom=bottom, bars=tuple(bars),
                  previous_points=" ".join(points), previous_dots=tuple(dots),
                  ticks=tuple((y, format_money(value, currency)) for y, value in ticks),
                  label_every=max(1, math.ceil(count / 14)), empty=not any(cost + before))
    return chart, tuple(daily)




def _nice_scale(value: float) -> tuple[float, int]:
    """The chart's top (the smallest 1, 2, 2.5 or 5 times a power of ten that is at least
    ``value``) and how many grid steps divide it into round numbers."""
    if value <= 0:
        return 0.0, 4
    power = 10 ** math.floor(math.log10(value))
    for factor, steps in ((1, 5), (2, 4), (2.5, 5), (5, 5)):
        if factor * power >= value * (1 - 1e-12):
            return factor * power, steps
    return 10 * power, 5


def _bucket_label(moment: datetime, granularity: str, language: str, *,
                  long: bool = False) -> str:
    if granularity == "day":
        return strftime(moment, N_("%a %d %b") if long else N_("%a %d"), language)
    if granularity == "week":
        year, week, _weekday = moment.date().isocalendar()
        if long:
            monday = strftime(moment, N_("%d %b"), language)
            return f"{year}-W{week:02d} ({monday})"
        return f"W{week:02d}"
    return strftime(moment, N_("%B %Y") if long else N_("%b"), language)
