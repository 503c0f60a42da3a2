"""What the CLI prints, made safe for a terminal (control characters shown escaped, never run), and
every error as one line with its fix (exit 2)."""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import logging
import os
import sqlite3
import traceback
import unicodedata
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from typing import IO, Any

import click

from ._errors import ConfigError, LedgerError
from ._i18n import display_width, pad

DEBUG_VARIABLE = "LLMTALLY_DEBUG"  # set to 1: an unexpected error shows its traceback


_NAMED_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def printable(value: object) -> str:
    """``str(value)`` with every control character made visible: C0/C1 controls and DEL as
    ``\\x1b``, format characters (bidi overrides such as U+202E, zero-width ones), line and
    paragraph separators and lone surrogates as ``\\u202e``. Letters, marks, symbols and
    spaces of any script pass unchanged."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or unicodedata.category(ch) == "Zs" else _escape(ch)
                   for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[ch]
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def echo(text: object = "", *, err: bool = False) -> None:
    """``click.echo`` for everything the CLI prints: each line made :func:`printable`."""
    click.echo("\n".join(printable(line) for line in str(text).split("\n")), err=err)


def print_json(data: Any) -> None:
    # ensure_ascii: every control, bidi and other non-ASCII character becomes a \uXXXX escape,
    # so the output is valid JSON, exact (a parser gets the original values back) and inert.
    click.echo(json.dumps(data, indent=2, ensure_ascii=True))


class TerminalText(io.RawIOBase):
    """A binary stream for export to a terminal: lines pass, control characters made visible
    (a CSV record's closing ``\\r`` is dropped). Files and pipes get the bytes unchanged."""

    def __init__(self, terminal: IO[str]) -> None:
        super().__init__()
        self._terminal = terminal
        self._decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        lines = self._decode(bytes(data)).split("\n")
        self._terminal.write("\n".join(printable(line.removesuffix("\r")) for line in lines))
        return len(data)

    def flush(self) -> None:
        self._terminal.flush()


class _PrintableLogs(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(printable(line) for line in super().format(record).split("\n"))


class CommandError(click.ClickException):
    """One line saying what is wrong and how to fix it; exit code 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(printable(" ".join(str(message).split())))


def _first_line(exc: BaseException) -> str:
    cause = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's error
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    text = str(cause).strip()
    return text.splitlines()[0].strip() if text else type(cause).__name__


def _as_command_error(exc: Exception, ledger: str | None = None) -> click.ClickException:
    """What a user can act on, in one line, for an exception that escaped a command."""
    from sqlalchemy.exc import OperationalError, SQLAlchemyError

    if isinstance(exc, click.ClickException):
        return exc
    if isinstance(exc, (ConfigError, LedgerError)):
        return CommandError(str(exc))
    where = f"the ledger {ledger}" if ledger else "the ledger"
    if isinstance(exc, (OperationalError, sqlite3.OperationalError)):
        return CommandError(f"{where} cannot be reached ({_first_line(exc)}); nothing was "
                            "changed. Check --db / LLMTALLY_DATABASE_URL and that the database "
                            "is running")
    if isinstance(exc, (SQLAlchemyError, sqlite3.Error)):
        return CommandError(f"{where} cannot be read ({_first_line(exc)}); it may be corrupted "
                            "or not a llmtally ledger. Check --db / LLMTALLY_DATABASE_URL")
    if isinstance(exc, OSError):
        name = f"{exc.filename}: " if exc.filename else ""
        return CommandError(f"{name}{_first_line(exc)}")
    return CommandError(f"internal error ({type(exc).__name__}: {_first_line(exc)}); this is a "
                        f"bug in llmtally: run again with {DEBUG_VARIABLE}=1 for the traceback "
                        "and report it")


@contextlib.contextmanager
def one_line_errors(ledger: str | None = None) -> Iterator[None]:
    try:
        yield
    except (click.exceptions.Exit, click.exceptions.Abort, BrokenPipeError):
        raise  # click ends quietly on a closed pipe (`llmtally export | head`)
    except Exception as exc:
        if os.environ.get(DEBUG_VARIABLE) and not isinstance(exc, click.ClickException):
            traceback.print_exc()
        raise _as_command_error(exc, ledger) from exc


class Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        _log_printably()
        with one_line_errors():
            return super().invoke(ctx)


def _log_printably() -> None:
    """Warnings the library logs during a command reach stderr (through logging's last-resort
    handler, as nothing else is configured) with control characters made visible."""
    if logging.lastResort is not None:
        logging.lastResort.setFormatter(_PrintableLogs("%(message)s"))


def iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.replace(tzinfo=timezone.utc).isoformat(timespec="seconds")


def quantity(amount: float, unit: str) -> str:
    if unit in ("tokens", "requests"):
        return f"{amount:,.0f}"
    return money(amount, unit)


def money(amount: float, currency: str | None) -> str:
    digits = 2 if abs(amount) >= 1 else 6
    return f"{amount:,.{digits}f} {currency or ''}".strip()


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, left: int) -> None:
    """Aligned columns: the first ``left`` columns (names) flush left, figures flush right."""
    cells = [[printable(c) for c in header]] + [[printable(c) for c in row] for row in rows]
    # columns, not characters: a Chinese or Korean header or name is two columns a character
    widths = [max(display_width(row[i]) for row in cells) for i in range(len(header))]
    for index, row in enumerate(cells):
        line = "  ".join(pad(cell, w, right=i >= left)
                         for i, (cell, w) in enumerate(zip(row, widths)))
        echo(line.rstrip())
        if index == 0:
            echo("  ".join("-" * w for w in widths))
