"""Moving events out of and into the ledger: export (JSONL, CSV), import, prune.

**Export** streams events oldest first (``ts``, then ``id``), every ``UsageEvent`` column, in
chunks read through a server-side cursor on PostgreSQL (SQLite cursors stream by nature), so
memory stays flat however large the ledger. ``ts`` is ISO 8601 in UTC (``...Z``); in CSV,
``tags`` and ``metadata`` are JSON text, ``streamed`` is ``true``/``false``, an empty cell is
NULL, and a text cell a spreadsheet would run as a formula (it starts with ``= + - @``, a tab
or a CR) starts with a ``'`` that import takes off again. Written to a path, the file appears complete or not at all (a temporary file renamed
into place); a name ending in ``.gz`` is gzip-compressed.

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
import csv
import gzip
import io
import json
import math
import os
import pickle
import re
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Connection, Select, case, delete, func, select
from sqlalchemy.exc import SQLAlchemyError

from .._errors import ConfigError, LedgerError
from .._storage.files import create_beside
from .._storage.tables import EVENT_COLUMNS, MAX_ID, MAX_TEXT, UsageEvent
from .._budgets.ledger import EventCharges, rebuild_counters_before
from .._storage.store import Store, driver_row
from .._events.event import CALL_TYPES, SOURCES, STATUSES, TOKEN_FIELDS
from .._timeparse import parse_instant
from .._events.usage import MAX_TOKEN_COUNT

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
IMPORT_BATCH_BYTES = 8 << 20
INVALID_LINES_KEPT = 20
_EVENTS = UsageEvent.__table__
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
        out: Any = target
        if fmt == "csv" and _is_terminal(target):
            out = _ShownControls(target)  # type: ignore[arg-type]
        try:
            rows = _write_events(conn, statement, out, fmt, progress, chunk_rows)
        except BrokenPipeError:
            raise  # the reader went away (`| head`): not an error worth a message
        except OSError as exc:
            raise TransferError(f"cannot write the export ({_reason(exc)}); what was written "
                                "is incomplete") from exc
    return ExportResult(rows=rows, format=fmt, path=None)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


# C0 controls but tab and newline (and CR that ends a record), DEL, C1, line/paragraph separators
_TERMINAL_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]|\r(?!\n)")


class _ShownControls:
    """A terminal as the target of a CSV export: a control character in a cell is written as
    ``\\x1b`` (``\\u2028``) instead of being sent to the terminal to act on. (The JSONL
    export escapes them anyway; a CSV file keeps them, for an exact round trip.)"""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out

    def write(self, data: bytes) -> int:
        text = _TERMINAL_UNSAFE.sub(_shown, data.decode("utf-8", "surrogateescape"))
        return self._out.write(text.encode("utf-8", "surrogateescape"))


def _shown(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


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
    """Stream the statement's rows to ``out``, in pieces of about _WRITE_PIECE bytes; returns
    the count."""
    encode = _encode_jsonl if fmt == "jsonl" else _encode_csv
    if fmt == "csv":
        out.write(b"".join(_encode_csv([EVENT_COLUMNS])))  # the header row
    ordered = statement.order_by(_EVENTS.c.ts, _EVENTS.c.id)
    result = conn.execute(ordered, execution_options={"yield_per": chunk_rows})
    count = 0
    for chunk in result.partitions():
        for piece in encode(chunk):
            out.write(piece)
        count += len(chunk)
        if progress is not None:
            progress(len(chunk))
    return count


_WRITE_PIECE = 1 << 20
_TS_INDEX = EVENT_COLUMNS.index("ts")
_json_line = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
# JSON leaves these raw (ensure_ascii=False); escaped, a JSONL export is safe to print on a
# terminal (DEL, the C1 controls such as CSI) and to paste into JavaScript (U+2028, U+2029).
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029]")


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _encode_jsonl(rows: Iterable[Sequence[Any]]) -> Iterator[bytes]:
    lines: list[str] = []
    size = 0
    for row in rows:
        values = dict(zip(EVENT_COLUMNS, row))
        values["ts"] = _iso_utc(row[_TS_INDEX])
        line = _json_line(values)
        lines.append(line)
        size += len(line)
        if size >= _WRITE_PIECE:
            yield _jsonl_bytes(lines)
            lines, size = [], 0
    if lines:
        yield _jsonl_bytes(lines)


def _jsonl_bytes(lines: list[str]) -> bytes:
    lines.append("")
    return _JSON_UNSAFE.sub(_json_escape, "\n".join(lines)).encode("utf-8")


def _encode_csv(rows: Iterable[Sequence[Any]]) -> Iterator[bytes]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)  # "\r\n" ends records, so a "\r" inside a value is quoted too
    for row in rows:
        writer.writerow([_csv_cell(value) for value in row])
        if buffer.tell() >= _WRITE_PIECE:
            yield buffer.getvalue().encode("utf-8")
            buffer.seek(0)
            buffer.truncate()
    if buffer.tell():
        yield buffer.getvalue().encode("utf-8")


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
    if isinstance(value, str):
        return _neutralised(value)
    return str(value)


# A spreadsheet evaluates a cell that starts with one of these (OWASP "CSV injection"); such a
# text cell gets a leading "'" so it is shown as text, and import takes that quote off again.
# A value that itself starts with "'" and one of these (or a second "'") is quoted as well, so
# the round trip is exact; any other value, "'abc" included, is written as it is.
_FORMULA_START = frozenset("=+-@\t\r")
_QUOTED_START = _FORMULA_START | {"'"}


def _neutralised(text: str) -> str:
    if text and (text[0] in _FORMULA_START or _is_quoted(text)):
        return "'" + text
    return text


def _is_quoted(cell: str) -> bool:
    return len(cell) > 1 and cell[0] == "'" and cell[1] in _QUOTED_START


def _unquoted(cell: str) -> str:
    """The value a text cell of our CSV export stands for (see ``_neutralised``)."""
    return cell[1:] if _is_quoted(cell) else cell


def _iso_utc(moment: datetime) -> str:
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment.isoformat(timespec="microseconds") + "Z"


# -- import: reading lines -------------------------------------------------------------------


_READ_BLOCK = 1 << 20
MAX_RECORD_BYTES = 4 * MAX_LINE_BYTES
"""A CSV record (quoted fields may span lines) larger than this is invalid."""
# Lines of spaces, tabs and CRs alone are blank (between records, in JSONL and CSV alike).
# A run of them is counted and passed over at C speed: a file of a billion blank lines must
# not take a billion Python steps.
_BLANK_BYTES = b" \t\r\n"
_BLANK_LINES = re.compile(rb"[ \t\r\n]*\n")


class _RecordTooLong(Exception):
    """A CSV record grew past MAX_RECORD_BYTES (raised through csv.reader to its caller)."""


class _Lines:
    """The physical lines of a binary stream as text, numbered from 1, read in blocks.

    Memory stays bounded whatever the stream holds: runs of blank lines are counted, not
    kept; a line longer than :data:`MAX_LINE_BYTES` is cut (the rest skipped) and one that is
    not valid UTF-8 is decoded with surrogate escapes — either way its number is put in
    ``flagged`` with the reason, and whatever record contains it is invalid. A CSV record
    (``csv_records()``) longer than :data:`MAX_RECORD_BYTES` raises :class:`_RecordTooLong`.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self._read = stream.read
        self._data = b""
        self._pos = 0
        self._eof = False
        self._read_count = 0  # physical lines consumed, blank ones included
        self._pushed: tuple[int, str] | None = None
        self._long_head = ""
        self._csv = False
        self._record_start = True
        self._record_bytes = 0
        self.number = 0  # the line last returned
        self.record_first = 1  # CSV: the first line of the record being read
        self.bytes_read = 0  # of the lines returned (not of the blank lines passed over)
        self.flagged: dict[int, str] = {}

    def csv_records(self) -> None:
        """Read CSV: call :meth:`start_record` before each record is parsed."""
        self._csv = True

    def start_record(self) -> None:
        self._record_start = True
        self._record_bytes = 0
        self.record_first = self._pushed[0] if self._pushed else self._read_count + 1

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._pushed is not None:
            item, self._pushed = self._pushed, None
        else:
            item = self._read_line(self._record_start or not self._csv)
            if item is None:
                raise StopIteration
        self.number, text = item
        if self._csv:
            if self._record_start:
                self._record_start = False
                self.record_first = self.number
            self._record_bytes += len(text)
            if self._record_bytes > MAX_RECORD_BYTES:
                raise _RecordTooLong(f"the record is longer than {MAX_RECORD_BYTES:,} bytes")
        return text

    def first_content(self) -> str:
        """The first line that is not blank, without consuming it ("" if there is none).
        The blank lines before it are consumed (blank in CSV and JSONL alike)."""
        if self._pushed is None:
            while (item := self._read_line(True)) is not None:
                if item[1].strip() or item[0] in self.flagged:
                    self._pushed = item
                    break
            else:
                return ""
        number, text = self._pushed
        # a line cut for its length: its start tells the format
        return self._long_head if text == "\n" and number in self.flagged else text

    def flag_in(self, first: int, last: int) -> str | None:
        """The reason a line in [first, last] was flagged, if one was (and forget them)."""
        if not self.flagged:
            return None
        numbers = sorted(n for n in self.flagged if first <= n <= last)
        reasons = [self.flagged.pop(n) for n in numbers]
        return reasons[0] if reasons else None

    def _read_line(self, pass_blank: bool) -> tuple[int, str] | None:
        while True:
            if pass_blank:
                self._pass_blank_lines()
            raw, too_long = self._next_raw()
            if raw is None:
                return None
            self._read_count += 1
            if not (pass_blank and not too_long and not raw.strip(_BLANK_BYTES)):
                break  # (a blank line that straddled two blocks is passed over here)
        number = self._read_count
        self.bytes_read += len(raw)
        if too_long:
            self._long_head = raw[:64].decode("utf-8", "replace")
            self.flagged[number] = f"the line is longer than {MAX_LINE_BYTES:,} bytes"
            return number, "\n"
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            return number, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.flagged[number] = f"not valid UTF-8 (byte {exc.start + 1})"
            return number, raw.decode("utf-8", "surrogateescape")

    def _pass_blank_lines(self) -> None:
        while True:
            if self._pos < len(self._data) and self._data[self._pos] not in _BLANK_BYTES:
                return  # the usual case: a line of content
            blank = _BLANK_LINES.match(self._data, self._pos)
            if blank is not None:
                self._read_count += self._data.count(b"\n", self._pos, blank.end())
                self._pos = blank.end()
            if self._pos < len(self._data) or not self._fill():
                return

    def _next_raw(self) -> tuple[bytes | None, bool]:
        """The next line's bytes with its newline, and whether it was cut at MAX_LINE_BYTES."""
        while True:
            end = self._data.find(b"\n", self._pos)
            if end >= 0:
                raw = self._data[self._pos:end + 1]
                self._pos = end + 1
                return raw, end - (self._pos - len(raw)) > MAX_LINE_BYTES
            if len(self._data) - self._pos > MAX_LINE_BYTES:
                raw = self._data[self._pos:self._pos + MAX_LINE_BYTES]
                self._skip_line()
                return raw, True
            if not self._fill():
                raw = self._data[self._pos:]
                self._pos = len(self._data)
                return (raw or None), len(raw) > MAX_LINE_BYTES

    def _skip_line(self) -> None:
        """Pass over the rest of the current line (up to and including its newline)."""
        while True:
            end = self._data.find(b"\n", self._pos)
            if end >= 0:
                self._pos = end + 1
                return
            self._pos = len(self._data)
            if not self._fill():
                return

    def _fill(self) -> bool:
        """Append the next block to the unread bytes; False at the end of the stream."""
        if self._eof:
            return False
        block = self._read(_READ_BLOCK)
        if not block:
            self._eof = True
            return False
        self._data = self._data[self._pos:] + block
        self._pos = 0
        return True


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
    lines.csv_records()
    reader = csv.reader(lines)
    header = _csv_header(reader, lines, name)

    def records() -> Iterator[tuple[int, Any]]:
        while True:
            lines.start_record()
            try:
                fields = next(reader)
            except StopIteration:
                return
            except (csv.Error, _RecordTooLong) as exc:
                first = lines.record_first
                lines.flag_in(first, lines.number)
                yield first, _Invalid(str(exc) if isinstance(exc, _RecordTooLong)
                                      else f"not CSV ({exc})")
                continue
            first = lines.record_first
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
        lines.start_record()
        header = next(reader, [])
        while header == [] and lines.first_content():
            lines.start_record()
            header = next(reader, [])
    except (csv.Error, _RecordTooLong) as exc:
        raise TransferError(f"{name} is not an llmtally CSV file ({exc}); {hint}") from exc
    names = [column.strip() for column in header]
    missing = [column for column in ("id", "ts", "model") if column not in names]
    if lines.flag_in(1, lines.number) or missing or len(set(names)) != len(names):
        shown = ",".join(names)[:80]
        raise TransferError(f"{name} is not an llmtally CSV file (its header {shown!r} "
                            f"lacks {', '.join(missing) or 'unique column names'}); {hint}")
    return names


_CSV_INTS = frozenset(TOKEN_FIELDS)
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
            record[name] = _unquoted(text)
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
        **{name: _count(record, name) for name in TOKEN_FIELDS},
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
    elif isinstance(value, float) and not math.isfinite(value):
        # 1e999 parses as inf, which JSON cannot hold: PostgreSQL would refuse the whole import
        raise _Invalid("metadata holds a number too large for JSON")
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
    sqlite = store.dialect == "sqlite"
    with _ledger_errors(store, "the import"):
        store.ensure_schema()  # an unreachable ledger is found before a long read, not after
    with _open_input(source) as (stream, name), _Spool() as spool:
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
            for batch in _valid_batches(records, result, lines, batch_size, sqlite):
                spool.write(batch)
        except (OSError, EOFError, zlib.error) as exc:
            raise TransferError(f"cannot read {name} ({_reason(exc)}); nothing was imported. "
                                "Check the file (a .gz must be complete)") from exc
        # The whole file is read and checked: only now take the write lock (SQLite), for the
        # valid rows alone, so a file of junk never keeps the application's writes waiting.
        # Events landing in a budget's window are charged to it in this same transaction.
        charges = EventCharges(lambda: datetime.now(timezone.utc))
        with _ledger_errors(store, "the import"), store.write() as conn:
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


def _valid_batches(records: Iterable[tuple[int, Any]], result: ImportResult, lines: _Lines,
                   batch_size: int, sqlite: bool) -> Iterator[list[tuple[Any, ...]]]:
    """The valid records as driver rows (see ``driver_row``), in batches of at most
    ``batch_size`` rows or about IMPORT_BATCH_BYTES of input; invalid ones noted in ``result``."""
    batch: list[tuple[Any, ...]] = []
    start = lines.bytes_read
    for number, record in records:
        try:
            if isinstance(record, _Invalid):
                raise record
            batch.append(driver_row(_event_row(record), sqlite))
        except _Invalid as invalid:
            result._note_invalid(number, str(invalid))
            continue
        except RecursionError:  # a value nested nearly as deep as the JSON decoder allows
            result._note_invalid(number, "a value is nested too deeply")
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
                             f"import ({_reason(exc)}); nothing was imported. Free some space "
                             "there or set TMPDIR to a roomier directory")


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
            # Budget counters cache a GROUP BY over the events: drop those of pruned windows,
            # recompute those the cutoff splits (after the delete committed, under the lock).
            rebuild_counters_before(store, cutoff)
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
    ``exclusive`` never replaces an existing file. The file takes the user's umask."""
    try:
        fd, temporary = create_beside(path, ".part")
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
