"""Numbered, append-only schema migrations, recorded in the ledger itself.

Each migration runs in the same transaction as the row that records it, under a lock
(SQLite ``BEGIN IMMEDIATE``, a PostgreSQL advisory lock), so several processes opening a
new ledger at once apply it exactly once. A ledger written by a newer llmtally, or tables
of the same name that llmtally did not create, are refused — never altered.

A migration, once shipped, is never edited: it spells out its own DDL instead of using
the live model, so ``UsageEvent`` can grow through a later migration.

A migration that changes events after migration 5 must rebuild the rollups of the hours it
touched (``rollups.rebuild``) in its own transaction, as migration 5 built them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    inspect,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from .._errors import LedgerError
from .._events.usage import TOKEN_FIELDS
from .tables import EVENTS_TABLE

__all__ = ["Migration", "MIGRATIONS", "SCHEMA_TABLE", "migrate", "schema_version"]

SCHEMA_TABLE = "llmtally_schema"
_PG_LOCK_KEY = 0x6C6C6D74  # "llmt": serialises migrations across processes on PostgreSQL

_schema_meta = MetaData()
_schema = Table(
    SCHEMA_TABLE,
    _schema_meta,
    Column("version", Integer, primary_key=True),
    Column("name", String(100), nullable=False),
    Column("applied_at", DateTime, nullable=False),
)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    apply: Callable[[Connection], None]


def m001_initial(conn: Connection) -> None:
    """The events table and the indexes that time-range reports and budgets use."""
    json_type = JSON().with_variant(JSONB(), "postgresql")
    meta = MetaData()
    table = Table(
        EVENTS_TABLE,
        meta,
        Column("id", String(128), primary_key=True),
        Column("ts", DateTime, nullable=False),
        Column("source", String(16), nullable=False),
        Column("provider", String(256)),
        Column("model", String(256), nullable=False),
        Column("resolved_model", String(256)),
        Column("call_type", String(32), nullable=False),
        Column("streamed", Boolean, nullable=False),
        Column("status", String(16), nullable=False),
        Column("error_type", String(256)),
        *(Column(name, BigInteger, nullable=False) for name in TOKEN_FIELDS),
        Column("cost", Float),
        Column("currency", String(3), nullable=False),
        Column("cost_status", String(16), nullable=False),
        Column("price_source", String(256)),
        Column("latency_ms", Float),
        Column("ttft_ms", Float),
        Column("project", String(256)),
        Column("user", String(256)),
        Column("session", String(128)),
        Column("tags", json_type, nullable=False),
        Column("request_id", String(128)),
        Column("metadata", json_type, nullable=False),
    )
    Index("ix_llmtally_events_ts", table.c.ts)
    for name in ("project", "user", "model", "provider", "cost_status"):
        Index(f"ix_llmtally_events_{name}_ts", table.c[name], table.c.ts)
    meta.create_all(conn)


def m002_budgets(conn: Connection) -> None:
    """Budget counters (spent and reserved per budget, instance and window), open
    reservations, and the warnings already sent (so many processes send each once)."""
    meta = MetaData()
    Table(
        "llmtally_budget_counters", meta,
        Column("budget_key", String(512), primary_key=True),
        Column("instance", String(256), primary_key=True),
        Column("window_start", DateTime, primary_key=True),
        Column("window_end", DateTime),
        Column("spent", BigInteger, nullable=False),     # in units: nano-USD, tokens, requests
        Column("reserved", BigInteger, nullable=False),
        Column("updated_at", DateTime, nullable=False),
    )
    reservations = Table(
        "llmtally_reservations", meta,
        Column("id", String(64), primary_key=True),
        Column("created_at", DateTime, nullable=False),
        Column("expires_at", DateTime, nullable=False),
        Column("holds", JSON().with_variant(JSONB(), "postgresql"), nullable=False),
    )
    Index("ix_llmtally_reservations_expires_at", reservations.c.expires_at)
    Table(
        "llmtally_budget_alerts", meta,
        Column("budget_key", String(512), primary_key=True),
        Column("instance", String(256), primary_key=True),
        Column("window_start", DateTime, primary_key=True),
        Column("threshold", Float, primary_key=True),
        Column("fired_at", DateTime, nullable=False),
    )
    meta.create_all(conn)


def m003_budget_definitions(conn: Connection) -> None:
    """Budget definitions, so every process, the CLI and reports see the budgets in force and
    every writer charges every event to them (whichever process defined them)."""
    meta = MetaData()
    Table(
        "llmtally_budgets", meta,
        Column("budget_key", String(512), primary_key=True),
        Column("definition", Text, nullable=False),      # Budget.to_dict() as JSON
        Column("timezone", String(64), nullable=False),  # the zone its windows are counted in
        Column("updated_at", DateTime, nullable=False),
        Column("updated_by", String(256), nullable=False),  # host:pid of the Tally that set it
    )
    meta.create_all(conn)


def m004_one_name_per_provider(conn: Connection) -> None:
    """One name per provider and per model: rows written before store the price map's raw
    provider names (``bedrock_converse``, ``vertex_ai-language-models``) and, when recorded
    with a route, the route in the model (``deepseek/deepseek-chat``). Rewrite them as new
    rows are written, store budget definitions under their normalised keys, and recount the
    counters of budgets that scope or split by provider or model.

    Data, not DDL: it uses today's naming rules (:func:`llmtally._pricing.ledger_names` and
    ``split_route``), which every new row follows. Ended windows of those budgets lose their
    counters (history only: nothing reads them); open windows are recounted from the events."""
    from .._budgets.counters import rename_budgets
    from .._pricing.names import ledger_names, split_route

    events = Table(EVENTS_TABLE, MetaData(), Column("provider", String), Column("model", String))
    pairs = conn.execute(select(events.c.provider, events.c.model).distinct()).all()
    for provider, model in pairs:
        if model is None:
            continue
        new_model, new_provider = ledger_names(model, provider) if provider else split_route(model)
        if (new_model, new_provider) != (model, provider):
            match = events.c.provider.is_(None) if provider is None else events.c.provider == provider
            conn.execute(events.update().where(match, events.c.model == model).values(
                provider=new_provider, model=new_model))
    rename_budgets(conn, datetime.now(timezone.utc))


def m005_hourly_rollups(conn: Connection) -> None:
    """Hourly rollups and latency sketches (``rollups.py``), filled from the events already
    stored (the live fold: the rules every later write follows)."""
    from .rollups import rebuild

    text_column = String(256)
    meta = MetaData()
    Table(
        "llmtally_rollups", meta,
        Column("hour", DateTime, primary_key=True),
        Column("dims", String(32), primary_key=True),
        Column("provider", text_column), Column("model", text_column, nullable=False),
        Column("project", text_column), Column("user", text_column),
        Column("status", String(16), nullable=False), Column("error_type", text_column),
        Column("currency", String(3), nullable=False),
        Column("cost_status", String(16), nullable=False),
        Column("source", String(16), nullable=False), Column("call_type", String(32), nullable=False),
        Column("cache_hit", Boolean, nullable=False),
        Column("calls", BigInteger, nullable=False),
        Column("streamed_calls", BigInteger, nullable=False),
        *(Column(name, BigInteger, nullable=False) for name in TOKEN_FIELDS),
        Column("cost", Float, nullable=False), Column("max_cost", Float),
        Column("cached_calls", BigInteger, nullable=False),
        Column("cached_input_tokens", BigInteger, nullable=False),
        Column("latency_calls", BigInteger, nullable=False),
        Column("latency_ms_sum", Float, nullable=False),
        Column("ttft_calls", BigInteger, nullable=False),
        Column("ttft_ms_sum", Float, nullable=False),
        Column("first_ts", DateTime, nullable=False), Column("last_ts", DateTime, nullable=False),
    )
    Table(
        "llmtally_rollup_sketches", meta,
        Column("hour", DateTime, primary_key=True),
        Column("dims", String(32), primary_key=True),
        Column("metric", Integer, primary_key=True, autoincrement=False),
        Column("bucket", Integer, primary_key=True, autoincrement=False),
        Column("provider", text_column), Column("model", text_column, nullable=False),
        Column("project", text_column),
        Column("calls", BigInteger, nullable=False),
    )
    meta.create_all(conn)
    rebuild(conn)


def m006_alert_history(conn: Connection) -> None:
    """The history of rule alerts (``_alerts/history.py``): one row per alert sent, whose key
    (rule, subject, cool-down slot) lets many processes send each once."""
    meta = MetaData()
    alerts = Table(
        "llmtally_alerts", meta,
        Column("id", String(32), primary_key=True),
        Column("rule_key", String(32), nullable=False),
        Column("rule", String(256), nullable=False),
        Column("kind", String(32), nullable=False),
        Column("subject", String(600), nullable=False),
        Column("severity", String(16), nullable=False),
        Column("value", Float, nullable=False),
        Column("threshold", Float, nullable=False),
        Column("calls", BigInteger, nullable=False),
        Column("window_start", DateTime, nullable=False),
        Column("fired_at", DateTime, nullable=False),
        Column("details", Text, nullable=False),
        Column("acknowledged_at", DateTime),
        Column("acknowledged_by", String(256)),
    )
    Index("ix_llmtally_alerts_fired_at", alerts.c.fired_at)
    meta.create_all(conn)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial", m001_initial),
    Migration(2, "budgets", m002_budgets),
    Migration(3, "budget definitions", m003_budget_definitions),
    Migration(4, "one name per provider", m004_one_name_per_provider),
    Migration(5, "hourly rollups", m005_hourly_rollups),
    Migration(6, "alert history", m006_alert_history),
)


def schema_version(conn: Connection) -> int:
    """The highest migration recorded in this ledger, 0 for an empty database."""
    if not inspect(conn).has_table(SCHEMA_TABLE):
        return 0
    return conn.execute(select(_schema.c.version).order_by(_schema.c.version.desc())).scalar() or 0


def migrate(conn: Connection, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Bring the ledger on ``conn`` up to the newest migration; return the version it is at.

    ``conn`` must be inside a transaction that holds the database's write lock (the caller
    begins it); on PostgreSQL an advisory lock is taken here as well.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    latest = migrations[-1].version if migrations else 0
    tables = set(inspect(conn).get_table_names())
    if SCHEMA_TABLE not in tables:
        if EVENTS_TABLE in tables:
            raise LedgerError(
                f"the database has a table {EVENTS_TABLE!r} but no {SCHEMA_TABLE!r}: it was not "
                "created by llmtally, so it is left untouched. Point llmtally at another database "
                "(LLMTALLY_DATABASE_URL) or rename that table."
            )
        _schema_meta.create_all(conn)
        current = 0
    else:
        try:
            current = schema_version(conn)
        except Exception as exc:  # a table of that name with other columns
            raise LedgerError(
                f"the table {SCHEMA_TABLE!r} in this database was not written by llmtally "
                f"({exc.__class__.__name__}); it is left untouched. Use another database."
            ) from exc
    if current > latest:
        raise LedgerError(
            f"this ledger has schema version {current}, written by a newer llmtally; this one "
            f"knows versions up to {latest}. Upgrade llmtally (pip install -U llmtally) to use it."
        )
    for migration in migrations:
        if migration.version > current:
            migration.apply(conn)
            conn.execute(_schema.insert().values(
                version=migration.version,
                name=migration.name,
                applied_at=datetime.now(timezone.utc).replace(tzinfo=None),
            ))
            current = migration.version
    return current
