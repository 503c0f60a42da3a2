"""``llmtally serve`` / ``Tally.asgi()``: the JSON API, ``/metrics`` and the dashboard, served by
the real uvicorn over a real SQLite file and the real PostgreSQL, read over HTTP.

Every figure is compared with what a plain SQL ``GROUP BY`` over the events (or
``tally.summary()`` and the report, which the ledger tests hold to the events) says."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from serving import served
from sqlalchemy import create_engine, text

from llmtally import Budget
from llmtally._reporting.report import build_report
from llmtally._sample import record_history
from llmtally._serve.source import LedgerView
from llmtally._storage.store import normalize_url

pytest.importorskip("fastapi", reason="the serve extra: pip install -e '.[serve]'")

NOW = datetime(2026, 11, 25, 10, 0, tzinfo=timezone.utc)
SINCE, UNTIL = "2026-11-18T10:00:00+00:00", "2026-11-25T10:00:00+00:00"
TOKEN = "s3cret-token-for-tests-0123456789"


def _sql(url: str, query: str, **params) -> list[dict]:
    engine = create_engine(normalize_url(url))
    try:
        with engine.connect() as conn:
            return [dict(row) for row in conn.execute(text(query), params).mappings()]
    finally:
        engine.dispose()


def _naive(text_moment: str) -> datetime:
    return datetime.fromisoformat(text_moment).astimezone(timezone.utc).replace(tzinfo=None)


@pytest.fixture
def history(ledger_url, make_tally):
    tally = make_tally(ledger_url, clock=lambda: NOW, timezone="Asia/Seoul")
    record_history(tally, NOW - timedelta(days=15), NOW, count=1200)
    return tally, ledger_url


def test_summary_top_timeseries_and_report_equal_the_events(history):
    tally, url = history
    with served(tally.asgi()) as base, httpx.Client(base_url=base) as client:
        for by in ("model", "provider", "project", "user", "status", "day"):
            got = client.get("/api/v1/summary", params={"since": SINCE, "until": UNTIL, "by": by})
            assert got.status_code == 200, got.text
            body = got.json()
            assert body["rows"] == [row.as_dict() for row in tally.summary(
                since=_naive(SINCE), until=_naive(UNTIL), by=by)]
        sql = _sql(url, "SELECT COUNT(*) AS calls, COALESCE(SUM(cost), 0) AS cost, "
                        "SUM(input_tokens) AS input FROM llmtally_events "
                        "WHERE ts >= :a AND ts < :b", a=_naive(SINCE), b=_naive(UNTIL))[0]
        assert body["total"]["calls"] == sql["calls"] > 500
        assert body["total"]["cost"] == pytest.approx(float(sql["cost"]), abs=1e-9)
        assert body["total"]["input_tokens"] == sql["input"]

        report = build_report(LedgerView(tally), since=_naive(SINCE), until=_naive(UNTIL))
        assert report.current.calls == body["total"]["calls"]
        assert report.current.cost == pytest.approx(body["total"]["cost"], abs=1e-9)

        filtered = client.get("/api/v1/summary", params={
            "since": SINCE, "until": UNTIL, "by": "model", "project": "search", "status": "ok"})
        expected = _sql(url, "SELECT COUNT(*) AS calls, COALESCE(SUM(cost), 0) AS cost FROM "
                             "llmtally_events WHERE ts >= :a AND ts < :b AND project = 'search' "
                             "AND status = 'ok'", a=_naive(SINCE), b=_naive(UNTIL))[0]
        assert filtered.json()["total"]["calls"] == expected["calls"] > 0
        assert filtered.json()["total"]["cost"] == pytest.approx(float(expected["cost"]), abs=1e-9)

        top = client.get("/api/v1/top", params={"since": SINCE, "until": UNTIL, "by": "model",
                                                "n": 2}).json()
        assert len(top["rows"]) == 3 and top["rows"][2]["key"] is None
        assert top["rows"][2]["other"] == len(tally.summary(
            since=_naive(SINCE), until=_naive(UNTIL), by="model")) - 2
        assert sum(row["calls"] for row in top["rows"]) == sql["calls"]
        assert sum(row["cost"] for row in top["rows"]) == pytest.approx(float(sql["cost"]), abs=1e-9)

        for step, expected_points in (("day", 8), ("hour", None)):
            series = client.get("/api/v1/timeseries",
                                params={"since": SINCE, "until": UNTIL, "step": step}).json()
            points = series["points"]
            assert sum(p["calls"] for p in points) == sql["calls"]
            assert sum(p["cost"] for p in points) == pytest.approx(float(sql["cost"]), abs=1e-9)
            if expected_points:  # 7 × 24 h from 19:00 Seoul: 8 local days
                assert len(points) == expected_points
                assert all(p["start"].endswith("T00:00:00+09:00") for p in points)
        # the days of the series are Seoul's: the first holds 10:00 UTC .. 15:00 UTC (19:00-24:00)
        first_day = _sql(url, "SELECT COUNT(*) AS n FROM llmtally_events WHERE ts >= :a AND ts < :b",
                         a=_naive(SINCE), b=datetime(2026, 11, 18, 15, 0))[0]["n"]
        assert points and series["points"][0]["calls"] >= 0
        day_series = client.get("/api/v1/timeseries", params={"since": SINCE, "until": UNTIL}).json()
        assert day_series["points"][0]["calls"] == first_day


def test_calls_are_paged_newest_first_without_a_gap_or_a_repeat(history):
    tally, url = history
    expected = [row["id"] for row in _sql(
        url, "SELECT id FROM llmtally_events WHERE ts >= :a AND ts < :b AND project = 'search' "
             "ORDER BY ts DESC, id DESC", a=_naive(SINCE), b=_naive(UNTIL))]
    assert len(expected) > 40
    seen: list[str] = []
    with served(tally.asgi()) as base, httpx.Client(base_url=base) as client:
        cursor = None
        for _ in range(200):
            params = {"since": SINCE, "until": UNTIL, "project": "search", "limit": 17}
            if cursor:
                params["cursor"] = cursor
            page = client.get("/api/v1/calls", params=params).json()
            assert len(page["calls"]) <= 17
            seen += [call["id"] for call in page["calls"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        call = page["calls"][-1]
        assert set(call) >= {"id", "ts", "provider", "model", "cost", "latency_ms", "tags"}
        assert not {"prompt", "messages", "response", "api_key"} & set(call)
        bad = client.get("/api/v1/calls", params={"cursor": "bm90IG91cnM"})
        assert bad.status_code == 400 and "cursor" in bad.json()["error"]
    assert seen == expected


def test_budgets_carry_a_status_from_their_warn_at(ledger_url, make_tally):
    tally = make_tally(ledger_url, clock=lambda: NOW, budgets=[
        Budget(requests=10, per="day", each="user", warn_at=(0.5, 0.8), name="ten a day")])
    for user, calls in (("low", 2), ("warned", 5), ("critical", 8), ("over", 10)):
        for _ in range(calls):  # checked before each call, as a guarded call is
            held = tally.reserve(provider="openai", model="gpt-4o-mini", input_tokens=10,
                                 max_tokens=5, user=user)
            tally.record(provider="openai", model="gpt-4o-mini", input_tokens=10,
                         output_tokens=5, user=user, reservation=held)
    assert tally.flush(20)
    with served(tally.asgi()) as base:
        found = httpx.get(f"{base}/api/v1/budgets").json()["budgets"]
    status = {row["scope"]["user"]: (row["status"], row["used"]) for row in found}
    assert status == {"low": ("normal", 2), "warned": ("warning", 5),
                      "critical": ("critical", 8), "over": ("exceeded", 10)}
    assert all(row["limit"] == 10 and row["resets_at"] for row in found)


def _families(text_body: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {family.name: family for family in text_string_to_metric_families(text_body)}


def test_metrics_parse_and_sum_to_the_ledger_with_bounded_labels(history):
    tally, url = history
    for index in range(12):  # more projects than the label bound
        tally.record(provider="openai", model="gpt-4o-mini", input_tokens=1000 + index,
                     output_tokens=10, project=f"p{index:02d}", ts=NOW - timedelta(hours=1))
    assert tally.flush(20)
    sql = _sql(url, "SELECT COUNT(*) AS calls, COALESCE(SUM(cost), 0) AS cost, "
                    "SUM(output_tokens) AS output, SUM(CASE WHEN cost_status = 'unpriced' THEN 1 "
                    "ELSE 0 END) AS unpriced, COUNT(DISTINCT project) AS projects "
                    "FROM llmtally_events")[0]
    from llmtally._serve.app import create_app

    with served(create_app(tally, metrics_top=5)) as base:
        scraped = httpx.get(f"{base}/metrics")
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain")
    families = _families(scraped.text)
    calls = [s for s in families["llmtally_calls"].samples if s.name == "llmtally_calls_total"]
    assert sum(s.value for s in calls) == sql["calls"]
    cost = [s for s in families["llmtally_cost"].samples if s.name == "llmtally_cost_total"]
    assert sum(s.value for s in cost) == pytest.approx(float(sql["cost"]), abs=1e-9)
    assert {s.labels["currency"] for s in cost} == {"USD"}
    output = [s for s in families["llmtally_tokens"].samples
              if s.name == "llmtally_tokens_total" and s.labels["kind"] == "output"]
    assert sum(s.value for s in output) == sql["output"]
    unpriced = [s for s in families["llmtally_unpriced_calls"].samples
                if s.name == "llmtally_unpriced_calls_total"]
    assert sum(s.value for s in unpriced) == sql["unpriced"] > 0
    projects = {s.labels["project"] for s in calls}
    assert sql["projects"] > 12 and len(projects) <= 6 and "other" in projects
    assert len({s.labels["model"] for s in calls}) <= 6


def test_metrics_show_each_budget_instance(sqlite_url, make_tally):
    tally = make_tally(sqlite_url, clock=lambda: NOW,
                       budgets=[Budget(usd=1, per="month", name="monthly")])
    tally.record(provider="openai", model="gpt-4o-mini", input_tokens=1_000_000, output_tokens=0,
                 ts=NOW - timedelta(hours=1))  # $0.15
    assert tally.flush(20)
    with served(tally.asgi()) as base:
        families = _families(httpx.get(f"{base}/metrics").text)
    used = families["llmtally_budget_used"].samples
    ratio = families["llmtally_budget_used_ratio"].samples
    assert [(s.labels["budget"], s.value) for s in used] == [("monthly", pytest.approx(0.15))]
    assert ratio[0].value == pytest.approx(0.15)
    assert families["llmtally_budget_limit"].samples[0].value == 1


def test_nothing_is_served_but_reads_and_every_response_carries_the_headers(history):
    tally, url = history
    counts = {table: _sql(url, f"SELECT COUNT(*) AS n FROM {table}")[0]["n"]
              for table in ("llmtally_events", "llmtally_rollups", "llmtally_budget_counters")}
    with served(tally.asgi()) as base, httpx.Client(base_url=base) as client:
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            for path in ("/", "/api/v1/summary", "/metrics"):
                answer = client.request(method, path)
                assert answer.status_code == 405, (method, path)
        for path in ("/", "/api/v1/summary", "/api/v1/calls", "/api/v1/budgets", "/metrics",
                     "/api/v1/health", "/api/v1/openapi.json", "/nope", "/static/report.css"):
            answer = client.get(path)
            assert answer.status_code in (200, 404), path
            csp = answer.headers["content-security-policy"]
            assert "default-src 'none'" in csp and "script-src" not in csp
            assert answer.headers["x-content-type-options"] == "nosniff"
            assert answer.headers["x-frame-options"] == "DENY"
        schema = client.get("/api/v1/openapi.json").json()
        assert {"/api/v1/summary", "/api/v1/calls", "/api/v1/budgets", "/api/v1/timeseries",
                "/api/v1/top", "/api/v1/errors", "/api/v1/unpriced", "/api/v1/health"} \
            <= set(schema["paths"])
        assert all(set(item) == {"get"} for item in schema["paths"].values())
        assert client.get("/docs").status_code == 404  # Swagger UI would fetch from a CDN
    assert counts == {table: _sql(url, f"SELECT COUNT(*) AS n FROM {table}")[0]["n"]
                      for table in counts}


HOSTILE = [
    {"since": "99999999999d"}, {"since": "0001-01-01"}, {"since": "9999-12-31"},
    {"since": "7d", "until": "30d"}, {"since": "'; DROP TABLE llmtally_events; --"},
    {"since": "\x00"}, {"since": "7d" * 100}, {"until": "x"}, {"by": "nonsense"},
    {"by": "model; DROP"}, {"limit": "-1"}, {"limit": "10" * 30}, {"limit": "nan"},
    {"n": "0"}, {"n": "1e309"}, {"step": "minute"}, {"status": "<script>"},
    {"cursor": "!!!"}, {"cursor": "A" * 5000}, {"cursor": "MDAwMS0wMS0wMXx4"},
    {"cursor": "OTk5OS0xMi0zMVQyMzo1OTo1OS45OTk5OTl8"}, {"project": "p" * 10_000},
    {"period": "forever"}, {"period": "today", "until": "1d"}, {"since": "0001-01-01", "step": "hour"},
    {"since": "2026-11-31"}, {"since": "2026-02-30T25:61"}, {"model": "\u202e\u0000"},
]


@pytest.mark.parametrize("path", ["/", "/api/v1/summary", "/api/v1/top", "/api/v1/timeseries",
                                  "/api/v1/calls", "/api/v1/errors", "/api/v1/unpriced"])
def test_hostile_query_strings_get_a_4xx_never_a_500(sqlite_url, make_tally, path):
    tally = make_tally(sqlite_url, clock=lambda: NOW)
    tally.record(provider="openai", model="gpt-4o-mini", input_tokens=10, output_tokens=5,
                 ts=NOW - timedelta(hours=2))
    assert tally.flush(20)
    with served(tally.asgi()) as base, httpx.Client(base_url=base) as client:
        for params in HOSTILE:
            started = time.monotonic()
            answer = client.get(path, params=params)
            assert time.monotonic() - started < 5, (path, params)
            assert answer.status_code < 500, (path, params, answer.text[:300])
            assert "Traceback" not in answer.text and 'File "' not in answer.text
        raw = client.get(path + "?since=%ff%fe&by=%00&limit=%")  # not even UTF-8
        assert raw.status_code < 500


def test_a_token_is_required_when_given_and_compared_in_full(sqlite_url, make_tally):
    tally = make_tally(sqlite_url, clock=lambda: NOW)
    with served(tally.asgi(token=TOKEN)) as base, httpx.Client(base_url=base) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {TOKEN[:-1]}"},
                        {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Basic {TOKEN}"}):
            for path in ("/", "/api/v1/summary", "/metrics", "/static/report.css"):
                answer = client.get(path, headers=headers)
                assert answer.status_code == 401, (path, headers)
                assert answer.headers["www-authenticate"] == "Bearer"
        assert client.get("/api/v1/summary", headers={"Authorization": f"Bearer {TOKEN}"}) \
            .status_code == 200
        first = client.get("/", params={"token": TOKEN, "period": "week"}, follow_redirects=False)
        assert first.status_code == 303 and first.headers["location"] == "/?period=week"
        cookie = first.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        assert client.get("/?period=week").status_code == 200  # with the cookie now
    with pytest.raises(Exception, match="at least 16"):
        tally.asgi(token="short")


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "llmtally.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def test_serve_refuses_an_open_address_without_a_token(sqlite_url, make_tally):
    tally = make_tally(sqlite_url)
    tally.record(provider="openai", model="gpt-4o-mini", input_tokens=1, output_tokens=1)
    tally.close()
    for args, env, says in (
            (["--host", "0.0.0.0"], {}, "--token-env"),
            (["--host", "::"], {}, "--token-env"),
            (["--host", "example.com"], {}, "--token-env"),
            (["--token-env", "LLMTALLY_TEST_UNSET_TOKEN"], {}, "not set"),
            (["--host", "0.0.0.0", "--token-env", "T"], {"T": "short"}, "at least 16")):
        done = _cli("serve", "--db", sqlite_url, *args, env=env)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_serve_runs_under_uvicorn_and_answers(sqlite_url, make_tally, tmp_path):
    import socket

    tally = make_tally(sqlite_url)
    tally.record(provider="openai", model="gpt-4o-mini", input_tokens=10, output_tokens=5)
    tally.close()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    import os

    process = subprocess.Popen([sys.executable, "-m", "llmtally.cli", "serve", "--db", sqlite_url,
                                "--port", str(port)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        import time

        deadline = time.monotonic() + 30
        while True:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/summary?since=1d", timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stderr.read()  # type: ignore[union-attr]
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert answer.status_code == 200 and answer.json()["total"]["calls"] == 1
        assert "server" not in answer.headers  # no version banner
    finally:
        process.terminate()
        process.wait(10)
    assert re.search(rf"http://127\.0\.0\.1:{port}/", process.stdout.read())  # type: ignore[union-attr]


def test_mounted_inside_an_existing_app(sqlite_url, make_tally):
    from fastapi import FastAPI

    tally = make_tally(sqlite_url, clock=lambda: NOW)
    tally.record(provider="openai", model="gpt-4o-mini", input_tokens=10, output_tokens=5,
                 ts=NOW - timedelta(minutes=5), project="mounted")
    assert tally.flush(20)
    host = FastAPI()

    @host.get("/")
    def home() -> dict:
        return {"home": True}

    host.mount("/llm", tally.asgi(token=TOKEN))
    with served(host) as base, httpx.Client(base_url=base) as client:
        assert client.get("/").json() == {"home": True}
        auth = {"Authorization": f"Bearer {TOKEN}"}
        page = client.get("/llm/", headers=auth)
        assert page.status_code == 200
        assert 'href="/llm/static/report.css"' in page.text
        assert client.get("/llm/static/report.css", headers=auth).status_code == 200
        assert client.get("/llm/api/v1/summary?since=1d", headers=auth).json()["total"]["calls"] == 1
        first = client.get("/llm/", params={"token": TOKEN}, follow_redirects=False)
        assert first.headers["location"] == "/llm/"
        assert "Path=/llm" in first.headers["set-cookie"]


def test_status_and_alerts_in_the_api_and_on_the_dashboard(ledger_url, make_tally):
    from llmtally import AlertRule

    now = NOW - timedelta(minutes=2)
    tally = make_tally(ledger_url, clock=lambda: NOW, alert_rules=[AlertRule("auth_failure")])
    tally.record(provider="openai", model="gpt-4o-mini", status="error",
                 error_type="litellm.AuthenticationError", ts=now)
    for _ in range(4):
        tally.record(provider="anthropic", model="claude-haiku-4-5", input_tokens=5,
                     output_tokens=5, ts=now)
    fired = tally.check_alerts()
    with served(tally.asgi()) as base, httpx.Client(base_url=base) as client:
        providers = client.get("/api/v1/status").json()["providers"]
        assert [(p["provider"], p["state"], p["sent"]) for p in providers] == \
            [("openai", "down", 1), ("anthropic", "ok", 4)]
        assert client.get("/api/v1/status", params={"window": "1y"}).status_code == 422
        listed = client.get("/api/v1/alerts", params={"open": "true"}).json()["alerts"]
        assert [a["id"] for a in listed] == [fired[0].id]
        assert listed[0]["kind"] == "auth_failure" and listed[0]["severity"] == "critical"
        page = client.get("/", params={"period": "today"}).text
        assert 'id="channels"' in page and "state-down" in page and fired[0].id[:8] in page


def test_metrics_are_a_snapshot_made_again_every_refresh(sqlite_url, make_tally):
    from llmtally._serve.app import create_app

    tally = make_tally(sqlite_url, clock=lambda: NOW)
    tally.record(provider="openai", model="gpt-4o-mini", input_tokens=10, output_tokens=5)
    assert tally.flush(20)

    def calls(base: str) -> float:
        families = _families(httpx.get(f"{base}/metrics").text)
        return sum(s.value for s in families["llmtally_calls"].samples
                   if s.name == "llmtally_calls_total")

    app = create_app(tally, cache_seconds=0, metrics_refresh_seconds=0.3)
    with served(app) as base:
        assert calls(base) == 1
        for _ in range(4):
            tally.record(provider="openai", model="gpt-4o-mini", input_tokens=10, output_tokens=5)
        assert tally.flush(20)
        assert calls(base) == 1  # the snapshot, answered at once
        deadline = time.monotonic() + 10
        while calls(base) != 5:  # made again on its thread
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_answers_are_shared_for_the_cache_seconds_then_made_again(sqlite_url, make_tally):
    tally = make_tally(sqlite_url, clock=lambda: NOW)
    tally.record(provider="openai", model="gpt-4o-mini", input_tokens=10, output_tokens=5,
                 ts=NOW - timedelta(hours=1))
    assert tally.flush(20)
    query = {"since": SINCE, "until": UNTIL}
    with served(tally.asgi(cache_seconds=1.0)) as base, httpx.Client(base_url=base) as client:
        assert client.get("/api/v1/summary", params=query).json()["total"]["calls"] == 1
        tally.record(provider="openai", model="gpt-4o-mini", input_tokens=10, output_tokens=5,
                     ts=NOW - timedelta(hours=1))
        assert tally.flush(20)
        shared = client.get("/api/v1/summary", params=query)
        assert shared.json()["total"]["calls"] == 1  # the answer of a moment ago
        assert shared.headers["content-security-policy"].startswith("default-src 'none'")
        assert client.get("/api/v1/summary", params={**query, "by": "provider"}) \
            .json()["total"]["calls"] == 2  # another question: answered now
        time.sleep(1.2)
        assert client.get("/api/v1/summary", params=query).json()["total"]["calls"] == 2
        assert client.get("/nope").status_code == 404  # not kept
