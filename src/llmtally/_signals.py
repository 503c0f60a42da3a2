"""SIGTERM flushes the ledger before the process goes.

Python's default action for SIGTERM (what ``kill``, ``docker stop``, Kubernetes and systemd
send first) ends the process at once, without ``atexit`` handlers, so the events still queued
in the background writer (at most ``flush_interval_s`` of them) would be lost. When a
``Tally`` is made on the main thread and SIGTERM still has its default action, llmtally
installs one handler that flushes every live Tally (at most ``SIGTERM_FLUSH_TIMEOUT_S``), puts
the default action back and sends SIGTERM again: the process still dies of SIGTERM, as before,
only later by the time the flush took.

An application that handles SIGTERM itself keeps its handler: llmtally never replaces one
(if it is set before the first Tally), and a handler set afterwards simply replaces llmtally's.
Such a handler should leave through ``sys.exit()`` (``atexit`` then flushes) or call
``tally.flush()``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import weakref
from typing import Any, Protocol


class _Flushable(Protocol):
    """A Tally, as far as SIGTERM is concerned."""

    @property
    def closed(self) -> bool: ...

    def flush(self, timeout: float | None = None) -> bool: ...

__all__ = ["flush_on_sigterm", "SIGTERM_FLUSH_TIMEOUT_S"]

SIGTERM_FLUSH_TIMEOUT_S = 5.0  # docker stop / systemd wait 10 s, Kubernetes 30 s, before SIGKILL

_tallies: weakref.WeakSet[_Flushable] = weakref.WeakSet()
_installed = False


def flush_on_sigterm(tally: _Flushable) -> None:
    """Have ``tally`` flushed if the process receives SIGTERM (see the module docstring)."""
    global _installed
    _tallies.add(tally)
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return  # the application handles SIGTERM: leave it alone
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError, AttributeError):  # no signals here (a sub-interpreter, say)
        return
    _installed = True


def _on_sigterm(signum: int, _frame: Any) -> None:
    global _installed
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    _installed = False
    deadline = time.monotonic() + SIGTERM_FLUSH_TIMEOUT_S
    for tally in list(_tallies):
        try:
            if not tally.closed:
                tally.flush(max(0.0, deadline - time.monotonic()))
        except Exception:  # dying anyway: never let a fault of ours change how
            pass
    os.kill(os.getpid(), signum)
