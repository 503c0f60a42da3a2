"""Event ids: unique across processes and hosts without a system call per event.

``uuid4()`` reads the OS random source on every call (a syscall, microseconds in a sandbox).
Instead each process draws 80 random bits once — again in a forked child — and appends a
counter: 32 hex characters, like a UUID's, and as unlikely to collide.
"""

from __future__ import annotations

import itertools
import os
import secrets

__all__ = ["EventIds", "EVENT_IDS"]


class EventIds:
    """``next_id()`` → ``"<20 random hex><12 hex counter>"``."""

    def __init__(self) -> None:
        self._reseed()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._prefix = secrets.token_hex(10)
        self._counter = itertools.count()

    def next_id(self) -> str:
        return f"{self._prefix}{next(self._counter):012x}"


EVENT_IDS = EventIds()
"""The ids of this process's events (and of budget holds, which become event ids)."""
