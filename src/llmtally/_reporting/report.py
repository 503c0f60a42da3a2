"""The weekly HTML report: one static file that opens offline, built from SQL aggregates.

:func:`build_report` reads the figures (see ``_report_data``: GROUP BYs over the ``ts``
index, never a loop over events), :func:`render_html` fills the Jinja2 template (autoescape
on: every model name, user, tag, error type and metadata value is inert text), and
:func:`write_report` writes the file atomically. The file has its CSS inline, its charts as
inline SVG, no JavaScript and no URL to fetch.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .._errors import ConfigError
from .._storage.files import create_beside
from . import data
from .period import Period, resolve_period

if TYPE_CHECKING:
    from .._budgets.states import CounterState
    from .._pricing.book import PriceBook
    from .._storage.store import Store

__all__ = ["Report", "ReportFile", "build_report", "render_html", "write_report",
           "report_path", "format_money", "DEFAULT_REPORT_DIR", "DEFAULT_TOP"]

DEFAULT_REPORT_DIR = "reports"
DEFAULT_TOP = 10
"""Rows per breakdown table; the rest are summed into one "other" row."""
MAX_COSTLY_CALLS = 10
MAX_PERCENTILE_ROWS = 15
MAX_ERROR_ROWS = 15
MAX_UNPRICED_ROWS = 20
MAX_BUDGET_ROWS = 30
_FLUSH_TIMEOUT_S = 10.0
_TEXT_CUT = 120

# -- money ---------------------------------------------------------------------------------

_SYMBOLS = {
    "USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥", "CNY": "¥", "INR": "₹", "KRW": "₩",
    "RUB": "₽", "TRY": "₺", "UAH": "₴", "ILS": "₪", "VND": "₫", "NGN": "₦", "PHP": "₱",
    "THB": "฿", "BRL": "R$", "CAD": "CA$", "AUD": "A$", "NZD": "NZ$", "HKD": "HK$",
    "SGD": "S$", "MXN": "MX$", "TWD": "NT$",
}
_NO_DECIMALS = frozenset({"JPY", "KRW", "VND", "CLP", "ISK", "UGX", "PYG", "XOF", "XAF"})
_MINUS = "\u2212"


def format_money(amount: float, currency: str, *, signed: bool = False) -> str:
    """``$1,234.56``, ``€0.0042``, ``¥1,235``; the ISO code where there is no common symbol
    (``1,234.56 CHF``). Amounts too small for the currency's decimals keep two significant
    digits rather than showing as 0."""
    decimals = 0 if currency in _NO_DECIMALS else 2
    value = abs(amount)
    if value and value < 0.5 * 10 ** -decimals:
        decimals = max(decimals, 1 - math.floor(math.log10(value)))
    text = f"{value:,.{decimals}f}"
    sign = _MINUS if amount < 0 and float(text.replace(",", "")) else "+" if signed else ""
    symbol = _SYMBOLS.get(currency)
    return f"{sign}{symbol}{text}" if symbol else f"{sign}{text} {currency}"


def _number(value: float) -> str:
    return f"{value:,.0f}"


def _percent(value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return "–"
    text = f"{abs(value):.1f}%"
    if value < 0 and text != "0.0%":
        return _MINUS + text
    return ("+" if signed else "") + text


def _duration(ms: float | None) -> str:
    if ms is None:
        return "–"
    if ms < 1000:
        return f"{ms:.0f} ms"
    return f"{ms / 1000:.2f} s" if ms < 10_000 else f"{ms / 1000:.1f} s"


def _cut(text: Any, limit: int = _TEXT_CUT) -> str:
    value = "" if text is None else str(text)
    return value if len(value) <= limit else value[:limit - 1] + "…"


# -- the report's content ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """A figure now and in the previous period."""

    now: float
    before: float

    @property
    def delta(self) -> float:
        return self.now - self.before

    @property
    def percent(self) -> float | None:
        """The change in percent, None when there was nothing before."""
        return None if not self.before else 100.0 * self.delta / self.before


@dataclass(frozen=True, slots=True)
class TableRow:
    label: str
    detail: str | None
    calls: int
    errors: int
    tokens: int
    cost: float
    share: float          # of the period's cost, percent
    bar: float            # width of the bar, percent of the largest row
    change: Change
    is_new: bool
    unpriced_calls: int
    estimated_calls: int
    is_other: bool = False
    members: int = 1


@dataclass(frozen=True, slots=True)
class Breakdown:
    """One "cost by ..." table: the top rows and one "other" row summing the rest."""

    title: str
    column: str
    rows: tuple[TableRow, ...]
    groups: int


@dataclass(frozen=True, slots=True)
class ChartBar:
    label: str
    title: str
    x: float
    width: float
    y: float
    height: float
    cost: float
    previous: float | None
    future: bool


@dataclass(frozen=True, slots=True)
class Chart:
    width: int
    height: int
    left: int
    top: int
    plot_height: float
    bottom: float
    bars: tuple[ChartBar, ...]
    previous_points: str
    previous_dots: tuple[tuple[float, float, str], ...]
    ticks: tuple[tuple[float, str], ...]
    label_every: int
    empty: bool


@dataclass(frozen=True, slots=True)
class ProviderHealth:
    provider: str
    calls: int
    errors: int
    error_rate: float | None
    previous_calls: int
    top_errors: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class BudgetRow:
    label: str
    scope: str
    kind: str
    used: str
    limit: str
    percent: float | None
    bar: float
    resets: str
    runs_out: str
    action: str
    over: bool


@dataclass(frozen=True, slots=True)
class Report:
    """Everything the template shows, already computed (figures, and text for the labels)."""

    title: str
    period: Period
    project: str | None
    currency: str
    timezone: str
    generated_at: datetime
    database: str
    current: data.Totals
    previous: data.Totals
    cache_savings: float
    chart: Chart
    daily: tuple[tuple[str, float, float | None, int], ...]
    breakdowns: tuple[Breakdown, ...]
    latency: tuple[data.Percentiles, ...]
    ttft: tuple[data.Percentiles, ...]
    providers: tuple[ProviderHealth, ...]
    errors: tuple[data.ErrorRow, ...]
    errors_total: int
    budgets: tuple[BudgetRow, ...]
    budgets_total: int
    costly: tuple[data.CallRow, ...]
    unpriced: tuple[data.UnpricedModel, ...]
    unpriced_total: int
    estimated_models: tuple[TableRow, ...]
    other_currencies: dict[str, int] = field(default_factory=dict)

    @property
    def cost(self) -> Change:
        return Change(self.current.cost, self.previous.cost)

    @property
    def calls(self) -> Change:
        return Change(self.current.calls, self.previous.calls)

    @property
    def tokens(self) -> Change:
        return Change(self.current.tokens, self.previous.tokens)

    def money(self, amount: float, *, signed: bool = False) -> str:
        return format_money(amount, self.currency, signed=signed)

    def headline_lines(self) -> list[str]:
        """The headline as a few lines of plain text (what ``llmtally report`` prints)."""
        cost, calls, tokens = self.cost, self.calls, self.tokens

        def versus(change: Change) -> str:
            return "new" if change.percent is None else _percent(change.percent, signed=True)

        lines = [
            f"period      {self.period.label}, {self.timezone}"
            + (f", project {self.project}" if self.project else ""),
            f"cost        {self.money(cost.now)}  ({self.money(cost.delta, signed=True)}, "
            f"{versus(cost)} vs {self.period.previous_label})",
            f"calls       {_number(calls.now)}  ({versus(calls)})"
            f"  error rate {_percent(_rate(self.current.error_rate))}"
            + (f"  blocked {self.current.blocked:,}" if self.current.blocked else ""),
            f"tokens      {_number(tokens.now)}  ({versus(tokens)})",
            f"cache saved {self.money(self.cache_savings)}",
        ]
        if self.current.unpriced_calls:
            lines.append(f"unpriced    {self.current.unpriced_calls:,} calls have no price "
                         "(not in the cost; see the report)")
        if self.current.estimated_calls:
            lines.append(f"estimated   {self.money(self.current.estimated_cost)} of the cost "
                         f"({self.current.estimated_calls:,} calls) is from tokens counted offline")
        return lines


def _rate(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


class ReportSource(Protocol):
    """What a report reads: a :class:`~llmtally.Tally`'s ledger, prices, zone and budgets."""

    store: Store
    prices: PriceBook
    tz: tzinfo
    currency: str

    @property
    def database_url(self) -> str: ...

    def now(self) -> datetime: ...

    def flush(self, timeout: float | None = None) -> bool: ...

    def budget_states(self) -> list[CounterState]: ...


def build_report(tally: ReportSource, *, week: str | None = None, since: Any = None,
                 until: Any = None, project: str | None = None, top: int = DEFAULT_TOP,
                 now: datetime | None = None) -> Report:
    """Read the report's figures from ``tally``'s ledger (a few aggregate queries). Flushes
    first, so the Tally's own events are in it."""
    if project is not None and not str(project).strip():
        raise ConfigError("project must be a non-empty name")
    if top < 1:
        raise ConfigError(f"top={top!r}: show at least one row per table")
    tally.flush(_FLUSH_TIMEOUT_S)
    now = now or tally.now()
    period = resolve_period(week=week, since=since, until=until, now=now, tz=tally.tz)
    start, end = period.utc_range
    previous_start, previous_end = period.previous_utc_range
    rows = data.Range(start, end, previous_start, previous_end, project)
    with tally.store.connect() as conn:
        current, previous = data.totals(conn, rows)
        models = data.model_totals(conn, rows)
        by = {name: data.group_totals(conn, rows, name) for name in ("provider", "project", "user")}
        buckets = data.time_buckets(conn, rows, minutes=not period.whole_hour_offsets)
        latency = data.percentiles(conn, rows, "latency_ms")
        ttft = data.percentiles(conn, rows, "ttft_ms", streamed_only=True)
        errors = data.errors(conn, rows)
        costly = data.costliest_calls(conn, rows, MAX_COSTLY_CALLS)
        unpriced = data.unpriced_models(conn, rows)
        stored_currencies = data.currencies(conn, rows)
    states = tally.budget_states()
    total_cost = current.cost
    chart, daily = _chart(period, buckets, tally.currency)
    breakdowns = (  # in page order: provider and project side by side, then model, user
        _breakdown("Cost by provider", "provider", by["provider"], top, total_cost),
        _breakdown("Cost by project", "project", by["project"], top, total_cost),
        _breakdown("Cost by model", "model", models, top, total_cost),
        _breakdown("Cost by user", "user", by["user"], top, total_cost),
    )
    estimated = tuple(_table_row(row, total_cost, 0.0) for row in models if row.estimated_calls)
    zone_name = getattr(tally.tz, "key", None) or str(tally.tz)
    title = f"LLM usage {period.label}" + (f" · {project}" if project else "")
    return Report(
        title=title, period=period, project=project, currency=tally.currency,
        timezone=zone_name, generated_at=_as_aware(now).astimezone(tally.tz),
        database=tally.database_url, current=current, previous=previous,
        cache_savings=_cache_savings(models, tally.prices), chart=chart, daily=daily,
        breakdowns=breakdowns,
        latency=tuple(latency[:MAX_PERCENTILE_ROWS]), ttft=tuple(ttft[:MAX_PERCENTILE_ROWS]),
        providers=_provider_health(by["provider"], errors),
        errors=tuple(errors[:MAX_ERROR_ROWS]), errors_total=len(errors),
        budgets=_budget_rows(states, now, tally.tz, tally.currency)[:MAX_BUDGET_ROWS],
        budgets_total=len(states), costly=tuple(costly),
        unpriced=tuple(unpriced[:MAX_UNPRICED_ROWS]), unpriced_total=len(unpriced),
        estimated_models=estimated[:MAX_UNPRICED_ROWS],
        other_currencies={code: calls for code, calls in stored_currencies.items()
                          if code != tally.currency},
    )


def _as_aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _cache_savings(models: Sequence[data.GroupRow], prices: PriceBook) -> float:
    """What cached tokens would have cost at the full input price minus what they cost, plus
    what LiteLLM cache hits (recorded at cost 0) would have cost — at today's prices."""
    saved = 0.0
    for row in models:
        extra = row.extra
        if not (extra.get("cache_read_tokens") or extra.get("hit_calls")):
            continue
        price = prices.lookup(row.key or "", row.provider)
        if price is None:
            continue
        if extra["cache_read_tokens"]:
            typical_prompt = int(extra["cached_calls_input_tokens"] / max(extra["cached_calls"], 1))
            full, _out, cached, _write, _reason = price.rates(typical_prompt)
            if full is not None and cached is not None:
                saved += extra["cache_read_tokens"] * max(full - cached, 0.0)
        if extra["hit_calls"]:
            typical_prompt = int(extra["hit_input_tokens"] / extra["hit_calls"])
            saved += _cost_at(price.rates(typical_prompt), extra)
    return saved


def _cost_at(rates: tuple[float | None, ...], extra: dict[str, float]) -> float:
    full, out, cached, write, reason = rates
    inp_n, out_n = extra["hit_input_tokens"], extra["hit_output_tokens"]
    read_n, write_n = extra["hit_cache_read_tokens"], extra["hit_cache_write_tokens"]
    reason_n = extra["hit_reasoning_tokens"]
    total = 0.0
    if full is not None:
        total += max(inp_n - read_n - write_n, 0) * full + read_n * (cached or 0.0) \
            + write_n * (write or 0.0)
    if out is not None:
        total += max(out_n - reason_n, 0) * out + reason_n * (reason or 0.0)
    return total


def _table_row(row: data.GroupRow, total_cost: float, largest: float, *,
               is_other: bool = False) -> TableRow:
    label = row.key if row.key is not None else "(none)"
    return TableRow(
        label=label, detail=row.provider, calls=row.calls, errors=row.errors, tokens=row.tokens,
        cost=row.cost, share=100.0 * row.cost / total_cost if total_cost else 0.0,
        bar=100.0 * row.cost / largest if largest else 0.0,
        change=Change(row.cost, row.previous_cost), is_new=row.previous_calls == 0,
        unpriced_calls=row.unpriced_calls, estimated_calls=row.estimated_calls,
        is_other=is_other, members=row.members)


def _breakdown(title: str, column: str, found: Sequence[data.GroupRow], top: int,
               total_cost: float) -> Breakdown:
    """The top ``top`` groups of this period by cost, and one row summing the rest."""
    active = [row for row in found if row.calls]
    shown, rest = active[:top], active[top:]
    other = None
    if rest:
        other = data.GroupRow(
            key=f"other ({len(rest)} more)", calls=sum(r.calls for r in rest),
            errors=sum(r.errors for r in rest),
            input_tokens=sum(r.input_tokens for r in rest),
            output_tokens=sum(r.output_tokens for r in rest), cost=sum(r.cost for r in rest),
            unpriced_calls=sum(r.unpriced_calls for r in rest),
            estimated_calls=sum(r.estimated_calls for r in rest),
            previous_calls=sum(r.previous_calls for r in rest),
            previous_cost=sum(r.previous_cost for r in rest), members=len(rest))
    largest = max([row.cost for row in shown] + ([other.cost] if other else []) + [0.0])
    rows = [_table_row(row, total_cost, largest) for row in shown]
    if other is not None:
        rows.append(_table_row(other, total_cost, largest, is_other=True))
    return Breakdown(title=title, column=column, rows=tuple(rows), groups=len(active))


def _provider_health(providers: Sequence[data.GroupRow],
                     errors: Sequence[data.ErrorRow]) -> tuple[ProviderHealth, ...]:
    by_provider: dict[str | None, list[tuple[str, int]]] = {}
    for row in errors:
        by_provider.setdefault(row.provider, []).append((row.error_type or "(unknown)", row.count))
    out = []
    for row in providers:
        if not row.calls:
            continue
        types = by_provider.get(row.key, [])
        out.append(ProviderHealth(
            provider=row.key if row.key is not None else "(none)", calls=row.calls,
            errors=row.errors, error_rate=100.0 * row.errors / row.calls if row.calls else None,
            previous_calls=row.previous_calls, top_errors=tuple(types[:3])))
    out.sort(key=lambda item: (-(item.error_rate or 0.0), -item.calls, item.provider))
    return tuple(out[:MAX_ERROR_ROWS])


def _budget_rows(states: Sequence[CounterState], now: datetime, tz: tzinfo,
                 currency: str) -> tuple[BudgetRow, ...]:
    rows = []
    for state in states:
        budget = state.budget
        scope = dict(budget.scope) | ({budget.each: state.instance} if budget.each else {})

        def amount(value: float, kind: str = budget.kind) -> str:
            return format_money(value, currency) if kind == "usd" else f"{value:,.0f} {kind}"

        percent = 100.0 * state.used / budget.limit if budget.limit else None
        end = state.window.end
        run_out = state.run_out(now)
        if run_out is None:
            runs_out = "not before it resets" if end is not None and state.spent > 0 else "–"
        else:
            runs_out = _local(run_out, tz)
        rows.append(BudgetRow(
            label=budget.label, scope=", ".join(f"{k}={v}" for k, v in scope.items()) or "all calls",
            kind=budget.kind, used=amount(state.used), limit=amount(budget.limit), percent=percent,
            bar=min(percent or 0.0, 100.0), resets="never" if end is None else _local(end, tz),
            runs_out=runs_out, action=budget.action,
            over=budget.limit > 0 and state.used >= budget.limit))
    rows.sort(key=lambda row: (-(row.percent or 0.0), row.label, row.scope))
    return tuple(rows)


def _local(naive_utc: datetime, tz: tzinfo) -> str:
    return f"{naive_utc.replace(tzinfo=timezone.utc).astimezone(tz):%a %d %b %Y %H:%M}"


# -- the chart -----------------------------------------------------------------------------

_CHART_WIDTH, _CHART_HEIGHT = 720, 260
_CHART_LEFT, _CHART_RIGHT, _CHART_TOP, _CHART_BOTTOM = 64, 12, 14, 30


def _chart(period: Period, buckets: Sequence[tuple[datetime, float, int]], currency: str
           ) -> tuple[Chart, tuple[tuple[str, float, float | None, int], ...]]:
    """Cost per day (or week, month) as bars, the previous period as a dashed line."""
    edges = [_naive_utc(start) for start, _end in period.buckets]
    previous_edges = [_naive_utc(start) for start, _end in period.previous_buckets]
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
        label = _bucket_label(bucket_start, period.granularity)
        previous = before[index] if has_before[index] else None
        long_label = _bucket_label(bucket_start, period.granularity, long=True)
        title = f"{long_label}: {format_money(cost[index], currency)}, {calls[index]:,} calls"
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


def _naive_utc(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc).replace(tzinfo=None)


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


def _bucket_label(moment: datetime, granularity: str, *, long: bool = False) -> str:
    if granularity == "day":
        return f"{moment:%a %d %b}" if long else f"{moment:%a %d}"
    if granularity == "week":
        year, week, _ = moment.date().isocalendar()
        return f"{year}-W{week:02d} ({moment:%d %b})" if long else f"W{week:02d}"
    return f"{moment:%B %Y}" if long else f"{moment:%b}"


# -- rendering -----------------------------------------------------------------------------


def _environment() -> Any:
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=PackageLoader("llmtally", "templates"),
        autoescape=select_autoescape(("html", "j2"), default=True, default_for_string=True),
        undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
    )
    env.filters.update(number=_number, percent=_percent, duration=_duration, cut=_cut,
                       json_text=_json_text, css_number=_css_number)
    return env


def _json_text(value: Any) -> str:
    """Metadata as compact JSON text (escaped by the template like any other text)."""
    return _cut(json.dumps(value, ensure_ascii=False, sort_keys=True, default=str), 160)


def _css_number(value: float) -> str:
    """A number safe inside a style attribute: finite, plain digits."""
    number = float(value)
    if not math.isfinite(number):
        number = 0.0
    return f"{max(0.0, min(number, 100.0)):.2f}"


def render_html(report: Report) -> str:
    """The report as one self-contained HTML document."""
    template = _environment().get_template("report.html.j2")
    return template.render(
        r=report, money=report.money, rate=_rate, local=lambda m: f"{m:%Y-%m-%d %H:%M}",
        when=lambda naive: (
            f"{naive.replace(tzinfo=timezone.utc).astimezone(report.period.tz):%a %d %b %H:%M}"),
        price_key=_price_key, toml_key=_toml_key)


def _price_key(provider: str | None, model: str) -> str:
    if provider and not model.startswith(provider + "/"):
        return f"{provider}/{model}"
    return model


def _toml_key(key: str) -> str:
    return json.dumps(key, ensure_ascii=False)


# -- writing -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReportFile:
    """A written report: where it is, and the figures it shows."""

    path: Path
    report: Report


def report_path(path: str | os.PathLike[str] | None, report: Report) -> Path:
    """The file to write: ``path`` itself, or ``llmtally-<period>.html`` inside it when it is
    a directory (an existing one, or a name ending with ``/``); default ``reports/``."""
    name = f"llmtally-{report.period.slug}"
    if report.project:
        name += "-" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", report.project).strip("._") or "project")
    name += ".html"
    if path is None:
        return Path(DEFAULT_REPORT_DIR) / name
    text = os.fspath(path)
    if not text:
        raise ConfigError("the report path is empty; give a file name or a directory")
    target = Path(text).expanduser()
    if text.endswith(("/", os.sep)) or target.is_dir():
        return target / name
    return target


def write_report(tally: ReportSource, path: str | os.PathLike[str] | None = None, *,
                 week: str | None = None, since: Any = None, until: Any = None,
                 project: str | None = None, top: int = DEFAULT_TOP) -> ReportFile:
    """Build, render and atomically write the report; see :meth:`Tally.report`."""
    report = build_report(tally, week=week, since=since, until=until, project=project, top=top)
    target = report_path(path, report)
    _write_atomically(target, render_html(report).encode("utf-8"))
    return ReportFile(path=target, report=report)


def _write_atomically(target: Path, content: bytes) -> None:
    """A temporary file beside ``target``, flushed to disk, then renamed over it: readers see
    the old file or the new one, never half of one."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = create_beside(target, ".tmp")
    except OSError as exc:
        raise ConfigError(f"cannot write the report to {target} ({exc.strerror or exc}); "
                          "choose a writable file or directory") from exc
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException as exc:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise ConfigError(f"cannot write the report to {target} ({exc.strerror or exc}); "
                              "choose a writable file or directory") from exc
        raise

