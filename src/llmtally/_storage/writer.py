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
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .._events.metadata import clean_metadata, safe_str
from .._log import warn_limited
from .spill import SpillFile, encode_event
from .store import InsertHook, Store, is_outage

__all__ = ["Writer", "DEFAULT_BATCH_SIZE", "DEFAULT_FLUSH_INTERVAL_S", "DEFAULT_MAX_QUEUE"]

DEFAULT_BATCH_SIZE = 1000
DEFAULT_FLUSH_INTERVAL_S = 0.2
DEFAULT_MAX_QUEUE = 100_000
DEFAULT_SPILL_AFTER_S = 5.0
DEFAULT_MAX_PENDING = 10_000
DEFAULT_SYNC_TIMEOUT_S = 10.0  # the longest a durability="sync" record() waits for its event
_RETRY_MIN_S = 0.25
_RETRY_MAX_S = 15.0
_Refused = tuple[dict[str, Any], BaseException]  # a row that cannot be stored, and why
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
        self._submitted = itertools.count(1)  # next() is atomic under the GIL
        self._last_submitted = 0
        self._done = 0
        self._cycles = 0
        self._done_cond = threading.Condition()
        self._wake = threading.Event()
        self._flush_wanted = 0
        self._stop = False
        self._pending: list[dict[str, Any]] = []
        # durability="sync": id(row) -> the Event its submitter waits on (rows stay referenced
        # in the queue or _pending until they are done, so their ids cannot be reused meanwhile)
        self._waiters: dict[int, threading.Event] = {}
        self._down_since: float | None = None
        self._next_retry = 0.0
        self._retry_delay = _RETRY_MIN_S
        self.written = 0
        self.spilled = 0
        self.rejected = 0
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
        self._last_submitted = next(self._submitted)
        if self._queue.qsize() >= self.max_queue:
            built = row if isinstance(row, dict) else _built(row)
            if built is None:
                self._count_dropped()
                return
            if self.spill_now([built], reason="the in-memory queue is full"):
                return
            # the disk refused too: keep it queued past the bound rather than drop it
            row = built
        self._queue.put(row)
        if self._queue.qsize() >= self.batch_size:
            self._wake.set()

    def submit_and_wait(self, row: dict[str, Any], timeout: float = DEFAULT_SYNC_TIMEOUT_S) -> bool:
        """Queue one event and wait until it is in the ledger or fsync'd in the spill file.

        Returns False if that took longer than ``timeout`` seconds (the database hangs and the
        disk refuses the spill file too); the event then stays queued like any other.
        """
        done = threading.Event()
        key = id(row)
        self._waiters[key] = done
        self.submit(row)
        self._wake.set()
        if done.wait(timeout):
            return True
        self._waiters.pop(key, None)
        return done.is_set()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event submitted so far is in the ledger or the spill file.

        Returns False if ``timeout`` (seconds) ran out first.
        """
        target = self._last_submitted
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._done_cond:
            self._flush_wanted += 1
            # A whole cycle must start after this call: it also replays any spill backlog.
            cycle_target = self._cycles + 2
        self._wake.set()
        try:
            with self._done_cond:
                while self._done < target or self._cycles < cycle_target:
                    if not self._thread.is_alive():
                        return False
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._wake.set()  # the writer may have cleared it before our cycle began
                    self._done_cond.wait(0.05 if remaining is None else min(remaining, 0.05))
            return True
        finally:
            with self._done_cond:
                self._flush_wanted -= 1

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
                             "are kept and retried", type(exc).__name__, _first_line(exc),
                             level=logging.ERROR, exc_info=True)
            with self._done_cond:
                self._cycles += 1
                self._done_cond.notify_all()
            if self._stop and self._queue.empty() and not self._pending:
                return

    def _cycle(self) -> None:
        self._drain_queue()
        flushing = self._flush_wanted > 0 or self._stop
        settle = flushing or bool(self._waiters)  # someone waits: spill rather than keep waiting
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
                self._count_dropped()
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
                handled, bad, outage = self._insert_one_by_one(batch, self._insert)
                self._reject(bad)
            del self._pending[:handled]
            self._mark_done(batch[:handled])
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
        self.store.insert_many([_json_safe(row) for row in rows], self.charges)
        self.written += len(rows)

    @staticmethod
    def _insert_one_by_one(rows: list[dict[str, Any]], insert: Callable[[list[dict[str, Any]]], Any],
                           ) -> tuple[int, list[_Refused], BaseException | None]:
        """A batch failed for its content: insert its rows one at a time, so only the bad ones
        are set aside. Returns how many rows were dealt with (stored or found bad), the bad
        ones with their errors, and the outage that stopped it early (None if it did not)."""
        bad: list[_Refused] = []
        for done, row in enumerate(rows):
            try:
                insert([row])
            except Exception as exc:
                if is_outage(exc):
                    return done, bad, exc
                bad.append((row, exc))
        return len(rows), bad, None

    def _reject(self, bad: list[_Refused]) -> None:
        """Keep rows that can never be stored in the rejected file, in a form that can always
        be written (see :func:`_salvaged`), and say so (rate limited)."""
        if not bad:
            return
        self.rejected += len(bad)
        row, exc = bad[-1]
        warn_limited("rejected", "llmtally: %d events cannot be stored (event %s: %s: %s); they "
                     "are kept in %s", len(bad), _event_id(row), type(exc).__name__,
                     _first_line(exc)[:300], self._rejected_path)
        try:
            SpillFile(self._rejected_path).append([_salvaged(row, exc) for row, exc in bad])
        except Exception as exc:  # never let a row that cannot be kept wedge the writer
            warn_limited("rejected-lost", "llmtally: could not keep %d rejected events in %s "
                         "(%s: %s): %s", len(bad), self._rejected_path, type(exc).__name__,
                         _first_line(exc), ", ".join(_event_id(row) for row, _ in bad[:10]),
                         level=logging.ERROR)

    @property
    def _rejected_path(self) -> Path:
        return self.spill.path.with_name(self.spill.path.name + ".rejected.jsonl")

    def _note_outage(self, exc: BaseException) -> None:
        now = self._clock()
        if self._down_since is None:
            self._down_since = now
        warn_limited("outage", "llmtally: cannot write to the ledger %s (%s: %s); %d events wait "
                     "and will be written when it is back (or kept in %s)", self.store.display_url,
                     type(exc).__name__, _first_line(exc), len(self._pending), self.spill.path)
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
        bad: list[_Refused] = []
        try:
            try:
                lines = [encode_event(_json_safe(row)) for row in rows]
            except Exception:
                lines, bad = _encodable(rows)
            self.spill.append_lines(lines)
        except OSError as exc:
            warn_limited("spill-failed", "llmtally: %s and the spill file %s cannot be written "
                         "(%s); %d events are held in memory", reason, self.spill.path, exc,
                         len(rows), level=logging.ERROR)
            return False
        self._reject(bad)  # after the spill: if that failed, all the rows are tried again
        self.spilled += len(rows) - len(bad)
        warn_limited("spilled", "llmtally: %s; %d events kept in %s, replayed when it is back",
                     reason, len(rows) - len(bad), self.spill.path)
        self._mark_done(rows)
        return True

    def _count_dropped(self) -> None:
        """A deferred event that could not be built is done with (flush must not wait for it)."""
        with self._done_cond:
            self._done += 1
            self._done_cond.notify_all()

    def _mark_done(self, rows: list[dict[str, Any]]) -> None:
        with self._done_cond:
            self._done += len(rows)
            self._done_cond.notify_all()
        if self._waiters:
            for row in rows:
                waiter = self._waiters.pop(id(row), None)
                if waiter is not None:
                    waiter.set()

    def _try_replay(self) -> None:
        """Replay spilled events (ours or another process's) once the ledger answers."""
        try:
            if not self.spill.has_backlog():
                return
            for path in self.spill.claim():
                with self.spill.replaying(path):
                    rows, bad_lines = self.spill.read(path)
                    refused: list[_Refused] = []
                    for start in range(0, len(rows), self.batch_size):
                        batch = rows[start:start + self.batch_size]
                        try:
                            self._replay_insert(batch)
                        except Exception as exc:
                            if is_outage(exc):
                                raise
                            _, bad, outage = self._insert_one_by_one(batch, self._replay_insert)
                            if outage is not None:
                                raise outage  # noqa: B904  (the file stays claimed; retried whole)
                            refused += bad
                    self._reject(refused)  # only once the whole file is in: never kept twice
                    if bad_lines:
                        warn_limited("spill-unreadable", "llmtally: %s had %d unreadable lines "
                                     "(%s); they were skipped", path, len(bad_lines),
                                     ", ".join(map(str, bad_lines[:10])))
                    path.unlink()
                warn_limited("replayed", "llmtally: replayed %d spilled events from %s",
                             len(rows) - len(refused), path, level=logging.INFO)
        except Exception as exc:
            if is_outage(exc):
                self._note_outage(exc)
            else:
                warn_limited("replay", "llmtally: could not replay %s (%s: %s); will try again",
                             self.spill.path, type(exc).__name__, _first_line(exc))
        else:
            self._back_up()

    def _replay_insert(self, rows: list[dict[str, Any]]) -> None:
        """Spilled events are charged to the budgets when they are stored, like any other
        (ids already stored are skipped, and not charged again)."""
        self.store.insert_many([_json_safe(row) for row in rows], self.charges)


MAX_METADATA_TEXT = 1024  # characters in one metadata string (key or value)
MAX_METADATA_JSON = 65_536  # characters of one event's metadata as JSON
_SURROGATE = re.compile(r"\\ud[89a-f][0-9a-f]{2}", re.IGNORECASE)


def _bounded_metadata(meta: Any) -> dict[str, Any]:
    notes: list[str] = []
    cleaned = _clean_tree(meta, notes)
    if not isinstance(cleaned, dict):
        cleaned = {"value": cleaned}
    size = len(json.dumps(cleaned))
    if size > MAX_METADATA_JSON:
        cleaned = {"llmtally_metadata_dropped": size}
        notes = [f"metadata was {size} characters of JSON; dropped (limit {MAX_METADATA_JSON})"]
    if notes:
        cleaned["llmtally_warnings"] = [*(cleaned.get("llmtally_warnings") or []), *notes][:20]
    return cleaned


def _clean_tree(value: Any, notes: list[str]) -> Any:
    if isinstance(value, str):
        return _clean_string(value, notes)
    if isinstance(value, list):
        return [_clean_tree(item, notes) for item in value]
    if isinstance(value, dict):
        return {_clean_string(key, notes): _clean_tree(item, notes) for key, item in value.items()}
    return value


def _clean_string(text: str, notes: list[str]) -> str:
    if "\x00" in text:
        text = text.replace("\x00", "")
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")  # a lone surrogate becomes "?"
    if len(text) > MAX_METADATA_TEXT:
        notes.append(f"a metadata text of {len(text)} characters was cut to {MAX_METADATA_TEXT}")
        text = text[:MAX_METADATA_TEXT]
    return text


def _built(build: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
    """Run a deferred event's builder; a failure loses that one event, loudly."""
    try:
        row = build()
    except Exception as exc:
        warn_limited("deferred", "llmtally: could not build a deferred event (%s: %s)",
                     type(exc).__name__, _first_line(exc), exc_info=True)
        return None
    if row is not None and not isinstance(row, dict):
        warn_limited("deferred", "llmtally: a deferred event was built as a %s, not a dict; "
                     "dropped", type(row).__name__)
        return None
    return row


def _event_id(row: Any) -> str:
    return safe_str(row.get("id"))[:200] if isinstance(row, Mapping) else "?"


def _encodable(rows: list[dict[str, Any]]) -> tuple[list[str], list[_Refused]]:
    """Spill lines for the rows that can be written as one, and the rows that cannot."""
    lines: list[str] = []
    bad: list[_Refused] = []
    for row in rows:
        try:
            lines.append(encode_event(_json_safe(row)))
        except Exception as exc:
            bad.append((row, exc))
    return lines, bad


def _salvaged(row: Any, error: BaseException) -> dict[str, Any]:
    """What can be kept of a row that cannot be stored, as something that can always be
    written as a JSON line: the row as it would be stored if possible, else field by field
    (metadata cleaned as record() cleans it, other odd values as text). The error is noted."""
    note = f"rejected: {type(error).__name__}: {_first_line(error)[:300]}"
    try:
        out = _json_safe(row)
        encode_event(out)
    except Exception:
        out = {}
        for key, value in (row.items() if isinstance(row, Mapping) else [("id", None)]):
            key = key if isinstance(key, str) else safe_str(key)
            if key == "metadata" and isinstance(value, Mapping):
                notes: list[str] = []
                value = clean_metadata(value if isinstance(value, dict) else dict(value), notes)
                if notes:
                    value["llmtally_warnings"] = notes
            try:
                encode_event({key: value})
            except Exception:
                value = safe_str(value)
            out[key] = value
    meta = out.get("metadata")
    if isinstance(meta, dict):
        warnings = meta.get("llmtally_warnings")
        meta["llmtally_warnings"] = [*(warnings if isinstance(warnings, list) else []), note]
    else:
        out["llmtally_rejected"] = note
    return out


def _first_line(exc: BaseException) -> str:
    text = safe_str(exc).strip()
    return text.splitlines()[0] if text else ""


def _json_safe(row: Mapping[str, Any]) -> dict[str, Any]:
    """Make metadata storable in any database: JSON types only, no NaN (PostgreSQL's JSON
    refuses it), no NUL character (PostgreSQL refuses it in text and JSON), no lone surrogate
    (invalid UTF-8: no driver can send it), every string at most ``MAX_METADATA_TEXT``
    characters and the whole at most ``MAX_METADATA_JSON``; a cut is noted in the metadata."""
    out = dict(row)
    meta = out.get("metadata")
    if meta:
        text = json.dumps(meta, default=str, allow_nan=True)  # ASCII: odd characters escaped
        if len(text) > MAX_METADATA_TEXT or "\\u0000" in text or _SURROGATE.search(text):
            out["metadata"] = _bounded_metadata(json.loads(text, parse_constant=lambda _: None))
        else:
            out["metadata"] = json.loads(text, parse_constant=lambda _: None)
    for key in ("cost", "latency_ms", "ttft_ms"):
        value = out.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = None
    return out
