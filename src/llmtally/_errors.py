"""Exceptions that llmtally raises into user code."""

from __future__ import annotations

__all__ = ["ConfigError", "LedgerError"]


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key, the value and what is allowed."""


class LedgerError(RuntimeError):
    """The ledger database cannot be used as asked (foreign or newer schema, unopenable URL)."""
