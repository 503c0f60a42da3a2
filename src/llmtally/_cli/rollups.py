"""``llmtally rollups``: what the hourly rollups hold, checked against the events or rebuilt."""

from __future__ import annotations

from typing import Any

import click

from .._i18n import translator
from .._terminal import echo
from .ledger import ledger_options

__all__ = ["rollups"]


@click.command("rollups")
@click.option("--check", is_flag=True,
              help="Fold the events again and compare; exit 1 if any rollup differs.")
@click.option("--rebuild", is_flag=True, help="Recompute every rollup from the events.")
@ledger_options
def rollups(tally: Any, check: bool, rebuild: bool) -> None:
    """The hourly rollups the report and summaries read: how many rows, hours and events.

    They are written in the same transaction as the events they sum, so they cannot drift;
    --check proves it (it reads every event), --rebuild recomputes them (writers wait
    meanwhile; the migration that created them did the same).

    \b
    Example:
      llmtally rollups --check
      llmtally rollups --rebuild --db postgresql+psycopg://app@db/llm
    """
    from sqlalchemy import func, select

    from .._storage import rollups as stored
    from .._storage.tables import HourlyRollup

    store = tally.store
    _ = translator(tally.language)
    if rebuild:
        with store.write() as conn:
            events = stored.rebuild(conn)
        echo(_("rebuilt the rollups from {count:,} events").format(count=events))
    if check:
        with store.connect() as conn:
            differences = stored.differences(conn)
        for line in differences:
            echo(line)
        if differences:
            echo(_("the rollups differ from the events: llmtally rollups --rebuild recomputes "
                   "them"))
            raise SystemExit(1)
        echo(_("every rollup equals the events"))
    if rebuild or check:
        return
    table = HourlyRollup.__table__.c
    with store.connect() as conn:
        rows, events, first, last = conn.execute(select(
            func.count(), func.coalesce(func.sum(table.calls), 0), func.min(table.hour),
            func.max(table.hour))).one()
    span = _(", {first} to {last} UTC").format(
        first=f"{first:%Y-%m-%d %H:00}", last=f"{last:%Y-%m-%d %H:00}") if rows else ""
    echo(_("{rows:,} rollup rows summing {events:,} events").format(rows=rows, events=int(events))
         + span)
