"""Alert sinks against loopback receivers: each vendor's payload shape as its documentation
gives it, Feishu/Lark and DingTalk signatures checked the way their servers check them, names
from the ledger unable to mention a channel or forge a link, e-mail over a real SMTP server, a
failing sink retried with back-off and logged once, never blocking a call, and no secret of a
sink URL in any log line."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from llmtally import AlertRule, ConfigError, Tally
from llmtally._notify.courier import Courier
from llmtally._notify.message import AlertMessage
from llmtally._notify.notifier import Notifier
from llmtally._notify.sinks import request_for, sink_of

NOW = datetime(2026, 11, 25, 10, 7, tzinfo=timezone.utc)
SECRET = "SEC-robot-secret-42"
HOSTILE = "<!channel> @everyone [click](https://evil.example) <https://evil.example|x> *bold*"


class Receiver:
    """A loopback HTTP server that keeps every request (path, query, headers, JSON body)."""

    def __init__(self, status: int = 200) -> None:
        self.requests: list[dict] = []
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                parts = urlsplit(self.path)
                received.append({"path": parts.path, "query": parse_qs(parts.query),
                                 "headers": dict(self.headers), "body": json.loads(body)})
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(status: int = 200) -> Receiver:
        made.append(Receiver(status))
        return made[-1]

    yield make
    for server in made:
        server.close()


MESSAGE = AlertMessage("critical", f"[CRITICAL] error rate: {HOSTILE}",
                       ("60% of 20 calls failed (alert at 20%)", "since 2026-11-25 09:52 UTC"),
                       {"kind": "rule", "subject": HOSTILE}, "https://llm.example/dashboard")


def _deliver(sink) -> None:
    notifier = Notifier([sink])
    notifier.notify(MESSAGE)
    assert notifier.drain(20)
    assert notifier.courier.delivered == 1


def test_slack_blocks_with_mentions_and_links_escaped(receiver):
    hook = receiver()
    _deliver({"type": "slack", "url": f"{hook.base}/services/T0/B0/XXXX"})
    body = hook.requests[0]["body"]
    assert [block["type"] for block in body["blocks"]] == ["header", "section", "context"]
    assert body["blocks"][0]["text"]["type"] == "plain_text"  # the title: no markup at all
    parsed = [body["text"], body["blocks"][1]["text"]["text"]]  # the fields Slack reads as mrkdwn
    assert "&lt;!channel&gt;" in body["text"] and "<!channel>" not in " ".join(parsed)
    assert "<https://evil.example|x>" not in " ".join(parsed)
    assert body["blocks"][2]["elements"][0]["text"] == "<https://llm.example/dashboard|open>"


def test_discord_mentions_nobody(receiver):
    hook = receiver()
    _deliver({"type": "discord", "url": f"{hook.base}/api/webhooks/1/abc"})
    body = hook.requests[0]["body"]
    assert body["allowed_mentions"] == {"parse": []}
    assert body["embeds"][0]["color"] == 0xB42318 and body["embeds"][0]["url"].startswith("https://llm")
    assert body["content"].startswith("[CRITICAL]")


def test_teams_adaptive_card(receiver):
    hook = receiver()
    _deliver({"type": "teams", "url": f"{hook.base}/workflows/x"})
    body = hook.requests[0]["body"]
    assert body["type"] == "message"
    card = body["attachments"][0]
    assert card["contentType"] == "application/vnd.microsoft.card.adaptive"
    assert card["content"]["type"] == "AdaptiveCard"
    texts = [block["text"] for block in card["content"]["body"]]
    assert "\\[click\\]\\(https://evil\\.example\\)" in texts[0]  # markdown made literal
    assert card["content"]["actions"][0]["url"] == "https://llm.example/dashboard"


@pytest.mark.parametrize("kind", ["feishu", "lark"])
def test_feishu_and_lark_signed_as_their_servers_check(receiver, kind):
    hook = receiver()
    before = int(time.time())
    _deliver({"type": kind, "url": f"{hook.base}/open-apis/bot/v2/hook/abc", "secret": SECRET})
    body = hook.requests[0]["body"]
    assert body["msg_type"] == "text" and body["content"]["text"].startswith("[CRITICAL]")
    stamp = int(body["timestamp"])
    assert before <= stamp <= int(time.time())
    key = f"{stamp}\n{SECRET}".encode()
    assert body["sign"] == base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()


def test_feishu_without_a_secret_is_not_signed(receiver):
    hook = receiver()
    _deliver({"type": "feishu", "url": f"{hook.base}/open-apis/bot/v2/hook/abc"})
    assert set(hook.requests[0]["body"]) == {"msg_type", "content"}


def test_dingtalk_signed_in_the_query_string(receiver):
    hook = receiver()
    _deliver({"type": "dingtalk", "url": f"{hook.base}/robot/send?access_token=TOKEN123",
              "secret": SECRET})
    request = hook.requests[0]
    assert request["query"]["access_token"] == ["TOKEN123"]
    stamp = request["query"]["timestamp"][0]
    assert abs(int(stamp) - time.time() * 1000) < 60_000
    expected = base64.b64encode(hmac.new(SECRET.encode(), f"{stamp}\n{SECRET}".encode(),
                                         hashlib.sha256).digest()).decode()
    assert request["query"]["sign"] == [expected]  # parse_qs undid the URL-encoding
    assert request["body"] == {"msgtype": "text", "text": {"content": MESSAGE.text}}


def test_wecom_group_robot(receiver):
    hook = receiver()
    _deliver({"type": "wecom", "url": f"{hook.base}/cgi-bin/webhook/send?key=KEY"})
    assert hook.requests[0]["body"] == {"msgtype": "text", "text": {"content": MESSAGE.text}}


def test_a_plain_url_is_recognised_by_its_host():
    assert sink_of("https://hooks.slack.com/services/T/B/X").type == "slack"
    assert sink_of("https://discord.com/api/webhooks/1/x").type == "discord"
    assert sink_of("https://open.feishu.cn/open-apis/bot/v2/hook/x").type == "feishu"
    assert sink_of("https://open.larksuite.com/open-apis/bot/v2/hook/x").type == "lark"
    assert sink_of("https://oapi.dingtalk.com/robot/send?access_token=x").type == "dingtalk"
    assert sink_of("https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=x").type == "wecom"
    assert sink_of("https://prod-01.westus.logic.azure.com/workflows/x").type == "teams"
    assert sink_of("https://hooks.slack.com.evil.example/services/x").type == "webhook"
    assert sink_of("https://example.com/hook").type == "webhook"
    url, body = request_for(sink_of("https://example.com/hook"), MESSAGE)
    assert body == MESSAGE.data  # the generic webhook gets the alert's data


def test_email_over_smtp(tmp_path):
    from aiosmtpd.controller import Controller

    got: list = []

    class Keep:
        async def handle_DATA(self, server, session, envelope):  # noqa: N802
            got.append(envelope)
            return "250 OK"

    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(Keep(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        _deliver({"type": "email", "host": "127.0.0.1", "port": port,
                  "sender": "llm@example.com", "to": ["oncall@example.com", "b@example.com"]})
    finally:
        controller.stop()
    assert got[0].rcpt_tos == ["oncall@example.com", "b@example.com"]
    text = got[0].content.decode()
    assert "Subject: [CRITICAL] error rate:" in text and "60% of 20 calls failed" in text
    assert "\r\nSubject" not in text.split("Subject", 1)[1][:200]  # one header line


@pytest.mark.parametrize("table, says", [
    ({"type": "slak", "url": "https://x.example"}, "type='slak'"),
    ({"type": "slack"}, "needs url"),
    ({"type": "email", "host": "smtp.example"}, "needs host, sender and to"),
    ({"type": "email", "host": "h", "sender": "a@b", "to": "c@d", "port": 0}, "port=0"),
    ({"type": "feishu", "url": "https://open.feishu.cn/x", "secret": ""}, "secret must be"),
    ({"type": "slack", "url": "https://hooks.slack.com/x", "token": "t"}, "unknown key 'token'"),
])
def test_a_bad_sink_is_refused_naming_the_field_and_not_its_secret(sqlite_url, table, says):
    with pytest.raises(ConfigError) as caught:
        Tally(sqlite_url, alerts=["log", table])
    assert says in str(caught.value) and "alerts[1]" in str(caught.value)
    assert "SEC-" not in str(caught.value)


def test_a_failing_sink_is_retried_logged_once_and_never_blocks_a_call(receiver, sqlite_url,
                                                                       caplog, make_tally):
    hook = receiver(status=500)
    caplog.set_level(logging.WARNING, logger="llmtally")
    url = f"{hook.base}/services/T0/B0/SEC-secret-path"
    courier = Courier(timeout_s=5, attempts=3, backoff_s=0.05)
    notifier = Notifier([url], courier=courier)
    started = time.perf_counter()
    for _ in range(5):
        notifier.notify(MESSAGE)
    assert time.perf_counter() - started < 0.05  # queued, not sent, on the caller's thread
    assert notifier.drain(30)
    assert (courier.delivered, courier.failed) == (0, 5)
    assert len(hook.requests) == 15  # 3 attempts each
    lines = [r.getMessage() for r in caplog.records if "could not be delivered" in r.getMessage()]
    assert len(lines) == 1 and "3 attempts" in lines[0] and "HTTP 500" in lines[0]
    assert "SEC-" not in caplog.text and "/services/" not in caplog.text


def test_rule_alerts_and_budget_alerts_reach_the_same_sinks(receiver, sqlite_url, make_tally):
    from llmtally import Budget

    hook = receiver()
    tally = make_tally(sqlite_url, clock=lambda: NOW,
                       alert_rules=[AlertRule("auth_failure")],
                       budgets=[Budget(requests=2, per="day", warn_at=(0.5,))],
                       alerts=[{"type": "slack", "url": f"{hook.base}/services/T/B/X"}],
                       dashboard_url="https://llm.example/")
    tally.record(provider="openai", model="gpt-4o-mini", status="error",
                 error_type="litellm.AuthenticationError", ts=NOW - timedelta(minutes=1))
    assert len(tally.check_alerts()) == 1
    held = tally.reserve(model="gpt-4o-mini", provider="openai", input_tokens=1, max_tokens=1)
    tally.record(provider="openai", model="gpt-4o-mini", input_tokens=1, output_tokens=1,
                 reservation=held)
    assert tally.flush(20)
    assert tally.notifier.drain(20)
    titles = sorted(r["body"]["blocks"][0]["text"]["text"] for r in hook.requests)
    assert titles == ["[CRITICAL] authentication failures (invalid or revoked key): openai",
                      "[WARNING] budget requests 2/day: 50% reached (all calls)"]
    rule = next(r["body"] for r in hook.requests if "authentication" in r["body"]["text"])
    assert "https://llm.example/" in json.dumps(rule)
