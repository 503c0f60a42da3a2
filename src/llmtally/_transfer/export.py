"""Export: the ledger's events as JSONL or CSV, safe for terminals and spreadsheets, written atomically."""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import date, datetime, timezone
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Connection, Select, func, select

from .._storage.files import create_beside
from .._storage.store import Store
from .._storage.tables import EVENT_COLUMNS
from .._timeparse import parse_instant
from .transfer import (
    DEFAULT_CHUNK_ROWS,
    EVENTS,
    FORMULA_START,
    ExportResult,
    TransferError,
    format_for,
    is_quoted,
    is_stream,
    iso_utc,
    ledger_errors,
    reason,
)

__all__ = ["export_events", "count_events"]

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
    path = None if is_stream(target) else Path(target)  # type: ignore[arg-type]
    fmt = format_for(path, format)
    statement = _filtered(select(EVENTS), since=since, until=until, project=project, now=now)
    with ledger_errors(store, "the export"), store.connect() as conn:
        if path is not None:
            with atomic_output(path) as file:
                rows = write_events(conn, statement, file, fmt, progress, chunk_rows)
            return ExportResult(rows=rows, format=fmt, path=path)
        out: Any = target
        if fmt == "csv" and _is_terminal(target):
            out = _ShownControls(target)  # type: ignore[arg-type]
        try:
            rows = write_events(conn, statement, out, fmt, progress, chunk_rows)
        except BrokenPipeError:
            raise  # the reader went away (`| head`): not an error worth a message
        except OSError as exc:
            raise TransferError(f"cannot write the export ({reason(exc)}); what was written "
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
    statement = _filtered(select(func.count()).select_from(EVENTS), since=since, until=until,
                          project=project, now=now)
    with ledger_errors(store, "counting events"):
        with store.connect() as conn:
            return int(conn.execute(statement).scalar_one())


def _filtered(statement: Select[Any], *, since: Any, until: Any, project: str | None,
              now: datetime | None) -> Select[Any]:
    now = now or datetime.now(timezone.utc)
    start, end = parse_instant(since, now=now), parse_instant(until, now=now)
    if start is not None:
        statement = statement.where(EVENTS.c.ts >= start)
    if end is not None:
        statement = statement.where(EVENTS.c.ts < end)
    if project is not None:
        statement = statement.where(EVENTS.c.project == project)
    return statement


def write_events(conn: Connection, statement: Select[Any], out: IO[bytes], fmt: str,
                  progress: Callable[[int], None] | None, chunk_rows: int) -> int:
    """Stream the statement's rows to ``out``, in pieces of about _WRITE_PIECE bytes; returns
    the count."""
    encode = _encode_jsonl if fmt == "jsonl" else _encode_csv
    if fmt == "csv":
        out.write(b"".join(_encode_csv([EVENT_COLUMNS])))  # the header row
    ordered = statement.order_by(EVENTS.c.ts, EVENTS.c.id)
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
        values["ts"] = iso_utc(row[_TS_INDEX])
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
        return iso_utc(value)
    if isinstance(value, (list, dict)):
        return _json_line(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return _neutralised(value)
    return str(value)


def _neutralised(text: str) -> str:
    if text and (text[0] in FORMULA_START or is_quoted(text)):
        return "'" + text
    return text


@contextlib.contextmanager
def atomic_output(path: Path, *, exclusive: bool = False) -> Iterator[IO[bytes]]:
    """A binary stream that becomes ``path`` only when the block completes (fsync'd, renamed);
    on any failure the temporary file is removed. ``.gz`` names are gzip-compressed;
    ``exclusive`` never replaces an existing file. The file takes the user's umask."""
    try:
        fd, temporary = create_beside(path, ".part")
    except OSError as exc:
        raise TransferError(f"cannot write {path} ({reason(exc)}); choose a writable "
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
        raise TransferError(f"cannot write {path} ({reason(exc)}); nothing was written") from exc
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
