"""The `llmtally` command: thin commands over the library (open the ledger, one call, print).

Two rules hold for every command. Output: every line goes through :func:`echo`, which makes
control characters visible (a model or user name is caller-controlled and may hold terminal
escapes); JSON output is ASCII-escaped. Errors: one line on stderr, exit code 2
(:class:`CommandError`); the group turns any exception that escapes a command into one.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, TypeVar, cast, overload

import click

from ._terminal import (
    CommandError,
    Group,
    TerminalText,
    echo,
    iso,
    money,
    one_line_errors,
    print_json,
    print_table,
    printable,
    quantity,
)

F = TypeVar("F", bound=Callable[..., Any])


# -- output: nothing a caller recorded can drive the operator's terminal -----------------------


# -- errors: one line, exit code 2 --------------------------------------------------------------


# -- the ledger ---------------------------------------------------------------------------------


@overload
def ledger_options(func: F) -> F: ...
@overload
def ledger_options(*, create: bool = False) -> Callable[[F], F]: ...


def ledger_options(func: F | None = None, *, create: bool = False) -> Any:
    """``--db`` and ``--config``, shared by every command that opens the ledger; the command
    gets the open ``Tally`` as its first argument.

    The ledger is reached before the command runs, so an unreachable, corrupted or newer
    ledger is one line. Only a command with ``create=True`` (import) may create a missing
    SQLite file; the others say it does not exist.
    """
    if func is None:
        return functools.partial(ledger_options, create=create)

    @click.option("--db", "database_url", metavar="URL",
                  help="Ledger path or URL (default: $LLMTALLY_DATABASE_URL or ./llmtally.db).")
    @click.option("--config", "config_path", metavar="FILE", type=click.Path(dir_okay=False),
                  help="llmtally.toml to read (default: $LLMTALLY_CONFIG or ./llmtally.toml).")
    @functools.wraps(func)
    def wrapper(*args: Any, database_url: str | None, config_path: str | None, **kwargs: Any) -> Any:
        tally = open_ledger(database_url, config_path, create=create)
        try:
            with one_line_errors(tally.database_url):
                return func(tally, *args, **kwargs)
        finally:
            tally.close()

    return wrapper


def open_ledger(database_url: str | None, config_path: str | None, *, create: bool = False) -> Any:
    """The configured ``Tally``, its ledger reached and its schema checked (or CommandError)."""
    from sqlalchemy.engine import make_url

    from ._config import load_settings
    from ._storage.store_urls import DEFAULT_DATABASE_URL, normalize_url
    from ._tally import Tally

    settings = load_settings(config_path)  # validated; Tally(**settings) checks --db's value
    if database_url:
        settings["database_url"] = database_url
    url = normalize_url(settings.get("database_url") or DEFAULT_DATABASE_URL)
    parsed = make_url(url)
    if (not create and parsed.get_backend_name() == "sqlite"
            and parsed.database not in (None, "", ":memory:")
            and not Path(parsed.database).exists()):
        raise CommandError(
            f"the ledger {parsed.database} does not exist (nothing was created); point --db or "
            "LLMTALLY_DATABASE_URL at your ledger, or make one by running your application, "
            "`llmtally import FILE` or `llmtally demo`")
    tally = Tally(**settings)
    try:
        with one_line_errors(tally.database_url):
            tally.store.ensure_schema()  # PostgreSQL is otherwise reached at the first query
    except BaseException:
        tally.close()
        raise
    return tally


# -- the commands -------------------------------------------------------------------------------


@click.group(cls=Group,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="llmtally")
def main() -> None:
    """llmtally: what your LLM calls cost, from a SQL ledger.

    \b
    Examples:
      llmtally demo
      llmtally summary --since 7d --by model
      llmtally prices anthropic/claude-sonnet-4-5
      llmtally unpriced
      llmtally budgets
      llmtally report --week last -o reports/
    """


@main.command()
@click.option("--db", "database", default="llmtally-demo.db", show_default=True,
              type=click.Path(dir_okay=False), help="The SQLite file to fill (made fresh).")
@click.option("-o", "--output", default="reports/", show_default=True,
              help="Where the report goes (a directory, or a file name).")
def demo(database: str, output: str) -> None:
    """Two weeks of simulated traffic, live calls through LiteLLM and LangChain (mock
    responses, nothing leaves the machine), a budget blocking a call, and the report.

    \b
    Example:
      llmtally demo && open reports/llmtally-*.html
    """
    from ._demo import run_demo

    result = run_demo(database, output, say=echo)
    echo("")
    for line in result.headline:
        echo("  " + line)
    echo("")
    echo(f"Report: {result.report}")
    echo(f"Ledger: {result.database}  (next: llmtally summary --db {database} --by project)")
    echo(f"Done in {result.seconds:.1f} s.")


@main.command()
@click.option("--since", default="7d", show_default=True, help="Start: a duration (7d, 24h) or a date.")
@click.option("--until", default=None, help="End (exclusive): a duration ago or a date. Default: now.")
@click.option("--by", "group_by", default="model", show_default=True,
              type=click.Choice(["model", "provider", "project", "user", "session", "source",
                                 "status", "call_type", "day"]), help="Group by this column.")
@click.option("--project", default=None, help="Only this project.")
@click.option("--user", default=None, help="Only this user.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV.")
@ledger_options
def summary(tally: Any, since: str, until: str | None, group_by: str, project: str | None,
            user: str | None, as_json: bool, as_csv: bool) -> None:
    """Calls, tokens and cost per model (or provider, project, user, day...).

    \b
    Example:
      llmtally summary --since 7d --by project
      llmtally summary --since 2026-11-01 --until 2026-11-15 --by user --json
    """
    filters = {name: value for name, value in (("project", project), ("user", user)) if value}
    rows = tally.summary(since=since, until=until, by=group_by, **filters)
    if as_json:
        print_json([row.as_dict() for row in rows])
        return
    if as_csv:
        fields = list(rows[0].as_dict()) if rows else ["key"]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: printable(v) if isinstance(v, str) else v
                          for k, v in row.as_dict().items()} for row in rows)
        click.echo(buffer.getvalue(), nl=False)
        return
    if not rows:
        echo(f"No calls recorded since {since} in {tally.database_url}.")
        return
    table = [[row.key or "-", row.calls, row.errors, row.input_tokens, row.output_tokens,
              row.cache_read_tokens,
              "unpriced" if row.unpriced_calls == row.calls else money(row.cost, row.currency),
              row.unpriced_calls or ""] for row in rows]
    table.append(["TOTAL", sum(r.calls for r in rows), sum(r.errors for r in rows),
                  sum(r.input_tokens for r in rows), sum(r.output_tokens for r in rows),
                  sum(r.cache_read_tokens for r in rows),
                  money(sum(r.cost for r in rows), rows[0].currency),
                  sum(r.unpriced_calls for r in rows) or ""])
    print_table([group_by, "calls", "errors", "input", "output", "cached", "cost", "unpriced"],
                 table, left=1)
    if any(r.unpriced_calls for r in rows):
        echo("\nSome calls have no known price (not counted in cost): see `llmtally unpriced`.")


@main.command()
@click.argument("model")
@click.option("--provider", default=None, help="Provider, if MODEL has no provider/ prefix.")
@click.option("--price-map", default=None, help="auto | bundled | litellm | path to a price JSON.")
@click.option("--config", "config_path", metavar="FILE", type=click.Path(dir_okay=False),
              help="llmtally.toml with price overrides.")
def prices(model: str, provider: str | None, price_map: str | None, config_path: str | None) -> None:
    """Show the price llmtally uses for MODEL (per million tokens).

    \b
    Example:
      llmtally prices gpt-4o-mini
      llmtally prices qwen-plus --provider dashscope
    """
    from ._config import read_settings
    from ._pricing.book import PriceBook

    settings = read_settings(config_path)
    book = PriceBook(settings.prices or None, currency=settings.currency,
                     rates=settings.rates or None, price_map=price_map or settings.price_map)
    found = book.resolve(model, provider)
    stored = (f"stored as:    model {found.model}, provider {found.provider or '-'}"
              + (f" ({found.how})" if found.provider else ""))
    if found.price is None:
        raise CommandError(
            f"no price known for {model!r}" + (f" (provider {provider!r})" if provider else "")
            + f" in {book.map_source}{_other_providers_entry(book, found)}. Add one to llmtally.toml: "
            f"[prices.\"{model}\"] input = ..., output = ... (per 1M tokens)")
    echo(_describe_price(model, found.price, stored))


def _other_providers_entry(book: Any, found: Any) -> str:
    """Why a name the map knows is unpriced: its entry belongs to another provider."""
    if found.provider is None:
        return ""
    other = book.lookup(found.model)
    if other is None or other.provider is None:
        return ""
    return (f"; its entry {other.model_key!r} is {other.provider}'s, and a name is never priced "
            f"from another provider's entry (provider here: {found.provider})")


@main.command()
@click.option("--since", default=None, help="Only calls since (7d, 2026-11-01). Default: all.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@ledger_options
def unpriced(tally: Any, since: str | None, as_json: bool) -> None:
    """Models seen with no known price (their calls have no cost in reports).

    \b
    Example:
      llmtally unpriced --since 30d
    """
    rows = tally.unpriced(since=since)
    if as_json:
        print_json([row.as_dict() for row in rows])
        return
    if not rows:
        echo("Every recorded model has a price.")
        return
    print_table(["provider", "model", "calls", "input", "output", "last seen"],
                 [[r.provider or "-", r.model, r.calls, r.input_tokens, r.output_tokens,
                   r.last_seen.isoformat(timespec="seconds")] for r in rows], left=2)
    echo('\nAdd a price to llmtally.toml, e.g.\n  [prices."MODEL"]\n  input = 0.5    # per 1M '
               'input tokens\n  output = 1.5   # per 1M output tokens\n  currency = "USD"')


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--check", is_flag=True,
              help="Compare every counter with the ledger's events; exit 1 if any differs.")
@click.option("--repair", is_flag=True, help="Rewrite the counters that differ from the ledger.")
@ledger_options
def budgets(tally: Any, as_json: bool, check: bool, repair: bool) -> None:
    """Every budget in force on this ledger, whichever process defined it: used, reserved,
    limit, when its window resets, when it runs out at the current rate, and the calls of
    models with no price that a usd budget could not count. Budgets come from llmtally.toml
    ([[budgets]]), LLMTALLY_CONFIG, or any Tally(budgets=...) that used this ledger.

    --check compares each counter (a cache of the ledger's events) with a GROUP BY over the
    events and with the open holds, prints any drift and exits 1 if there is one; --repair
    rewrites those counters from the ledger.

    \b
    Example:
      llmtally budgets --config llmtally.toml
      llmtally budgets --check --db postgresql+psycopg://app@db/llm
    """
    from ._budgets.counters import check_counters, ledger_states, unpriced_calls

    if check or repair:
        drifts = check_counters(tally.store, repair=repair)
        unit = {"usd": tally.currency, "tokens": "tokens", "requests": "requests"}
        for drift in drifts:
            kind = unit[drift.budget.kind]
            echo(f"{drift.budget.label} [{drift.instance or 'all calls'}] window "
                 f"{drift.window_start.isoformat()}: spent {quantity(drift.spent, kind)}, the "
                 f"ledger says {quantity(drift.expected_spent, kind)}; reserved "
                 f"{quantity(drift.reserved, kind)}, open holds "
                 f"{quantity(drift.expected_reserved, kind)}"
                 + (" (repaired)" if repair else ""))
        if not drifts:
            echo("Every budget counter equals the ledger.")
        elif not repair:
            echo(f"{len(drifts)} counters differ from the ledger: llmtally budgets --repair "
                 "rewrites them.")
            raise SystemExit(1)
        return
    now = datetime.now(timezone.utc)
    tally.flush(10)  # also puts the budgets of llmtally.toml in the ledger: they are in force too
    with tally.store.connect() as conn:
        states = ledger_states(conn, now)
        unpriced = [unpriced_calls(conn, state) if state.budget.kind == "usd" else 0
                    for state in states]
    rows: list[dict[str, Any]] = []
    for state, not_counted in zip(states, unpriced):
        budget = state.budget
        scope = dict(budget.scope) | ({budget.each: state.instance} if budget.each else {})
        run_out = state.run_out(now)
        rows.append({
            "budget": budget.label, "scope": scope, "kind": budget.kind, "used": state.spent,
            "reserved": state.reserved, "limit": budget.limit,
            "percent": 100 * state.used / budget.limit if budget.limit else None,
            "resets_at": iso(state.window.end), "runs_out_at": iso(run_out),
            "action": budget.action, "unpriced_calls": not_counted,
        })
    if as_json:
        print_json(rows)
        return
    if not rows and tally.budgets is not None:
        echo("No budget has been charged yet (an each= budget shows each user, project... "
             "once a call of theirs was checked against it).")
        return
    if not rows:
        echo("No budgets configured: add [[budgets]] to llmtally.toml (see the README).")
        return
    unit = {"usd": tally.currency, "tokens": "tokens", "requests": "requests"}
    print_table(
        ["budget", "scope", "used", "reserved", "limit", "%", "resets", "runs out", "unpriced"],
        [[r["budget"], ", ".join(f"{k}={v}" for k, v in r["scope"].items()) or "all calls",
          quantity(r["used"], unit[r["kind"]]), quantity(r["reserved"], unit[r["kind"]]),
          quantity(r["limit"], unit[r["kind"]]),
          "-" if r["percent"] is None else f"{r['percent']:.1f}",
          r["resets_at"] or "never", r["runs_out_at"] or "-",
          str(r["unpriced_calls"]) if r["unpriced_calls"] else "-"] for r in rows], left=2)
    if any(r["unpriced_calls"] for r in rows):
        echo("unpriced: calls in the window to models with no price, which usd budgets cannot "
             "count (llmtally unpriced lists them; a price override counts them from then on).")


@main.command()
@click.option("--week", default=None, metavar="WEEK",
              help="last (default), this, or an ISO week such as 2026-W47.")
@click.option("--since", default=None, help="Start instead of a week: a date or a duration (30d).")
@click.option("--until", default=None, help="End (exclusive) with --since. Default: now.")
@click.option("--project", default=None, help="Only this project.")
@click.option("-o", "--output", default=None, metavar="PATH",
              help="File, or directory for llmtally-<week>.html (default: reports/).")
@ledger_options
def report(tally: Any, week: str | None, since: str | None, until: str | None,
           project: str | None, output: str | None) -> None:
    """Write the HTML usage report (one self-contained file) and print its headline.

    \b
    Example:
      llmtally report --week last -o reports/
      llmtally report --since 2026-11-01 --until 2026-11-15 --project search -o r.html
    """
    from ._reporting.render import write_report

    written = write_report(tally, output, week=week, since=since, until=until, project=project)
    echo(str(written.path))
    for line in written.report.headline_lines():
        echo(f"  {line}")


@main.command("export")
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
    from ._transfer.export import export_events

    with _export_progress(tally, since=since, until=until, project=project) as progress:
        to_file = output not in (None, "-")
        stdout: IO[bytes] = sys.stdout.buffer
        if not to_file and sys.stdout.isatty():
            stdout = TerminalText(sys.stdout)  # type: ignore[assignment]
        result = export_events(tally.store, cast(str, output) if to_file else stdout,
                               format=fmt, since=since, until=until, project=project,
                               progress=progress)
    if to_file:
        echo(f"exported {result.rows:,} events to {output} ({result.format})", err=True)


@main.command("import")
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
    from ._transfer.importing import import_events

    source = sys.stdin.buffer if file == "-" else file
    result = import_events(tally.store, source, format=fmt)
    echo(f"imported {result.imported:,} events from {file} ({result.format}); "
               f"skipped {result.skipped:,} already in the ledger; invalid lines: {result.invalid:,}")
    for line, reason in result.invalid_lines:
        echo(f"  line {line}: {reason}")
    if result.invalid > len(result.invalid_lines):
        echo(f"  ... and {result.invalid - len(result.invalid_lines):,} more")
    if result.invalid:
        raise SystemExit(1)


def _require_older_than(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str:
    if not value:
        raise CommandError("prune needs --older-than (e.g. 90d or 2026-01-01): it deletes "
                           "events, so it never guesses a cutoff")
    return value


@main.command()
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
    from ._transfer.prune import prune_events

    result = prune_events(tally.store, older_than, archive=archive, dry_run=dry_run)
    details = [f"cost {money(amount, currency)}" for currency, amount in result.cost.items()]
    if result.unpriced:
        details.append(f"{result.unpriced:,} unpriced")
    what = f"{result.events:,} events older than {iso(result.cutoff)}" + (
        f" ({'; '.join(details)})" if details else "")
    if result.dry_run:
        echo(f"would delete {what}" + (f", archiving them to {archive}" if archive else "")
                   + "; nothing deleted (--dry-run)")
    else:
        echo(f"deleted {what}" + (f"; archived to {archive}" if archive else ""))


@contextlib.contextmanager
def _export_progress(tally: Any, **filters: Any) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr when it is a terminal (it needs a count first), else nothing."""
    if not sys.stderr.isatty():
        yield None
        return
    from ._transfer.export import count_events

    total = count_events(tally.store, **filters)
    with click.progressbar(length=total, label="exporting", file=sys.stderr) as bar:
        yield bar.update


def _describe_price(model: str, price: Any, stored: str) -> str:
    def per_million(value: float | None) -> str:
        return "-" if value is None else f"{value * 1_000_000:.4f}"

    lines = [
        f"model:        {model}",
        stored,
        f"matched:      {price.model_key}  (provider {price.provider or '-'}, mode {price.mode or '-'})",
        f"source:       {price.source}",
        f"currency:     {price.currency} per 1M tokens",
        f"input:        {per_million(price.input)}",
        f"output:       {per_million(price.output)}",
        f"cache read:   {per_million(price.cache_read)}",
        f"cache write:  {per_million(price.cache_write)}",
        f"reasoning:    {per_million(price.reasoning)}",
    ]
    if price.above or price.tiers:
        sizes = [above for above, _ in price.above] or [low for low, _, _ in price.tiers[1:]]
        lines.append("larger:       other rates above " + ", ".join(f"{int(size):,}" for size in sizes)
                     + " prompt tokens")
    if price.off_peak is not None:
        peak = price.off_peak.rates
        lines.append(f"off-peak:     input {per_million(peak[0])}, output {per_million(peak[1])}, "
                     f"cache read {per_million(peak[2])} in the provider's discount hours "
                     "(each call is priced at its own time)")
    if getattr(price, "max_output_tokens", None):
        lines.append(f"max output:   {price.max_output_tokens} tokens")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    main()
