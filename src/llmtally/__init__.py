"""llmtally: every LLM call recorded with its tokens, cost and latency in a SQL ledger.

>>> from llmtally import Tally
>>> tally = Tally()                       # ./llmtally.db, or $LLMTALLY_DATABASE_URL
>>> with tally.scope(project="etl", user="bob"):
...     tally.record(provider="openai", model="gpt-4o-mini", input_tokens=1200, output_tokens=300)

``import llmtally`` is light: it imports neither litellm, langchain nor SQLAlchemy; the
database layer loads when the first ``Tally`` is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._alerts.rules import AlertRule
from ._budgets.budget import Budget, BudgetExceeded
from ._errors import ConfigError, LedgerError
from ._events.event import CallEvent
from ._events.usage import Usage
from ._pricing.price import Price
from ._tally import Tally

if TYPE_CHECKING:
    from ._storage.tables import UsageEvent

__all__ = ["Tally", "CallEvent", "Usage", "Budget", "BudgetExceeded", "AlertRule", "Price",
           "UsageEvent", "ConfigError", "LedgerError", "__version__"]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "UsageEvent":  # a SQLModel class: importing it loads SQLAlchemy
        from ._storage.tables import UsageEvent

        return UsageEvent
    raise AttributeError(f"module 'llmtally' has no attribute {name!r}")
