"""Hostile review of the rule alerts and their sinks: dedup across processes, hostile names
from proxy clients, secrets in settings errors, vendors answering 200 to a refused message,
threads left behind after close."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import Clock

from llmtally import AlertRule, ConfigError, Tally
from llmtally._alerts.evaluate import Finding
from llmtally._alerts.history import alert_id
from llmtally._notify.courier import Courier, Job
from llmtally._notify.message import AlertMessage
from llmtally._notify.sinks import Sink, deliver_once, request_for, sink_of

NOW = datetime(2026, 11, 25, 10, 59, 50, tzinfo=timezone.utc)
AUTH = "litellm.AuthenticationError"


def _message(subject: str) -> AlertMessage:
    return AlertMessage("critical", f"[CRITICAL] error rate: {subject}",
                        (f"rule: error_rate per model {subject}",), {"subject": subject})


# -- dedup ---------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(time, "tzset"), reason="needs time.tzset")
def test_the_dedup_slot_does_not_depend_on_the_process_time_zone(monkeypatch):
    """Two processes on one ledger, one with TZ=UTC and one with TZ=Asia/Kolkata, must agree
    on the alert id of the same finding at the same instant, or both send it."""
    finding = Finding(AlertRule("auth_failure", cooldown="1h"), "openai", 1.0, 1,
                      datetime(2026, 11, 25, 10, 0))
    now = datetime(2026, 11, 25, 10, 40)  # naive UTC, as the monitor passes it
    ids = []
    try:
        for zone in ("UTC", "Asia/Kolkata"):
            monkeypatch.setenv("TZ", zone)
            time.tzset()
            ids.append(alert_id(finding, now))
    finally:
        monkeypatch.undo()
        time.tzset()
    assert ids[0] == ids[1]


def test_the_cooldown_holds_across_a_slot_edge(sqlite_url, make_tally):
    """cooldown=1h: an alert at 10:59:50 must not be sent again 30 s later at 11:00:20."""
    clock = Clock(NOW)
    tally = make_tally(sqlite_url, clock=clock, alerts=[lambda alert: None],
                       alert_rules=[AlertRule("auth_failure", cooldown="1h")])
    tally.record(provider="openai", model="gpt-4o-mini", status="error", error_type=AUTH,
                 ts=NOW - timedelta(minutes=1))
    assert len(tally.check_alerts()) == 1
    clock.now = NOW + timedelta(seconds=30)
    assert tally.check_alerts() == []


# -- hostile names -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["feishu", "lark"])
def test_a_model_name_cannot_at_everyone_on_feishu(kind):
    """Feishu/Lark text messages turn <at user_id="all"></at> into an @all mention."""
    sink = Sink(kind, url="https://open.feishu.cn/open-apis/bot/v2/hook/x")
    _, body = request_for(sink, _message('m<at user_id="all">all</at>'), now=1_700_000_000)
    assert "<at" not in json.dumps(body, ensure_ascii=False)


def test_a_model_name_cannot_forge_a_discord_link():
    """Discord renders [text](url) masked links in webhook content and embed descriptions."""
    sink = Sink("discord", url="https://discord.com/api/webhooks/1/x")
    _, body = request_for(sink, _message("[Open dashboard](https://evil.example/login)"))
    assert "](https://evil.example" not in body["content"]
    assert "](https://evil.example" not in body["embeds"][0]["description"]


# -- secrets in errors ---------------------------------------------------------------------


@pytest.mark.parametrize("url", ["hooks.slack.com/services/T0/B0/SECRETXYZ",
                                 "htps://hooks.slack.com/services/T0/B0/SECRETXYZ"])
def test_a_mistyped_webhook_url_is_not_echoed_by_sink_of(url):
    with pytest.raises(ConfigError) as sink_error:
        sink_of(url)
    assert "SECRETXYZ" not in str(sink_error.value)


@pytest.mark.parametrize("url", ["hooks.slack.com/services/T0/B0/SECRETXYZ",
                                 "htps://hooks.slack.com/services/T0/B0/SECRETXYZ"])
def test_a_mistyped_webhook_url_is_not_echoed_by_tally(url, sqlite_url):
    with pytest.raises(ConfigError) as tally_error:
        Tally(sqlite_url, alerts=[url])
    assert "SECRETXYZ" not in str(tally_error.value)


def test_an_upper_case_scheme_is_a_webhook_like_any_other():
    assert sink_of("HTTPS://hooks.slack.com/services/T0/B0/SECRETXYZ").type == "slack"


# -- vendors answering 200 to a refused message -------------------------------------------


class _Vendor:
    """Answers every POST 200 with ``body`` (as Feishu, DingTalk and WeCom do on failure)."""

    def __init__(self, body: dict) -> None:
        payload = json.dumps(body).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("kind, answer", [
    ("feishu", {"code": 19021, "msg": "sign match fail or timestamp is not within one hour"}),
    ("dingtalk", {"errcode": 310000, "errmsg": "sign not match"}),
    ("wecom", {"errcode": 40058, "errmsg": "content exceed max length"}),
])
def test_a_vendor_refusal_answered_200_is_not_delivered(kind, answer):
    vendor = _Vendor(answer)
    try:
        sink = Sink(kind, url=vendor.url, secret="s3" if kind != "wecom" else None)
        courier = Courier(timeout_s=5, attempts=2, backoff_s=0.01)
        courier.submit(Job(sink.where, lambda: deliver_once(sink, _message("m"), 5)))
        assert courier.drain(20)
        assert (courier.delivered, courier.failed) == (0, 1)
    finally:
        vendor.close()


def test_wecom_text_fits_its_2048_byte_limit():
    sink = Sink("wecom", url="https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=x")
    _, body = request_for(sink, _message("模" * 3000))
    assert len(body["text"]["content"].encode("utf-8")) <= 2048


# -- threads -------------------------------------------------------------------------------


def test_no_delivery_thread_is_left_after_close(tmp_path):
    def couriers() -> int:
        return sum(1 for t in threading.enumerate() if t.name == "llmtally-alerts")

    before = couriers()
    for number in range(3):
        tally = Tally(f"sqlite:///{tmp_path / 'ledger.db'}", price_map="bundled",
                      spill_path=tmp_path / f"spill-{number}.jsonl",
                      alerts=["http://127.0.0.1:9/hook/secret"])
        tally.notifier.notify(_message("m"))
        tally.close()
    deadline = time.monotonic() + 15
    while couriers() > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert couriers() <= before
