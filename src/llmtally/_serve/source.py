"""What the server reads: a Tally's ledger, with every budget any process defined in it (not
only the serving Tally's own)."""

from __future__ import annotations

from datetime import datetime, tzinfo
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .._budgets.states import CounterState
    from .._pricing.book import PriceBook
    from .._storage.store import Store
    from .._tally import Tally

__all__ = ["LedgerView"]


class LedgerView:
    """A :class:`~llmtally._reporting.report.ReportSource` over ``tally``'s ledger whose
    budgets are those stored in the ledger (``llmtally budgets`` shows the same)."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.store: Store = tally.store
        self.prices: PriceBook = tally.prices
        self.currency: str = tally.currency
        self.language: str = tally.language

    @property
    def tz(self) -> tzinfo:
        return self.tally.tz

    @property
    def database_url(self) -> str:
        return self.tally.database_url

    def now(self) -> datetime:
        return self.tally.now()

    def flush(self, timeout: float | None = None) -> bool:
        return self.tally.flush(timeout)

    def budget_states(self) -> list[CounterState]:
        from .._budgets.counters import ledger_states

        with self.store.connect() as conn:
            return ledger_states(conn, self.now())
