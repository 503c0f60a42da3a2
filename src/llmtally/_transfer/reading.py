"""Reading a file to import: plain or gzip, JSONL or CSV, line by line with bounded memory (a
hostile file cannot exhaust it)."""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from .._events.event import TOKEN_FIELDS
from .transfer import (
    MAX_LINE_BYTES,
    ImportResult,
    TransferError,
    is_stream,
    unquoted,
)
from .validation import COLUMN_SET, Invalid, short

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


class Lines:
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
        item: tuple[int, str] | None
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


@contextlib.contextmanager
def open_input(source: str | os.PathLike[str] | IO[bytes]) -> Iterator[tuple[IO[bytes], str]]:
    """The source as a binary stream (gunzipped if it is gzip data) and its display name."""
    if is_stream(source):
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


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


_json_loads = json.JSONDecoder(parse_constant=_refuse_constant).decode


_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def jsonl_records(lines: Lines, result: ImportResult, name: str) -> Iterator[tuple[int, Any]]:
    """(line number, decoded JSON object or the reason it is not one) for each non-blank line.
    Raises TransferError at the end if no line at all was a JSON object."""
    objects = 0
    for text in lines:
        number = lines.number
        flagged = lines.flag_in(number, number)
        if flagged is None and not text.strip():
            continue
        if flagged is not None:
            yield number, Invalid(flagged)
            continue
        try:
            value = _json_loads(text)
        except (ValueError, RecursionError) as exc:
            yield number, Invalid(f"not JSON ({getattr(exc, 'msg', exc)})")
            continue
        if not isinstance(value, dict):
            yield number, Invalid(f"a JSON {_JSON_KINDS.get(type(value), 'value')}, not an object")
            continue
        objects += 1
        yield number, value
    if objects == 0 and result.invalid:
        raise TransferError(f"{name} is not JSONL: none of its lines is a JSON object; give a "
                            "file written by `llmtally export` (or --format csv for CSV)")


def csv_records(lines: Lines, name: str) -> Iterator[tuple[int, Any]]:
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
                yield first, Invalid(str(exc) if isinstance(exc, _RecordTooLong)
                                      else f"not CSV ({exc})")
                continue
            first = lines.record_first
            flagged = lines.flag_in(first, lines.number)
            if flagged is not None:
                yield first, Invalid(flagged)
            elif not fields:
                continue
            elif len(fields) != len(header):
                yield first, Invalid(f"{len(fields)} fields; the header has {len(header)}")
            else:
                yield first, _from_csv(header, fields)

    return records()


def _csv_header(reader: Any, lines: Lines, name: str) -> list[str]:
    hint = ("give a file written by `llmtally export --format csv` (its first line names the "
            "columns: id, ts, model, ...), or --format jsonl for JSONL")
    try:
        lines.start_record()
        header: list[str] = next(reader, [])
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


def _from_csv(header: Sequence[str], fields: Sequence[str]) -> dict[str, Any] | Invalid:
    """CSV text cells as the JSON types a JSONL line would carry (an empty cell is null)."""
    record: dict[str, Any] = {}
    for name, text in zip(header, fields):
        if text == "" or name not in COLUMN_SET:
            continue
        if name in _CSV_INTS:
            if not _DIGITS.fullmatch(text):
                return Invalid(f"{name}: {short(text)} is not a token count (0 to 10^12)")
            record[name] = int(text)
        elif name in _CSV_FLOATS:
            record[name] = float(text) if _NUMBER.fullmatch(text) else text
        elif name == "streamed":
            record[name] = _CSV_BOOLS.get(text.lower(), text)
        elif name in _CSV_JSON:
            try:
                record[name] = _json_loads(text)
            except (ValueError, RecursionError):
                return Invalid(f"{name}: {short(text)} is not JSON")
        else:
            record[name] = unquoted(text)
    return record
