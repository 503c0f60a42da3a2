"""Sending one alert to every configured target: the log, callables, and sinks (delivered by
the courier thread, so a slow or failing sink never holds up the caller)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .._log import logger, warn_limited
from .courier import DEFAULT_WEBHOOK_TIMEOUT_S, Courier, Job
from .message import AlertMessage
from .sinks import Sink, deliver_once, sink_of

__all__ = ["Notifier", "targets_of"]


def targets_of(given: Sequence[Any], where: str = "alerts") -> tuple[Any, ...]:
    """``"log"``, callables and sinks (URLs and tables become :class:`Sink`), checked."""
    out: list[Any] = []
    for number, target in enumerate(given):
        if target == "log" or callable(target):
            out.append(target)
        else:
            out.append(sink_of(target, f"{where}[{number}]"))
    return tuple(out)


class Notifier:
    """Delivers alerts to ``targets`` (see :func:`targets_of`)."""

    def __init__(self, targets: Sequence[Any], *, timeout_s: float = DEFAULT_WEBHOOK_TIMEOUT_S,
                 courier: Courier | None = None) -> None:
        self.targets = targets_of(targets)
        self.timeout_s = timeout_s
        self.courier = courier or (Courier(timeout_s=timeout_s)
                                   if any(isinstance(t, Sink) for t in self.targets) else None)

    def notify(self, message: AlertMessage, *, log_line: str | None = None) -> None:
        """Log, call and queue ``message``; never raises."""
        for target in self.targets:
            try:
                if target == "log":
                    logger.warning("%s", log_line or message.text.replace("\n", " · "))
                elif isinstance(target, Sink):
                    self._queue(target, message)
                else:
                    call: Callable[[dict[str, Any]], Any] = target
                    call(message.data)
            except Exception as exc:
                warn_limited("alert", "llmtally: an alert target failed (%s: %s)",
                             type(exc).__name__, exc)

    def _queue(self, sink: Sink, message: AlertMessage) -> None:
        assert self.courier is not None  # made when there is a sink
        timeout = self.timeout_s
        self.courier.submit(Job(sink.where, lambda: deliver_once(sink, message, timeout)))

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until the alerts queued so far are delivered (or given up on)."""
        return True if self.courier is None else self.courier.drain(timeout)
