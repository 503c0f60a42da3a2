"""Telling an outage (the database is unreachable or busy: retry later) from a bad row."""

from __future__ import annotations

import sqlite3

from sqlalchemy.exc import DatabaseError, OperationalError

from .._errors import LedgerError

__all__ = ["is_outage"]


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` means the database is unreachable or busy (worth retrying), not that a row is bad."""
    if isinstance(exc, (OperationalError, LedgerError)):  # LedgerError: the file cannot be used now
        return True
    if isinstance(exc, DatabaseError):
        return bool(getattr(exc, "connection_invalidated", False))
    return isinstance(exc, (OSError, sqlite3.OperationalError))
