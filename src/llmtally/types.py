"""The values llmtally hands back, in one place: what ``tally.reserve()``, ``summary()``,
``unpriced()``, ``budget_states()``, ``scope()`` and the transfer functions return, and the
error a transfer raises. Import them from here (``from llmtally.types import SummaryRow``) to
annotate code that keeps them; the modules that define them are private and may move.

Importing this module loads SQLAlchemy (``import llmtally`` alone does not).
"""

from __future__ import annotations

from ._budgets.states import CounterState, Crossing, Hold, Reservation
from ._events.scope import Attribution
from ._pricing.book import Resolution
from ._pricing.price import PricedCost
from ._reporting.queries import SummaryRow, UnpricedRow
from ._reporting.render import ReportFile
from ._transfer.transfer import ExportResult, ImportResult, PruneResult, TransferError

__all__ = [
    "Attribution",
    "CounterState",
    "Crossing",
    "ExportResult",
    "Hold",
    "ImportResult",
    "PricedCost",
    "PruneResult",
    "ReportFile",
    "Reservation",
    "Resolution",
    "SummaryRow",
    "TransferError",
    "UnpricedRow",
]
