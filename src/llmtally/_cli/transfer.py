"""``llmtally export``, ``import`` and ``prune``: events in and out of the ledger."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any, cast

import click

from .._i18n import translator
from .._terminal import CommandError, TerminalText, echo, iso, money
from .ledger import ledger_options

__all__ = ["export", "import_", "prune"]


@click.command("export")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default=None,
              help="jsonl or csv (default: from -o's extension, else jsonl).")
@click.option("--since", default=None, help="Start: a duration (30d) or a date. Default: all.")
@click.option("--until", default=None, help="End (exclusive): a duration ago or a date.")
@click.option("--project", default=None, help="Only this project.")
@click.option("-o", "--output", default=None, metavar="FILE", type=click.Path(dir_okay=False),
              help="Write to FILE (complete or not at all; .gz compresses). Default: stdout.")
@ledger_options
def export(tally: Any, fmt: str | None, since: str | None, until: str | None,
           project: str | None, output: str | None) -> None:
    """Write events as JSONL or CSV: every column, ts in UTC (ISO 8601), oldest first.

    \b
    Example:
      llmtally export --format csv --since 30d > usage.csv
      llmtally export --project search -o search.jsonl.gz
    """
    from .._transfer.export import export_events

    with _export_progress(tally, since=since, until=until, project=project) as progress:
        to_file = output not in (None, "-")
        stdout: IO[bytes] = sys.stdout.buffer
        if not to_file and sys.stdout.isatty():
            stdout = TerminalText(sys.stdout)  # type: ignore[assignment]
        result = export_events(tally.store, cast(str, output) if to_file else stdout,
                               format=fmt, since=since, until=until, project=project,
                               progress=progress)
    if to_file:
        _ = translator(tally.language)
        echo(_("exported {rows:,} events to {path} ({format})").format(
            rows=result.rows, path=output, format=result.format), err=True)


@click.command("import")
@click.argument("file", metavar="FILE")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default=None,
              help="jsonl or csv (default: from FILE's extension, else its content).")
@ledger_options(create=True)
def import_(tally: Any, file: str, fmt: str | None) -> None:
    """Add the events of FILE (JSONL or CSV from `export`, .gz too, - for stdin).

    Idempotent: an event whose id is already in the ledger is skipped, so importing a file
    twice adds nothing. Invalid lines are listed and left out; all valid lines are written in
    one transaction. Exit code 0: every line imported or already there; 1: some lines were
    invalid (the others were imported); 2: nothing imported (unreadable or wrong-format file,
    ledger error).

    \b
    Example:
      llmtally import usage.jsonl
      llmtally export --db a.db | llmtally import - --db merged.db
    """
    from .._transfer.importing import import_events

    source = sys.stdin.buffer if file == "-" else file
    result = import_events(tally.store, source, format=fmt)
    _ = translator(tally.language)
    echo(_("imported {imported:,} events from {path} ({format}); skipped {skipped:,} already "
           "in the ledger; invalid lines: {invalid:,}").format(
        imported=result.imported, path=file, format=result.format, skipped=result.skipped,
        invalid=result.invalid))
    for line, reason in result.invalid_lines:
        echo("  " + _("line {line}: {reason}").format(line=line, reason=reason))
    if result.invalid > len(result.invalid_lines):
        echo("  " + _("... and {count:,} more").format(
            count=result.invalid - len(result.invalid_lines)))
    if result.invalid:
        raise SystemExit(1)


def _require_older_than(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str:
    if not value:
        raise CommandError("prune needs --older-than (e.g. 90d or 2026-01-01): it deletes "
                           "events, so it never guesses a cutoff")
    return value


@click.command()
@click.option("--older-than", callback=_require_older_than, metavar="AGE|DATE",
              help="Required. Delete events older than this: 90d, 12w, or a date (2026-01-01).")
@click.option("--archive", default=None, metavar="FILE.jsonl.gz", type=click.Path(dir_okay=False),
              help="First write them to this new file (gzip JSONL; `llmtally import` reads it).")
@click.option("--dry-run", is_flag=True, help="Print what would be deleted; delete nothing.")
@ledger_options
def prune(tally: Any, older_than: str, archive: str | None, dry_run: bool) -> None:
    """Delete events older than a cutoff, in one transaction (budget counters are kept).

    With --archive they are written to the archive first, and only those are deleted.

    \b
    Example:
      llmtally prune --older-than 90d --dry-run
      llmtally prune --older-than 90d --archive old-2026Q3.jsonl.gz
    """
    from .._transfer.prune import prune_events

    result = prune_events(tally.store, older_than, archive=archive, dry_run=dry_run)
    _ = translator(tally.language)
    details = [_("cost {amount}").format(amount=money(amount, currency))
               for currency, amount in result.cost.items()]
    if result.unpriced:
        details.append(_("{count:,} unpriced").format(count=result.unpriced))
    what = _("{count:,} events older than {cutoff}").format(
        count=result.events, cutoff=iso(result.cutoff)) + (
        f" ({'; '.join(details)})" if details else "")
    if result.dry_run:
        echo(_("would delete {what}").format(what=what)
             + (_(", archiving them to {path}").format(path=archive) if archive else "")
             + _("; nothing deleted (--dry-run)"))
    else:
        echo(_("deleted {what}").format(what=what)
             + (_("; archived to {path}").format(path=archive) if archive else ""))


@contextlib.contextmanager
def _export_progress(tally: Any, **filters: Any) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr when it is a terminal (it needs a count first), else nothing."""
    if not sys.stderr.isatty():
        yield None
        return
    from .._transfer.export import count_events

    total = count_events(tally.store, **filters)
    with click.progressbar(length=total, label="exporting", file=sys.stderr) as bar:
        yield bar.update
