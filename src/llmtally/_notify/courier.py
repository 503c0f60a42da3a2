"""Delivering alerts off the caller's thread, with retries: one daemon thread and a bounded
queue of jobs (an HTTP POST, an e-mail), each tried ``attempts`` times with a doubling pause.

A webhook URL often carries a secret (``https://hooks.slack.com/services/T000/B000/XXXX``), so
logs name only its scheme and host. Redirects are not followed: urllib would turn a POST
answered with 301/302/303 into a body-less GET, so the alert would be lost yet look delivered.
A 3xx answer is a failed attempt like a 5xx. A failure is logged at most once a minute.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .._log import warn_limited

__all__ = ["Courier", "Job", "Undelivered", "is_webhook", "redact_url",
           "post", "DEFAULT_WEBHOOK_TIMEOUT_S"]

DEFAULT_WEBHOOK_TIMEOUT_S = 5.0
DEFAULT_WEBHOOK_ATTEMPTS = 3  # the first try and 2 retries
_BACKOFF_S = 0.5  # doubled after each failed attempt
_IDLE_S = 2.0  # the thread ends after this long with nothing to deliver (none left after close)


def is_webhook(target: object) -> bool:
    return isinstance(target, str) and target[:8].lower().startswith(("http://", "https://"))


def redact_url(url: str) -> str:
    """``https://hooks.example.com/…``: enough to recognise, nothing that authenticates."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}/…"


class Undelivered(Exception):
    """One failed attempt; the message says why (never a secret)."""


@dataclass(frozen=True, slots=True)
class Job:
    """Something to deliver: ``attempt()`` (called again on failure) and where, for the log."""

    where: str
    attempt: Callable[[], None]


def post(url: str, body: bytes, headers: Mapping[str, str], timeout_s: float) -> bytes:
    """POST ``body``; raise :class:`Undelivered` unless the answer is a 2xx; return its body."""
    import urllib.error  # here, not at import: it loads http.client and ssl
    import urllib.request

    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "llmtally", **headers})
    try:
        with _no_redirect_opener().open(request, timeout=timeout_s) as response:
            if 200 <= response.status < 300:
                answer: bytes = response.read(65536)
                return answer
            raise Undelivered(f"HTTP {response.status}")
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code}"
        if 300 <= exc.code < 400:
            reason += " redirect, not followed (give the webhook's final URL)"
        raise Undelivered(reason) from None
    except (OSError, ValueError) as exc:  # refused, timed out, bad URL
        raise Undelivered(type(exc).__name__) from None


class Courier:
    """Runs jobs on a daemon thread; ``drain()`` waits (bounded) for those queued so far."""

    def __init__(self, *, timeout_s: float = DEFAULT_WEBHOOK_TIMEOUT_S,
                 attempts: int = DEFAULT_WEBHOOK_ATTEMPTS, backoff_s: float = _BACKOFF_S) -> None:
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=10_000)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.delivered = 0
        self.failed = 0

    def send(self, url: str, payload: Mapping[str, Any]) -> None:
        """Queue one JSON POST of ``payload`` to ``url``."""
        body = json.dumps(payload, default=str).encode("utf-8")

        def attempt() -> None:
            post(url, body, {}, self.timeout_s)

        self.submit(Job(redact_url(url), attempt))

    def submit(self, job: Job) -> None:
        """Queue a job; never blocks the caller (a full queue drops it, logged)."""
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            warn_limited("webhook-full", "llmtally: too many alerts queued for %s; this one is "
                         "dropped", job.where)
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="llmtally-alerts",
                                                daemon=True)
                self._thread.start()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued job was delivered or given up on."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def _run(self) -> None:
        while True:
            try:
                job = self._queue.get(timeout=_IDLE_S)
            except queue.Empty:
                with self._lock:  # submit() starts another thread if a job comes after this
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            try:
                self._deliver(job)
            finally:
                self._queue.task_done()

    def _deliver(self, job: Job) -> None:
        delay = self.backoff_s
        reason = "?"
        for attempt in range(1, self.attempts + 1):
            try:
                job.attempt()
                self.delivered += 1
                return
            except Undelivered as exc:
                reason = str(exc)
            except Exception as exc:  # a sink's own bug must not end the thread
                reason = type(exc).__name__
            if attempt < self.attempts:
                time.sleep(delay)
                delay *= 2
        self.failed += 1
        warn_limited("webhook", "llmtally: an alert could not be delivered to %s (%s, %d "
                     "attempts)", job.where, reason, self.attempts)


def _no_redirect_opener() -> Any:
    """urllib's default opener (proxies from the environment, HTTPS) minus redirects: a 3xx
    answer then raises HTTPError like any other non-2xx."""
    import urllib.request

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    return urllib.request.build_opener(_NoRedirect)
