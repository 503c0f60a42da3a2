"""Budget alerts delivered to webhooks: JSON POSTs off the caller's thread, with retries.

A webhook URL often carries a secret (``https://hooks.slack.com/services/T000/B000/XXXX``), so
logs name only its scheme and host. Redirects are not followed: urllib would turn a POST
answered with 301/302/303 into a body-less GET, so the alert would be lost yet look delivered.
A 3xx answer is a failed attempt like a 5xx.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from .._log import warn_limited

__all__ = ["WebhookSender", "is_webhook", "redact_url", "DEFAULT_WEBHOOK_TIMEOUT_S"]

DEFAULT_WEBHOOK_TIMEOUT_S = 5.0
DEFAULT_WEBHOOK_ATTEMPTS = 3  # the first try and 2 retries
_BACKOFF_S = 0.5  # doubled after each failed attempt


def is_webhook(target: object) -> bool:
    return isinstance(target, str) and target.startswith(("http://", "https://"))


def redact_url(url: str) -> str:
    """``https://hooks.example.com/…``: enough to recognise, nothing that authenticates."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/…"


class WebhookSender:
    """Posts alerts on a daemon thread; ``drain()`` waits (bounded) for those queued so far."""

    def __init__(self, *, timeout_s: float = DEFAULT_WEBHOOK_TIMEOUT_S,
                 attempts: int = DEFAULT_WEBHOOK_ATTEMPTS, backoff_s: float = _BACKOFF_S) -> None:
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=10_000)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.delivered = 0
        self.failed = 0

    def send(self, url: str, payload: Mapping[str, Any]) -> None:
        """Queue one POST; never blocks the caller (a full queue drops the alert, logged)."""
        body = json.dumps(payload, default=str).encode("utf-8")
        try:
            self._queue.put_nowait((url, body))
        except queue.Full:
            warn_limited("webhook-full", "llmtally: too many budget alerts queued for %s; "
                         "this one is dropped", redact_url(url))
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="llmtally-webhooks",
                                                daemon=True)
                self._thread.start()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued alert was delivered or given up on."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def _run(self) -> None:
        while True:
            url, body = self._queue.get()
            try:
                self._post(url, body)
            finally:
                self._queue.task_done()

    def _post(self, url: str, body: bytes) -> None:
        import urllib.error  # here, not at import: it loads http.client and ssl
        import urllib.request

        opener = _no_redirect_opener()
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            request = urllib.request.Request(url, data=body, method="POST", headers={
                "Content-Type": "application/json", "User-Agent": "llmtally"})
            try:
                with opener.open(request, timeout=self.timeout_s) as response:
                    if 200 <= response.status < 300:
                        self.delivered += 1
                        return
                    reason = f"HTTP {response.status}"
            except urllib.error.HTTPError as exc:
                reason = f"HTTP {exc.code}"
                if 300 <= exc.code < 400:
                    reason += " redirect, not followed (give the webhook's final URL)"
            except (OSError, ValueError) as exc:  # refused, timed out, bad URL
                reason = type(exc).__name__
            if attempt < self.attempts:
                time.sleep(delay)
                delay *= 2
        self.failed += 1
        warn_limited("webhook", "llmtally: a budget alert could not be delivered to %s (%s, "
                     "%d attempts)", redact_url(url), reason, self.attempts)


def _no_redirect_opener() -> Any:
    """urllib's default opener (proxies from the environment, HTTPS) minus redirects: a 3xx
    answer then raises HTTPError like any other non-2xx."""
    import urllib.request

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    return urllib.request.build_opener(_NoRedirect)
