"""Hostile requests against ``llmtally serve``: what a client of the proxy (who controls names)
or anyone who can reach the port may send. Each test is a defect found in review, or a property
checked and found sound."""

from __future__ import annotations

import base64
import socket
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from serving import served

pytest.importorskip("fastapi", reason="the serve extra: pip install -e '.[serve]'")

NOW = datetime(2026, 11, 25, 10, 0, tzinfo=timezone.utc)
TOKEN = "s3cret-token-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _raw_get(base: str, target: str) -> tuple[int, dict[str, str]]:
    """GET ``target`` exactly as written (httpx would normalise ``//host`` paths)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(head[0].split()[1]), headers


@pytest.mark.parametrize("path", ["//evil.example/x", "/\\evil.example/x", "///evil.example"])
def test_token_redirect_stays_on_this_server(make_tally, path):
    """``/?token=`` redirects to drop the token; a path beginning ``//`` (or ``/\\``) must not
    turn that into a redirect to another host (``Location: //evil.example/x`` is one)."""
    tally = make_tally(clock=lambda: NOW)
    with served(tally.asgi(token=TOKEN)) as base:
        status, headers = _raw_get(base, f"{path}?token={TOKEN}&a=1")
    assert status == 303
    location = headers["location"]
    assert location.startswith("/") and not location.startswith(("//", "/\\")), location
    assert TOKEN not in location


@pytest.mark.parametrize("query", [
    {"model": "\x00"}, {"user": "a\x00b"}, {"project": "\x00"},
])
@pytest.mark.parametrize("endpoint", ["/api/v1/summary", "/api/v1/calls", "/api/v1/errors", "/"])
def test_nul_in_a_filter_is_a_400_not_a_500(ledger_url, make_tally, endpoint, query):
    """PostgreSQL text cannot hold NUL: a filter value with one raised psycopg.DataError (a 500)."""
    tally = make_tally(ledger_url, clock=lambda: NOW)
    tally.record(provider="openai", model="gpt-4o-mini", input_tokens=1, output_tokens=1,
                 ts=NOW - timedelta(hours=1))
    with served(tally.asgi()) as base, httpx.Client(base_url=base) as client:
        got = client.get(endpoint, params=query)
        assert got.status_code == 400, got.text[:300]
        assert client.get("/api/v1/health").status_code == 200  # and it still answers


def test_nul_in_a_cursor_is_a_400(ledger_url, make_tally):
    tally = make_tally(ledger_url, clock=lambda: NOW)
    cursor = base64.urlsafe_b64encode(b"2026-11-25T09:00:00|\x00").decode().rstrip("=")
    with served(tally.asgi()) as base, httpx.Client(base_url=base) as client:
        got = client.get("/api/v1/calls", params={"cursor": cursor})
        assert got.status_code == 400, got.text[:300]


@pytest.mark.parametrize("since", ["499d", "1000d", "3000d", "9000d"])
def test_long_daily_series_in_a_half_hour_zone_is_not_a_500(ledger_url, make_tally, since):
    """In a +05:30 zone every local midnight cuts an hour, each read from the events as one
    more OR'd interval: 1000 days passed MAX_POINTS but broke SQLite ('Expression tree is too
    large'), a 500. Either an answer or a 400 saying why is right."""
    tally = make_tally(ledger_url, clock=lambda: NOW, timezone="Asia/Kolkata")
    tally.record(provider="openai", model="gpt-4o-mini", input_tokens=1, output_tokens=1,
                 ts=NOW - timedelta(hours=1))
    tally.flush()
    with served(tally.asgi()) as base, httpx.Client(base_url=base, timeout=60) as client:
        got = client.get("/api/v1/timeseries", params={"since": since, "step": "day"})
        assert got.status_code in (200, 400), got.text[:300]
        if got.status_code == 200:
            assert sum(point["calls"] for point in got.json()["points"]) == 1


@pytest.mark.parametrize("since", ["2000-01-01", "1950-01-01", "1900-01-01"])
def test_dashboard_over_a_long_period_in_a_half_hour_zone_is_not_a_500(ledger_url, make_tally,
                                                                         since):
    tally = make_tally(ledger_url, clock=lambda: NOW, timezone="Asia/Kolkata")
    tally.record(provider="openai", model="gpt-4o-mini", input_tokens=1, output_tokens=1,
                 ts=NOW - timedelta(hours=1))
    tally.flush()
    with served(tally.asgi()) as base, httpx.Client(base_url=base, timeout=60) as client:
        got = client.get("/", params={"since": since})
        assert got.status_code in (200, 400), got.text[:300]


def test_cursor_pages_with_equal_timestamps_neither_skip_nor_repeat(ledger_url, make_tally):
    """Sound: rows sharing a ts are ordered by id, and the cursor carries both."""
    tally = make_tally(ledger_url, clock=lambda: NOW)
    moment = NOW - timedelta(hours=1)
    ids = [f"same-{i:02d}" for i in range(9)] + ["Same-x", "same-10", "z"]
    for event_id in ids:
        tally.record(provider="openai", model="gpt-4o-mini", input_tokens=1, output_tokens=1,
                     ts=moment, id=event_id)
    tally.flush()
    with served(tally.asgi()) as base, httpx.Client(base_url=base) as client:
        seen: list[str] = []
        cursor = None
        for _ in range(20):
            params = {"since": "1d", "limit": 2, **({"cursor": cursor} if cursor else {})}
            body = client.get("/api/v1/calls", params=params).json()
            seen += [call["id"] for call in body["calls"]]
            cursor = body["next_cursor"]
            if not cursor:
                break
    assert sorted(seen) == sorted(ids) and len(seen) == len(ids)


def test_hostile_names_are_inert_in_html_and_metrics(make_tally):
    """Sound: names, tags, metadata and error types are escaped in the page (datalist options
    included) and in the Prometheus text; links carry them url-encoded."""
    tally = make_tally(clock=lambda: NOW)
    evil = '"><script>alert(1)</script><a href="javascript:alert(1)">'
    tally.record(provider="openai", model=evil, input_tokens=1, output_tokens=1,
                 ts=NOW - timedelta(hours=1), project=evil, user='javascript:alert(1)',
                 status="error", error_type=evil, tags=[evil], metadata={"k": evil}, id=evil)
    tally.flush()
    with served(tally.asgi()) as base, httpx.Client(base_url=base) as client:
        page = client.get("/", params={"period": "today", "model": evil}).text
        assert "<script>" not in page and 'href="javascript:' not in page
        metrics = client.get("/metrics").text
        assert "\n<script" not in metrics
        for line in metrics.splitlines():
            assert line.startswith("#") or "{" in line or line == "" or " " in line


def test_metrics_other_bucket_sums_to_the_ledger(ledger_url, make_tally):
    """Sound: with more projects and models than ``top``, every call and every cent is in a
    kept label or in ``other``."""
    from llmtally._serve.app import create_app

    tally = make_tally(ledger_url, clock=lambda: NOW)
    for index in range(30):
        tally.record(provider="openai", model="gpt-4o-mini" if index % 2 else "gpt-4o",
                     input_tokens=1000 * (index + 1), output_tokens=10, project=f"p{index}",
                     ts=NOW - timedelta(hours=index + 1))
    tally.flush()
    with served(create_app(tally, metrics_top=3)) as base, httpx.Client(base_url=base) as client:
        text = client.get("/metrics").text
        summary = client.get("/api/v1/summary", params={"since": "100d"}).json()["total"]
    calls = [line for line in text.splitlines() if line.startswith("llmtally_calls_total{")]
    projects = {line.split('project="')[1].split('"')[0] for line in calls}
    assert len(projects) == 4 and "other" in projects
    assert sum(float(line.rsplit(" ", 1)[1]) for line in calls) == summary["calls"] == 30
    cost = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("llmtally_cost_total{"))
    assert cost == pytest.approx(summary["cost"], rel=1e-9)
