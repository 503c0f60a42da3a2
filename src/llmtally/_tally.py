"""`Tally`: the one object users hold. It prices, attributes and queues events, and reads them back."""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ._budgets.budget import Budget, zone
from ._budgets.guard import BudgetGuard, check_alerts
from ._errors import ConfigError
from ._events import scope as _scope
from ._events.event import CallEvent, clean_id, event_row
from ._events.ids import EVENT_IDS
from ._events.usage import (
    Usage,
)
from ._log import logger, warn_limited
from ._pricing.book import PriceBook
from ._pricing.price import Price
from ._tracking import tracked

if TYPE_CHECKING:  # the database layer is imported when a Tally is made, not at `import llmtally`
    from ._budgets.ledger import BudgetLedger
    from ._budgets.states import CounterState, Reservation
    from ._reporting.queries import SummaryRow, UnpricedRow
    from ._storage.store import Store
    from ._storage.writer import Writer
    from .integrations.langchain import LangChainHandler
    from .integrations.litellm import LiteLLMLogger

__all__ = ["Tally"]

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_EXIT_FLUSH_TIMEOUT_S = 10.0
DURABILITIES = ("batched", "sync")
DEFAULT_RESERVATION_TTL_S = 900.0
DEFAULT_MAX_OUTPUT_ESTIMATE = 4096
UNPRICED_POLICIES = ("allow", "block")
_SCOPE_KEYS = ("project", "user", "session", "tags", "request_id", "metadata")
_ids = EVENT_IDS
_new_tuple = tuple.__new__


class Tally:
    """A ledger of LLM calls.

    ``Tally()`` opens ``./llmtally.db`` (or ``$LLMTALLY_DATABASE_URL``);
    ``Tally("postgresql+psycopg://user@host/db")`` shares one ledger between processes and hosts.

    Events are priced by one price engine (LiteLLM's price map, bundled, plus ``prices``
    overrides), attributed from :meth:`scope`, and written by a background thread in batches;
    :meth:`flush` waits for them, and the interpreter's exit flushes too.

    Args:
        database_url: a path, ``sqlite:///...`` or ``postgresql+psycopg://...`` URL.
        prices: price overrides by model name (``"model"`` or ``"provider/model"``); they win
            over the price map.
        currency: the ledger's currency: every cost is stored in it (ISO 4217, default USD).
        rates: how many units of ``currency`` one unit of another currency is worth, e.g.
            ``{"CNY": 0.1389}``; needed for overrides in other currencies.
        price_map: ``"auto"``, ``"bundled"``, ``"litellm"`` or a path to a LiteLLM-format JSON.
        scope: default attribution for every event (``project``, ``user``, ``tags``, ...).
        spill_path: where events wait while the database is unreachable.
        budgets: :class:`Budget` limits; calls that would exceed one are stopped before they
            are sent (see :meth:`reserve`).
        timezone: the IANA time zone budget windows are counted in (default UTC).
        fail_closed: if the ledger cannot be reached to check budgets, block calls (default:
            allow them and log).
        durability: ``"batched"`` (default): :meth:`record` only queues the event and a
            background thread commits batches (a SIGKILL loses at most the last
            ``flush_interval_s``, 0.2 s, of events). ``"sync"``: :meth:`record` returns once its
            event is committed (SQLite ``synchronous=FULL``) or, while the database is
            unreachable, fsync'd in the spill file, so a killed process loses no recorded call;
            concurrent records share a commit. Costs a commit wait per call (see the README).
        alerts: where budget warnings go: ``"log"``, webhook URLs (a JSON POST each, off the
            caller's thread, 5 s timeout, 3 attempts) and/or callables taking a dict.
        reservation_ttl_s: a reservation never settled (its process died) is released after this.
        max_output_estimate: output tokens assumed for a call that sets no ``max_tokens`` (or
            the model's own output limit, if lower).
        unpriced: a call of a model with no known price under a ``usd=`` budget: ``"allow"``
            (default: let it through, warned once per model, its calls counted by
            ``llmtally budgets``) or ``"block"`` (raise :class:`BudgetExceeded`). A price
            override prices it from then on.
        clock: returns "now" as an aware datetime (a seam for tests).
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        prices: Mapping[str, Price | Mapping[str, Any]] | None = None,
        currency: str = "USD",
        rates: Mapping[str, float] | None = None,
        price_map: str = "auto",
        scope: Mapping[str, Any] | None = None,
        spill_path: str | os.PathLike[str] | None = None,
        batch_size: int | None = None,
        flush_interval_s: float | None = None,
        max_queue: int | None = None,
        budgets: Sequence[Budget] = (),
        timezone: str | None = None,
        fail_closed: bool = False,
        durability: str = "batched",
        alerts: Sequence[str | Callable[[dict[str, Any]], Any]] = ("log",),
        reservation_ttl_s: float = DEFAULT_RESERVATION_TTL_S,
        max_output_estimate: int = DEFAULT_MAX_OUTPUT_ESTIMATE,
        unpriced: str = "allow",
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        from ._config import check_tally_arguments

        check_tally_arguments(locals())  # first thing: here locals() is the arguments (and self)
        from ._storage.store import Store
        from ._storage.store_urls import DEFAULT_DATABASE_URL
        from ._storage.writer import Writer

        self.prices = PriceBook(_as_prices(prices), currency=currency, rates=rates, price_map=price_map)
        self.prices.known_models()  # load the map now: a bad map file fails here, not at a call
        self.currency = self.prices.currency
        self._default_scope = _scope_from_mapping(scope or {})
        self._clock = clock or _utc_now
        writer_options: dict[str, Any] = {
            name: value for name, value in (
                ("batch_size", batch_size), ("flush_interval_s", flush_interval_s),
                ("max_queue", max_queue),
            ) if value is not None
        }
        for name, value in writer_options.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}={value!r} is not allowed: give a positive number")
        if durability not in DURABILITIES:
            raise ConfigError(f"durability={durability!r} is not allowed; use \"batched\" (the "
                              "default: background batches) or \"sync\" (record() waits for "
                              "the commit)")
        self.durability = durability
        self._sync = durability == "sync"
        url = database_url or os.environ.get("LLMTALLY_DATABASE_URL") or DEFAULT_DATABASE_URL
        # last of the checks: it creates the SQLite file
        self.store: Store = Store(url, durable_commits=self._sync)
        from ._storage.spill import SpillFile

        self.spill_path = Path(spill_path) if spill_path else _default_spill_path(self.store)
        self._writer: Writer = Writer(self.store, SpillFile(self.spill_path), **writer_options)
        self._closed = False
        self._closing = False
        # the integrations this Tally built (one each), made under the lock
        self._litellm_logger: LiteLLMLogger | None = None
        self._langchain_handler: LangChainHandler | None = None
        self._integration_lock = threading.Lock()
        # Run before each flush (and so at exit): integrations drain their own buffers here,
        # e.g. LiteLLM's deferred async logging queue. Each gets the flush's timeout.
        self._before_flush: list[Callable[[float | None], None]] = []
        self.tz = zone(timezone)  # calendar windows of budgets and reports
        alerts = check_alerts(alerts)
        if unpriced not in UNPRICED_POLICIES:
            raise ConfigError(f"unpriced={unpriced!r} is not allowed; use \"allow\" (the default: "
                              "calls to a model with no price pass usd budgets, with a warning) "
                              "or \"block\"")
        self.budgets: BudgetLedger | None = None
        if budgets:
            from ._budgets.ledger import BudgetLedger

            for budget in budgets:
                if not isinstance(budget, Budget):
                    raise ConfigError(f"budgets: {budget!r} is not a llmtally.Budget")
            self.budgets = BudgetLedger(
                self.store, budgets, tz=self.tz, currency=self.currency,
                reservation_ttl=timedelta(seconds=reservation_ttl_s), clock=self._clock,
                timezone_name=timezone or "UTC")
        self._guard = BudgetGuard(
            self.budgets, prices=self.prices, writer=self._writer, clock=self._clock,
            attribution=self._attribution_here, record=self.record_event, flush=self.flush,
            integration_holds=self._integration_holds, alerts=alerts,
            fail_closed=bool(fail_closed), max_output_estimate=max_output_estimate,
            unpriced=unpriced)
        from ._budgets.charges import EventCharges

        # Every event this Tally writes is charged to every budget defined in the ledger (by any
        # process), in the transaction that stores it; crossed thresholds alert from here.
        self._writer.charges = EventCharges(self._clock, on_crossings=self._guard.deliver)
        self._guard.publish()
        _register_exit_flush(self)

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None, **overrides: Any) -> Tally:
        """A Tally configured from ``llmtally.toml`` and ``LLMTALLY_*`` environment variables.

        The file is ``path``, else ``$LLMTALLY_CONFIG``, else ``./llmtally.toml`` if present.
        Environment variables win over the file; keyword ``overrides`` win over both.
        """
        from ._config import load_settings

        return cls(**{**load_settings(path), **overrides})

    def __repr__(self) -> str:
        return f"Tally({self.store.display_url!r}, currency={self.currency!r})"

    @property
    def database_url(self) -> str:
        """The ledger's URL, password hidden."""
        return self.store.display_url

    # -- attribution ---------------------------------------------------------------------

    @contextmanager
    def scope(
        self,
        *,
        project: str | None = None,
        user: str | None = None,
        session: str | None = None,
        tags: Iterable[str] | str | None = None,
        request_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Iterator[_scope.Attribution]:
        """Attribute every call made inside the block (nested scopes: inner wins, tags merge).

        >>> with tally.scope(project="search", user="alice", tags=["beta"]):
        ...     litellm.completion(model="gpt-4o-mini", messages=msgs)
        """
        with _scope.attributed(project=project, user=user, session=session, tags=tags,
                               request_id=request_id, metadata=metadata) as merged:
            yield merged

    # -- recording -----------------------------------------------------------------------

    def record(
        self,
        *,
        model: str,
        provider: str | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
        latency_ms: float | None = None,
        ttft_ms: float | None = None,
        status: str = "ok",
        error_type: str | None = None,
        call_type: str = "chat",
        streamed: bool = False,
        resolved_model: str | None = None,
        estimated: bool = False,
        cache_hit: bool = False,
        id: str | None = None,
        ts: datetime | None = None,
        source: str = "manual",
        project: str | None = None,
        user: str | None = None,
        session: str | None = None,
        tags: Iterable[str] | None = None,
        request_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        reservation: Reservation | None = None,
    ) -> str:
        """Record one LLM call; returns its event id. Never raises: odd values are recorded as
        well as they can be, with a note in ``metadata["llmtally_warnings"]``.

        Token counts follow the ledger's convention: ``input_tokens`` includes cache reads and
        writes, ``output_tokens`` includes reasoning. ``estimated=True`` marks counts that were
        not reported by the provider (e.g. counted offline); ``cache_hit=True`` records a call
        answered from a cache (LiteLLM's, say): its tokens are kept, its cost is 0.
        ``reservation`` (from :meth:`reserve`) is settled to this event's real cost and tokens.
        """
        # CallEvent's own field order (tests/test_record.py holds it), built without the
        # keyword binding of its constructor: this runs on the caller's thread for every call
        event = _new_tuple(CallEvent, (
            model, provider, _new_tuple(Usage, (input_tokens, output_tokens, cache_read_tokens,
                                                cache_write_tokens, reasoning_tokens)),
            status, error_type, call_type, streamed, resolved_model, estimated, cache_hit, ts,
            latency_ms, ttft_ms, id, source, project, user, session, tags, request_id, metadata))
        return self._record(event, _event_id(id), reservation)

    def record_event(self, event: CallEvent, *, reservation: Reservation | None = None) -> str:
        """Record one :class:`CallEvent` (what :meth:`record` does with its arguments);
        returns its event id. Never raises."""
        return self._record(event, _event_id(event.id), reservation)

    def _record(self, event: CallEvent, event_id: str, reservation: Reservation | None) -> str:
        try:
            self._submit(event_row(event, event_id, self._clock(), self._attribution_here(),
                                   self.prices), reservation)
        except Exception as exc:  # never into the caller's code
            warn_limited("record", "llmtally: could not record a call to %r (%s: %s)",
                         event.model, type(exc).__name__, exc, exc_info=True)
        return event_id

    def record_later(self, build: Callable[[], CallEvent]) -> bool:
        """Have the writer thread build and record an event (for adapters whose event is
        costly to build, e.g. counting a response offline): the attribution in force on the
        writer thread is the Tally's default scope only, so ``build()`` returns an event with
        its attribution, ``id`` and ``ts`` set. Returns False, and does nothing, when the event
        must be recorded on the caller's thread (``durability="sync"``, or after close)."""
        if self._sync or self._closed:
            return False
        self._writer.submit(functools.partial(self._deferred_row, build))
        return True

    def _keep_after_close(self, row: dict[str, Any]) -> None:
        """A call recorded after close() (say, by a LiteLLM logger still registered): its
        writer has stopped, so the event goes to the spill file, which the next Tally on this
        ledger replays."""
        warn_limited("after-close", "llmtally: a call was recorded after this Tally was closed; "
                     "it is kept in %s until a Tally on this ledger replays it", self.spill_path)
        self._writer.spill_now([row], reason="the Tally is closed")

    def _deferred_row(self, build: Callable[[], CallEvent]) -> dict[str, Any]:
        event = build()
        return event_row(event, _event_id(event.id), self._clock(), self._attribution_here(),
                         self.prices)

    def _submit(self, row: dict[str, Any], reservation: Reservation | None) -> None:
        if reservation is not None and reservation.holds:
            # released by the transaction that stores this event, which also charges it
            row["_reservation"] = reservation.id
        if self._closed:
            self._keep_after_close(row)
        elif not self._sync:
            self._writer.submit(row)
        elif not self._writer.submit_and_wait(row):
            warn_limited("sync-timeout", "llmtally: durability=\"sync\" could not make an "
                         "event durable in time (the ledger hangs and the spill file %s "
                         "cannot be written); it stays queued", self.spill_path,
                         level=logging.ERROR)

    def track(
        self,
        fn: F | None = None,
        *,
        model: str | None = None,
        provider: str | None = None,
        call_type: str = "chat",
        **attribution: Any,
    ) -> Any:
        """Decorate a function that calls an LLM SDK directly; each call becomes an event.

        The return value's ``usage`` (OpenAI, Anthropic, LiteLLM or Gemini shape) gives the
        tokens; the call is timed; an exception is recorded (``status="error"``, its type in
        ``error_type``) and re-raised unchanged. Works on sync and async functions.

        >>> @tally.track(model="deepseek/deepseek-chat")
        ... def ask(q): return client.chat.completions.create(model="deepseek-chat", messages=[...])
        """
        unknown = set(attribution) - set(_SCOPE_KEYS)
        if unknown:
            raise TypeError(f"track() got unexpected keyword arguments {sorted(unknown)}; "
                            f"allowed: model, provider, call_type, {', '.join(_SCOPE_KEYS)}")

        def decorate(func: F) -> F:
            return tracked(self, func, model=model, provider=provider, call_type=call_type,
                           attribution=attribution)

        return decorate(fn) if fn is not None else decorate

    def litellm(self) -> Any:
        """The LiteLLM callback that records every call: ``litellm.callbacks = [tally.litellm()]``.

        Returns the same ``CustomLogger`` each time. SDK calls (``completion``,
        ``acompletion``, streams, embeddings) and ``litellm.Router`` calls become events with
        ``source="litellm"``; :meth:`flush` also runs the async logging LiteLLM defers.
        """
        if self._litellm_logger is not None:
            return self._litellm_logger
        try:
            import litellm  # noqa: F401  (imported already, the integration module would not fail)

            from .integrations.litellm import LiteLLMLogger
            from .integrations.litellm_drain import drain_logging_worker
        except ImportError as exc:
            raise ImportError('tally.litellm() needs LiteLLM: pip install "llmtally[litellm]"') from exc
        with self._integration_lock:
            if self._litellm_logger is None:
                self._litellm_logger = LiteLLMLogger(self)
                self._before_flush.append(drain_logging_worker)
        return self._litellm_logger

    @property
    def litellm_attached(self) -> bool:
        """Whether :meth:`litellm` has made this Tally's LiteLLM logger."""
        return self._litellm_logger is not None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run (calls recorded since wait in the spill file)."""
        return self._closed

    def now(self) -> datetime:
        """This Tally's clock (an aware datetime): what its events and budgets call "now"."""
        return self._clock()

    def guard(self, fn: F) -> F:
        """Budgets for a LiteLLM call that has no hook able to stop it: ``litellm.completion``
        (streamed or not), ``litellm.embedding``, ``Router.completion`` (sync calls).

        >>> litellm.callbacks = [tally.litellm()]
        >>> completion = tally.guard(litellm.completion)
        >>> completion(model="openai/gpt-4o-mini", messages=msgs, max_tokens=500)

        Each call gets a ``litellm_call_id`` (a uuid, unless one was passed); its estimate is
        reserved like :meth:`reserve` (``BudgetExceeded`` is raised before ``fn`` runs, and a
        ``blocked`` event recorded); then ``fn(..., litellm_call_id=...)`` runs, and the
        success or failure hook of ``tally.litellm()`` (which must be registered) settles the
        hold to the call's real cost — for a stream, when it ends or is closed. If ``fn``
        raises before LiteLLM logged the call, the hold is released. Works on sync and async
        functions; without budgets it only passes the call through. Async SDK calls and
        ``Router`` async calls need no guard: ``tally.litellm()`` blocks them itself.

        With ``durability="sync"`` a guarded call that is not streamed also returns only once
        its event is durable (LiteLLM records calls on its own logging thread or event-loop
        task, just after the call returned to you, so an unguarded call killed in that instant
        can be missing).
        """
        from .integrations.litellm import guard

        return guard(self.litellm(), fn)  # type: ignore[no-any-return]

    def langchain(self) -> Any:
        """The LangChain callback handler that records every model call:
        ``chain.invoke(x, config={"callbacks": [tally.langchain()]})``.

        Returns the same handler each time. Each chat or text-completion model call of a
        chain, agent or bare model (``invoke``, ``ainvoke``, ``batch``, ``stream``,
        ``astream``, ``astream_events``) becomes one event with ``source="langchain"``; with
        budgets, a call that would go over raises :class:`BudgetExceeded` before it is sent.
        ``metadata={"llmtally_project": ..., "llmtally_user": ..., "llmtally_session": ...}``
        and ``tags`` in the run config attribute the calls.
        """
        if self._langchain_handler is not None:
            return self._langchain_handler
        try:
            from .integrations.langchain import LangChainHandler
        except ImportError as exc:
            raise ImportError('tally.langchain() needs LangChain: pip install "llmtally[langchain]"') from exc
        with self._integration_lock:
            if self._langchain_handler is None:
                self._langchain_handler = LangChainHandler(self)
        return self._langchain_handler

    def wrap_embeddings(self, embeddings: Any, *, model: str | None = None,
                        provider: str | None = None) -> Any:
        """LangChain ``Embeddings`` that record each call (LangChain reports none for them).

        >>> emb = tally.wrap_embeddings(OpenAIEmbeddings(model="text-embedding-3-small"))
        >>> vectors = emb.embed_documents(texts)      # one event, call_type="embedding"

        ``embed_documents``, ``embed_query``, ``aembed_documents`` and ``aembed_query`` are
        recorded with their input tokens counted offline (``estimated``), checked against the
        budgets first; ``model`` and ``provider`` default to what the object names.
        """
        try:
            from .integrations.langchain_embeddings import wrap_embeddings
        except ImportError as exc:
            raise ImportError('tally.wrap_embeddings() needs LangChain: '
                              'pip install "llmtally[langchain]"') from exc
        return wrap_embeddings(self, embeddings, model=model, provider=provider)

    # -- budgets -------------------------------------------------------------------------

    def reserve(
        self,
        *,
        model: str,
        provider: str | None = None,
        messages: Iterable[Any] | None = None,
        input_tokens: int | None = None,
        max_tokens: int | None = None,
        choices: int | None = None,
        call_type: str = "chat",
        project: str | None = None,
        user: str | None = None,
        session: str | None = None,
        tags: Iterable[str] | None = None,
    ) -> Reservation | None:
        """Check and hold this call's estimated cost on every budget that covers it, before the
        call is sent; raise :class:`BudgetExceeded` (and record a ``blocked`` event) if any
        would go over. Returns None when no budget is configured.

        The estimate is the prompt (``input_tokens``, else ``messages`` counted offline) plus
        ``choices`` (``n``; default 1) times the output: ``max_tokens`` (capped at the model's
        output limit), else the model's output limit, at most ``max_output_estimate``; a
        ``max_tokens`` that is not a positive whole number counts as absent. Priced by the price
        engine. Pass the result to :meth:`record` (``reservation=``): the transaction that
        stores the event releases the hold and charges the real cost. Use :meth:`release` if
        the call was not made.

        >>> held = tally.reserve(model="gpt-4o-mini", messages=msgs, max_tokens=500)
        >>> response = client.chat.completions.create(model="gpt-4o-mini", messages=msgs, max_tokens=500)
        >>> tally.record(model="gpt-4o-mini", input_tokens=..., output_tokens=..., reservation=held)
        """
        return self._guard.reserve(model=model, provider=provider, messages=messages,
                                   input_tokens=input_tokens, max_tokens=max_tokens,
                                   choices=choices, call_type=call_type, project=project,
                                   user=user, session=session, tags=tags)

    async def areserve(self, **call: Any) -> Reservation | None:
        """:meth:`reserve` for async code: the database work runs on a worker thread, so the
        event loop never waits for it (the scope in force is carried over)."""
        return await self._guard.areserve(**call)

    def release(self, reservation: Reservation | None, *, sent: bool = False) -> None:
        """Give a reservation back when no event will record the call (it was not made).
        A call that was made is recorded instead (``record(..., reservation=...)``), which
        releases the hold and charges what it used; ``sent`` is accepted for compatibility and
        changes nothing: only events count. Never raises."""
        self._guard.release(reservation, sent=sent)

    def budget_states(self) -> list[CounterState]:
        """Each budget (and each ``each=`` instance with use) in its current window. Flushes
        first, so this Tally's own calls are charged."""
        if self.budgets is None:
            return []
        self.flush(DEFAULT_EXIT_FLUSH_TIMEOUT_S)
        return self._guard.states()

    def _integration_holds(self) -> bool:
        """Whether the LiteLLM logger holds budgets for calls not recorded yet."""
        return self._litellm_logger is not None and self._litellm_logger.holds_calls()

    def _attribution_here(self) -> _scope.Attribution:
        """The scope in force here, over the Tally's default scope."""
        scope = _scope.current()
        if self._default_scope is not _scope.EMPTY:
            scope = self._default_scope.merged(scope)
        return scope

    # -- durability ----------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event recorded so far is in the ledger (or, if the database is
        unreachable, safe in the spill file). Returns False if ``timeout`` ran out."""
        self._drain_integrations(timeout)
        self._guard.publish()
        return self._writer.flush(timeout)

    def _drain_integrations(self, timeout: float | None) -> None:
        """Let each integration hand over what it still holds (e.g. LiteLLM's deferred async
        logging) so that it is written with this flush or close."""
        for drain in list(self._before_flush):
            try:
                drain(timeout)
            except Exception as exc:
                warn_limited("before-flush", "llmtally: could not drain %r before flushing (%s: %s)",
                             drain, type(exc).__name__, exc)

    async def aflush(self, timeout: float | None = None) -> bool:
        """:meth:`flush` for async code, without blocking the event loop. Await it before your
        event loop ends (e.g. at the end of the ``main()`` given to ``asyncio.run``): LiteLLM
        logs async calls in tasks on that loop, and cancels those still running when the loop
        closes, so calls that finished just before would never be recorded."""
        if self._litellm_logger is not None:
            from .integrations.litellm_drain import adrain_logging_worker

            await adrain_logging_worker(timeout)
        import asyncio

        return await asyncio.to_thread(self.flush, timeout)

    def close(self, timeout: float | None = DEFAULT_EXIT_FLUSH_TIMEOUT_S) -> None:
        """Flush, stop the writer and release the database. Idempotent."""
        if self._closed or self._closing:
            return
        self._closing = True
        # First let the integrations hand over what they hold (LiteLLM's deferred logging):
        # those calls finished before close() and belong in this Tally's ledger.
        self._drain_integrations(timeout)
        self._closed = True
        self._guard.drain_alerts()
        if not self._writer.close(timeout):
            logger.warning("llmtally: close() gave up after %ss with %d events not yet written "
                           "(a slow or unreachable ledger); events already spilled are in %s",
                           timeout, self._writer.queued, self.spill_path)
        self.store.close()

    def __enter__(self) -> Tally:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------

    def summary(self, since: str | datetime | None = None, until: str | datetime | None = None,
                by: str = "model", **filters: str) -> list[SummaryRow]:
        """Calls, tokens and cost per ``by`` value (model, provider, project, user, session,
        source, status, call_type or day) between ``since`` and ``until`` ("7d", "24h",
        "2026-11-01", a datetime). Flushes first, so this Tally's own events are included."""
        from ._reporting.queries import summarize

        self.flush(DEFAULT_EXIT_FLUSH_TIMEOUT_S)
        now = self._clock()
        with self.store.connect() as conn:
            return summarize(conn, since=since, until=until, by=by, now=now, filters=filters)

    def unpriced(self, since: str | datetime | None = None) -> list[UnpricedRow]:
        """Models seen with no known price: add them to ``prices`` to have them priced."""
        from ._reporting.queries import unpriced_models

        self.flush(DEFAULT_EXIT_FLUSH_TIMEOUT_S)
        with self.store.connect() as conn:
            return unpriced_models(conn, since=since, now=self._clock())

    def report(self, path: str | os.PathLike[str] | None = None, *, week: str | None = None,
               since: str | datetime | None = None, until: str | datetime | None = None,
               project: str | None = None) -> Path:
        """Write the HTML usage report and return its path.

        ``week="last"`` (the default), ``"this"`` or an ISO week (``"2026-W47"``), in this
        Tally's time zone; or ``since``/``until`` ("7d", "2026-11-01", a datetime). ``path`` is
        a file, or a directory (existing, or ending with ``/``; default ``reports/``) to hold
        ``llmtally-2026-W47.html``. The file is self-contained (inline CSS and SVG, no script,
        no URL) and written atomically. Flushes first, so this Tally's own events are in it.

        >>> tally.report("reports/", week="last")
        PosixPath('reports/llmtally-2026-W47.html')
        """
        from ._reporting.render import write_report

        return write_report(self, path, week=week, since=since, until=until,
                            project=project).path


# -- helpers -------------------------------------------------------------------------------




def _utc_now() -> datetime:
    return datetime.now(timezone.utc)



def _as_prices(prices: Mapping[str, Any] | None) -> dict[str, Price] | None:
    if not prices:
        return None
    out: dict[str, Price] = {}
    for name, value in prices.items():
        if isinstance(value, Price):
            out[name] = value
        elif isinstance(value, Mapping):
            try:
                out[name] = Price(**value)
            except TypeError as exc:
                raise ConfigError(f"prices[{name!r}]: {exc}; allowed keys: input, output, "
                                  "cache_read, cache_write, reasoning, per, currency") from exc
        else:
            raise ConfigError(f"prices[{name!r}] must be a llmtally.Price or a table of prices, "
                              f"not {type(value).__name__}")
    return out


def _scope_from_mapping(values: Mapping[str, Any]) -> _scope.Attribution:
    unknown = set(values) - set(_SCOPE_KEYS)
    if unknown:
        raise ConfigError(f"scope has unknown keys {sorted(unknown)}; allowed: {', '.join(_SCOPE_KEYS)}")
    with _scope.attributed(**values) as attribution:
        pass
    return attribution


def _default_spill_path(store: Store) -> Path:
    """Beside a SQLite file; for other databases, in the user's state directory."""
    path: Path | None = getattr(store, "path", None)
    if path is not None:
        return path.with_name(path.name + ".spill.jsonl")
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    digest = hashlib.sha1(store.display_url.encode()).hexdigest()[:12]
    return state / "llmtally" / f"spill-{digest}.jsonl"


def _register_exit_flush(tally: Tally) -> None:
    """Flush at interpreter exit and on SIGTERM (unless the application handles it), and keep
    working in forked children (multiprocessing, gunicorn, Celery prefork), without keeping
    the Tally alive."""
    from ._signals import flush_on_sigterm

    flush_on_sigterm(tally)
    ref = weakref.ref(tally)

    def flush_at_exit() -> None:
        live = ref()
        if live is not None and not live._closed:
            live.close(DEFAULT_EXIT_FLUSH_TIMEOUT_S)

    def restart_in_child() -> None:
        live = ref()
        if live is None or live._closed:
            return
        live._writer.restart_after_fork()
        # multiprocessing children leave through os._exit(), which skips atexit, but run
        # multiprocessing's finalizers; that registry is cleared when the child starts, so the
        # finalizer is added from multiprocessing's own after-fork step, which runs later.
        util = sys.modules.get("multiprocessing.util")
        if util is not None:
            util.register_after_fork(live, lambda _tally: util.Finalize(
                None, flush_at_exit, exitpriority=100))

    atexit.register(flush_at_exit)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=restart_in_child)


def _event_id(given: str | None) -> str:
    """The caller's id made safe for any database, or a new one: none given, or nothing left
    of it once cleaned (``""``, NULs), which no database could store as a key."""
    return (None if given is None else clean_id(given)) or _ids.next_id()
