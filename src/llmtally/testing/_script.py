"""What the fake provider answers and what it was asked: the token counts it reports
(:class:`FakeUsage`), scripted tool calls (:class:`FakeToolCall`), and the :class:`Script`
that the request handlers read and :class:`~llmtally.testing.FakeProvider`'s methods set."""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._provider import FakeProvider

__all__ = ["FakeUsage", "FakeToolCall", "Reply", "Script"]


@dataclass
class FakeUsage:
    """Token counts that the next responses report.

    OpenAI semantics: ``cached_tokens`` is part of ``prompt_tokens`` and ``reasoning_tokens`` is
    part of ``completion_tokens``. Anthropic semantics: ``input_tokens`` = ``prompt_tokens`` and
    the two cache counts come *on top* of it, as the real API reports them.
    """

    prompt_tokens: int = 12
    completion_tokens: int = 5
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cache_creation_tokens: int = 0
    cache_read_tokens: int = 0

    def openai(self) -> dict[str, Any]:
        """The OpenAI ``usage`` object."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens, "audio_tokens": 0},
        }

    def anthropic(self) -> dict[str, Any]:
        """The Anthropic Messages ``usage`` object."""
        return {
            "input_tokens": self.prompt_tokens,
            "output_tokens": self.completion_tokens,
            "cache_creation_input_tokens": self.cache_creation_tokens,
            "cache_read_input_tokens": self.cache_read_tokens,
        }


@dataclass(frozen=True)
class FakeToolCall:
    """A tool call in a scripted reply (:meth:`FakeProvider.queue_replies`): the fake model
    asks for tool ``name`` with ``arguments`` (sent as JSON), as OpenAI ``tool_calls`` or an
    Anthropic ``tool_use`` block."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: str | None = None


Reply = str | tuple[FakeToolCall, ...]

_REDACTED = {"authorization", "x-api-key", "api-key"}


class Script:
    """A FakeProvider's state, shared under one lock by the caller's thread and the handler
    threads: the requests counted and logged, and what comes next (injected failures, delay,
    stream cut, queued replies). ``provider`` holds ``usage``, ``reply`` and
    ``resolved_model``, which tests set at any time."""

    def __init__(self, provider: FakeProvider) -> None:
        self.provider = provider
        self._lock = threading.Lock()
        self.stopping = threading.Event()  # set by stop(): wakes handlers sleeping in a delay
        self._ids = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._requests = 0
            self._log: list[dict[str, Any]] = []
            self._fail_left, self._fail_status = 0, 500
            self._fail_body: dict[str, Any] | None = None
            self._delay = 0.0
            self.cut_after: int | None = None
            self._queued: deque[Reply] = deque()

    # -- set by the FakeProvider --

    @property
    def requests(self) -> int:
        with self._lock:
            return self._requests

    def request_log(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._log)

    def fail_next(self, n: int, status: int, body: dict[str, Any] | None) -> None:
        with self._lock:
            self._fail_left, self._fail_status, self._fail_body = n, status, body

    def delay(self, seconds: float) -> None:
        with self._lock:
            self._delay = max(0.0, float(seconds))

    def cut_stream_after(self, chunks: int | None) -> None:
        with self._lock:
            self.cut_after = chunks

    def queue(self, items: list[Reply]) -> None:
        with self._lock:
            self._queued.extend(items)

    # -- used by the handler and the routes --

    def on_request(self, path: str, body: dict[str, Any] | None, headers: Any) -> tuple[int, Any] | None:
        """Count and log a request; return ``(status, body)`` if it must fail."""
        entry = {
            "path": path,
            "model": (body or {}).get("model"),
            "stream": bool((body or {}).get("stream")),
            "headers": {k.lower(): ("***" if k.lower() in _REDACTED else v) for k, v in headers.items()},
            "body": body,
        }
        with self._lock:
            self._requests += 1
            self._log.append(entry)
            if self._fail_left > 0:
                self._fail_left -= 1
                return self._fail_status, self._fail_body
        return None

    def wait_delay(self) -> bool:
        """Sleep for the configured delay; False if stop() interrupted it."""
        with self._lock:
            seconds = self._delay
        return not (seconds and self.stopping.wait(seconds))

    def next_reply(self) -> Reply:
        with self._lock:
            return self._queued.popleft() if self._queued else self.provider.reply

    def resolve(self, body: dict[str, Any]) -> str:
        return self.provider.resolved_model or str(body.get("model") or "fake-model")

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids):06d}"

    @property
    def usage(self) -> FakeUsage:
        return self.provider.usage

    @property
    def reply(self) -> str:
        return self.provider.reply
