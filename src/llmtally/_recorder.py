"""What an integration may ask of a :class:`~llmtally.Tally`: the recording and budget calls,
nothing else. The LiteLLM and LangChain adapters are written against this protocol (the
``Tally`` builds them and satisfies it), so they never reach into the Tally's own state and
the import graph runs one way: ``Tally`` -> integrations -> this protocol and the event type.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ._budgets.ledger import BudgetLedger
    from ._budgets.states import Reservation
    from ._events.event import CallEvent

__all__ = ["Recorder"]


class Recorder(Protocol):
    """Records calls and checks budgets for an integration (a :class:`~llmtally.Tally`)."""

    budgets: BudgetLedger | None
    """The budgets in force, or None when the Tally has none (then nothing is reserved)."""
    durability: str
    """``"batched"`` or ``"sync"`` (``record_event`` waits for the commit)."""

    @property
    def litellm_attached(self) -> bool:
        """Whether this Tally's LiteLLM logger exists (it may record a call the LangChain
        handler sees too)."""

    def now(self) -> datetime:
        """The Tally's clock: an aware datetime."""

    def record_event(self, event: CallEvent, *, reservation: Reservation | None = None) -> str:
        """Record one call (never raises); its hold, if any, is settled with it."""

    def record_later(self, build: Callable[[], CallEvent]) -> bool:
        """Build and record the event on the writer thread; False if it must be done now."""

    def reserve(self, *, model: str, provider: str | None = None,
                messages: Iterable[Any] | None = None, input_tokens: int | None = None,
                max_tokens: int | None = None, choices: int | None = None,
                call_type: str = "chat", project: str | None = None, user: str | None = None,
                session: str | None = None,
                tags: Iterable[str] | None = None) -> Reservation | None:
        """Hold a call's estimated cost on its budgets, or raise ``BudgetExceeded``."""

    def release(self, reservation: Reservation | None, *, sent: bool = False) -> None:
        """Give back a hold whose call will not be recorded with it."""

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every recorded event is stored."""
