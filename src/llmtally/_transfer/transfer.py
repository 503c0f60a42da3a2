"""Moving events out of and into the ledger: export (JSONL, CSV), import, prune.

**Export** streams events oldest first (``ts``, then ``id``), every ``UsageEvent`` column, in
chunks read through a server-side cursor on PostgreSQL (SQLite cursors stream by nature), so
memory stays flat however large the ledger. ``ts`` is ISO 8601 in UTC (``...Z``); in CSV,
``tags`` and ``metadata`` are JSON text, ``streamed`` is ``true``/``false``, an empty cell is
NULL, and a text cell a spreadsheet would run as a formula (it starts with ``= + - @``, a tab
or a CR) starts with a ``'`` that import takes off again. Written to a path, the file appears
complete or not at all (a temporary file renamed into place); a name ending in ``.gz`` is
gzip-compressed.

**Import** reads what export writes (JSONL or CSV, gzip-compressed or not) and is idempotent:
an event whose id is already in the ledger is skipped, so importing a file twice adds nothing
and merging two ledgers is export + import. Every line is validated (types, bounds, the
status / call_type / cost_status values, the token parts within their whole); invalid lines
are counted and their numbers reported, valid ones are inserted — all of them in **one
transaction**, so an import either adds every valid line or, if anything fails on the way
(unreadable file, wrong format, the database), nothing at all. The file is read and checked
first, in bounded memory (blank lines are counted, not kept; lines, CSV records and batches
have size caps), its valid rows kept compressed in a temporary file; only then is the write
transaction opened, so reading a large or junk-filled file never holds SQLite's write lock.
Values are never altered to
make them fit: a line the ledger could not have written (a 300-character model name, a NUL
character, invalid UTF-8, NaN) is invalid, not cut.

**Prune** deletes events older than a cutoff in one transaction, optionally writing them first
to a gzip JSONL archive that import reads back. It reads and deletes the same snapshot of the
ledger (SQLite holds its write lock; PostgreSQL uses REPEATABLE READ), so exactly the archived
events are deleted. Budget counters are not touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from .._errors import ConfigError, LedgerError
from .._storage.store import Store
from .._storage.tables import UsageEvent

__all__ = ["TransferError", "ExportResult", "ImportResult", "PruneResult", "FORMATS", "COST_STATUSES",
           "MAX_LINE_BYTES"]

FORMATS = ("jsonl", "csv")
COST_STATUSES = frozenset({"priced", "estimated", "unpriced"})
MAX_LINE_BYTES = 1 << 20
"""A longer line (JSONL) or CSV line is invalid: no event is that large, and memory stays bounded."""
MAX_METADATA_DEPTH = 64
DEFAULT_CHUNK_ROWS = 2000
DEFAULT_IMPORT_BATCH = 5000
IMPORT_BATCH_BYTES = 8 << 20
INVALID_LINES_KEPT = 20
EVENTS = UsageEvent.__table__
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


class TransferError(LedgerError):
    """An export, import or prune could not be done: the message says what and how to fix it.
    Nothing was half-written (see the module docstring)."""


@dataclass(frozen=True, slots=True)
class ExportResult:
    rows: int
    format: str
    path: Path | None = None


@dataclass(slots=True)
class ImportResult:
    """``imported`` new events, ``skipped`` already in the ledger (or earlier in the file),
    ``invalid`` lines not imported; ``invalid_lines`` lists the first of them as
    (line number, reason)."""

    format: str
    imported: int = 0
    skipped: int = 0
    invalid: int = 0
    invalid_lines: list[tuple[int, str]] = field(default_factory=list)

    @property
    def lines(self) -> int:
        return self.imported + self.skipped + self.invalid

    def note_invalid(self, line: int, reason: str) -> None:
        self.invalid += 1
        if len(self.invalid_lines) < INVALID_LINES_KEPT:
            self.invalid_lines.append((line, reason))


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What a prune deleted (or, with ``dry_run``, would delete): ``events`` older than
    ``cutoff`` (naive UTC), their cost per currency, how many had no price."""

    cutoff: datetime
    events: int
    cost: dict[str, float]
    unpriced: int
    archive: Path | None
    dry_run: bool


# -- export ----------------------------------------------------------------------------------


def iso_utc(moment: datetime) -> str:
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment.isoformat(timespec="microseconds") + "Z"


# -- import: reading lines -------------------------------------------------------------------


# -- import: records ---------------------------------------------------------------------------


# -- import: validation ----------------------------------------------------------------------


# -- import ------------------------------------------------------------------------------------


# -- prune -------------------------------------------------------------------------------------


# -- files and errors --------------------------------------------------------------------------


def reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def ledger_errors(store: Store, what: str) -> Iterator[None]:
    """A database failure as one TransferError line (the transaction has been rolled back)."""
    try:
        yield
    except SQLAlchemyError as exc:
        cause = reason(getattr(exc, "orig", None) or exc)
        raise TransferError(f"the ledger {store.display_url} failed during {what} ({cause}); "
                            "nothing was changed. Check --db / LLMTALLY_DATABASE_URL and that the "
                            "database is running") from exc


FORMULA_START = frozenset("=+-@\t\r")
_QUOTED_START = FORMULA_START | {"'"}


def is_quoted(cell: str) -> bool:
    return len(cell) > 1 and cell[0] == "'" and cell[1] in _QUOTED_START


def unquoted(cell: str) -> str:
    """The value a text cell of our CSV export stands for (see ``_neutralised``)."""
    return cell[1:] if is_quoted(cell) else cell


def is_stream(target: Any) -> bool:
    return hasattr(target, "read") or hasattr(target, "write")


def format_for(path: Path | None, requested: str | None, first_line: str | None = None) -> str:
    """The format asked for, else the one the file name says, else what the content looks like."""
    if requested is not None:
        if requested not in FORMATS:
            raise ConfigError(f"format {requested!r} is not allowed; use one of: {', '.join(FORMATS)}")
        return requested
    name = path.name.lower() if path is not None else ""
    name = name[:-3] if name.endswith(".gz") else name
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".csv"):
        return "csv"
    if first_line is not None and not first_line.lstrip().startswith("{"):
        return "csv"
    return "jsonl"


# A spreadsheet evaluates a cell that starts with one of these (OWASP "CSV injection"); such a
# text cell gets a leading "'" so it is shown as text, and import takes that quote off again.
# A value that itself starts with "'" and one of these (or a second "'") is quoted as well, so
# the round trip is exact; any other value, "'abc" included, is written as it is.
