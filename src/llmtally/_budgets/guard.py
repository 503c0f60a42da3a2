"""A Tally's budgets: each call checked and held before it is sent, blocked calls recorded,
threshold and block alerts delivered. The holds are released and the real cost charged by the
transaction that stores the call's event (see ``charges``), whichever process writes it."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .._events import scope as _scope
from .._events.event import CallEvent
from .._events.ids import EVENT_IDS
from .._events.usage import coerce_count
from .._i18n import translator
from .._log import logger, warn_limited
from .._notify.courier import DEFAULT_WEBHOOK_TIMEOUT_S
from .._notify.message import AlertMessage
from .._notify.notifier import Notifier
from .budget import Budget, BudgetExceeded
from .states import CounterState, Crossing, Reservation

if TYPE_CHECKING:
    from .._pricing.book import PriceBook
    from .._storage.writer import Writer
    from .ledger import BudgetLedger

__all__ = ["BudgetGuard"]

_ids = EVENT_IDS
_FLUSH_BEFORE_BLOCKING_S = 2.0


class BudgetGuard:
    """The budget side of a :class:`~llmtally.Tally` (one each): ``ledger`` is None when the
    Tally has no budgets of its own (budgets other processes defined are still charged, by the
    writer, and their threshold alerts delivered here)."""

    def __init__(self, ledger: BudgetLedger | None, *, prices: PriceBook, writer: Writer,
                 clock: Callable[[], datetime], attribution: Callable[[], _scope.Attribution],
                 record: Callable[[CallEvent], str], flush: Callable[[float], bool],
                 integration_holds: Callable[[], bool], notifier: Notifier, language: str,
                 fail_closed: bool, max_output_estimate: int, unpriced: str) -> None:
        self.ledger = ledger
        self._prices = prices
        self._writer = writer
        self._clock = clock
        self._attribution = attribution
        self._record = record
        self._flush = flush
        self._integration_holds = integration_holds
        self._notifier = notifier
        self._language = language
        self._fail_closed = fail_closed
        self._max_output_estimate = max_output_estimate
        self._unpriced_policy = unpriced
        self._unpriced_warned: set[str] = set()
        self._let_through = False  # a call was let through unchecked (fail open) since...

    def reserve(self, *, model: str, provider: str | None = None,
                messages: Iterable[Any] | None = None, input_tokens: int | None = None,
                max_tokens: int | None = None, choices: int | None = None,
                call_type: str = "chat", project: str | None = None, user: str | None = None,
                session: str | None = None,
                tags: Iterable[str] | None = None) -> Reservation | None:
        """See :meth:`Tally.reserve`."""
        if self.ledger is None:
            return None
        attributes = self._budget_attributes(model, provider, project, user, session, tags)
        estimate, priced = self._estimate(model, provider, messages, input_tokens, max_tokens,
                                          choices, has_output=call_type != "embedding")
        reservation_id = _ids.next_id()
        try:
            if not priced:
                self._unpriced_call(model, attributes)
            if self._let_through or self._writer.behind:
                # Calls let through while the ledger was down wait in the writer: store (and
                # so charge) them before checking this one.
                if self._writer.catch_up(_FLUSH_BEFORE_BLOCKING_S) and not self._writer.behind:
                    self._let_through = False
            try:
                try:
                    return self.ledger.reserve(reservation_id, attributes, estimate)
                except Exception as exc:
                    if not _is_conflict(exc):
                        raise
                    # PostgreSQL chose this transaction as a deadlock or serialization victim
                    return self.ledger.reserve(reservation_id, attributes, estimate)
            except BudgetExceeded:
                if not self._holds_in_flight():
                    raise
                # About to block: calls that finished here may still hold more than they used
                # until their events are stored (which releases their holds): store them, retry.
                self._flush(_FLUSH_BEFORE_BLOCKING_S)
                return self.ledger.reserve(reservation_id, attributes, estimate)
        except BudgetExceeded as exc:
            budget = exc.budget or getattr(exc, "unpriced_under", None)
            if budget is None:  # fail closed: the ledger could not be asked
                raise
            self._record(CallEvent(
                id=reservation_id, model=model, provider=provider, status="blocked",
                error_type="llmtally.BudgetExceeded", call_type=call_type, project=project,
                user=user, session=session, tags=tags,
                metadata={"budget": budget.label, "budget_scope": exc.scope,
                          **({"unpriced": True} if exc.budget is None else {})}))
            self._alert("blocked", budget, exc.scope, used=exc.used, requested=exc.requested,
                        resets_at=exc.resets_at)
            raise
        except Exception as exc:
            if self._fail_closed:
                raise BudgetExceeded.unavailable(exc) from exc
            self._let_through = True
            warn_limited("budget-open", "llmtally: budgets could not be checked (%s: %s); the "
                         "call is allowed (fail open) and charged to the budgets when its event "
                         "is written. Use fail_closed=True to block instead.",
                         type(exc).__name__, exc)
            return Reservation(reservation_id, ())

    async def areserve(self, **call: Any) -> Reservation | None:
        """See :meth:`Tally.areserve`."""
        if self.ledger is None:
            return None
        from .offloop import reserve_off_loop

        held: Reservation | None = await reserve_off_loop(self, functools.partial(self.reserve, **call))
        return held

    def release(self, reservation: Reservation | None, *, sent: bool = False) -> None:
        """See :meth:`Tally.release`."""
        if reservation is None or self.ledger is None or not reservation.holds:
            return
        try:
            self.ledger.release(reservation)
        except Exception as exc:
            warn_limited("budget-settle", "llmtally: could not release a budget reservation "
                         "(%s: %s); it expires on its own", type(exc).__name__, exc)

    def states(self) -> list[CounterState]:
        """Each budget in its current window (the caller flushes first)."""
        return [] if self.ledger is None else self.ledger.states()

    def publish(self) -> bool:
        """Put the budget definitions in the ledger (retried until it answers)."""
        if self.ledger is None:
            return True
        try:
            self.ledger.publish()
            return True
        except Exception as exc:
            warn_limited("budget-publish", "llmtally: could not write the budget definitions to "
                         "the ledger yet (%s: %s); will try again", type(exc).__name__, exc)
            return False

    def drain_alerts(self, timeout: float = DEFAULT_WEBHOOK_TIMEOUT_S) -> bool:
        """Wait until the webhooks queued so far are delivered (or given up); False if
        ``timeout`` ran out."""
        return self._notifier.drain(timeout)

    def _holds_in_flight(self) -> bool:
        """Whether calls of this process that have finished, or are finishing, may still hold
        more than they used: events not yet stored, or holds an integration has not handed
        to an event yet. Only then is a check about to block worth a flush and a retry."""
        return bool(self._writer.queued) or self._integration_holds()

    def _unpriced_call(self, model: str, attributes: Mapping[str, Any]) -> None:
        """A call of a model with no price, under a usd budget: warn once per model, or block."""
        assert self.ledger is not None
        now = self._clock()
        usd = [b for b, _, _ in self.ledger.covering(attributes, now)
               if b.kind == "usd" and b.action == "block"]
        if not usd:
            return
        if self._unpriced_policy == "block":
            raise BudgetExceeded.unpriced(model, usd[0])
        if model not in self._unpriced_warned and len(self._unpriced_warned) < 10_000:
            self._unpriced_warned.add(model)
            logger.warning("llmtally: %r has no price, so usd budgets (%s) cannot count its "
                           "calls; they are allowed (unpriced=\"allow\"). Add a price override "
                           "(prices={%r: Price(...)}) or use unpriced=\"block\"; `llmtally "
                           "budgets` counts these calls", model, usd[0].label, model)

    def _budget_attributes(self, model: str, provider: str | None, project: str | None,
                           user: str | None, session: str | None,
                           tags: Iterable[str] | None) -> dict[str, Any]:
        scope = self._attribution()
        names = self._prices.resolve(model, provider)
        return {
            "model": names.model or model, "provider": names.provider,
            "project": project or scope.project, "user": user or scope.user,
            "session": session or scope.session,
            "tags": _scope.merge_tags(scope.tags, tuple(tags or ())),
        }

    def _estimate(self, model: str, provider: str | None, messages: Iterable[Any] | None,
                  input_tokens: Any, max_tokens: Any, choices: Any = None, *,
                  has_output: bool = True) -> tuple[dict[str, float], bool]:
        """A call's estimated use, and whether its model has a price (an embedding has no
        output)."""
        from .._events.tokens import count_messages

        prompt = coerce_count(input_tokens)
        if prompt is None:
            prompt = count_messages(list(messages), model) if messages else 0
        limit = self._prices.max_output_tokens(model, provider)
        output = coerce_count(max_tokens) if has_output else 0
        if not has_output:
            pass
        elif not output:  # absent, zero, negative or not a whole number: as if not given
            output = min(limit, self._max_output_estimate) if limit else self._max_output_estimate
        elif limit:
            output = min(output, limit)  # the provider sends no more than the model's limit
        assert output is not None  # None (absent) was replaced above
        output *= _choices(choices)
        priced = self._prices.cost(model=model, provider=provider, input_tokens=prompt,
                                  output_tokens=output)
        return ({"usd": priced.cost or 0.0, "tokens": prompt + output, "requests": 1.0},
                priced.cost is not None)

    def deliver(self, crossings: Iterable[Crossing]) -> None:
        for crossing in crossings:
            state = crossing.state
            self._alert("threshold", state.budget, _state_scope(state), used=state.spent,
                        threshold=crossing.threshold, resets_at=_aware_end(state))

    def _alert(self, kind: str, budget: Budget, scope: Mapping[str, str], **details: Any) -> None:
        payload = {"event": kind, "budget": budget.label, "kind": budget.kind,
                   "limit": budget.limit, "scope": dict(scope), **details}
        if isinstance(payload.get("resets_at"), datetime):
            payload["resets_at"] = payload["resets_at"].isoformat()
        self._notifier.notify(budget_message(kind, budget, scope, payload, self._language),
                              log_line=f"llmtally budget {kind}: {json.dumps(payload)}")



# -- helpers -------------------------------------------------------------------------------


MAX_CHOICES = 128  # OpenAI's own limit for n


def _choices(value: Any) -> int:
    """``n`` / ``best_of`` as a multiplier of the output estimate (1 if absent or not usable)."""
    count = coerce_count(value)
    return min(count, MAX_CHOICES) if count else 1


def _is_conflict(exc: BaseException) -> bool:
    """A PostgreSQL deadlock or serialization failure: worth one more try, not an outage."""
    return getattr(getattr(exc, "orig", None), "sqlstate", None) in ("40P01", "40001")


def _state_scope(state: CounterState) -> dict[str, str]:
    scope = dict(state.budget.scope)
    if state.budget.each:
        scope[state.budget.each] = state.instance
    return scope


def _aware_end(state: CounterState) -> datetime | None:
    end = state.window.end
    return None if end is None else end.replace(tzinfo=timezone.utc)


def budget_message(kind: str, budget: Budget, scope: Mapping[str, str],
                   payload: dict[str, Any], language: str = "en") -> AlertMessage:
    """A budget's warning (``threshold``) or a blocked call (``blocked``) as a message."""
    _ = translator(language)
    who = ", ".join(f"{key}={value}" for key, value in scope.items()) or _("all calls")
    unit = "" if budget.kind == "usd" else f" {budget.kind}"
    used = payload.get("used", 0.0)
    if kind == "threshold":
        title = _("[WARNING] budget {budget}: {share:.0%} reached ({who})").format(
            budget=budget.label, share=payload.get("threshold", 0), who=who)
    else:
        title = _("[CRITICAL] budget {budget}: a call was blocked ({who})").format(
            budget=budget.label, who=who)
    lines = (_("used {used} of {limit}").format(used=f"{used:,.4g}{unit}",
                                                limit=f"{budget.limit:,.4g}{unit}"),
             _("resets {when}").format(when=payload.get("resets_at") or _("never")))
    return AlertMessage("warning" if kind == "threshold" else "critical", title, lines, payload)
