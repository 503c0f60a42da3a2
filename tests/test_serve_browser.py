"""The dashboard of ``llmtally serve`` in headless Chromium (the system package, as the report's
browser test): it renders the ledger's figures, its filters change them, every value a caller
controls stays text, the Content-Security-Policy holds (no inline style or script runs), and it
fits a phone. Served by the real uvicorn over a real SQLite file."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from serving import served
from test_report import _hostile_ledger
from test_report_browser import CHROMIUM_ARGS, chromium, png_size
from test_serve import _sql

from llmtally._sample import record_history

pytest.importorskip("fastapi", reason="the serve extra: pip install -e '.[serve]'")

NOW = datetime(2026, 11, 25, 10, 0, tzinfo=timezone.utc)
# LLMTALLY_TEST_SCREENSHOT=docs/images/dashboard.png writes the README's picture
SCREENSHOT = os.environ.get("LLMTALLY_TEST_SCREENSHOT")


def _count(url: str, since: datetime, **where: str) -> int:
    clause = "".join(f" AND {name} = :{name}" for name in where)
    return _sql(url, f"SELECT COUNT(*) AS n FROM llmtally_events WHERE ts >= :a AND ts < :b{clause}",
                a=since.replace(tzinfo=None), b=NOW.replace(tzinfo=None), **where)[0]["n"]


def test_dashboard_in_chromium(sqlite_url, make_tally, tmp_path):
    executable = chromium()
    from playwright.sync_api import sync_playwright

    tally = make_tally(sqlite_url, clock=lambda: NOW)
    record_history(tally, NOW - timedelta(days=16), NOW, count=2500)
    _hostile_ledger(tally)  # <script> and <img onerror> in every field a caller controls
    assert tally.flush(20)
    week_ago = NOW - timedelta(days=7)
    dialogs: list[str] = []
    violations: list[str] = []
    foreign: list[str] = []
    with served(tally.asgi(refresh_seconds=120)) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            page.on("console", lambda message: violations.append(message.text)
                    if "Content Security Policy" in message.text else None)
            page.on("request", lambda request: None if request.url.startswith(base)
                    else foreign.append(request.url))
            page.goto(f"{base}/?period=7d", wait_until="load")

            calls = page.locator("#headline-calls")
            assert calls.inner_text() == f"{_count(sqlite_url, week_ago):,}"
            # the stylesheet loaded from the server (style-src 'self'): cards have a border
            border = page.evaluate("getComputedStyle(document.querySelector('.card')).borderTopStyle")
            assert border == "solid"
            assert page.evaluate("document.querySelectorAll('script, [style], [onerror]').length") == 0
            text = page.inner_text("body")
            assert "<script>alert('project')</script>" in text  # shown as text
            assert page.locator("meta[http-equiv=refresh]").get_attribute("content") == "120"
            assert page.locator("#recent-calls tbody tr").count() == 50

            # an inline script or style injected now is refused by the policy
            page.evaluate("""() => { const s = document.createElement('script');
                s.textContent = 'window.ran = 1'; document.body.appendChild(s); }""")
            assert page.evaluate("window.ran") is None

            # filters: project, then status
            page.fill("#filter-project", "search")
            page.click("button[type=submit]")
            page.wait_for_load_state("load")
            assert "project=search" in page.url
            assert calls.inner_text() == f"{_count(sqlite_url, week_ago, project='search'):,}"
            page.select_option("#filter-status", "error")
            page.click("button[type=submit]")
            page.wait_for_load_state("load")
            errors = _count(sqlite_url, week_ago, project="search", status="error")
            assert calls.inner_text() == f"{errors:,}" and errors > 0
            assert page.locator("#recent-calls tbody tr").count() == min(errors, 50)

            # a period link keeps the filters; older calls page on
            page.goto(f"{base}/?period=30d", wait_until="load")
            first = page.locator("#recent-calls tbody tr td code").all_inner_texts()
            page.click("#older")
            page.wait_for_load_state("load")
            second = page.locator("#recent-calls tbody tr td code").all_inner_texts()
            assert len(second) == 50 and not set(first) & set(second)

            phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
            phone.goto(f"{base}/?period=today", wait_until="load")
            overflow = phone.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"the dashboard is {overflow}px wider than a phone"
        finally:
            browser.close()
    assert dialogs == [] and foreign == []
    assert violations and all("script" in v for v in violations)  # only the one injected above


def test_the_readmes_screenshot_of_the_dashboard(sqlite_url, make_tally, tmp_path):
    """The picture in the README: this week on the demo's simulated traffic (set
    LLMTALLY_TEST_SCREENSHOT=docs/images/dashboard.png to write it there)."""
    executable = chromium()
    from playwright.sync_api import sync_playwright

    tally = make_tally(sqlite_url, clock=lambda: NOW)
    record_history(tally, NOW - timedelta(days=16), NOW, count=3000)
    target = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "dashboard.png"
    with served(tally.asgi()) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"{base}/?period=week", wait_until="load")
            page.screenshot(path=str(target))
        finally:
            browser.close()
    width, height = png_size(target.read_bytes())
    assert (width, height) == (1280, 1000) and target.stat().st_size > 40_000
