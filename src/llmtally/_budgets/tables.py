"""The budget tables of the ledger (counters, holds, alerts sent, definitions) and the units counters hold."""

from __future__ import annotations

import os
import socket
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    DateTime,
    Index,
    Text,
    bindparam,
    cast,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field

from .._storage.tables import LedgerModel, UsageEvent

if TYPE_CHECKING:
    from sqlalchemy import Table

__all__ = ["BudgetCounter", "BudgetHold", "BudgetAlertSent", "BudgetDefinition",
           "COUNTERS", "RESERVATIONS", "ALERTS", "DEFINITIONS"]

# Declared as the events table is (SQLModel; times are naive UTC, so DateTime without a time
# zone, not SQLModel's default for datetime); the migrations in _storage/migrations.py keep
# their own frozen copies of the DDL that created them.


class BudgetCounter(LedgerModel, table=True):
    """What a budget has spent and holds in one window, for one ``each=`` instance."""

    __tablename__ = "llmtally_budget_counters"
    budget_key: str = Field(primary_key=True, max_length=512)
    instance: str = Field(primary_key=True, max_length=256)
    window_start: datetime = Field(primary_key=True, sa_type=DateTime)
    window_end: datetime | None = Field(default=None, sa_type=DateTime)
    spent: int = Field(sa_type=BigInteger)  # in units: nano-USD, tokens, requests
    reserved: int = Field(sa_type=BigInteger)
    updated_at: datetime = Field(sa_type=DateTime)


class BudgetHold(LedgerModel, table=True):
    """An open reservation: what one call holds on each counter until its event lands."""

    __tablename__ = "llmtally_reservations"
    __table_args__ = (Index("ix_llmtally_reservations_expires_at", "expires_at"),)
    id: str = Field(primary_key=True, max_length=64)
    created_at: datetime = Field(sa_type=DateTime)
    expires_at: datetime = Field(sa_type=DateTime)
    holds: list[list[object]] = Field(
        sa_column=Column("holds", JSON().with_variant(JSONB(), "postgresql"), nullable=False))


class BudgetAlertSent(LedgerModel, table=True):
    """A threshold warning already sent, so that many processes send each once."""

    __tablename__ = "llmtally_budget_alerts"
    budget_key: str = Field(primary_key=True, max_length=512)
    instance: str = Field(primary_key=True, max_length=256)
    window_start: datetime = Field(primary_key=True, sa_type=DateTime)
    threshold: float = Field(primary_key=True)
    fired_at: datetime = Field(sa_type=DateTime)


class BudgetDefinition(LedgerModel, table=True):
    """A budget in force on the ledger, whichever process defined it."""

    __tablename__ = "llmtally_budgets"
    budget_key: str = Field(primary_key=True, max_length=512)
    definition: str = Field(sa_type=Text)  # Budget.to_dict() as JSON
    timezone: str = Field(max_length=64)  # the zone its windows are counted in
    updated_at: datetime = Field(sa_type=DateTime)
    updated_by: str = Field(max_length=256)  # host:pid of the Tally that set it


COUNTERS = BudgetCounter.__table__
RESERVATIONS = BudgetHold.__table__
ALERTS = BudgetAlertSent.__table__
DEFINITIONS = BudgetDefinition.__table__


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


