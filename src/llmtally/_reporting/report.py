"""The weekly HTML report: one static file that opens offline, built from SQL aggregates.

:func:`build_report` reads the figures (see ``_report_data``: GROUP BYs over the ``ts``
index, never a loop over events), :func:`render_html` fills the Jinja2 template (autoescape
on: every model name, user, tag, error type and metadata value is inert text), and
:func:`write_report` writes the file atomically. The file has its CSS inline, its charts as
inline SVG, no JavaScript and no URL to fetch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone, tzinfo
from typing import TYPE_CHECKING, Any, Protocol

from .._errors import ConfigError
from .._i18n import N_, strftime, translator
from . import data, health
from .chart import cost_chart
from .figures import Breakdown, BudgetRow, Change, ProviderHealth, Report, TableRow
from .numbers import format_money
from .period import resolve_period

if TYPE_CHECKING:
    from .._budgets.states import CounterState
    from .._pricing.book import PriceBook
    from .._storage.store import Store

__all__ = ["build_report", "DEFAULT_REPORT_DIR", "DEFAULT_TOP", "REPORT_FILTERS"]

DEFAULT_REPORT_DIR = "reports"
DEFAULT_TOP = 10
"""Rows per breakdown table; the rest are summed into one "other" row."""
MAX_COSTLY_CALLS = 10
MAX_PERCENTILE_ROWS = 15
MAX_ERROR_ROWS = 15
MAX_UNPRICED_ROWS = 20
MAX_BUDGET_ROWS = 30
REPORT_FILTERS = ("provider", "model", "project", "user", "status")
_FLUSH_TIMEOUT_S = 10.0

# -- money ---------------------------------------------------------------------------------


# -- the report's content ------------------------------------------------------------------


class ReportSource(Protocol):
    """What a report reads: a :class:`~llmtally.Tally`'s ledger, prices, zone and budgets."""

    store: Store
    prices: PriceBook
    currency: str
    language: str

    @property
    def tz(self) -> tzinfo: ...

    @property
    def database_url(self) -> str: ...

    def now(self) -> datetime: ...

    def flush(self, timeout: float | None = None) -> bool: ...

    def budget_states(self) -> list[CounterState]: ...


def build_report(tally: ReportSource, *, week: str | None = None, since: Any = None,
                 until: Any = None, project: str | None = None, top: int = DEFAULT_TOP,
                 now: datetime | None = None, filters: Mapping[str, str] | None = None) -> Report:
    """Read the report's figures from ``tally``'s ledger (a few aggregate queries). Flushes
    first, so the Tally's own events are in it. ``filters`` keeps only the calls whose
    provider, model, project, user or status equal the values given (the dashboard's). Its
    text is in the Tally's ``language``."""
    if project is not None and not str(project).strip():
        raise ConfigError("project must be a non-empty name")
    wanted = dict(filters or {})
    for name in wanted:
        if name not in REPORT_FILTERS:
            raise ConfigError(f"cannot filter on {name!r}; use one of: {', '.join(REPORT_FILTERS)}")
    if project is not None:
        wanted["project"] = project
    if top < 1:
        raise ConfigError(f"top={top!r}: show at least one row per table")
    tally.flush(_FLUSH_TIMEOUT_S)
    now = now or tally.now()
    language = tally.language
    _ = translator(language)
    period = resolve_period(week=week, since=since, until=until, now=now, tz=tally.tz,
                            language=language)
    start, end = period.utc_range
    previous_start, previous_end = period.previous_utc_range
    rows = data.Range(start, end, previous_start, previous_end, tuple(sorted(wanted.items())),
                      period.utc_boundaries())
    with tally.store.connect() as conn:
        current, previous = data.totals(conn, rows)
        models = data.model_totals(conn, rows)
        by = {name: data.group_totals(conn, rows, name) for name in ("provider", "project", "user")}
        buckets = data.time_buckets(conn, rows, minutes=not period.whole_hour_offsets)
        latency = data.percentiles(conn, rows, "latency_ms")
        ttft = data.percentiles(conn, rows, "ttft_ms")
        errors = data.errors(conn, rows)
        costly = data.costliest_calls(conn, rows, MAX_COSTLY_CALLS)
        unpriced = data.unpriced_models(conn, rows)
        stored_currencies = data.currencies(conn, rows)
    states = tally.budget_states()
    total_cost = current.cost
    chart, daily = cost_chart(period, buckets, tally.currency, language)
    breakdowns = (  # in page order: provider and project side by side, then model, user
        _breakdown(_("Cost by provider"), "provider", by["provider"], top, total_cost, _),
        _breakdown(_("Cost by project"), "project", by["project"], top, total_cost, _),
        _breakdown(_("Cost by model"), "model", models, top, total_cost, _),
        _breakdown(_("Cost by user"), "user", by["user"], top, total_cost, _),
    )
    estimated = tuple(_table_row(row, total_cost, 0.0) for row in models if row.estimated_calls)
    zone_name = getattr(tally.tz, "key", None) or str(tally.tz)
    title = (_("LLM usage {period}").format(period=period.label)
             + "".join(f" · {value}" for value in wanted.values()))
    return Report(
        language=language, title=title, period=period, project=wanted.get("project"), currency=tally.currency,
        timezone=zone_name, generated_at=_as_aware(now).astimezone(tally.tz),
        database=tally.database_url, current=current, previous=previous,
        cache_savings=_cache_savings(models, tally.prices), chart=chart, daily=daily,
        breakdowns=breakdowns,
        latency=tuple(latency[:MAX_PERCENTILE_ROWS]), ttft=tuple(ttft[:MAX_PERCENTILE_ROWS]),
        providers=_provider_health(by["provider"], errors, _),
        errors=tuple(errors[:MAX_ERROR_ROWS]), errors_total=len(errors),
        budgets=_budget_rows(states, now, tally.tz, tally.currency, language)[:MAX_BUDGET_ROWS],
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
               total_cost: float, _: Callable[[str], str]) -> Breakdown:
    """The top ``top`` groups of this period by cost, and one row summing the rest."""
    active = [row for row in found if row.calls]
    shown, rest = active[:top], active[top:]
    other = None
    if rest:
        other = data.GroupRow(
            key=_("other ({count} more)").format(count=len(rest)), calls=sum(r.calls for r in rest),
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


def _provider_health(providers: Sequence[data.GroupRow], errors: Sequence[data.ErrorRow],
                     _: Callable[[str], str]) -> tuple[ProviderHealth, ...]:
    by_provider: dict[str | None, list[tuple[str, int]]] = {}
    for row in errors:
        by_provider.setdefault(row.provider, []).append((row.error_type or _("(unknown)"),
                                                         row.count))
    out = []
    for group in providers:
        if not group.calls:
            continue
        types = by_provider.get(group.key, [])
        kinds = [(health.kind_of(name), count) for name, count in types]
        out.append(ProviderHealth(
            provider=group.key if group.key is not None else _("(none)"), calls=group.calls,
            errors=group.errors,
            error_rate=100.0 * group.errors / group.calls if group.calls else None,
            previous_calls=group.previous_calls, top_errors=tuple(types[:3]),
            state=health.state(group.calls, group.errors,
                               sum(n for kind, n in kinds if kind == "rate_limit"),
                               sum(n for kind, n in kinds if kind == "auth"))))
    out.sort(key=lambda item: (-(item.error_rate or 0.0), -item.calls, item.provider))
    return tuple(out[:MAX_ERROR_ROWS])


def _budget_rows(states: Sequence[CounterState], now: datetime, tz: tzinfo,
                 currency: str, language: str) -> tuple[BudgetRow, ...]:
    _ = translator(language)
    units = {"tokens": _("tokens"), "requests": _("requests")}
    rows = []
    for state in states:
        budget = state.budget
        scope = dict(budget.scope) | ({budget.each: state.instance} if budget.each else {})

        def amount(value: float, kind: str = budget.kind) -> str:
            return (format_money(value, currency) if kind == "usd"
                    else f"{value:,.0f} {units.get(kind, kind)}")

        percent = 100.0 * state.used / budget.limit if budget.limit else None
        end = state.window.end
        run_out = state.run_out(now)
        if run_out is None:
            runs_out = _("not before it resets") if end is not None and state.spent > 0 else "–"
        else:
            runs_out = _local(run_out, tz, language)
        rows.append(BudgetRow(
            label=budget.label,
            scope=", ".join(f"{k}={v}" for k, v in scope.items()) or _("all calls"),
            kind=budget.kind, used=amount(state.used), limit=amount(budget.limit), percent=percent,
            bar=min(percent or 0.0, 100.0),
            resets=_("never") if end is None else _local(end, tz, language),
            runs_out=runs_out, action=budget.action,
            over=budget.limit > 0 and state.used >= budget.limit, level=state.level))
    rows.sort(key=lambda row: (-(row.percent or 0.0), row.label, row.scope))
    return tuple(rows)


def _local(naive_utc: datetime, tz: tzinfo, language: str) -> str:
    return strftime(naive_utc.replace(tzinfo=timezone.utc).astimezone(tz),
                    N_("%a %d %b %Y %H:%M"), language)


# -- the chart -----------------------------------------------------------------------------


# -- rendering -----------------------------------------------------------------------------


# -- writing -------------------------------------------------------------------------------
