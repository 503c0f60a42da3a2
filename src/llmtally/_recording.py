"""The recording service: a `CallEvent` becomes a row (normalised, priced, attributed), the
row goes to the writer, and the writer's life follows the process's (flush, close, exit,
fork). `Tally` is a facade over this, the budget guard and the readers."""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import sys
import weakref
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ._events import scope as _scope
from ._events.event import CallEvent, clean_id, event_row
from ._events.ids import EVENT_IDS
from ._log import logger, warn_limited
from ._pricing.book import PriceBook

if TYPE_CHECKING:
    from ._budgets.states import Reservation
    from ._storage.store import Store
    from ._storage.writer import Writer

__all__ = ["Recording", "Closable", "event_id", "default_spill_path", "DEFAULT_EXIT_FLUSH_TIMEOUT_S"]

DEFAULT_EXIT_FLUSH_TIMEOUT_S = 10.0
_ids = EVENT_IDS


def event_id(given: str | None) -> str:
    """The caller's id made safe for any database, or a new one: none given, or nothing left
    of it once cleaned (``""``, NULs), which no database could store as a key."""
    return (None if given is None else clean_id(given)) or _ids.next_id()


def default_spill_path(store: Store) -> Path:
    """Beside a SQLite file; for other databases, in the user's state directory."""
    path: Path | None = getattr(store, "path", None)
    if path is not None:
        return path.with_name(path.name + ".spill.jsonl")
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    digest = hashlib.sha1(store.display_url.encode()).hexdigest()[:12]
    return state / "llmtally" / f"spill-{digest}.jsonl"


class Recording:
    """Owns the store and the writer: records events, flushes and closes.

    ``attribution()`` is the scope in force on the calling thread; ``on_flush`` runs after
    the integrations drained and before the writer flushes, ``on_close`` before the writer
    stops (the budget guard publishes its budgets and delivers its alerts there).
    """

    def __init__(self, store: Store, writer: Writer, *, prices: PriceBook, sync: bool,
                 spill_path: Path, clock: Callable[[], datetime],
                 attribution: Callable[[], _scope.Attribution]) -> None:
        self.store, self.writer, self.prices = store, writer, prices
        self.sync, self.spill_path = sync, spill_path
        self.clock, self.attribution = clock, attribution
        self.closed = False
        self._closing = False
        # Run before each flush (and so at exit): integrations drain their own buffers here,
        # e.g. LiteLLM's deferred async logging queue. Each gets the flush's timeout.
        self.before_flush: list[Callable[[float | None], None]] = []
        self.on_flush: Callable[[], object] = _nothing
        self.on_close: Callable[[], object] = _nothing

    def record(self, event: CallEvent, event_id: str, reservation: Reservation | None) -> str:
        """Record ``event`` as ``event_id``; settle ``reservation`` with it. Never raises."""
        try:
            self._submit(event_row(event, event_id, self.clock(), self.attribution(),
                                   self.prices), reservation)
        except Exception as exc:  # never into the caller's code
            warn_limited("record", "llmtally: could not record a call to %r (%s: %s)",
                         getattr(event, "model", None), type(exc).__name__, exc, exc_info=True)
        return event_id

    def record_later(self, build: Callable[[], CallEvent]) -> bool:
        """Have the writer thread build and record an event; False (nothing done) when it
        must be recorded on the caller's thread (``durability="sync"``, or after close)."""
        if self.sync or self.closed:
            return False
        self.writer.submit(functools.partial(self._deferred_row, build))
        return True

    def _deferred_row(self, build: Callable[[], CallEvent]) -> dict[str, Any]:
        event = build()
        return event_row(event, event_id(event.id), self.clock(), self.attribution(),
                         self.prices)

    def _submit(self, row: dict[str, Any], reservation: Reservation | None) -> None:
        if reservation is not None and reservation.holds:
            # released by the transaction that stores this event, which also charges it
            row["_reservation"] = reservation.id
        if self.closed:
            self._keep_after_close(row)
        elif not self.sync:
            self.writer.submit(row)
        elif not self.writer.submit_and_wait(row):
            warn_limited("sync-timeout", "llmtally: durability=\"sync\" could not make an "
                         "event durable in time (the ledger hangs and the spill file %s "
                         "cannot be written); it stays queued", self.spill_path,
                         level=logging.ERROR)

    def _keep_after_close(self, row: dict[str, Any]) -> None:
        """A call recorded after close() (say, by a LiteLLM logger still registered): its
        writer has stopped, so the event goes to the spill file, which the next Tally on this
        ledger replays."""
        warn_limited("after-close", "llmtally: a call was recorded after this Tally was closed; "
                     "it is kept in %s until a Tally on this ledger replays it", self.spill_path)
        self.writer.spill_now([row], reason="the Tally is closed")

    # -- lifecycle -------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event recorded so far is in the ledger or the spill file."""
        self._drain_integrations(timeout)
        self.on_flush()
        return self.writer.flush(timeout)

    def _drain_integrations(self, timeout: float | None) -> None:
        for drain in list(self.before_flush):
            try:
                drain(timeout)
            except Exception as exc:
                warn_limited("before-flush", "llmtally: could not drain %r before flushing (%s: %s)",
                             drain, type(exc).__name__, exc)

    def close(self, timeout: float | None = DEFAULT_EXIT_FLUSH_TIMEOUT_S) -> None:
        """Flush, stop the writer and release the database. Idempotent."""
        if self.closed or self._closing:
            return
        self._closing = True
        # First let the integrations hand over what they hold (LiteLLM's deferred logging):
        # those calls finished before close() and belong in this ledger.
        self._drain_integrations(timeout)
        self.closed = True
        self.on_close()
        if not self.writer.close(timeout):
            logger.warning("llmtally: close() gave up after %ss with %d events not yet written "
                           "(a slow or unreachable ledger); events already spilled are in %s",
                           timeout, self.writer.queued, self.spill_path)
        self.store.close()

    def close_at_exit(self, owner: Closable) -> None:
        """Close ``owner`` (the Tally, so a subclass's ``close`` runs too) at interpreter exit,
        flush it on SIGTERM (unless the application handles it), and keep the writer working
        in forked children (multiprocessing, gunicorn, Celery prefork), without keeping
        either alive."""
        from ._signals import flush_on_sigterm

        flush_on_sigterm(owner)
        owner_ref, writer_ref = weakref.ref(owner), weakref.ref(self.writer)

        def close_at_exit() -> None:
            live = owner_ref()
            if live is not None and not live.closed:
                live.close(DEFAULT_EXIT_FLUSH_TIMEOUT_S)

        def restart_in_child() -> None:
            live, writer = owner_ref(), writer_ref()
            if live is None or writer is None or live.closed:
                return
            writer.restart_after_fork()
            # multiprocessing children leave through os._exit(), which skips atexit, but run
            # multiprocessing's finalizers; that registry is cleared when the child starts, so
            # the finalizer is added from multiprocessing's own after-fork step, which runs later.
            util = sys.modules.get("multiprocessing.util")
            if util is not None:
                util.register_after_fork(live, lambda _live: util.Finalize(
                    None, close_at_exit, exitpriority=100))

        atexit.register(close_at_exit)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=restart_in_child)


class Closable(Protocol):
    """What is closed at exit and flushed on SIGTERM: a Tally."""

    @property
    def closed(self) -> bool: ...

    def flush(self, timeout: float | None = None) -> bool: ...

    def close(self, timeout: float | None = DEFAULT_EXIT_FLUSH_TIMEOUT_S) -> None: ...


def _nothing() -> None:
    return None
