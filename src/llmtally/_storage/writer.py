"""The background writer: events leave the caller's thread at once and reach the ledger in batches.

``submit()`` only appends to an in-memory queue. A daemon thread takes what has queued up,
writes it in one transaction per batch, and wakes callers waiting in ``flush()``.

When the database is unreachable the batch waits (retried with backoff); after
``spill_after_s`` seconds, past ``max_pending`` events, or when someone flushes, it goes to the
spill file instead, so ``flush()`` always means "durable": in the ledger or in the spill file.
When the database answers again the spill file is replayed. Rows the database rejects for
their content (not an outage) are written one by one; the few that still fail go to
``<spill>.rejected.jsonl`` and are logged, so one bad row never blocks the others. The same
goes for a row that cannot be serialised, when writing, spilling or replaying: nothing a row
holds can wedge the writer. Every message is rate limited (``warn_limited``).

``submit_and_wait()`` (``durability="sync"``) queues an event the same way, wakes the writer
and waits until *that* event is committed or spilled (fsync'd); events submitted meanwhile by
other threads share the transaction (group commit). While the database is unreachable such
events are spilled at once instead of waiting ``spill_after_s``.

Here: the queue, the writer thread and its outage state. Beside it: writer_waits.py (what
``flush()`` and ``submit_and_wait()`` wait for), writer_spill.py (the spill and rejected files,
replay) and writer_rows.py (rows made storable, or salvaged).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from .._log import warn_limited
from .spill import SpillFile
from .store import InsertHook, Store
from .store_outage import is_outage
from .writer_rows import first_line, json_safe
from .writer_spill import SpillHandoff, insert_one_by_one
from .writer_waits import Waits

__all__ = ["Writer", "DEFAULT_BATCH_SIZE", "DEFAULT_FLUSH_INTERVAL_S", "DEFAULT_MAX_QUEUE"]

DEFAULT_BATCH_SIZE = 1000
DEFAULT_FLUSH_INTERVAL_S = 0.2
DEFAULT_MAX_QUEUE = 100_000
DEFAULT_SPILL_AFTER_S = 5.0
DEFAULT_MAX_PENDING = 10_000
DEFAULT_SYNC_TIMEOUT_S = 10.0  # the longest a durability="sync" record() waits for its event
_RETRY_MIN_S = 0.25
_RETRY_MAX_S = 15.0
_Queued = dict[str, Any] | Callable[[], dict[str, Any] | None]  # a row, or a function that builds it


class Writer:
    """Batches events into ``store`` on a background thread; see the module docstring."""

    def __init__(
        self,
        store: Store,
        spill: SpillFile,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        max_queue: int = DEFAULT_MAX_QUEUE,
        spill_after_s: float = DEFAULT_SPILL_AFTER_S,
        max_pending: int = DEFAULT_MAX_PENDING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.spill = spill
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_queue = max_queue
        self.spill_after_s = spill_after_s
        self.max_pending = max_pending
        self._clock = clock
        # Budgets: charges every batch's new events to the counters in the same transaction.
        self.charges: InsertHook | None = None
        self._start()

    def _start(self) -> None:
        """Fresh state and a new writer thread (at construction, and in a forked child)."""
        self._queue: queue.SimpleQueue[_Queued] = queue.SimpleQueue()
        self._waits = Waits()
        self._wake = threading.Event()
        self._stop = False
        self._pending: list[dict[str, Any]] = []
        self._down_since: float | None = None
        self._next_retry = 0.0
        self._retry_delay = _RETRY_MIN_S
        self.written = 0
        self._handoff = SpillHandoff(self.spill, self._waits.mark_done)
        self._thread = threading.Thread(target=self._run, name="llmtally-writer", daemon=True)
        self._thread.start()

    def restart_after_fork(self) -> None:
        """In a forked child: the parent's writer thread did not survive the fork.

        The child starts empty (the parent's queued events are the parent's to write) with new
        locks (one may have been held at the fork), a new thread and its own connections.
        """
        self.spill.reset_lock()
        self.store.forget_connections()
        self._start()

    # -- caller side ---------------------------------------------------------------------

    def submit(self, row: dict[str, Any] | Callable[[], dict[str, Any] | None]) -> None:
        """Queue one event; never blocks, never raises for a full queue (it spills instead).

        ``row`` may be a function that builds the event: it then runs on the writer thread
        (an integration's way to keep that work off the caller's thread); None or an
        exception from it drops that event, with a warning.
        """
        self._waits.submitted()
        if self._queue.qsize() >= self.max_queue:
            built = row if isinstance(row, dict) else _built(row)
            if built is None:
                self._waits.dropped()
                return
            if self.spill_now([built], reason="the in-memory queue is full"):
                return
            # the disk refused too: keep it queued past the bound rather than drop it
            row = built
        self._queue.put(row)
        # is_set() first: while the writer is busy, setting an already set event (a lock and a
        # notify) cost the caller more than the rest of queueing the event
        if self._queue.qsize() >= self.batch_size and not self._wake.is_set():
            self._wake.set()

    def submit_and_wait(self, row: dict[str, Any], timeout: float = DEFAULT_SYNC_TIMEOUT_S) -> bool:
        """Queue one event and wait until it is in the ledger or fsync'd in the spill file.

        Returns False if that took longer than ``timeout`` seconds (the database hangs and the
        disk refuses the spill file too); the event then stays queued like any other.
        """
        done = self._waits.expect(row)
        self.submit(row)
        self._wake.set()
        if done.wait(timeout):
            return True
        self._waits.forget(row)
        return done.is_set()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event submitted so far is in the ledger or the spill file.

        Returns False if ``timeout`` (seconds) ran out first.
        """
        return self._waits.flush(self._wake, lambda: self._thread.is_alive(), timeout)

    def close(self, timeout: float | None = 10.0) -> bool:
        """Flush and stop the thread. Returns False if events could not be made durable in time."""
        flushed = self.flush(timeout)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
        return flushed

    @property
    def behind(self) -> bool:
        """Events wait because the ledger was found unreachable (and not reached since)."""
        return self._down_since is not None

    def catch_up(self, timeout: float) -> bool:
        """Try the ledger now (not after the retry back-off) and wait for what is queued."""
        self._next_retry = 0.0
        return self.flush(timeout)

    @property
    def queued(self) -> int:
        return self._queue.qsize() + len(self._pending)

    @property
    def spilled(self) -> int:
        """Events kept in the spill file so far (replayed later)."""
        return self._handoff.spilled

    @property
    def rejected(self) -> int:
        """Events kept in the rejected file so far (the database refused them)."""
        return self._handoff.rejected

    # -- writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        self._try_replay()
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            try:
                self._cycle()
            except Exception as exc:  # never let the thread die; the next cycle retries
                warn_limited("writer-error", "llmtally writer: unexpected error (%s: %s); events "
                             "are kept and retried", type(exc).__name__, first_line(exc),
                             level=logging.ERROR, exc_info=True)
            self._waits.cycle_ended()
            if self._stop and self._queue.empty() and not self._pending:
                return

    def _cycle(self) -> None:
        self._drain_queue()
        flushing = self._waits.flushing or self._stop
        settle = flushing or self._waits.waited_on  # someone waits: spill rather than keep waiting
        if self._down_since is not None and self._clock() < self._next_retry:
            if self._pending and (settle or self._must_spill(self._clock())):
                self._spill_pending()
            return
        if self._pending:
            self._write_pending()
        elif self._down_since is not None:
            self._try_replay()  # nothing new to write: probe the ledger with the backlog
        if self._pending and (settle or self._must_spill(self._clock())):
            self._spill_pending()
        elif flushing and self._down_since is None:
            self._try_replay()

    def _drain_queue(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            row = item if isinstance(item, dict) else _built(item)
            if row is None:
                self._waits.dropped()
                continue
            self._pending.append(row)

    def _must_spill(self, now: float) -> bool:
        return len(self._pending) >= self.max_pending or (
            self._down_since is not None and now - self._down_since >= self.spill_after_s)

    def _write_pending(self) -> None:
        while self._pending:
            batch = self._pending[: self.batch_size]
            outage: BaseException | None = None
            try:
                self._insert(batch)
                handled = len(batch)
            except Exception as exc:
                if is_outage(exc):
                    self._note_outage(exc)
                    return
                handled, bad, outage = insert_one_by_one(batch, self._insert)
                self._handoff.reject(bad)
            del self._pending[:handled]
            self._waits.mark_done(batch[:handled])
            if outage is not None:  # the rest of the batch waits, like any batch in an outage
                self._note_outage(outage)
                return
        self._recovered()

    def _recovered(self) -> None:
        self._back_up()
        self._try_replay()

    def _back_up(self) -> None:
        if self._down_since is not None:
            warn_limited("back-up", "llmtally: the ledger %s is reachable again",
                         self.store.display_url)
            self._down_since = None
            self._retry_delay = _RETRY_MIN_S

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        self.store.insert_many([json_safe(row) for row in rows], self.charges)
        self.written += len(rows)

    def _note_outage(self, exc: BaseException) -> None:
        now = self._clock()
        if self._down_since is None:
            self._down_since = now
        cause = first_line(exc)
        if "full" not in cause:
            cause += self.store.full_disk_note()
        warn_limited("outage", "llmtally: cannot write to the ledger %s (%s: %s); %d events wait "
                     "and will be written when it is back (or kept in %s)", self.store.display_url,
                     type(exc).__name__, cause, len(self._pending), self.spill.path)
        self._next_retry = now + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, _RETRY_MAX_S)

    def _spill_pending(self) -> None:
        rows, self._pending = self._pending, []
        if self.spill_now(rows, reason="the ledger is unreachable"):
            return
        self._pending = rows + self._pending  # the disk refused too: keep them in memory

    def spill_now(self, rows: list[dict[str, Any]], *, reason: str) -> bool:
        """Append ``rows`` to the spill file now (fsync'd), saying ``reason`` in the log (rate
        limited). False if the disk refused them too. A row that cannot be written as a spill
        line goes to the rejected file instead; it never holds back the others."""
        return self._handoff.spill_now(rows, reason=reason)

    def _try_replay(self) -> None:
        """Replay spilled events (ours or another process's) once the ledger answers."""
        try:
            if not self.spill.has_backlog():
                return
            self._handoff.replay(self._replay_insert, self.batch_size)
        except Exception as exc:
            if is_outage(exc):
                self._note_outage(exc)
            else:
                warn_limited("replay", "llmtally: could not replay %s (%s: %s); will try again",
                             self.spill.path, type(exc).__name__, first_line(exc))
        else:
            self._back_up()

    def _replay_insert(self, rows: list[dict[str, Any]]) -> None:
        """Spilled events are charged to the budgets when they are stored, like any other
        (ids already stored are skipped, and not charged again)."""
        self.store.insert_many([json_safe(row) for row in rows], self.charges)


def _built(build: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
    """Run a deferred event's builder; a failure loses that one event, loudly."""
    try:
        row = build()
    except Exception as exc:
        warn_limited("deferred", "llmtally: could not build a deferred event (%s: %s)",
                     type(exc).__name__, first_line(exc), exc_info=True)
        return None
    if row is not None and not isinstance(row, dict):
        warn_limited("deferred", "llmtally: a deferred event was built as a %s, not a dict; "
                     "dropped", type(row).__name__)
        return None
    return row
