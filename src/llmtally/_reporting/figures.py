"""The report's figures as values: the period's totals against the previous one, tables, the chart,
provider health, budgets."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from .._i18n import display_width, pad, translator
from . import data
from .numbers import format_money, number, percent
from .period import Period

if TYPE_CHECKING:
    pass

__all__ = ["Report"]

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
    state: str = "ok"  # over the period: ok, degraded or down (_reporting/health.py)


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
    level: str  # normal, warning, critical or exceeded (CounterState.level)


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
    language: str = "en"  # of the labels and the template's text (_i18n.py)

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
        """The headline as a few lines of plain text (what ``llmtally report`` prints), in the
        report's language."""
        _ = translator(self.language)
        cost, calls, tokens = self.cost, self.calls, self.tokens

        def versus(change: Change) -> str:
            return _("new") if change.percent is None else percent(change.percent, signed=True)

        period = f"{self.period.label}, {self.timezone}"
        if self.project:
            period += ", " + _("project {name}").format(name=self.project)
        calls_text = _("{calls}  ({change})  error rate {rate}").format(
            calls=number(calls.now), change=versus(calls),
            rate=percent(rate(self.current.error_rate)))
        if self.current.blocked:
            calls_text += "  " + _("blocked {count}").format(count=number(self.current.blocked))
        lines = [
            (_("period"), period),
            (_("cost"), _("{cost}  ({delta}, {change} vs {previous})").format(
                cost=self.money(cost.now), delta=self.money(cost.delta, signed=True),
                change=versus(cost), previous=self.period.previous_label)),
            (_("calls"), calls_text),
            (_("tokens"), _("{tokens}  ({change})").format(tokens=number(tokens.now),
                                                           change=versus(tokens))),
            (_("cache saved"), self.money(self.cache_savings)),
        ]
        if self.current.unpriced_calls:
            lines.append((_("unpriced"), _("{count} calls have no price (not in the cost; see "
                                           "the report)").format(
                count=number(self.current.unpriced_calls))))
        if self.current.estimated_calls:
            lines.append((_("estimated"), _("{cost} of the cost ({count} calls) is from tokens "
                                            "counted offline").format(
                cost=self.money(self.current.estimated_cost),
                count=number(self.current.estimated_calls))))
        width = max(display_width(label) for label, _value in lines) + 1
        return [pad(label, width) + value for label, value in lines]


def rate(value: float | None) -> float | None:
    return None if value is None else 100.0 * value
