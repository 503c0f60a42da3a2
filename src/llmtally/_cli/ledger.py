"""Opening the ledger for a command: ``--db`` and ``--config``, and the checks made before
the command runs (the file exists, the database answers, the schema is known)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, overload

import click

from .._terminal import CommandError, one_line_errors

__all__ = ["ledger_options", "open_ledger"]

F = TypeVar("F", bound=Callable[..., Any])


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

    from .._config import load_settings
    from .._storage.store_urls import DEFAULT_DATABASE_URL, normalize_url
    from .._tally import Tally

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
