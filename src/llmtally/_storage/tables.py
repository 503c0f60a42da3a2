"""The ledger's table: one `UsageEvent` row per LLM call attempt.

Token columns follow OpenAI's (and LiteLLM's, and LangChain's) convention:

- ``input_tokens`` is the whole prompt and *includes* ``cache_read_tokens`` and
  ``cache_write_tokens`` (Anthropic's raw API reports them apart; llmtally adds them in).
- ``output_tokens`` *includes* ``reasoning_tokens``.

So ``input_tokens + output_tokens`` is always the call's total, and each part is priced once.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import JSON, BigInteger, Column, DateTime, Index
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

if TYPE_CHECKING:
    from sqlalchemy import Table

__all__ = ["LedgerModel", "UsageEvent", "HourlyRollup", "RollupSketch", "EVENTS_TABLE",
           "ROLLUPS_TABLE", "SKETCHES_TABLE", "EVENT_COLUMNS", "QUOTED_EVENT_COLUMNS", "INSERT_EVENTS",
           "SKIP_STORED_IDS", "MAX_TEXT", "MAX_ID"]

EVENTS_TABLE = "llmtally_events"
MAX_ID = 128
"""Longest event id, request id or session id kept (longer ones are cut)."""
MAX_TEXT = 256
"""Longest provider, model, user, project, tag or error type kept (longer ones are cut)."""

_JSON = JSON().with_variant(JSONB(), "postgresql")


class LedgerModel(SQLModel, registry=registry()):
    """The base of llmtally's tables: a registry (and metadata) of their own, so an
    application's ``SQLModel.metadata.create_all()`` never creates llmtally's tables in its
    database and its model names never clash with llmtally's."""

    if TYPE_CHECKING:  # set by SQLModel's metaclass on each table class; its stubs omit it
        __table__: ClassVar[Table]


class UsageEvent(LedgerModel, table=True):
    """One LLM call attempt, as stored in the ledger.

    ``id`` is the call's own id (LiteLLM call id, LangChain run id, or a fresh UUID), so a
    replayed or re-imported event is never counted twice. ``ts`` is in UTC (naive datetime).
    ``cost`` is in ``currency``; it is ``None`` when the model has no known price
    (``cost_status="unpriced"``), never a silent 0.
    """

    __tablename__ = EVENTS_TABLE
    __table_args__ = (
        Index("ix_llmtally_events_ts", "ts"),
        Index("ix_llmtally_events_project_ts", "project", "ts"),
        Index("ix_llmtally_events_user_ts", "user", "ts"),
        Index("ix_llmtally_events_model_ts", "model", "ts"),
        Index("ix_llmtally_events_provider_ts", "provider", "ts"),
        Index("ix_llmtally_events_cost_status_ts", "cost_status", "ts"),
    )

    # identity
    id: str = Field(primary_key=True, max_length=MAX_ID)
    ts: datetime = Field(sa_column=Column("ts", DateTime, nullable=False))  # naive UTC
    source: str = Field(default="manual", max_length=16)
    # what
    provider: str | None = Field(default=None, max_length=MAX_TEXT)
    model: str = Field(max_length=MAX_TEXT)
    resolved_model: str | None = Field(default=None, max_length=MAX_TEXT)
    call_type: str = Field(default="chat", max_length=32)
    streamed: bool = False
    # outcome
    status: str = Field(default="ok", max_length=16)
    error_type: str | None = Field(default=None, max_length=MAX_TEXT)
    # tokens
    input_tokens: int = Field(default=0, sa_type=BigInteger)
    output_tokens: int = Field(default=0, sa_type=BigInteger)
    cache_read_tokens: int = Field(default=0, sa_type=BigInteger)
    cache_write_tokens: int = Field(default=0, sa_type=BigInteger)
    reasoning_tokens: int = Field(default=0, sa_type=BigInteger)
    # money
    cost: float | None = None
    currency: str = Field(default="USD", max_length=3)
    cost_status: str = Field(default="priced", max_length=16)
    price_source: str | None = Field(default=None, max_length=MAX_TEXT)
    # time
    latency_ms: float | None = None
    ttft_ms: float | None = None
    # attribution
    project: str | None = Field(default=None, max_length=MAX_TEXT)
    user: str | None = Field(default=None, max_length=MAX_TEXT)
    session: str | None = Field(default=None, max_length=MAX_ID)
    tags: list[str] = Field(default_factory=list, sa_column=Column("tags", _JSON, nullable=False))
    request_id: str | None = Field(default=None, max_length=MAX_ID)
    meta: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column("metadata", _JSON, nullable=False)
    )


EVENT_COLUMNS: tuple[str, ...] = tuple(c.name for c in UsageEvent.__table__.columns)
"""Column names in table order; an event travels through the writer as a dict with these keys."""
QUOTED_EVENT_COLUMNS = ", ".join(f'"{name}"' for name in EVENT_COLUMNS)
"""The events' columns as an SQL column list (``user`` is a keyword in PostgreSQL)."""
INSERT_EVENTS = f"INSERT INTO {EVENTS_TABLE} ({QUOTED_EVENT_COLUMNS})"
"""The head of every insert of events; :data:`SKIP_STORED_IDS` its tail."""
SKIP_STORED_IDS = "ON CONFLICT (id) DO NOTHING"
"""An event already stored is never stored again (replays, imports, retries)."""


ROLLUPS_TABLE = "llmtally_rollups"
SKETCHES_TABLE = "llmtally_rollup_sketches"


class HourlyRollup(LedgerModel, table=True):
    """The events of one UTC hour that share every grouping column, summed.

    Written in the same transaction as the events it sums (``_storage/rollups.py``), so a
    ``GROUP BY`` over the events and a sum over these rows always agree. ``dims`` is a digest
    of the grouping columns (provider … cache_hit): one short key instead of a composite key
    of long texts (PostgreSQL refuses index entries over ~2.7 kB). ``max_cost`` lets the
    costliest calls of a period be found through a few hours of events.
    """

    __tablename__ = ROLLUPS_TABLE
    hour: datetime = Field(primary_key=True, sa_type=DateTime)  # naive UTC, whole hour
    dims: str = Field(primary_key=True, max_length=32)
    # grouping columns, as in the events (NULL where the events have NULL)
    provider: str | None = Field(default=None, max_length=MAX_TEXT)
    model: str = Field(max_length=MAX_TEXT)
    project: str | None = Field(default=None, max_length=MAX_TEXT)
    user: str | None = Field(default=None, max_length=MAX_TEXT)
    status: str = Field(max_length=16)
    error_type: str | None = Field(default=None, max_length=MAX_TEXT)
    currency: str = Field(max_length=3)
    cost_status: str = Field(max_length=16)
    source: str = Field(max_length=16)
    call_type: str = Field(max_length=32)
    cache_hit: bool  # price_source == "cache-hit": LiteLLM answered from its cache
    # sums
    calls: int = Field(sa_type=BigInteger)
    streamed_calls: int = Field(sa_type=BigInteger)
    input_tokens: int = Field(sa_type=BigInteger)
    output_tokens: int = Field(sa_type=BigInteger)
    cache_read_tokens: int = Field(sa_type=BigInteger)
    cache_write_tokens: int = Field(sa_type=BigInteger)
    reasoning_tokens: int = Field(sa_type=BigInteger)
    cost: float  # of the calls with a cost (0.0 when none has one)
    max_cost: float | None = None
    cached_calls: int = Field(sa_type=BigInteger)  # calls with cache_read_tokens > 0
    cached_input_tokens: int = Field(sa_type=BigInteger)  # their input_tokens
    latency_calls: int = Field(sa_type=BigInteger)  # calls with a latency_ms
    latency_ms_sum: float
    ttft_calls: int = Field(sa_type=BigInteger)
    ttft_ms_sum: float
    first_ts: datetime = Field(sa_type=DateTime)
    last_ts: datetime = Field(sa_type=DateTime)


class RollupSketch(LedgerModel, table=True):
    """How many successful calls of one hour, provider, model and project took a duration in
    one bucket (``_storage/sketch.py``): percentiles of any period without reading events.
    ``metric`` 0 is ``latency_ms``, 1 is ``ttft_ms`` (streamed calls)."""

    __tablename__ = SKETCHES_TABLE
    hour: datetime = Field(primary_key=True, sa_type=DateTime)
    dims: str = Field(primary_key=True, max_length=32)
    metric: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    bucket: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    provider: str | None = Field(default=None, max_length=MAX_TEXT)
    model: str = Field(max_length=MAX_TEXT)
    project: str | None = Field(default=None, max_length=MAX_TEXT)
    calls: int = Field(sa_type=BigInteger)
