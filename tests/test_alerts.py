"""Webhook delivery against real loopback HTTP servers: what counts as delivered."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llmtally._notify.courier import Courier


class _Server:
    """A loopback HTTP server that answers every request with ``status`` (and ``location``),
    and records (method, path, body) of each request it gets."""

    def __init__(self, status: int, location: str | None = None) -> None:
        server = self
        self.requests: list[tuple[str, str, bytes]] = []

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                server.requests.append((self.command, self.path, self.rfile.read(length)))
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_PUT = do_HEAD = _answer  # noqa: N815 - http.server's names

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook/secret-token-42"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def servers():
    made: list[_Server] = []

    def make(status: int, location: str | None = None) -> _Server:
        made.append(_Server(status, location))
        return made[-1]

    yield make
    for server in made:
        server.close()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_a_failed_delivery_retried_and_logged(servers, caplog, status):
    target = servers(204)
    redirector = servers(status, location=target.url)
    caplog.set_level(logging.WARNING, logger="llmtally")
    sender = Courier(timeout_s=5, attempts=3, backoff_s=0.01)
    sender.send(redirector.url, {"event": "blocked", "budget": "usd 1/day"})
    assert sender.drain(20)
    assert (sender.delivered, sender.failed) == (0, 1)
    assert [method for method, _, _ in redirector.requests] == ["POST"] * 3
    assert json.loads(redirector.requests[0][2]) == {"event": "blocked", "budget": "usd 1/day"}
    assert target.requests == []  # the redirect's target never hears of the alert
    assert f"HTTP {status} redirect, not followed" in caplog.text
    assert "could not be delivered" in caplog.text and "3 attempts" in caplog.text
    assert "secret-token" not in caplog.text


def test_a_2xx_answer_is_delivered_once(servers, caplog):
    target = servers(204)
    caplog.set_level(logging.WARNING, logger="llmtally")
    sender = Courier(timeout_s=5, attempts=3, backoff_s=0.01)
    sender.send(target.url, {"event": "threshold", "threshold": 0.8})
    assert sender.drain(20)
    assert (sender.delivered, sender.failed) == (1, 0)
    assert [(m, json.loads(b)) for m, _, b in target.requests] == \
        [("POST", {"event": "threshold", "threshold": 0.8})]
    assert "could not be delivered" not in caplog.text
