"""Moving events out of and into the ledger: export (JSONL, CSV), import, prune.

**Export** streams events oldest first (``ts``, then ``id``), every ``UsageEvent`` column, in
chunks read through a server-side cursor on PostgreSQL (SQLite cursors stream by nature), so
memory stays flat however large the ledger. ``ts`` is ISO 8601 in UTC (``...Z``); in CSV,
``tags`` and ``metadata`` are JSON text, ``streamed`` is ``true``/``false``, an empty cell is
NULL. Written to a path, the file appears complete or not at all (a temporary file renamed
into place); a name ending in ``.gz`` is gzip-compressed.

**Import** reads what export writes (JSONL or CSV, gzip-compressed or not) and is idempotent:
an event whose id is already in the ledger is skipped, so importing a file twice adds nothing
and merging two ledgers is export + import. Every line is validated (types, bounds, the
status / call_type / cost_status values, the token parts within their whole); invalid lines
are counted and their numbers reported, valid ones are inserted — all of them in **one
transaction**, so an import either adds every valid line or, if anything fails on the way
(unreadable file, wrong format, the database), nothing at all. Values are never altered to
make them fit: a line the ledger could not have written (a 300-character model name, a NUL
character, invalid UTF-8, NaN) is invalid, not cut.

**Prune** deletes events older than a cutoff in one transaction, optionally writing them first
to a gzip JSONL archive that import reads back. It reads and deletes the same snapshot of the
ledger (SQLite holds its write lock; PostgreSQL uses REPEATABLE READ), so exactly the archived
events are deleted. Budget counters are not touched.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import math
import os
import re
import tempfile
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Connection, Select, case, delete, func, select
from sqlalchemy.exc import SQLAlchemyError

from ._errors import ConfigError, LedgerError
from ._model import EVENT_COLUMNS, MAX_ID, MAX_TEXT, UsageEvent
from ._store import Store, _driver_row
from ._tally import CALL_TYPES, SOURCES, STATUSES
from ._timeparse import parse_instant
from ._usage import MAX_TOKEN_COUNT

__all__ = [
    "TransferError", "ExportResult", "ImportResult", "PruneResult", "FORMATS", "COST_STATUSES",
    "MAX_LINE_BYTES", "export_events", "count_events", "import_events", "prune_events",
]

FORMATS = ("jsonl", "csv")
COST_STATUSES = frozenset({"priced", "estimated", "unpriced"})
MAX_LINE_BYTES = 1 << 20
"""A longer line (JSONL) or CSV line is invalid: no event is that large, and memory stays bounded."""
MAX_METADATA_DEPTH = 64
DEFAULT_CHUNK_ROWS = 2000
DEFAULT_IMPORT_BATCH = 5000
INVALID_LINES_KEPT = 20
_EVENTS = UsageEvent.__table__
_TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
                 "reasoning_tokens")
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

    def _note_invalid(self, line: int, reason: str) -> None:
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


def export_events(
    store: Store,
    target: str | os.PathLike[str] | IO[bytes],
    *,
    format: str | None = None,
    since: str | datetime | date | None = None,
    until: str | datetime | date | None = None,
    project: str | None = None,
    now: datetime | None = None,
    progress: Callable[[int], None] | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> ExportResult:
    """Write the events in [since, until) (optionally of one project) to ``target``.

    ``target`` is a path (written to a temporary file, renamed when complete; ``.gz`` is
    compressed) or a binary stream. ``format`` is ``"jsonl"`` or ``"csv"`` (default: from the
    path's extension, else JSONL). ``progress`` is called with each chunk's row count.
    """
    path = None if _is_stream(target) else Path(target)  # type: ignore[arg-type]
    fmt = _format_for(path, format)
    statement = _filtered(select(_EVENTS), since=since, until=until, project=project, now=now)
    with _ledger_errors(store, "the export"), store.connect() as conn:
        if path is not None:
            with _atomic_output(path) as out:
                rows = _write_events(conn, statement, out, fmt, progress, chunk_rows)
            return ExportResult(rows=rows, format=fmt, path=path)
        try:
            rows = _write_events(conn, statement, target, fmt, progress, chunk_rows)  # type: ignore[arg-type]
        except BrokenPipeError:
            raise  # the reader went away (`| head`): not an error worth a message
        except OSError as exc:
            raise TransferError(f"cannot write the export ({_reason(exc)}); what was written "
                                "is incomplete") from exc
    return ExportResult(rows=rows, format=fmt, path=None)


def count_events(store: Store, *, since: Any = None, until: Any = None, project: str | None = None,
                 now: datetime | None = None) -> int:
    """How many events :func:`export_events` with the same filters would write."""
    statement = _filtered(select(func.count()).select_from(_EVENTS), since=since, until=until,
                          project=project, now=now)
    with _ledger_errors(store, "counting events"):
        with store.connect() as conn:
            return int(conn.execute(statement).scalar_one())


def _filtered(statement: Select[Any], *, since: Any, until: Any, project: str | None,
              now: datetime | None) -> Select[Any]:
    now = now or datetime.now(timezone.utc)
    start, end = parse_instant(since, now=now), parse_instant(until, now=now)
    if start is not None:
        statement = statement.where(_EVENTS.c.ts >= start)
    if end is not None:
        statement = statement.where(_EVENTS.c.ts < end)
    if project is not None:
        statement = statement.where(_EVENTS.c.project == project)
    return statement


def _write_events(conn: Connection, statement: Select[Any], out: IO[bytes], fmt: str,
                  progress: Callable[[int], None] | None, chunk_rows: int) -> int:
    """Stream the statement's rows to ``out``, one encoded chunk at a time; returns the count."""
    encode = _encode_jsonl if fmt == "jsonl" else _encode_csv
    if fmt == "csv":
        out.write(_encode_csv([EVENT_COLUMNS]))  # the header row
    ordered = statement.order_by(_EVENTS.c.ts, _EVENTS.c.id)
    result = conn.execute(ordered, execution_options={"yield_per": chunk_rows})
    count = 0
    for chunk in result.partitions():
        out.write(encode(chunk))
        count += len(chunk)
        if progress is not None:
            progress(len(chunk))
    return count


_TS_INDEX = EVENT_COLUMNS.index("ts")
_json_line = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _encode_jsonl(rows: Iterable[Sequence[Any]]) -> bytes:
    lines = []
    for row in rows:
        values = dict(zip(EVENT_COLUMNS, row))
        values["ts"] = _iso_utc(row[_TS_INDEX])
        lines.append(_json_line(values))
    lines.append("")
    return "\n".join(lines).encode("utf-8")


def _encode_csv(rows: Iterable[Sequence[Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)  # "\r\n" ends records, so a "\r" inside a value is quoted too
    writer.writerows([_csv_cell(value) for value in row] for row in rows)
    return buffer.getvalue().encode("utf-8")


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, datetime):
        return _iso_utc(value)
    if isinstance(value, (list, dict)):
        return _json_line(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _iso_utc(moment: datetime) -> str:
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment.isoformat(timespec="microseconds") + "Z"


# -- import: reading lines -------------------------------------------------------------------


class _Lines:
    """The physical lines of a binary stream as text, numbered from 1.

    A line longer than :data:`MAX_LINE_BYTES` is cut (the rest skipped) and one that is not
    valid UTF-8 is decoded with surrogate escapes; either way its number is put in
    ``flagged`` with the reason, and whatever record contains it is invalid.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self._readline = stream.readline
        self._read_count = 0
        self._buffer: deque[tuple[int, str]] = deque()
        self.number = 0
        self.flagged: dict[int, str] = {}

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._buffer:
            self.number, text = self._buffer.popleft()
            return text
        item = self._read_line()
        if item is None:
            raise StopIteration
        self.number, text = item
        return text

    def first_content(self) -> str:
        """The first non-blank line, without consuming it ("" for an empty file)."""
        for _, text in self._buffer:
            if text.strip():
                return text
        while (item := self._read_line()) is not None:
            self._buffer.append(item)
            if item[1].strip():
                return item[1]
        return ""

    def flag_in(self, first: int, last: int) -> str | None:
        """The reason a line in [first, last] was flagged, if one was (and forget them)."""
        if not self.flagged:
            return None
        reasons = [self.flagged.pop(n) for n in range(first, last + 1) if n in self.flagged]
        return reasons[0] if reasons else None

    def _read_line(self) -> tuple[int, str] | None:
        raw = self._readline(MAX_LINE_BYTES + 1)
        if not raw:
            return None
        self._read_count += 1
        number = self._read_count
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while (rest := self._readline(1 << 16)) and not rest.endswith(b"\n"):
                pass
            self.flagged[number] = f"the line is longer than {MAX_LINE_BYTES:,} bytes"
            return number, "\n"
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            return number, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.flagged[number] = f"not valid UTF-8 (byte {exc.start + 1})"
            return number, raw.decode("utf-8", "surrogateescape")


def _is_stream(target: Any) -> bool:
    return hasattr(target, "read") or hasattr(target, "write")


@contextlib.contextmanager
def _open_input(source: str | os.PathLike[str] | IO[bytes]) -> Iterator[tuple[IO[bytes], str]]:
    """The source as a binary stream (gunzipped if it is gzip data) and its display name."""
    if _is_stream(source):
        stream: IO[bytes] = source  # type: ignore[assignment]
        name = str(getattr(source, "name", "<stream>"))
        yield (_gunzip_if_needed(stream), name)
        return
    path = Path(source)  # type: ignore[arg-type]
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise TransferError(f"cannot read {path} ({exc.strerror or exc}); check the path and "
                            "its permissions") from exc
    with raw:
        yield (_gunzip_if_needed(raw), str(path))


def _gunzip_if_needed(stream: IO[bytes]) -> IO[bytes]:
    magic = b""
    if hasattr(stream, "peek"):
        magic = stream.peek(2)[:2]
    elif stream.seekable():
        magic = stream.read(2)
        stream.seek(0)
    if magic == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[return-value]
    return stream


def _format_for(path: Path | None, requested: str | None, first_line: str | None = None) -> str:
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


# -- import: records ---------------------------------------------------------------------------


class _Invalid(Exception):
    """This line is not a valid event; the message says why."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


_json_loads = json.JSONDecoder(parse_constant=_refuse_constant).decode
_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def _jsonl_records(lines: _Lines, result: ImportResult, name: str) -> Iterator[tuple[int, Any]]:
    """(line number, decoded JSON object or the reason it is not one) for each non-blank line.
    Raises TransferError at the end if no line at all was a JSON object."""
    objects = 0
    for text in lines:
        number = lines.number
        flagged = lines.flag_in(number, number)
        if flagged is None and not text.strip():
            continue
        if flagged is not None:
            yield number, _Invalid(flagged)
            continue
        try:
            value = _json_loads(text)
        except (ValueError, RecursionError) as exc:
            yield number, _Invalid(f"not JSON ({getattr(exc, 'msg', exc)})")
            continue
        if not isinstance(value, dict):
            yield number, _Invalid(f"a JSON {_JSON_KINDS.get(type(value), 'value')}, not an object")
            continue
        objects += 1
        yield number, value
    if objects == 0 and result.invalid:
        raise TransferError(f"{name} is not JSONL: none of its lines is a JSON object; give a "
                            "file written by `llmtally export` (or --format csv for CSV)")


def _csv_records(lines: _Lines, name: str) -> Iterator[tuple[int, Any]]:
    """Check the header now (TransferError if it is not an llmtally CSV), then yield
    (first line number, field dict or the reason it is invalid) for each record."""
    limit = csv.field_size_limit()
    if limit < MAX_LINE_BYTES:
        csv.field_size_limit(MAX_LINE_BYTES)  # only ever raised: a field may be as long as a line
    reader = csv.reader(lines)
    header = _csv_header(reader, lines, name)

    def records() -> Iterator[tuple[int, Any]]:
        while True:
            first = lines.number + 1
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                lines.flag_in(first, lines.number)
                yield first, _Invalid(f"not CSV ({exc})")
                continue
            flagged = lines.flag_in(first, lines.number)
            if flagged is not None:
                yield first, _Invalid(flagged)
            elif not fields:
                continue
            elif len(fields) != len(header):
                yield first, _Invalid(f"{len(fields)} fields; the header has {len(header)}")
            else:
                yield first, _from_csv(header, fields)

    return records()


def _csv_header(reader: Any, lines: _Lines, name: str) -> list[str]:
    hint = ("give a file written by `llmtally export --format csv` (its first line names the "
            "columns: id, ts, model, ...), or --format jsonl for JSONL")
    try:
        header = next(reader, [])
        while header == [] and lines.first_content():
            header = next(reader, [])
    except csv.Error as exc:
        raise TransferError(f"{name} is not an llmtally CSV file ({exc}); {hint}") from exc
    names = [column.strip() for column in header]
    missing = [column for column in ("id", "ts", "model") if column not in names]
    if lines.flag_in(1, lines.number) or missing or len(set(names)) != len(names):
        shown = ",".join(names)[:80]
        raise TransferError(f"{name} is not an llmtally CSV file (its header {shown!r} "
                            f"lacks {', '.join(missing) or 'unique column names'}); {hint}")
    return names


_CSV_INTS = frozenset(_TOKEN_FIELDS)
_CSV_FLOATS = frozenset({"cost", "latency_ms", "ttft_ms"})
_CSV_JSON = frozenset({"tags", "metadata"})
_CSV_BOOLS = {"true": True, "false": False, "1": True, "0": False}
_DIGITS = re.compile(r"[0-9]{1,15}")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _from_csv(header: Sequence[str], fields: Sequence[str]) -> dict[str, Any] | _Invalid:
    """CSV text cells as the JSON types a JSONL line would carry (an empty cell is null)."""
    record: dict[str, Any] = {}
    for name, text in zip(header, fields):
        if text == "" or name not in _COLUMN_SET:
            continue
        if name in _CSV_INTS:
            if not _DIGITS.fullmatch(text):
                return _Invalid(f"{name}: {_short(text)} is not a token count (0 to 10^12)")
            record[name] = int(text)
        elif name in _CSV_FLOATS:
            record[name] = float(text) if _NUMBER.fullmatch(text) else text
        elif name == "streamed":
            record[name] = _CSV_BOOLS.get(text.lower(), text)
        elif name in _CSV_JSON:
            try:
                record[name] = _json_loads(text)
            except (ValueError, RecursionError):
                return _Invalid(f"{name}: {_short(text)} is not JSON")
        else:
            record[name] = text
    return record


_COLUMN_SET = frozenset(EVENT_COLUMNS)


# -- import: validation ----------------------------------------------------------------------


def _event_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """One decoded line (JSON types) as a ledger row, or :class:`_Invalid` saying why not.

    Missing or null values take the column's default; unknown keys are ignored; ``source``
    is kept when it is one llmtally writes, else ``"import"``.
    """
    cost = _amount(record, "cost")
    row = {
        "id": _text(record, "id", MAX_ID, required=True),
        "ts": _timestamp(record.get("ts")),
        "source": _source(record.get("source")),
        "provider": _text(record, "provider", MAX_TEXT),
        "model": _text(record, "model", MAX_TEXT, required=True),
        "resolved_model": _text(record, "resolved_model", MAX_TEXT),
        "call_type": _choice(record, "call_type", CALL_TYPES, "chat"),
        "streamed": _flag(record, "streamed"),
        "status": _choice(record, "status", STATUSES, "ok"),
        "error_type": _text(record, "error_type", MAX_TEXT),
        **{name: _count(record, name) for name in _TOKEN_FIELDS},
        "cost": cost,
        "currency": _currency(record.get("currency")),
        "cost_status": _choice(record, "cost_status", COST_STATUSES,
                               "unpriced" if cost is None else "priced"),
        "price_source": _text(record, "price_source", MAX_TEXT),
        "latency_ms": _amount(record, "latency_ms"),
        "ttft_ms": _amount(record, "ttft_ms"),
        "project": _text(record, "project", MAX_TEXT),
        "user": _text(record, "user", MAX_TEXT),
        "session": _text(record, "session", MAX_ID),
        "tags": _tags(record.get("tags")),
        "request_id": _text(record, "request_id", MAX_ID),
        "metadata": _metadata(record.get("metadata")),
    }
    _check_whole(row)
    return row


def _source(value: Any) -> str:
    return value if isinstance(value, str) and value in SOURCES else "import"


def _check_whole(row: Mapping[str, Any]) -> None:
    if row["input_tokens"] < row["cache_read_tokens"] + row["cache_write_tokens"]:
        raise _Invalid("input_tokens is less than cache_read_tokens + cache_write_tokens "
                       "(input includes the cached parts)")
    if row["output_tokens"] < row["reasoning_tokens"]:
        raise _Invalid("output_tokens is less than reasoning_tokens (output includes reasoning)")
    if (row["cost"] is None) != (row["cost_status"] == "unpriced"):
        raise _Invalid(f"cost {row['cost']!r} does not fit cost_status {row['cost_status']!r} "
                       "(only unpriced events have no cost)")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_string(text: str, name: str) -> None:
    if text.isascii() and "\x00" not in text:
        return
    if "\x00" in text:
        raise _Invalid(f"{name} contains a NUL character (PostgreSQL cannot store it)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid(f"{name} is not valid UTF-8 (a lone surrogate)") from None


def _text(record: Mapping[str, Any], name: str, limit: int, *, required: bool = False) -> str | None:
    value = record.get(name)
    if type(value) is str and 0 < len(value) <= limit and value.isascii() and "\x00" not in value:
        return value  # the usual case, checked at once
    if value is None or value == "":
        if required:
            raise _Invalid(f"{name} is missing")
        return None
    if not isinstance(value, str):
        raise _Invalid(f"{name}: {_short(value)} is not text")
    if len(value) > limit:
        raise _Invalid(f"{name} is {len(value):,} characters long (at most {limit})")
    _check_string(value, name)
    return value


def _timestamp(value: Any) -> datetime:
    if value is None or value == "":
        raise _Invalid("ts is missing")
    if not isinstance(value, str) or len(value) > 40:
        raise _Invalid(f"ts: {_short(value)} is not an ISO 8601 time")
    try:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is not None:
            moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    except (ValueError, OverflowError):
        raise _Invalid(f"ts: {_short(value)} is not an ISO 8601 time") from None
    return moment


def _choice(record: Mapping[str, Any], name: str, allowed: frozenset[str], default: str) -> str:
    value = record.get(name)
    if value is None or value == "":
        return default
    if not isinstance(value, str) or value not in allowed:
        raise _Invalid(f"{name}: {_short(value)} is not one of {', '.join(sorted(allowed))}")
    return value


def _flag(record: Mapping[str, Any], name: str) -> bool:
    value = record.get(name)
    if value is None:
        return False
    if value is True or value is False:
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    raise _Invalid(f"{name}: {_short(value)} is not true or false")


def _count(record: Mapping[str, Any], name: str) -> int:
    value = record.get(name)
    if value is None:
        return 0
    if type(value) is not int or not 0 <= value <= MAX_TOKEN_COUNT:
        raise _Invalid(f"{name}: {_short(value)} is not a token count (0 to 10^12)")
    return value


def _amount(record: Mapping[str, Any], name: str) -> float | None:
    value = record.get(name)
    if value is None:
        return None
    if type(value) not in (int, float):
        raise _Invalid(f"{name}: {_short(value)} is not a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not (math.isfinite(number) and number >= 0):
        raise _Invalid(f"{name}: {_short(value)} is not a finite number >= 0")
    return number


_CURRENCY = re.compile(r"[A-Z]{3}")


def _currency(value: Any) -> str:
    if value is None or value == "":
        return "USD"
    if not isinstance(value, str) or not _CURRENCY.fullmatch(value):
        raise _Invalid(f"currency: {_short(value)} is not a 3-letter ISO 4217 code")
    return value


def _tags(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid(f"tags: {_short(value)} is not a list")
    for tag in value:
        if not isinstance(tag, str) or not tag:
            raise _Invalid(f"tags: {_short(tag)} is not a tag (non-empty text)")
        if len(tag) > MAX_TEXT:
            raise _Invalid(f"a tag is {len(tag):,} characters long (at most {MAX_TEXT})")
        _check_string(tag, "a tag")
    return value


def _metadata(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Invalid(f"metadata: {_short(value)} is not a JSON object")
    _check_json(value, 1)
    return value


def _check_json(value: Any, depth: int) -> None:
    if depth > MAX_METADATA_DEPTH:
        raise _Invalid(f"metadata is nested more than {MAX_METADATA_DEPTH} levels deep")
    if isinstance(value, str):
        _check_string(value, "metadata")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_string(key, "metadata")
            _check_json(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_json(item, depth + 1)


# -- import ------------------------------------------------------------------------------------


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
    with _open_input(source) as (stream, name):
        lines = _Lines(stream)
        path = None if _is_stream(source) else Path(source)  # type: ignore[arg-type]
        try:
            first_line = lines.first_content()
            fmt = _format_for(path, format, first_line)
            result = ImportResult(format=fmt)
            if not first_line:
                return result  # an empty file: nothing to import
            records = (_jsonl_records(lines, result, name) if fmt == "jsonl"
                       else _csv_records(lines, name))
            with _ledger_errors(store, "the import"), store.write() as conn:
                for batch in _valid_batches(records, result, batch_size):
                    inserted = _insert(conn, store, batch)
                    result.imported += inserted
                    result.skipped += len(batch) - inserted
        except (OSError, EOFError, zlib.error) as exc:
            raise TransferError(f"cannot read {name} ({_reason(exc)}); nothing was imported. "
                                "Check the file (a .gz must be complete)") from exc
    return result


def _valid_batches(records: Iterable[tuple[int, Any]], result: ImportResult,
                   batch_size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for number, record in records:
        try:
            if isinstance(record, _Invalid):
                raise record
            batch.append(_event_row(record))
        except _Invalid as invalid:
            result._note_invalid(number, str(invalid))
            continue
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _insert(conn: Connection, store: Store, rows: Sequence[Mapping[str, Any]]) -> int:
    """The store's own insert (ON CONFLICT (id) DO NOTHING), inside the caller's transaction."""
    params = [_driver_row(row, store.dialect == "sqlite") for row in rows]
    return max(conn.exec_driver_sql(store._insert_sql, params).rowcount, 0)


# -- prune -------------------------------------------------------------------------------------


def prune_events(
    store: Store,
    older_than: str | datetime | date | None,
    *,
    archive: str | os.PathLike[str] | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
) -> PruneResult:
    """Delete the events older than ``older_than`` ("90d", "2026-01-01", a datetime).

    With ``archive`` (a new file; ``.gz`` compresses) they are first written there in the export
    JSONL format; the file is in place before the deletion commits. ``dry_run`` only counts.
    """
    cutoff = _cutoff(older_than, now)
    archive_path = None if archive is None else Path(archive)
    if archive_path is not None and archive_path.exists():
        raise TransferError(f"{archive_path} already exists; give --archive a new file name "
                            "(an archive is never overwritten)")
    old = _EVENTS.c.ts < cutoff
    with _ledger_errors(store, "the prune"):
        if dry_run:
            with store.connect() as conn:
                events, cost, unpriced = _old_totals(conn, old)
        else:
            with _snapshot(store) as conn:
                events, cost, unpriced = _old_totals(conn, old)
                _delete_old(conn, old, events, archive_path)
    return PruneResult(cutoff=cutoff, events=events, cost=cost, unpriced=unpriced,
                       archive=archive_path, dry_run=dry_run)


def _cutoff(older_than: Any, now: datetime | None) -> datetime:
    now = now or datetime.now(timezone.utc)
    if older_than is None or older_than == "":
        raise ConfigError("prune needs --older-than (e.g. 90d or 2026-01-01): it deletes events, "
                          "so it never guesses a cutoff")
    cutoff = parse_instant(older_than, now=now)
    if cutoff is None or cutoff > now.astimezone(timezone.utc).replace(tzinfo=None):
        raise ConfigError(f"--older-than {older_than!r} is in the future; give an age such as "
                          "90d or a past date")
    return cutoff


def _old_totals(conn: Connection, old: Any) -> tuple[int, dict[str, float], int]:
    rows = conn.execute(
        select(_EVENTS.c.currency, func.count(), func.coalesce(func.sum(_EVENTS.c.cost), 0.0),
               func.sum(case((_EVENTS.c.cost_status == "unpriced", 1), else_=0)))
        .where(old).group_by(_EVENTS.c.currency)).all()
    events = sum(int(row[1]) for row in rows)
    cost = {row[0]: float(row[2]) for row in rows}
    return events, cost, sum(int(row[3]) for row in rows)


def _delete_old(conn: Connection, old: Any, events: int, archive: Path | None) -> None:
    """Archive (if asked), then delete, checking that both saw the same events."""
    if archive is None:
        _checked_delete(conn, old, events)
        return
    with _atomic_output(archive, exclusive=True) as out:
        archived = _write_events(conn, select(_EVENTS).where(old), out, "jsonl", None,
                                 DEFAULT_CHUNK_ROWS)
        _checked_delete(conn, old, archived)


def _checked_delete(conn: Connection, old: Any, expected: int) -> None:
    deleted = conn.execute(delete(_EVENTS).where(old)).rowcount
    if deleted != expected:  # cannot happen in a snapshot; refuse rather than lose events
        raise TransferError(f"the ledger changed during the prune ({expected} events read, "
                            f"{deleted} to delete); nothing was deleted, run it again")


@contextlib.contextmanager
def _snapshot(store: Store) -> Iterator[Connection]:
    """A write transaction whose reads and deletes see the same events: SQLite takes its
    write lock up front; PostgreSQL runs REPEATABLE READ (new events stay invisible to it)."""
    if store.dialect == "sqlite":
        with store.write() as conn:
            yield conn
        return
    store.ensure_schema()
    with store.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
        with conn.begin():
            yield conn


# -- files and errors --------------------------------------------------------------------------


@contextlib.contextmanager
def _atomic_output(path: Path, *, exclusive: bool = False) -> Iterator[IO[bytes]]:
    """A binary stream that becomes ``path`` only when the block completes (fsync'd, renamed);
    on any failure the temporary file is removed. ``.gz`` names are gzip-compressed;
    ``exclusive`` never replaces an existing file."""
    directory = path.parent
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=directory)
    except OSError as exc:
        raise TransferError(f"cannot write {path} ({_reason(exc)}); choose a writable "
                            "location") from exc
    try:
        with os.fdopen(fd, "wb") as raw:
            if path.name.lower().endswith(".gz"):
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw) as packed:
                    yield packed  # type: ignore[misc]
            else:
                yield raw
            raw.flush()
            os.fsync(raw.fileno())
        _publish(Path(temporary), path, exclusive)
    except OSError as exc:
        _remove(temporary)
        raise TransferError(f"cannot write {path} ({_reason(exc)}); nothing was written") from exc
    except BaseException:
        _remove(temporary)
        raise


def _publish(temporary: Path, path: Path, exclusive: bool) -> None:
    if not exclusive:
        os.replace(temporary, path)
    else:
        try:
            os.link(temporary, path)  # fails if path exists, atomically
        except FileExistsError:
            raise TransferError(f"{path} already exists; give --archive a new file name") from None
        except OSError:  # a file system without hard links
            if path.exists():
                raise TransferError(f"{path} already exists; give --archive a new file name") from None
            os.replace(temporary, path)
        else:
            os.unlink(temporary)
    with contextlib.suppress(OSError):
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _remove(path: str | Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def _ledger_errors(store: Store, what: str) -> Iterator[None]:
    """A database failure as one TransferError line (the transaction has been rolled back)."""
    try:
        yield
    except SQLAlchemyError as exc:
        cause = _reason(getattr(exc, "orig", None) or exc)
        raise TransferError(f"the ledger {store.display_url} failed during {what} ({cause}); "
                            "nothing was changed. Check --db / LLMTALLY_DATABASE_URL and that the "
                            "database is running") from exc
