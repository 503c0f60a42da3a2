"""Import: the valid records of a file added to the ledger in batches, each event once, budgets charged."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import pickle
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from .._budgets.charges import EventCharges
from .._storage.store import Store, driver_row
from .._storage.tables import EVENT_COLUMNS
from .reading import (
    Lines,
    csv_records,
    jsonl_records,
    open_input,
)
from .transfer import (
    DEFAULT_IMPORT_BATCH,
    IMPORT_BATCH_BYTES,
    ImportResult,
    TransferError,
    format_for,
    is_stream,
    ledger_errors,
    reason,
)
from .validation import Invalid, validated_row

__all__ = ["import_events"]

def import_events(
    store: Store,
    source: str | os.PathLike[str] | IO[bytes],
    *,
    format: str | None = None,
    batch_size: int = DEFAULT_IMPORT_BATCH,
) -> ImportResult:
    """Add the events of a JSONL or CSV file (plain or gzip) to the ledger; see the module
    docstring. Raises TransferError, having written nothing, if the file cannot be read or
    is not JSONL/CSV, or if the ledger fails."""
    sqlite = store.dialect == "sqlite"
    with ledger_errors(store, "the import"):
        store.ensure_schema()  # an unreachable ledger is found before a long read, not after
    with open_input(source) as (stream, name), _Spool() as spool:
        lines = Lines(stream)
        path = None if is_stream(source) else Path(source)  # type: ignore[arg-type]
        try:
            first_line = lines.first_content()
            fmt = format_for(path, format, first_line)
            result = ImportResult(format=fmt)
            if not first_line:
                return result  # an empty file: nothing to import
            records = (jsonl_records(lines, result, name) if fmt == "jsonl"
                       else csv_records(lines, name))
            for batch in _valid_batches(records, result, lines, batch_size, sqlite):
                spool.write(batch)
        except (OSError, EOFError, zlib.error) as exc:
            raise TransferError(f"cannot read {name} ({reason(exc)}); nothing was imported. "
                                "Check the file (a .gz must be complete)") from exc
        # The whole file is read and checked: only now take the write lock (SQLite), for the
        # valid rows alone, so a file of junk never keeps the application's writes waiting.
        # Events landing in a budget's window are charged to it in this same transaction.
        charges = EventCharges(lambda: datetime.now(timezone.utc))
        with ledger_errors(store, "the import"), store.write() as conn:
            for batch in spool.batches():
                inserted, _ = store.insert_rows(conn, [_event_of(row) for row in batch], charges)
                result.imported += inserted
                result.skipped += len(batch) - inserted
    return result


def _event_of(spooled: Sequence[Any]) -> dict[str, Any]:
    """A spooled driver row (see ``driver_row``) as the event dict the store takes."""
    event = dict(zip(EVENT_COLUMNS, spooled))
    if isinstance(event["ts"], str):
        event["ts"] = datetime.fromisoformat(event["ts"])
    for key in ("tags", "metadata"):
        if isinstance(event[key], str):
            event[key] = json.loads(event[key])
    return event


def _valid_batches(records: Iterable[tuple[int, Any]], result: ImportResult, lines: Lines,
                   batch_size: int, sqlite: bool) -> Iterator[list[tuple[Any, ...]]]:
    """The valid records as driver rows (see ``driver_row``), in batches of at most
    ``batch_size`` rows or about IMPORT_BATCH_BYTES of input; invalid ones noted in ``result``."""
    batch: list[tuple[Any, ...]] = []
    start = lines.bytes_read
    for number, record in records:
        try:
            if isinstance(record, Invalid):
                raise record
            batch.append(driver_row(validated_row(record), sqlite))
        except Invalid as invalid:
            result.note_invalid(number, str(invalid))
            continue
        except RecursionError:  # a value nested nearly as deep as the JSON decoder allows
            result.note_invalid(number, "a value is nested too deeply")
            continue
        if len(batch) >= batch_size or lines.bytes_read - start >= IMPORT_BATCH_BYTES:
            yield batch
            batch = []
            start = lines.bytes_read
    if batch:
        yield batch


class _Spool:
    """The valid rows of an import, kept in a private temporary file (in TMPDIR, compressed)
    between reading the file and writing them to the ledger in one transaction."""

    def __init__(self) -> None:
        self._file: IO[bytes] | None = None
        self._packed: gzip.GzipFile | None = None
        self._batches = 0

    def __enter__(self) -> _Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError, ValueError):
                self._packed.close()  # type: ignore[union-attr]
            self._file.close()  # the file was never linked: closing it frees the space

    def write(self, batch: list[tuple[Any, ...]]) -> None:
        try:
            if self._packed is None:
                self._file = tempfile.TemporaryFile(prefix="llmtally-import-")
                self._packed = gzip.GzipFile(fileobj=self._file, mode="wb", compresslevel=1)
            pickle.dump(batch, self._packed, protocol=pickle.HIGHEST_PROTOCOL)
            self._batches += 1
        except OSError as exc:
            raise self._error(exc) from exc

    def batches(self) -> Iterator[list[tuple[Any, ...]]]:
        if self._packed is None:
            return
        try:
            self._packed.close()
            self._file.seek(0)  # type: ignore[union-attr]
            packed = gzip.GzipFile(fileobj=self._file, mode="rb")
            for _ in range(self._batches):
                yield pickle.load(packed)  # our own rows, in a file only this process can reach
        except (OSError, EOFError) as exc:
            raise self._error(exc) from exc

    @staticmethod
    def _error(exc: OSError | EOFError) -> TransferError:
        return TransferError(f"cannot use a temporary file in {tempfile.gettempdir()} for the "
                             f"import ({reason(exc)}); nothing was imported. Free some space "
                             "there or set TMPDIR to a roomier directory")
