"""The budget tables of the ledger (counters, holds, alerts sent, definitions) and the units counters hold."""

from __future__ import annotations

import os
import socket
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    DateTime,
    Float,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    cast,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from .._storage.tables import UsageEvent

__all__ = ["COUNTERS", "RESERVATIONS", "ALERTS", "DEFINITIONS"]


_meta = MetaData()


COUNTERS = Table(
    "llmtally_budget_counters", _meta,
    Column("budget_key", String(512), primary_key=True),
    Column("instance", String(256), primary_key=True),
    Column("window_start", DateTime, primary_key=True),
    Column("window_end", DateTime),
    Column("spent", BigInteger, nullable=False),
    Column("reserved", BigInteger, nullable=False),
    Column("updated_at", DateTime, nullable=False),
)


RESERVATIONS = Table(
    "llmtally_reservations", _meta,
    Column("id", String(64), primary_key=True),
    Column("created_at", DateTime, nullable=False),
    Column("expires_at", DateTime, nullable=False),
    Column("holds", JSON().with_variant(JSONB(), "postgresql"), nullable=False),
)


ALERTS = Table(
    "llmtally_budget_alerts", _meta,
    Column("budget_key", String(512), primary_key=True),
    Column("instance", String(256), primary_key=True),
    Column("window_start", DateTime, primary_key=True),
    Column("threshold", Float, primary_key=True),
    Column("fired_at", DateTime, nullable=False),
)


DEFINITIONS = Table(
    "llmtally_budgets", _meta,
    Column("budget_key", String(512), primary_key=True),
    Column("definition", Text, nullable=False),
    Column("timezone", String(64), nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Column("updated_by", String(256), nullable=False),
)


E = UsageEvent.__table__.c


# The hot path runs these few statements, built once (building SQLAlchemy expressions per call
# costs more than running them).
_COUNTER = "budget_key = :key AND instance = :instance AND window_start = :start"
_TYPES = (bindparam("start", type_=DateTime), bindparam("now", type_=DateTime))
RESERVE_IF_ROOM = text(
    f"UPDATE llmtally_budget_counters SET reserved = reserved + :amount, updated_at = :now "
    f"WHERE {_COUNTER} AND spent + reserved + :amount <= :limit").bindparams(*_TYPES)
RESERVE = text(
    f"UPDATE llmtally_budget_counters SET reserved = reserved + :amount, updated_at = :now "
    f"WHERE {_COUNTER}").bindparams(*_TYPES)
CHARGE = text(
    f"UPDATE llmtally_budget_counters SET spent = spent + :used, reserved = reserved - :released, "
    f"updated_at = :now WHERE {_COUNTER} RETURNING spent, reserved").bindparams(*_TYPES)
USE = text(f"SELECT spent, reserved FROM llmtally_budget_counters WHERE {_COUNTER}").bindparams(
    bindparam("start", type_=DateTime))

# PostgreSQL: inserting events takes this lock shared, creating a counter or a definition takes
# it exclusive (per schema: tests and tenants may share a database).
_PG_LOCK = "hashtext(current_schema() || '.llmtally_budget_counters')"
PG_SHARED_LOCK = text(f"SELECT pg_advisory_xact_lock_shared({_PG_LOCK})")

PG_EXCLUSIVE_LOCK = text(f"SELECT pg_advisory_xact_lock({_PG_LOCK})")


def half_up(conn: Connection, value: Any) -> Any:
    """floor(value + 0.5) in SQL, as :func:`to_units` rounds (SQL's own round() differs between
    SQLite and PostgreSQL at .5); SQLite's CAST truncates, which is floor for costs >= 0."""
    if conn.dialect.name == "postgresql":
        return func.floor(value + 0.5)
    return cast(value + 0.5, BigInteger)


def whoami() -> str:
    return f"{socket.gethostname()[:200]}:{os.getpid()}"


def insert_ignore(conn: Connection, table: Table = COUNTERS) -> Any:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing()
    from sqlalchemy.dialects.sqlite import insert

    return insert(table).on_conflict_do_nothing()


