"""The weekly HTML report: its figures are the ledger's SQL totals, on SQLite and PostgreSQL;
every user- or provider-supplied value in it is inert text; it has no script and no URL."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import fetch_events
from sqlalchemy import DateTime, bindparam, create_engine, text

from llmtally import Budget, ConfigError, Price
from llmtally._reporting.numbers import format_money
from llmtally._reporting.render import render_html, report_path
from llmtally._reporting.report import build_report
from llmtally._sample import UNPRICED_MODEL, bulk_load, record_history, sample_calls
from llmtally._storage.sketch import RELATIVE_ERROR
from llmtally._storage.store import Store, normalize_url

NOW = datetime(2026, 11, 25, 10, 0, tzinfo=timezone.utc)        # a Wednesday, in 2026-W48
W47 = (datetime(2026, 11, 16), datetime(2026, 11, 23))          # last week, UTC
W46 = (datetime(2026, 11, 9), datetime(2026, 11, 16))


def clock() -> datetime:
    return NOW


# -- reading the ledger with plain SQL (not through llmtally's queries) ---------------------


def sql_totals(url: str, start: datetime, end: datetime, project: str | None = None) -> dict:
    where = "ts >= :start AND ts < :end" + (" AND project = :project" if project else "")
    query = text(
        "SELECT COUNT(*) AS calls, COALESCE(SUM(cost), 0) AS cost, "
        "COALESCE(SUM(input_tokens + output_tokens), 0) AS tokens, "
        "COALESCE(SUM(CASE WHEN status = 'error' THEN 1 ELSE 0 END), 0) AS errors, "
        "COALESCE(SUM(CASE WHEN status = 'blocked' THEN 1 ELSE 0 END), 0) AS blocked, "
        "COALESCE(SUM(CASE WHEN cost_status = 'unpriced' THEN 1 ELSE 0 END), 0) AS unpriced, "
        "COALESCE(SUM(CASE WHEN cost_status = 'estimated' THEN 1 ELSE 0 END), 0) AS estimated "
        f"FROM llmtally_events WHERE {where}"
    ).bindparams(bindparam("start", type_=DateTime), bindparam("end", type_=DateTime))
    engine = create_engine(normalize_url(url))
    try:
        with engine.connect() as conn:
            params = {"start": start, "end": end, **({"project": project} if project else {})}
            row = conn.execute(query, params).mappings().one()
            return {key: (float(value) if key == "cost" else int(value))
                    for key, value in row.items()}
    finally:
        engine.dispose()


class _Page(HTMLParser):
    """Every element, attribute and text node of a document."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str, str | None]] = []
        self.by_id: dict[str, dict[str, str | None]] = {}
        self.text_by_id: dict[str, str] = {}
        self._open_ids: list[tuple[str, str, int]] = []
        self._texts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            self.attributes.append((tag, name, value))
        attributes = dict(attrs)
        if attributes.get("id"):
            self.by_id[attributes["id"]] = attributes
            self._open_ids.append((attributes["id"], tag, len(self._texts)))

    def handle_endtag(self, tag: str) -> None:
        if self._open_ids and self._open_ids[-1][1] == tag:
            element_id, _tag, first = self._open_ids.pop()
            self.text_by_id[element_id] = "".join(self._texts[first:]).strip()

    def handle_data(self, data: str) -> None:
        self._texts.append(data)


def parse(document: str) -> _Page:
    page = _Page()
    page.feed(document)
    page.close()
    return page


def shown_money(text_value: str) -> float:
    return float(re.sub(r"[^0-9.]", "", text_value))


def report_html(tally, **kwargs) -> tuple[object, str]:
    tally.flush()
    report = build_report(tally, **kwargs)
    return report, render_html(report)


# -- the figures ---------------------------------------------------------------------------


@pytest.fixture
def history(ledger_url, make_tally):
    """Two and a half weeks of sample traffic through Tally.record(), ending NOW."""
    tally = make_tally(ledger_url, clock=clock)
    record_history(tally, NOW - timedelta(days=17), NOW, count=1200)
    return tally, ledger_url


def test_headline_equals_the_sql_totals(history):
    tally, url = history
    report, document = report_html(tally, week="last")
    now, before = sql_totals(url, *W47), sql_totals(url, *W46)
    assert now["calls"] > 300 and before["calls"] > 300 and now["unpriced"] and now["errors"]
    page = parse(document)

    assert float(page.by_id["headline-cost"]["data-value"]) == pytest.approx(now["cost"], rel=1e-9)
    assert shown_money(page.text_by_id["headline-cost"]) == pytest.approx(now["cost"], abs=0.005)
    assert page.text_by_id["headline-cost"] == format_money(now["cost"], "USD")
    assert page.text_by_id["headline-calls"] == f"{now['calls']:,}"
    assert page.text_by_id["headline-tokens"] == f"{now['tokens']:,}"
    rate = 100 * now["errors"] / (now["calls"] - now["blocked"])
    assert float(page.by_id["headline-error-rate"]["data-value"]) == pytest.approx(rate)
    assert page.text_by_id["headline-error-rate"] == f"{rate:.1f}%"

    # Δ and % against the previous week
    delta = now["cost"] - before["cost"]
    assert float(page.by_id["headline-cost-change"]["data-value"]) == pytest.approx(delta, rel=1e-9)
    change = page.text_by_id["headline-cost-change"]
    assert format_money(delta, "USD", signed=True) in change
    assert f"{100 * delta / before['cost']:+.1f}%".replace("-", "\u2212") in change
    assert float(page.by_id["headline-calls-change"]["data-value"]) == now["calls"] - before["calls"]
    assert (report.previous.calls, report.previous.tokens) == (before["calls"], before["tokens"])
    assert report.previous.cost == pytest.approx(before["cost"], rel=1e-9)

    # the daily chart adds up to the week, and the breakdowns add up to the total
    assert sum(cost for _label, cost, _prev, _calls in report.daily) == pytest.approx(now["cost"])
    assert sum(calls for *_rest, calls in report.daily) == now["calls"]
    assert sum(prev for _label, _cost, prev, _calls in report.daily) == pytest.approx(before["cost"])
    for table in report.breakdowns:
        assert sum(row.cost for row in table.rows) == pytest.approx(now["cost"]), table.title
        assert sum(row.calls for row in table.rows) == now["calls"], table.title
    assert report.current.unpriced_calls == now["unpriced"]
    assert report.current.estimated_calls == now["estimated"]
    assert "<svg" in document and "<polyline" in document


def test_latency_percentiles_are_nearest_rank_per_model_within_the_sketch_s_error(history):
    tally, url = history
    report, _document = report_html(tally, week="last")
    start, end = W47
    values: dict[tuple, list[float]] = {}
    streams: dict[tuple, list[float]] = {}
    for event in fetch_events(url):
        ts = event["ts"] if isinstance(event["ts"], datetime) else datetime.fromisoformat(event["ts"])
        if start <= ts < end and event["status"] == "ok":
            key = (event["provider"], event["model"])
            if event["latency_ms"] is not None:
                values.setdefault(key, []).append(event["latency_ms"])
            if event["streamed"] and event["ttft_ms"] is not None:
                streams.setdefault(key, []).append(event["ttft_ms"])

    def nearest_rank(sample: list[float], p: int) -> float:
        ordered = sorted(sample)
        return ordered[-(-p * len(ordered) // 100) - 1]

    assert report.latency and report.ttft
    for rows, expected in ((report.latency, values), (report.ttft, streams)):
        for row in rows:
            sample = expected[(row.provider, row.model)]
            assert row.samples == len(sample)
            for estimate, p in ((row.p50, 50), (row.p95, 95)):  # within 1 %, as stated
                exact = nearest_rank(sample, p)
                assert abs(estimate - exact) <= RELATIVE_ERROR * exact * (1 + 1e-9), (p, exact)


def test_top_n_and_other(ledger_url, make_tally):
    tally = make_tally(ledger_url, clock=clock)
    for index in range(14):
        for _ in range(index + 1):
            tally.record(provider="openai", model="gpt-4o-mini", input_tokens=1000 * (index + 1),
                         output_tokens=100, user=f"user-{index:02d}", project="p",
                         ts=datetime(2026, 11, 18, 12, tzinfo=timezone.utc))
    report, document = report_html(tally, week="last")
    by_user = next(table for table in report.breakdowns if table.column == "user")
    assert [row.label for row in by_user.rows[:10]] == [f"user-{i:02d}" for i in range(13, 3, -1)]
    other = by_user.rows[10]
    assert other.is_other and other.label == "other (4 more)" and len(by_user.rows) == 11
    assert other.calls == 1 + 2 + 3 + 4
    # the "other" row is the ledger's sum for those four users
    engine = create_engine(normalize_url(ledger_url))
    with engine.connect() as conn:
        rest = conn.execute(text(
            'SELECT SUM(cost) FROM llmtally_events WHERE "user" IN '
            "('user-00', 'user-01', 'user-02', 'user-03')")).scalar()
    engine.dispose()
    assert other.cost == pytest.approx(rest)
    section = document.split('id="by-user"', 1)[1].split("</section>", 1)[0]
    assert section.count("<tr") == 12            # header, ten users, other
    assert "other (4 more)" in section and "user-03" not in section


def test_unpriced_and_estimated_are_flagged(ledger_url, make_tally):
    tally = make_tally(ledger_url, clock=clock)
    ts = datetime(2026, 11, 17, 9, tzinfo=timezone.utc)
    for _ in range(3):
        tally.record(provider="internal", model="acme-llm-7b", input_tokens=500,
                     output_tokens=50, ts=ts)
    tally.record(provider="openai", model="gpt-4o", input_tokens=2000, output_tokens=400,
                 estimated=True, streamed=True, ts=ts)
    tally.record(provider="openai", model="gpt-4o", input_tokens=2000, output_tokens=400, ts=ts)
    report, document = report_html(tally, week="last")
    totals = sql_totals(ledger_url, *W47)
    assert report.current.unpriced_calls == 3 == totals["unpriced"]
    assert [(row.model, row.calls, row.input_tokens) for row in report.unpriced] == [
        ("acme-llm-7b", 3, 1500)]
    page = parse(document)
    unpriced = document.split('id="unpriced"', 1)[1]
    assert "acme-llm-7b" in unpriced and "[prices.&#34;internal/acme-llm-7b&#34;]" in unpriced
    assert "3 calls have no known price" in document
    assert "unpriced</span>" in document.split('id="by-model"', 1)[1]   # no "$0.00" for it
    estimated_cost = tally.prices.cost(model="gpt-4o", provider="openai", input_tokens=2000,
                                       output_tokens=400).cost
    assert report.current.estimated_cost == pytest.approx(estimated_cost)
    assert f"{format_money(estimated_cost, 'USD')} of the cost" in document
    assert "est.</span>" in document and "Estimated costs" in document
    assert "headline-cost" in page.by_id


def test_cache_savings(ledger_url, make_tally):
    tally = make_tally(ledger_url, clock=clock)
    ts = datetime(2026, 11, 19, 15, tzinfo=timezone.utc)
    tally.record(provider="openai", model="gpt-4o-mini", input_tokens=1_000_000,
                 cache_read_tokens=800_000, output_tokens=1000, ts=ts)
    tally.record(provider="openai", model="gpt-4o-mini", input_tokens=5000, output_tokens=700,
                 cache_hit=True, ts=ts)
    report, document = report_html(tally, week="last")
    price = tally.prices.lookup("gpt-4o-mini", "openai")
    would_have = tally.prices.cost(model="gpt-4o-mini", provider="openai", input_tokens=5000,
                                   output_tokens=700).cost
    expected = 800_000 * (price.input - price.cache_read) + would_have
    assert report.cache_savings == pytest.approx(expected)
    assert float(parse(document).by_id["headline-cache-savings"]["data-value"]) == \
        pytest.approx(expected)


def test_budgets_section(ledger_url, make_tally):
    tally = make_tally(ledger_url, clock=clock, budgets=[
        Budget(usd=5, per="month"), Budget(requests=100, per="day", each="user")])
    for hours in (30, 20, 2):
        tally.record(provider="openai", model="gpt-4o", input_tokens=600_000,
                     output_tokens=2000, ts=NOW - timedelta(hours=hours))
    tally.flush()   # the counters start from the window's spend in the ledger
    held = tally.reserve(model="gpt-4o", provider="openai", user="alice", input_tokens=100,
                         max_tokens=100)
    tally.record(provider="openai", model="gpt-4o", input_tokens=100, output_tokens=80,
                 user="alice", reservation=held, ts=NOW)
    report, document = report_html(tally, week="this")
    month = sql_totals(ledger_url, datetime(2026, 11, 1), datetime(2026, 12, 1))
    rows = {row.label: row for row in report.budgets}
    monthly = rows["usd 5/month"]
    assert monthly.used == format_money(month["cost"], "USD") and monthly.limit == "$5.00"
    assert monthly.percent == pytest.approx(100 * month["cost"] / 5)
    assert monthly.resets == "Tue 01 Dec 2026 00:00"
    assert rows["requests 100/day each user"].scope == "user=alice"
    assert rows["requests 100/day each user"].used == "1 requests"
    section = document.split('id="budgets"', 1)[1].split("</section>", 1)[0]
    assert "usd 5/month" in section and format_money(month["cost"], "USD") in section
    assert "user=alice" in section
    # run-out forecast: this month's burn rate reaches the limit before the month ends
    state = next(s for s in tally.budget_states() if s.budget.per == "month")
    expected = state.run_out(NOW)
    assert expected is not None
    assert monthly.runs_out == f"{expected:%a %d %b %Y %H:%M}"


def test_no_budgets_says_how_to_add_one(sqlite_url, make_tally):
    _report, document = report_html(make_tally(sqlite_url, clock=clock), week="last")
    assert "No budgets configured" in document


# -- periods -------------------------------------------------------------------------------


def test_weeks_and_ranges(sqlite_url, make_tally):
    tally = make_tally(sqlite_url, clock=clock)
    record_history(tally, NOW - timedelta(days=24), NOW, count=600)
    last = build_report(tally, week="last")
    assert last.period.slug == "2026-W47" and not last.period.partial
    assert build_report(tally, week="2026-W47").current == last.current
    assert build_report(tally, week="2026w47").current == last.current
    assert build_report(tally).current == last.current        # the default is last week
    ranged = build_report(tally, since="2026-11-16", until="2026-11-23")
    assert ranged.current == last.current and ranged.period.slug == "2026-11-16_2026-11-22"
    assert ranged.previous.calls == sql_totals(sqlite_url, *W46)["calls"]

    this = build_report(tally, week="this")
    assert this.period.partial and this.period.slug == "2026-W48"
    assert this.current.calls == sql_totals(sqlite_url, datetime(2026, 11, 23), NOW.replace(tzinfo=None))["calls"]
    # compared with last week up to the same weekday and hour
    assert this.previous.calls == sql_totals(
        sqlite_url, datetime(2026, 11, 16), datetime(2026, 11, 18, 10))["calls"]
    assert len(this.daily) == 3          # Mon, Tue, Wed so far

    search = build_report(tally, week="last", project="search")
    assert search.current.calls == sql_totals(sqlite_url, *W47, project="search")["calls"]
    assert search.current.cost == pytest.approx(sql_totals(sqlite_url, *W47, project="search")["cost"])
    assert [table.groups for table in search.breakdowns if table.column == "project"] == [1]

    for bad in ({"week": "next"}, {"week": "2026-W60"}, {"week": "last", "since": "3d"},
                {"until": "2026-11-01"}, {"since": "2026-11-10", "until": "2026-11-01"},
                {"since": "yesterday"}):
        with pytest.raises(ConfigError):
            build_report(tally, **bad)


def test_weeks_follow_the_tally_time_zone(sqlite_url, make_tally):
    tally = make_tally(sqlite_url, clock=clock, timezone="Asia/Tokyo")
    # Sunday 22 Nov 20:00 UTC is Monday 23 Nov 05:00 in Tokyo: week 48 there, not 47
    tally.record(provider="openai", model="gpt-4o", input_tokens=1000, output_tokens=10,
                 ts=datetime(2026, 11, 22, 20, tzinfo=timezone.utc))
    tally.record(provider="openai", model="gpt-4o", input_tokens=1000, output_tokens=10,
                 ts=datetime(2026, 11, 22, 14, tzinfo=timezone.utc))
    last = build_report(tally, week="last")
    assert last.current.calls == 1 and last.timezone == "Asia/Tokyo"
    assert last.period.start == datetime(2026, 11, 16, tzinfo=tally.tz)
    assert [calls for *_rest, calls in last.daily] == [0, 0, 0, 0, 0, 0, 1]
    assert build_report(tally, week="this").current.calls == 1


def test_days_in_a_zone_with_a_half_hour_offset(ledger_url, make_tally):
    tally = make_tally(ledger_url, clock=clock, timezone="Asia/Kolkata")      # UTC+05:30
    for hour, minute in ((18, 15), (18, 45), (18, 45)):     # Mon 23:45, then Tue 00:15 there
        tally.record(provider="openai", model="gpt-4o", input_tokens=1000, output_tokens=10,
                     ts=datetime(2026, 11, 16, hour, minute, tzinfo=timezone.utc))
    report = build_report(tally, week="last")
    assert [calls for *_rest, calls in report.daily] == [1, 2, 0, 0, 0, 0, 0]
    cost = report.current.cost
    assert [daily_cost for _label, daily_cost, *_rest in report.daily][:2] == \
        [pytest.approx(cost / 3), pytest.approx(2 * cost / 3)]


def test_days_across_a_dst_change_add_up(sqlite_url, make_tally):
    tally = make_tally(sqlite_url, clock=lambda: datetime(2026, 10, 28, tzinfo=timezone.utc),
                       timezone="Europe/Berlin")
    # 2026-W43 ends on Sunday 25 Oct, when Berlin leaves summer time (a 25-hour day)
    start = datetime(2026, 10, 18, 22, tzinfo=timezone.utc)          # Mon 19 Oct 00:00 CEST
    for hour in range(0, 7 * 24 + 1):
        tally.record(provider="openai", model="gpt-4o-mini", input_tokens=1000,
                     output_tokens=100, ts=start + timedelta(hours=hour, minutes=30))
    report = build_report(tally, week="2026-W43")
    assert [calls for *_rest, calls in report.daily] == [24, 24, 24, 24, 24, 24, 25]
    assert report.current.calls == 169


# -- safety --------------------------------------------------------------------------------

SCRIPT = "<script>alert('{field}')</script>"
IMG = "\"><img src=x onerror=alert('{field}')>"
FIELDS = ("model", "provider", "project", "user", "session", "tag", "error_type", "metadata",
          "id", "resolved_model")


def _hostile_ledger(tally) -> None:
    ts = datetime(2026, 11, 18, 12, tzinfo=timezone.utc)
    for payload in (SCRIPT, IMG):
        def p(field: str) -> str:
            return payload.format(field=field)

        # a priced call: it is among the most expensive, with its attribution shown
        tally.record(id=p("id"), provider="openai", model="gpt-4o", input_tokens=900_000,
                     output_tokens=50_000, resolved_model=p("resolved_model"),
                     project=p("project"), user=p("user"), session=p("session"),
                     tags=[p("tag")], metadata={p("metadata"): p("metadata")}, ts=ts)
        # an unknown model of an unknown provider: unpriced, in the model and provider tables
        tally.record(provider=p("provider"), model=p("model"), input_tokens=10, output_tokens=5,
                     latency_ms=100, ttft_ms=40, streamed=True, ts=ts)
        tally.record(provider=p("provider"), model=p("model"), status="error",
                     error_type=p("error_type"), ts=ts)


def test_values_from_users_and_providers_are_inert(ledger_url, make_tally):
    tally = make_tally(ledger_url, clock=clock,
                       budgets=[Budget(usd=100, per="month", each="project")])
    held = tally.reserve(model="gpt-4o", provider="openai", project=SCRIPT.format(field="budget"),
                         input_tokens=10, max_tokens=10)
    tally.release(held)
    _hostile_ledger(tally)
    for kwargs in ({"week": "last"}, {"week": "last", "project": SCRIPT.format(field="project")},
                   {"week": "last", "project": IMG.format(field="project")}):
        _report, document = report_html(tally, **kwargs)
        page = parse(document)
        assert "script" not in page.tags and "img" not in page.tags
        assert not [a for a in page.attributes if a[1].startswith("on")]
        assert "<script" not in document.lower() and "<img" not in document.lower()
    _report, document = report_html(tally, week="last")
    readable = html.unescape(document)
    for field in FIELDS:        # each value is in the report, as text
        for payload in (SCRIPT, IMG):
            value = payload.format(field=field)
            if field == "metadata":
                value = value.replace('"', '\\"')
            assert value in readable, (field, payload)
    assert SCRIPT.format(field="budget") in readable


def test_no_script_and_no_url_to_fetch(history):
    tally, _url = history
    for kwargs in ({"week": "last"}, {"week": "this"}, {"since": "60d"}):
        _report, document = report_html(tally, **kwargs)
        page = parse(document)
        assert "<script" not in document.lower() and "script" not in page.tags
        for tag in ("link", "img", "iframe", "object", "embed", "image", "use", "base"):
            assert tag not in page.tags
        for _tag, name, value in page.attributes:
            if name in ("src", "href", "xlink:href", "action", "srcset", "poster", "data"):
                assert value is not None and value.startswith("#"), (name, value)
        assert not re.search(r"url\s*\(", document, re.I)
        assert "@import" not in document
        assert not re.search(r"(?:src|href)\s*=\s*[\"']?\s*(?:[a-z]+:)?//", document, re.I)


def test_empty_ledger(sqlite_url, make_tally):
    report, document = report_html(make_tally(sqlite_url, clock=clock), week="last")
    page = parse(document)
    assert page.text_by_id["headline-cost"] == "$0.00"
    assert page.text_by_id["headline-calls"] == "0" and page.text_by_id["headline-tokens"] == "0"
    assert page.text_by_id["headline-error-rate"] == "–"
    assert "No cost recorded in this period" in document
    assert "No calls in this period." in document and "No priced calls" in document
    assert report.daily and all(calls == 0 for *_rest, calls in report.daily)


def test_currency_formatting():
    assert format_money(1234.5, "USD") == "$1,234.50"
    assert format_money(0.000286, "USD") == "$0.00029"
    assert format_money(-3, "EUR", signed=True) == "\u2212€3.00"
    assert format_money(3, "GBP", signed=True) == "+£3.00"
    assert format_money(1234.4, "JPY") == "¥1,234"
    assert format_money(12.5, "CNY") == "¥12.50"
    assert format_money(12.5, "CHF") == "12.50 CHF"
    assert format_money(0, "USD") == "$0.00"


def test_report_in_the_ledger_currency(sqlite_url, make_tally):
    tally = make_tally(sqlite_url, clock=clock, currency="EUR", rates={"USD": 0.9},
                       prices={"acme": Price(input=1.0, output=2.0, currency="EUR")})
    tally.record(model="acme", input_tokens=1_000_000, output_tokens=500_000,
                 ts=datetime(2026, 11, 17, tzinfo=timezone.utc))
    report, document = report_html(tally, week="last")
    assert report.current.cost == pytest.approx(2.0)
    assert parse(document).text_by_id["headline-cost"] == "€2.00"
    assert "amounts in EUR" in document


# -- writing the file ----------------------------------------------------------------------


def test_tally_report_paths(sqlite_url, make_tally, tmp_path, monkeypatch):
    tally = make_tally(sqlite_url, clock=clock)
    tally.record(provider="openai", model="gpt-4o-mini", input_tokens=100, output_tokens=10,
                 ts=datetime(2026, 11, 20, tzinfo=timezone.utc))
    monkeypatch.chdir(tmp_path)
    default = tally.report(week="last")
    assert default == Path("reports") / "llmtally-2026-W47.html" and default.is_file()
    into = tally.report(str(tmp_path / "out") + "/", week="2026-W46")
    assert into == tmp_path / "out" / "llmtally-2026-W46.html" and into.is_file()
    again = tally.report(tmp_path / "out", since="2026-11-01", until="2026-11-15",
                         project="a b/c")
    assert again == tmp_path / "out" / "llmtally-2026-11-01_2026-11-14-a_b_c.html"
    named = tmp_path / "named.html"
    named.write_text("old")
    assert tally.report(named) == named and named.read_text().startswith("<!DOCTYPE html>")
    assert not [p for p in tmp_path.rglob("*.tmp")]           # nothing half-written left
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="cannot write the report"):
        tally.report(tmp_path / "file" / "r.html")
    report = build_report(tally)
    assert report_path(None, report) == Path("reports/llmtally-2026-W47.html")


# -- the sample generator ------------------------------------------------------------------


def test_sample_history_is_deterministic_and_plausible():
    start, end = datetime(2026, 11, 2), datetime(2026, 11, 16)
    first = list(sample_calls(start, end, count=3000, seed=7))
    assert first == list(sample_calls(start, end, count=3000, seed=7))
    assert first != list(sample_calls(start, end, count=3000, seed=8))
    assert len(first) == 3000 and len({call.id for call in first}) == 3000
    assert [c.ts for c in first] == sorted(c.ts for c in first)
    assert all(start <= c.ts.replace(tzinfo=None) < end for c in first)
    assert len({c.project for c in first}) >= 4 and len({c.user for c in first}) >= 6
    assert len({c.provider for c in first}) >= 5
    assert any(c.status == "error" and c.error_type for c in first)
    assert any(c.status == "blocked" for c in first)
    assert any(c.usage.cache_read_tokens for c in first) and any(c.cache_hit for c in first)
    assert any(c.streamed and c.ttft_ms for c in first) and any(c.estimated for c in first)
    assert any((c.provider, c.model) == UNPRICED_MODEL for c in first)
    weekdays = sum(1 for c in first if c.ts.weekday() < 5)
    assert weekdays / len(first) > 0.8           # office traffic


def test_bulk_rows_match_the_record_path(tmp_path, make_tally):
    start, end = datetime(2026, 11, 2), datetime(2026, 11, 4)
    recorded_url = f"sqlite:///{tmp_path / 'recorded.db'}"
    bulk_url = f"sqlite:///{tmp_path / 'bulk.db'}"
    tally = make_tally(recorded_url)
    assert record_history(tally, start, end, count=400, seed=3) == 400
    store = Store(bulk_url)
    try:
        assert bulk_load(store, tally.prices, start, end, count=400, seed=3, batch_size=64) == 400
        assert bulk_load(store, tally.prices, start, end, count=400, seed=3) == 0   # same ids
    finally:
        store.close()
    recorded, bulk = fetch_events(recorded_url), fetch_events(bulk_url)
    assert len(recorded) == len(bulk) == 400
    for one, other in zip(recorded, bulk):
        assert {k: v for k, v in one.items() if k != "cost"} == \
            {k: v for k, v in other.items() if k != "cost"}
        assert one["cost"] == pytest.approx(other["cost"]) if one["cost"] is not None \
            else other["cost"] is None


# -- the command ---------------------------------------------------------------------------


def llmtally(*args: str, cwd=None) -> subprocess.CompletedProcess:
    exe = shutil.which("llmtally") or os.path.join(os.path.dirname(sys.executable), "llmtally")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.fixture
def cli_ledger(tmp_path, make_tally):
    """Calls in last week and the week before, relative to the real clock (the command has no
    clock seam)."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    tally = make_tally(url)
    today = datetime.now(timezone.utc).replace(hour=12, minute=0, second=0, microsecond=0)
    monday = today - timedelta(days=today.weekday() + 7)
    for days, user in ((1, "alice"), (2, "bob"), (3, "alice"), (-5, "bob")):
        tally.record(provider="openai", model="gpt-4o", input_tokens=10_000, output_tokens=500,
                     user=user, project="search", ts=monday + timedelta(days=days))
    tally.flush()
    start = (monday - timedelta(hours=12)).replace(tzinfo=None)
    return url, (start, start + timedelta(days=7))


def test_report_command(cli_ledger, tmp_path):
    url, week = cli_ledger
    result = llmtally("report", "--week", "last", "-o", f"{tmp_path}/out/", "--db", url,
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    path = Path(lines[0])
    assert path.parent == tmp_path / "out" and path.name.startswith("llmtally-") and path.is_file()
    totals = sql_totals(url, *week)
    assert totals["calls"] == 3
    assert f"cost        {format_money(totals['cost'], 'USD')}" in result.stdout
    assert f"calls       {totals['calls']:,}" in result.stdout
    assert f"tokens      {totals['tokens']:,}" in result.stdout
    page = parse(path.read_text())
    assert page.text_by_id["headline-calls"] == "3"

    ranged = llmtally("report", "--since", f"{week[0]:%Y-%m-%d}", "--until",
                      f"{week[1]:%Y-%m-%d}", "--project", "search", "-o",
                      str(tmp_path / "r.html"), "--db", url)
    assert ranged.returncode == 0, ranged.stderr
    assert ranged.stdout.splitlines()[0] == str(tmp_path / "r.html")
    assert "project search" in ranged.stdout


@pytest.mark.parametrize("args, message", [
    (["--week", "someday"], "is not a week"),
    (["--week", "2026-W54"], "has no week 54"),
    (["--week", "last", "--since", "7d"], "not both"),
    (["--since", "soon"], "is neither a date"),
])
def test_report_command_errors_are_one_line(cli_ledger, tmp_path, args, message):
    url, _week = cli_ledger
    result = llmtally("report", *args, "-o", str(tmp_path / "x") + "/", "--db", url)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_report_command_unwritable_output(cli_ledger, tmp_path):
    url, _week = cli_ledger
    (tmp_path / "file").write_text("x")
    result = llmtally("report", "-o", str(tmp_path / "file" / "r.html"), "--db", url)
    assert result.returncode == 2 and "cannot write the report" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
