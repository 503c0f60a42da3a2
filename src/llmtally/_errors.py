"""Exceptions that llmtally raises into user code."""

from __future__ import annotations

import sys

__all__ = ["ConfigError", "LedgerError", "error_type"]


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key, the value and what is allowed."""


class LedgerError(RuntimeError):
    """The ledger database cannot be used as asked (foreign or newer schema, unopenable URL)."""


def error_type(error: BaseException) -> str:
    """The name an event records for an exception: ``TimeoutError`` for built-ins,
    ``litellm.RateLimitError`` / ``openai.InternalServerError`` for classes their top-level
    package exports, else ``module.Class`` with private module parts dropped."""
    cls = type(error)
    module = cls.__module__
    if module in ("builtins", "__main__"):
        return cls.__qualname__
    top = module.split(".", 1)[0]
    if getattr(sys.modules.get(top), cls.__name__, None) is cls:
        return f"{top}.{cls.__name__}"
    public = ".".join(part for part in module.split(".") if not part.startswith("_"))
    return f"{public}.{cls.__qualname__}" if public else cls.__qualname__
