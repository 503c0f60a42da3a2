"""The `llmtally` command: thin commands over the library (open the ledger, one call, print).

Two rules hold for every command. Output: every line goes through :func:`echo`, which makes
control characters visible (a model or user name is caller-controlled and may hold terminal
escapes); JSON output is ASCII-escaped. Errors: one line on stderr, exit code 2
(:class:`CommandError`); the group turns any exception that escapes a command into one.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TypeVar

import click

from ._cli.alerts import alerts, status
from ._cli.ledger import ledger_options
from ._cli.prices import prices
from ._cli.rollups import rollups
from ._cli.serve import serve
from ._cli.transfer import export, import_, prune
from ._i18n import N_, translator
from ._terminal import (
    Group,
    echo,
    iso,
    money,
    print_json,
    print_table,
    printable,
    quantity,
)

F = TypeVar("F", bound=Callable[..., Any])

# summary's --by columns, shown translated as its first header
_GROUP_NAMES = (N_("model"), N_("provider"), N_("project"), N_("user"), N_("session"),
                N_("source"), N_("status"), N_("call_type"), N_("day"))


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
    from ._config import read_settings
    from ._demo import run_demo

    # the demo keeps its own ledger and budgets; only the language is the configured one
    result = run_demo(database, output, say=echo, language=read_settings().language)
    _ = translator(result.language)
    echo("")
    for line in result.headline:
        echo("  " + line)
    echo("")
    echo(_("Report: {path}").format(path=result.report))
    echo(_("Ledger: {path}  (next: llmtally summary --db {db} --by project)").format(
        path=result.database, db=database))
    echo(_("Done in {seconds:.1f} s.").format(seconds=result.seconds))


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
    _ = translator(tally.language)
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
        echo(_("No calls recorded since {since} in {ledger}.").format(
            since=since, ledger=tally.database_url))
        return
    table = [[row.key or "-", row.calls, row.errors, row.input_tokens, row.output_tokens,
              row.cache_read_tokens,
              _("unpriced") if row.unpriced_calls == row.calls else money(row.cost, row.currency),
              row.unpriced_calls or ""] for row in rows]
    table.append([_("TOTAL"), sum(r.calls for r in rows), sum(r.errors for r in rows),
                  sum(r.input_tokens for r in rows), sum(r.output_tokens for r in rows),
                  sum(r.cache_read_tokens for r in rows),
                  money(sum(r.cost for r in rows), rows[0].currency),
                  sum(r.unpriced_calls for r in rows) or ""])
    print_table([_(group_by), _("calls"), _("errors"), _("input"), _("output"), _("cached"),
                 _("cost"), _("unpriced")], table, left=1)
    if any(r.unpriced_calls for r in rows):
        echo("\n" + _("Some calls have no known price (not counted in cost): see "
                      "`llmtally unpriced`."))


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
    _ = translator(tally.language)
    rows = tally.unpriced(since=since)
    if as_json:
        print_json([row.as_dict() for row in rows])
        return
    if not rows:
        echo(_("Every recorded model has a price."))
        return
    print_table([_("provider"), _("model"), _("calls"), _("input"), _("output"), _("last seen")],
                 [[r.provider or "-", r.model, r.calls, r.input_tokens, r.output_tokens,
                   r.last_seen.isoformat(timespec="seconds")] for r in rows], left=2)
    echo("\n" + _("Add a price to llmtally.toml, e.g.") + '\n  [prices."MODEL"]\n  input = 0.5    # '
         + _("per 1M input tokens") + "\n  output = 1.5   # " + _("per 1M output tokens")
         + '\n  currency = "USD"')


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

    _ = translator(tally.language)
    if check or repair:
        drifts = check_counters(tally.store, repair=repair)
        unit = {"usd": tally.currency, "tokens": "tokens", "requests": "requests"}
        for drift in drifts:
            kind = unit[drift.budget.kind]
            echo(_("{budget} [{instance}] window {window}: spent {spent}, the ledger says "
                   "{expected}; reserved {reserved}, open holds {holds}").format(
                budget=drift.budget.label, instance=drift.instance or _("all calls"),
                window=drift.window_start.isoformat(), spent=quantity(drift.spent, kind),
                expected=quantity(drift.expected_spent, kind),
                reserved=quantity(drift.reserved, kind),
                holds=quantity(drift.expected_reserved, kind))
                 + (" " + _("(repaired)") if repair else ""))
        if not drifts:
            echo(_("Every budget counter equals the ledger."))
        elif not repair:
            echo(_("{count} counters differ from the ledger: llmtally budgets --repair rewrites "
                   "them.").format(count=len(drifts)))
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
        echo(_("No budget has been charged yet (an each= budget shows each user, project... "
               "once a call of theirs was checked against it)."))
        return
    if not rows:
        echo(_("No budgets configured: add [[budgets]] to llmtally.toml (see the README)."))
        return
    unit = {"usd": tally.currency, "tokens": "tokens", "requests": "requests"}
    print_table(
        [_("budget"), _("scope"), _("used"), _("reserved"), _("limit"), "%", _("resets"),
         _("runs out"), _("unpriced")],
        [[r["budget"], ", ".join(f"{k}={v}" for k, v in r["scope"].items()) or _("all calls"),
          quantity(r["used"], unit[r["kind"]]), quantity(r["reserved"], unit[r["kind"]]),
          quantity(r["limit"], unit[r["kind"]]),
          "-" if r["percent"] is None else f"{r['percent']:.1f}",
          r["resets_at"] or _("never"), r["runs_out_at"] or "-",
          str(r["unpriced_calls"]) if r["unpriced_calls"] else "-"] for r in rows], left=2)
    if any(r["unpriced_calls"] for r in rows):
        echo(_("unpriced: calls in the window to models with no price, which usd budgets "
               "cannot count (llmtally unpriced lists them; a price override counts them from "
               "then on)."))


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


for _command in (prices, export, import_, prune, rollups, serve, status, alerts):
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
