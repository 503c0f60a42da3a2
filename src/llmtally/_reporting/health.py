"""How healthy a provider is, from its calls: the error types that mean a refused key or a
rate limit, and the state (ok, degraded, down, idle) that ``llmtally status``, the report and
the dashboard show.

Of the calls sent (blocked ones aside):

- ``down``: at least ``MIN_CALLS`` sent and half or more failed, or every call failed with an
  authentication error (a revoked key);
- ``degraded``: 10 % or more failed, or any was rate limited (429 / out of quota);
- ``ok``: otherwise; ``idle``: nothing sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import or_

__all__ = ["AUTH_ERRORS", "RATE_LIMIT_ERRORS", "STATES", "ends_with_any", "state", "kind_of"]

AUTH_ERRORS = ("AuthenticationError", "PermissionDeniedError")
"""Error type names (the exception's class, in any package) of an invalid or revoked key."""
RATE_LIMIT_ERRORS = ("RateLimitError", "ResourceExhausted", "TooManyRequests")
"""... of a 429: rate limited, or out of quota (OpenAI's ``insufficient_quota`` is a 429)."""
STATES = ("down", "degraded", "ok", "idle")
MIN_CALLS = 3
DOWN_RATE, DEGRADED_RATE = 0.5, 0.1


def ends_with_any(column: Any, names: Sequence[str]) -> Any:
    """SQL: ``column`` ends with one of ``names``."""
    return or_(*(column.like(f"%{name}") for name in names))


def kind_of(error_type: str | None) -> str | None:
    """``auth``, ``rate_limit`` or None for an error type name."""
    if error_type and error_type.endswith(AUTH_ERRORS):
        return "auth"
    if error_type and error_type.endswith(RATE_LIMIT_ERRORS):
        return "rate_limit"
    return None


def state(sent: int, errors: int, rate_limited: int, auth_failures: int) -> str:
    """The state of a provider with these counts (see the module's docs)."""
    if not sent:
        return "idle"
    if (sent >= MIN_CALLS and errors / sent >= DOWN_RATE) or (auth_failures and auth_failures == sent):
        return "down"
    if errors / sent >= DEGRADED_RATE or rate_limited:
        return "degraded"
    return "ok"
