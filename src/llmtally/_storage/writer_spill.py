"""Where the writer's rows go when the ledger does not take them: into the spill file while it
is unreachable, and back from it (replayed) once it answers; into ``<spill>.rejected.jsonl``
when the database refuses them for their content, found one by one so that one bad row never
blocks the others. Every message is rate limited (``warn_limited``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .._events.metadata import safe_str
from .._log import warn_limited
from .spill import SpillFile, encode_event
from .store_outage import is_outage
from .writer_rows import first_line, json_safe, salvaged

__all__ = ["SpillHandoff", "insert_one_by_one"]

_Refused = tuple[dict[str, Any], BaseException]  # a row that cannot be stored, and why


def insert_one_by_one(rows: list[dict[str, Any]], insert: Callable[[list[dict[str, Any]]], Any],
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


class SpillHandoff:
    """The spill file and the rejected file of one writer, with how many rows went to each.

    ``mark_done`` is told of the rows made durable here (spilled, or kept as rejected).
    """

    def __init__(self, spill: SpillFile, mark_done: Callable[[list[dict[str, Any]]], None]) -> None:
        self.spill = spill
        self._mark_done = mark_done
        self.spilled = 0
        self.rejected = 0

    def spill_now(self, rows: list[dict[str, Any]], *, reason: str) -> bool:
        """Append ``rows`` to the spill file now (fsync'd), saying ``reason`` in the log (rate
        limited). False if the disk refused them too. A row that cannot be written as a spill
        line goes to the rejected file instead; it never holds back the others."""
        bad: list[_Refused] = []
        try:
            try:
                lines = [encode_event(json_safe(row)) for row in rows]
            except Exception:
                lines, bad = _encodable(rows)
            self.spill.append_lines(lines)
        except OSError as exc:
            warn_limited("spill-failed", "llmtally: %s and the spill file %s cannot be written "
                         "(%s); %d events are held in memory", reason, self.spill.path, exc,
                         len(rows), level=logging.ERROR)
            return False
        self.reject(bad)  # after the spill: if that failed, all the rows are tried again
        self.spilled += len(rows) - len(bad)
        warn_limited("spilled", "llmtally: %s; %d events kept in %s, replayed when it is back",
                     reason, len(rows) - len(bad), self.spill.path)
        self._mark_done(rows)
        return True

    def reject(self, bad: list[_Refused]) -> None:
        """Keep rows that can never be stored in the rejected file, in a form that can always
        be written (see :func:`salvaged`), and say so (rate limited)."""
        if not bad:
            return
        self.rejected += len(bad)
        row, exc = bad[-1]
        warn_limited("rejected", "llmtally: %d events cannot be stored (event %s: %s: %s); they "
                     "are kept in %s", len(bad), _event_id(row), type(exc).__name__,
                     first_line(exc)[:300], self._rejected_path)
        try:
            SpillFile(self._rejected_path).append([salvaged(row, exc) for row, exc in bad])
        except Exception as exc:  # never let a row that cannot be kept wedge the writer
            warn_limited("rejected-lost", "llmtally: could not keep %d rejected events in %s "
                         "(%s: %s): %s", len(bad), self._rejected_path, type(exc).__name__,
                         first_line(exc), ", ".join(_event_id(row) for row, _ in bad[:10]),
                         level=logging.ERROR)

    @property
    def _rejected_path(self) -> Path:
        return self.spill.path.with_name(self.spill.path.name + ".rejected.jsonl")

    def replay(self, insert: Callable[[list[dict[str, Any]]], Any], batch_size: int) -> None:
        """Replay the spill files (ours or another process's) with ``insert``, ``batch_size``
        rows at a time. An outage is raised: the file being replayed stays claimed, and is
        tried again whole."""
        for path in self.spill.claim():
            with self.spill.replaying(path):
                rows, bad_lines = self.spill.read(path)
                refused: list[_Refused] = []
                for start in range(0, len(rows), batch_size):
                    batch = rows[start:start + batch_size]
                    try:
                        insert(batch)
                    except Exception as exc:
                        if is_outage(exc):
                            raise
                        _, bad, outage = insert_one_by_one(batch, insert)
                        if outage is not None:
                            raise outage  # noqa: B904  (the file stays claimed; retried whole)
                        refused += bad
                self.reject(refused)  # only once the whole file is in: never kept twice
                if bad_lines:
                    warn_limited("spill-unreadable", "llmtally: %s had %d unreadable lines "
                                 "(%s); they were skipped", path, len(bad_lines),
                                 ", ".join(map(str, bad_lines[:10])))
                path.unlink()
            warn_limited("replayed", "llmtally: replayed %d spilled events from %s",
                         len(rows) - len(refused), path, level=logging.INFO)


def _event_id(row: Any) -> str:
    return safe_str(row.get("id"))[:200] if isinstance(row, Mapping) else "?"


def _encodable(rows: list[dict[str, Any]]) -> tuple[list[str], list[_Refused]]:
    """Spill lines for the rows that can be written as one, and the rows that cannot."""
    lines: list[str] = []
    bad: list[_Refused] = []
    for row in rows:
        try:
            lines.append(encode_event(json_safe(row)))
        except Exception as exc:
            bad.append((row, exc))
    return lines, bad
