"""Alert texts, the weekly report, the dashboard and the CLI's human output in English,
Chinese and Korean, from gettext catalogs: every message marked in the code and the templates
is translated in each catalog, each compiled ``.mo`` is the compile of its ``.po`` (so neither
can drift), the language comes from ``language=`` or ``LLMTALLY_LANGUAGE``, and the figures
are the same in every language."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from llmtally import AlertRule, Budget, ConfigError, Tally
from llmtally._i18n import LANGUAGES, LOCALE_DIR, translator

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 11, 25, 10, 7, tzinfo=timezone.utc)


def _scripts():
    spec = importlib.util.spec_from_file_location("i18n_script", ROOT / "scripts" / "i18n.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("language", [code for code in LANGUAGES if code != "en"])
def test_every_marked_message_is_translated_and_compiled(language):
    from babel.messages.pofile import read_po

    script = _scripts()
    wanted = {message.id for message in script.template() if message.id}
    assert len(wanted) > 40
    po_path = LOCALE_DIR / language / "LC_MESSAGES" / "llmtally.po"
    with open(po_path, "rb") as handle:
        catalog = read_po(handle, locale=language)
    have = {message.id: message for message in catalog if message.id}
    assert wanted - set(have) == set(), "run python scripts/i18n.py, then translate"
    assert set(have) - wanted == set(), "messages no longer in the code: run scripts/i18n.py"
    for message_id, message in have.items():
        assert message.string and not message.fuzzy, message_id
        placeholders = sorted(part.split("}")[0] for part in message_id.split("{")[1:])
        assert sorted(part.split("}")[0] for part in message.string.split("{")[1:]) == \
            placeholders, message_id  # the same {fields}, with the same formats
        # the templates' %(name)s fields (Jinja2 fills them) and the same markup
        assert sorted(re.findall(r"%\(\w+\)s", message.string)) == \
            sorted(re.findall(r"%\(\w+\)s", message_id)), message_id
        assert sorted(re.findall(r"</?\w+", message.string)) == \
            sorted(re.findall(r"</?\w+", message_id)), message_id
    assert (po_path.with_suffix(".mo")).read_bytes() == script.compiled(po_path)


def _auth_alert(make_tally, url, language, received):
    tally = make_tally(url, clock=lambda: NOW, language=language,
                       alert_rules=[AlertRule("auth_failure")], alerts=[received.append, "log"])
    tally.record(provider="openai", model="gpt-4o-mini", status="error",
                 error_type="litellm.AuthenticationError", ts=NOW - timedelta(minutes=1))
    return tally


@pytest.mark.parametrize("language, title, line", [
    ("en", "[CRITICAL] authentication failures (invalid or revoked key): openai",
     "1 failed calls of 1 (alert at 1)"),
    ("zh", "[严重] 鉴权失败（密钥无效或已吊销）: openai", "1 次调用中 1 次失败（告警阈值 1）"),
    ("ko", "[심각] 인증 실패 (잘못되었거나 폐기된 키): openai", "호출 1건 중 1건 실패 (알림 기준 1)"),
])
def test_an_alert_in_each_language(sqlite_url, make_tally, language, title, line):
    from llmtally._alerts.message import from_fired

    received: list = []
    tally = _auth_alert(make_tally, sqlite_url, language, received)
    fired = tally.check_alerts()
    message = from_fired(fired[0], language=language)
    assert message.title == title
    assert message.lines[0].startswith(line)
    assert received[0]["subject"] == "openai"  # the data stays the same in any language


def test_a_budget_warning_in_korean():
    from llmtally._budgets.guard import budget_message

    budget = Budget(requests=2, per="day", warn_at=(0.5,))
    message = budget_message("threshold", budget, {}, {"threshold": 0.5, "used": 1.0}, "ko")
    assert message.title == "[경고] 예산 requests 2/day: 50% 도달 (모든 호출)"
    assert message.lines == ("2 requests 중 1 requests 사용", "초기화 없음")


def test_language_is_checked_and_read_from_the_environment(sqlite_url, tmp_path):
    with pytest.raises(ConfigError, match="language"):
        Tally(sqlite_url, language="fr")
    assert Tally(sqlite_url, language="zh-CN").language == "zh"
    tally = Tally(sqlite_url)
    tally.record(provider="openai", model="gpt-4o-mini", status="error",
                 error_type="litellm.RateLimitError")
    tally.close()
    done = subprocess.run([sys.executable, "-m", "llmtally.cli", "status", "--db", sqlite_url],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LLMTALLY_LANGUAGE": "ko"})
    assert done.returncode == 0, done.stderr
    header = done.stdout.splitlines()[0].split()
    assert header[:3] == ["제공자", "상태", "전송"]
    assert "저하" in done.stdout  # degraded: one call, rate limited
    as_json = subprocess.run([sys.executable, "-m", "llmtally.cli", "status", "--db", sqlite_url,
                              "--json"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "LLMTALLY_LANGUAGE": "zh"})
    assert json.loads(as_json.stdout)[0]["state"] == "degraded"  # data is never translated


# -- dates, widths ---------------------------------------------------------------------------


def test_dates_are_written_in_each_languages_order_with_its_own_day_and_month_names():
    from llmtally._i18n import N_, strftime

    monday = datetime(2026, 11, 30, 9, 5)
    assert strftime(monday, N_("%a %d %b"), "en") == "Mon 30 Nov"
    assert strftime(monday, N_("%a %d %b"), "zh") == "11月30日 周一"
    assert strftime(monday, N_("%a %d %b"), "ko") == "11월 30일 (월)"
    assert strftime(monday, N_("%a %d %b %Y %H:%M"), "zh") == "2026年11月30日 周一 09:05"
    assert strftime(monday, N_("%B %Y"), "ko") == "2026년 11월"
    assert strftime(monday, N_("%B %Y"), "en") == "November 2026"
    thursday = datetime(2026, 12, 3)  # a one-digit day has no leading zero in zh and ko
    assert strftime(thursday, N_("%a %d %b"), "zh") == "12月3日 周四"
    assert strftime(thursday, N_("%a %d %b"), "ko") == "12월 3일 (목)"
    assert strftime(thursday, N_("%a %d %b"), "en") == "Thu 03 Dec"


def test_a_table_is_aligned_in_columns_not_characters(sqlite_url, make_tally):
    from llmtally._i18n import display_width

    assert display_width("通义千问") == 8 and display_width("호출") == 4
    assert display_width("e\u0301") == 1  # a combining accent takes no column
    tally = make_tally(sqlite_url)
    for model, calls in (("通义千问-max", 3), ("tiny", 12)):
        for _ in range(calls):
            tally.record(provider="internal", model=model, input_tokens=10, output_tokens=2)
    tally.close()
    done = subprocess.run([sys.executable, "-m", "llmtally.cli", "summary", "--db", sqlite_url],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LLMTALLY_LANGUAGE": "ko"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header, rule, rows = lines[0], lines[1], lines[2:5]
    assert header.split()[:3] == ["모델", "호출", "오류"]
    assert [row.split()[0] for row in rows] == ["tiny", "通义千问-max", "합계"]
    # every row has an unpriced count in its last column: each ends where the rule ends
    assert {display_width(line) for line in (header, *rows)} == {display_width(rule)}
    assert [row.split()[1] for row in rows] == ["12", "3", "15"]


# -- the report and the dashboard ------------------------------------------------------------

NOV_25 = datetime(2026, 11, 25, 10, 7, tzinfo=timezone.utc)


@pytest.fixture
def three_reports(sqlite_url, make_tally):
    """The same ledger's report for last week, rendered in each language."""
    from llmtally._reporting.render import render_html
    from llmtally._reporting.report import build_report
    from llmtally._sample import record_history

    pages = {}
    for language in LANGUAGES:
        tally = make_tally(sqlite_url, clock=lambda: NOV_25, language=language,
                           budgets=[Budget(usd=20, per="month", warn_at=(0.5,))])
        if language == "en":
            record_history(tally, NOV_25 - timedelta(days=15), NOV_25, count=900)
            tally.record(provider="internal", model="no-price-model", input_tokens=5,
                         ts=NOV_25 - timedelta(days=3))
        tally.flush()
        report = build_report(tally, week="last")
        pages[language] = (report, render_html(report))
    return pages


def _catalog_messages(language: str) -> list[str]:
    """The English text of every message of ``language``'s catalog (what the page would show
    if any of them were left untranslated, or written in a template without being marked)."""
    from babel.messages.pofile import read_po

    with open(LOCALE_DIR / language / "LC_MESSAGES" / "llmtally.po", "rb") as handle:
        return [message.id for message in read_po(handle) if message.id]


def _visible_text(document: str) -> str:
    body = document[document.index("<body"):]
    body = re.sub(r"<[^>]+>", " ", body)
    import html

    return " ".join(html.unescape(body).split())


def test_the_report_is_in_the_tallys_language_with_the_same_figures(three_reports):
    from test_report import parse  # the report tests' own reader

    english = parse(three_reports["en"][1])
    for language in ("zh", "ko"):
        report, document = three_reports[language]
        _ = translator(language)
        page = parse(document)
        assert f'<html lang="{language}">' in document
        # every figure is the same: each element's data-value, and each headline figure shown
        values = {k: v.get("data-value") for k, v in page.by_id.items() if "data-value" in v}
        assert values == {k: v.get("data-value") for k, v in english.by_id.items()
                          if "data-value" in v} and len(values) >= 8
        for key in ("headline-cost", "headline-calls", "headline-tokens", "headline-error-rate"):
            assert page.text_by_id[key] == english.text_by_id[key]
        # the headings are the catalog's, the dates use the language's names
        for heading, text in (("h-budgets", "Budgets"), ("h-errors", "Errors by provider"),
                              ("h-costly", "Most expensive calls"),
                              ("h-provider", "Cost by provider"), ("h-trend", "Cost per day")):
            assert page.text_by_id[heading] == _(text) != text
        assert ("周一" if language == "zh" else "(월)") in page.text_by_id["period"]
        # no English sentence of the templates is left on the page
        shown = _visible_text(document)
        left = []
        for message in _catalog_messages(language):
            prose = re.sub(r"<code>.*?</code>|%\(\w+\)s|<[^>]+>", "|", message)
            for run in re.findall(r"[A-Za-z][A-Za-z ,'-]{11,}", prose):
                if _(message) != message and run.strip() in shown:
                    left.append(run)
        assert left == []
        assert report.headline_lines()[0].startswith(_("period"))


def test_the_dashboard_is_in_the_tallys_language(sqlite_url, make_tally):
    from test_report import parse

    from llmtally._serve.dashboard import render_dashboard
    from llmtally._serve.source import LedgerView

    tally = make_tally(sqlite_url, clock=lambda: NOV_25, language="zh")
    tally.record(provider="openai", model="gpt-4o-mini", input_tokens=10, output_tokens=3,
                 ts=NOV_25 - timedelta(minutes=5))
    tally.record(provider="openai", model="gpt-4o-mini", status="error",
                 error_type="litellm.RateLimitError", ts=NOV_25 - timedelta(minutes=4))
    tally.flush()
    document = render_dashboard(LedgerView(tally), {"period": "today"}, root="",
                                refresh_seconds=30)
    page = parse(document)
    assert page.text_by_id["h-recent"] == "最近的调用"
    assert page.text_by_id["h-now"] == "提供商当前状态"
    assert "今天" in document and "本周" in document
    # the status filter still sends the stored value, shown translated
    assert '<option value="error">错误</option>' in document
    assert "降级" in page.text_by_id["channels"]  # degraded: a 429 in two calls
    assert "gpt-4o-mini" in page.text_by_id["recent-calls"]


def test_the_report_command_prints_its_headline_in_the_language(sqlite_url, make_tally,
                                                                 tmp_path):
    tally = make_tally(sqlite_url)
    tally.record(provider="openai", model="gpt-4o-mini", input_tokens=1_000, output_tokens=50)
    tally.close()
    done = subprocess.run([sys.executable, "-m", "llmtally.cli", "report", "--db", sqlite_url,
                           "--since", "1d", "-o", str(tmp_path / "r.html")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LLMTALLY_LANGUAGE": "zh"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:6]] == ["周期", "费用", "调用", "token", "缓存节省"]
    assert "1（新增）" in lines[3]  # one call, none before
    assert '<html lang="zh">' in (tmp_path / "r.html").read_text()


@pytest.mark.parametrize("language", ["en", "zh"])
def test_a_stored_status_that_is_not_one_of_ours_is_shown_escaped_as_it_is(
        sqlite_url, make_tally, language):
    """record() and import keep status to ok/error/blocked, but another writer of a shared
    ledger may not: such a value is data, never a message (``_()`` would mark it safe HTML
    and %-format it)."""
    from sqlalchemy import create_engine

    from llmtally._serve.dashboard import render_dashboard
    from llmtally._serve.source import LedgerView
    from llmtally._storage.store import normalize_url

    tally = make_tally(sqlite_url, clock=lambda: NOV_25, language=language)
    for minutes in (5, 4, 3):
        tally.record(provider="openai", model="gpt-4o-mini", input_tokens=10,
                     output_tokens=3, ts=NOV_25 - timedelta(minutes=minutes))
    tally.flush()
    engine = create_engine(normalize_url(sqlite_url))
    with engine.begin() as conn:
        ids = [row[0] for row in conn.exec_driver_sql("SELECT id FROM llmtally_events ORDER BY ts")]
        for status, event_id in zip(("<b id=pwn>x</b>", "100%", "%d"), ids):
            conn.exec_driver_sql("UPDATE llmtally_events SET status = ? WHERE id = ?",
                                 (status, event_id))
    engine.dispose()
    document = render_dashboard(LedgerView(tally), {"period": "today"}, root="",
                                refresh_seconds=30)
    assert "<b id=pwn>" not in document and "&lt;b id=pwn&gt;x&lt;/b&gt;" in document
    assert ">100%<" in document and ">%d<" in document
