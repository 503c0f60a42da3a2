"""Logging for faults that must never reach the user's call: said once per interval, not per call."""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["logger", "warn_limited", "DEFAULT_LOG_INTERVAL_S"]

logger = logging.getLogger("llmtally")
DEFAULT_LOG_INTERVAL_S = 60.0

_last_said: dict[str, float] = {}
_suppressed: dict[str, int] = {}
_lock = threading.Lock()


def warn_limited(key: str, message: str, *args: object, level: int = logging.WARNING,
                 interval_s: float = DEFAULT_LOG_INTERVAL_S, exc_info: bool = False) -> None:
    """Log ``message`` at most once per ``interval_s`` for ``key``; say how many were held back."""
    now = time.monotonic()
    with _lock:
        last = _last_said.get(key)
        if last is not None and now - last < interval_s:
            _suppressed[key] = _suppressed.get(key, 0) + 1
            return
        _last_said[key] = now
        held_back = _suppressed.pop(key, 0)
    if held_back:
        message += " (%d similar messages suppressed)"
        args = (*args, held_back)
    logger.log(level, message, *args, exc_info=exc_info)
