"""The report in a real browser: headless Chromium (Debian's ``chromium``, which ``.ci/run``
installs) opens the file offline, makes no request besides the file itself, draws it, prints
it, and shows the ledger's SQL totals in the headline. On a phone-sized screen nothing runs off
the side.

Driven by Playwright against the system Chromium (``executable_path``): Playwright's own
browser downloads are never used. Without Chromium (or Playwright) the test is skipped
locally and fails under ``CI=true``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import struct
from datetime import datetime, timedelta, timezone

import pytest
from conftest import IN_CI
from test_report import W47, sql_totals

from llmtally._i18n import translator
from llmtally._reporting.numbers import format_money
from llmtally._sample import record_history

NOW = datetime(2026, 11, 25, 10, 0, tzinfo=timezone.utc)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def chromium() -> str:
    """The system Chromium, or skip (fail under CI) saying what is missing."""
    path = os.environ.get("LLMTALLY_TEST_CHROMIUM") or shutil.which("chromium") or \
        shutil.which("chromium-browser")
    problem = None
    if path is None:
        problem = ("no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")
    else:
        if importlib.util.find_spec("playwright") is None:
            problem = "playwright is not installed; pip install -e '.[dev]'"
    if problem:
        if IN_CI:
            pytest.fail(f"CI=true and {problem}")
        pytest.skip(problem)
    return path  # type: ignore[return-value]


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture
def report_file(tmp_path, make_tally):
    tally = make_tally(f"sqlite:///{tmp_path / 'ledger.db'}", clock=lambda: NOW)
    record_history(tally, NOW - timedelta(days=17), NOW, count=1500)
    written = tally.report(f"{tmp_path / 'report'}/", week="last")
    return written, f"sqlite:///{tmp_path / 'ledger.db'}"


def test_report_renders_offline_in_headless_chromium(report_file, tmp_path):
    executable = chromium()
    from playwright.sync_api import sync_playwright

    path, url = report_file
    totals = sql_totals(url, *W47)
    requests: list[str] = []
    failed: list[str] = []
    console_errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda request: requests.append(request.url))
            page.on("requestfailed", lambda request: failed.append(request.url))
            page.on("console", lambda message: console_errors.append(message.text)
                    if message.type == "error" else None)
            page.goto(path.resolve().as_uri(), wait_until="load")

            assert requests == [path.resolve().as_uri()], requests
            assert failed == [] and console_errors == []
            assert page.title().startswith("LLM usage 2026-W47")
            cost = page.locator("#headline-cost")
            assert float(cost.get_attribute("data-value")) == pytest.approx(totals["cost"], rel=1e-9)
            assert cost.inner_text() == format_money(totals["cost"], "USD")
            assert page.locator("#headline-calls").inner_text() == f"{totals['calls']:,}"
            assert page.locator("#headline-tokens").inner_text() == f"{totals['tokens']:,}"
            # the chart is drawn: one bar per day, with a size
            bars = page.locator("svg.chart rect.now")
            assert bars.count() == 7
            assert all(box["height"] > 0 for box in (bars.nth(i).bounding_box() for i in range(5)))

            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            data = shot.read_bytes()
            width, height = png_size(data)
            assert width == 1280 and height > 2000 and len(data) > 50_000

            pdf = page.pdf(path=str(tmp_path / "report.pdf"))     # print media
            assert pdf.startswith(b"%PDF") and len(pdf) > 20_000

            phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
            phone.goto(path.resolve().as_uri(), wait_until="load")
            overflow = phone.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"the page is {overflow}px wider than a phone"
            phone_shot = phone.screenshot(full_page=True)
            assert png_size(phone_shot)[0] == 390 * int(phone.evaluate("window.devicePixelRatio"))
        finally:
            browser.close()
    assert requests == [path.resolve().as_uri()]


# A realistic long project name: 60 characters, words joined by underscores (no hyphen or space
# for the browser to break at), and a long-ish provider name.
LONG_PROJECT = "customer_onboarding_document_summarisation_pipeline_eu_west2"
LONG_PROVIDER = "vertex_ai-language-models-europe-west4"
# the ids of the two breakdowns the template renders next to each other in a `.grid`
SIDE_BY_SIDE = ("by-provider", "by-project")
MEASURE_SIDE_BY_SIDE = """(wanted) => Array.from(document.querySelectorAll('.grid table.breakdown')).map(table => {
  const wrapper = table.closest('.scroll');
  const header = Array.from(table.querySelectorAll('thead th'))
    .find(th => th.textContent.trim().toLowerCase() === wanted);
  const box = header ? header.getBoundingClientRect() : null;
  const shown = wrapper.getBoundingClientRect();
  return {section: table.closest('section').id, scrollWidth: wrapper.scrollWidth,
          clientWidth: wrapper.clientWidth, wrapperLeft: shown.left, wrapperRight: shown.right,
          header: box && {left: box.left, right: box.right, top: box.top, bottom: box.bottom},
          names: Array.from(table.querySelectorAll('tbody td:first-child .name'))
            .map(name => name.textContent)};
})"""


@pytest.fixture(params=["sample names", "long names", "zh", "ko"])
def breakdown_report(request, tmp_path, make_tally):
    """Last week's report on the sample history; with "long names", plus calls in that week from
    a project with a 60-character name and from a provider with a long name; "zh" and "ko" in
    Chinese and Korean (their headers have other widths)."""
    language = request.param if request.param in ("zh", "ko") else "en"
    tally = make_tally(f"sqlite:///{tmp_path / 'ledger.db'}", clock=lambda: NOW, language=language)
    record_history(tally, NOW - timedelta(days=17), NOW, count=1500)
    if request.param == "long names":
        assert len(LONG_PROJECT) == 60
        tally.record(model="gpt-4o-mini", provider="openai", input_tokens=250_000,
                     output_tokens=60_000, latency_ms=900, project=LONG_PROJECT,
                     ts=datetime(2026, 11, 18, 12, tzinfo=timezone.utc))
        tally.record(model="gemini-2.5-flash", provider=LONG_PROVIDER, input_tokens=90_000,
                     output_tokens=20_000, latency_ms=700, project="research",
                     ts=datetime(2026, 11, 19, 15, tzinfo=timezone.utc))
        tally.flush()
    return tally.report(f"{tmp_path / 'report'}/", week="last"), request.param


def test_side_by_side_breakdowns_fit_a_laptop_and_a_phone(breakdown_report):
    """Cost by provider and Cost by project, next to each other, scroll sideways at no laptop
    width, their "vs previous" column in full view; on a phone nothing runs off the page."""
    executable = chromium()
    from playwright.sync_api import sync_playwright

    path, names = breakdown_report
    vs_previous = translator(names if names in ("zh", "ko") else "en")("vs previous").lower()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            for width in (1280, 1366):
                page = browser.new_page(viewport={"width": width, "height": 900})
                page.goto(path.resolve().as_uri(), wait_until="load")
                tables = page.evaluate(MEASURE_SIDE_BY_SIDE, vs_previous)
                assert [table["section"] for table in tables] == list(SIDE_BY_SIDE)
                first, second = (page.locator(f"#{section}").bounding_box() for section in SIDE_BY_SIDE)
                assert first["y"] == second["y"] and first["x"] + first["width"] <= second["x"], \
                    f"at {width}px the breakdowns are not side by side: {first}, {second}"
                if names == "long names":
                    shown = [name for table in tables for name in table["names"]]
                    assert LONG_PROJECT in shown and LONG_PROVIDER in shown, shown
                for table in tables:
                    where = f"{table['section']} at {width}px"
                    assert table["scrollWidth"] <= table["clientWidth"], \
                        f"{where} scrolls sideways: {table['scrollWidth']}px in {table['clientWidth']}px"
                    header = table["header"]
                    assert header is not None, f"{where}: no 'vs previous' header"
                    assert 0 <= header["left"] and header["right"] <= width, \
                        f"{where}: 'vs previous' at {header}, off a {width}px window"
                    assert table["wrapperLeft"] <= header["left"] and \
                        header["right"] <= table["wrapperRight"] + 0.5, \
                        f"{where}: 'vs previous' at {header}, hidden past its table's edge {table}"
                page.close()

            phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
            phone.goto(path.resolve().as_uri(), wait_until="load")
            page_width = phone.evaluate("document.documentElement.scrollWidth")
            assert page_width <= 390, f"the page is {page_width}px wide on a 390px phone"
            for table in phone.evaluate(MEASURE_SIDE_BY_SIDE, vs_previous):
                assert table["scrollWidth"] <= table["clientWidth"], \
                    f"{table['section']} scrolls sideways on a phone: {table}"
                header = table["header"]
                assert header is not None and 0 <= header["left"] and header["right"] <= 390, table
        finally:
            browser.close()
