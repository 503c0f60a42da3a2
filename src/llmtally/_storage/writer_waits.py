"""Who waits for the writer, and for what: ``flush()`` for every event submitted so far and a
whole cycle of the writer thread, ``submit_and_wait()`` for one event; the writer thread says
what is done (stored, spilled or dropped) and when a cycle ends."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Waits"]


class Waits:
    """The writer's progress (events submitted and done, cycles ended) and those waiting on it."""

    def __init__(self) -> None:
        self._submitted = itertools.count(1)  # next() is atomic under the GIL
        self._last_submitted = 0
        self._done = 0
        self._cycles = 0
        self._done_cond = threading.Condition()
        self._flush_wanted = 0
        # durability="sync": id(row) -> the Event its submitter waits on (rows stay referenced
        # in the queue or the writer's pending list until they are done, so their ids cannot
        # be reused meanwhile)
        self._waiters: dict[int, threading.Event] = {}

    # -- caller side ---------------------------------------------------------------------

    def submitted(self) -> None:
        """One more event was submitted."""
        self._last_submitted = next(self._submitted)

    def expect(self, row: dict[str, Any]) -> threading.Event:
        """The Event set once ``row`` is done (call before submitting it)."""
        done = threading.Event()
        self._waiters[id(row)] = done
        return done

    def forget(self, row: dict[str, Any]) -> None:
        """Its submitter stopped waiting for ``row``."""
        self._waiters.pop(id(row), None)

    def flush(self, wake: threading.Event, alive: Callable[[], bool],
              timeout: float | None) -> bool:
        """Wait until every event submitted so far is done and a whole cycle ran after this
        call, setting ``wake`` for the writer thread; False if ``timeout`` (seconds) ran out
        first or the thread is not ``alive``."""
        target = self._last_submitted
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._done_cond:
            self._flush_wanted += 1
            # A whole cycle must start after this call: it also replays any spill backlog.
            cycle_target = self._cycles + 2
        wake.set()
        try:
            with self._done_cond:
                while self._done < target or self._cycles < cycle_target:
                    if not alive():
                        return False
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    wake.set()  # the writer may have cleared it before our cycle began
                    self._done_cond.wait(0.05 if remaining is None else min(remaining, 0.05))
            return True
        finally:
            with self._done_cond:
                self._flush_wanted -= 1

    # -- writer thread -------------------------------------------------------------------

    @property
    def flushing(self) -> bool:
        """Someone waits in ``flush()``."""
        return self._flush_wanted > 0

    @property
    def waited_on(self) -> bool:
        """Someone waits for one event (``submit_and_wait()``)."""
        return bool(self._waiters)

    def dropped(self) -> None:
        """A deferred event that could not be built is done with (flush must not wait for it)."""
        with self._done_cond:
            self._done += 1
            self._done_cond.notify_all()

    def mark_done(self, rows: list[dict[str, Any]]) -> None:
        """``rows`` are in the ledger or the spill file (or set aside as rejected)."""
        with self._done_cond:
            self._done += len(rows)
            self._done_cond.notify_all()
        if self._waiters:
            for row in rows:
                waiter = self._waiters.pop(id(row), None)
                if waiter is not None:
                    waiter.set()

    def cycle_ended(self) -> None:
        with self._done_cond:
            self._cycles += 1
            self._done_cond.notify_all()
