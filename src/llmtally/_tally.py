"""`Tally`: the one object users hold. A facade: it validates its settings once (`Settings`),
builds the store, the writer and the services, and delegates recording (`Recording`), budgets
(`BudgetGuard`), reading, `track` and the integrations (the mixins) to them."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ._adapters import Adapters
from ._budgets.budget import DEFAULT_MAX_OUTPUT_ESTIMATE, DEFAULT_RESERVATION_TTL_S, Budget, zone
from ._budgets.guard import BudgetGuard
from ._events import scope as _scope
from ._events.event import CallEvent
from ._events.usage import Usage
from ._pricing.book import PriceBook
from ._pricing.price import Price
from ._recording import DEFAULT_EXIT_FLUSH_TIMEOUT_S, Recording, default_spill_path, event_id
from ._reporting.reading import Reading
from ._tracking import Tracking

if TYPE_CHECKING:  # the database layer is imported when a Tally is made, not at `import llmtally`
    from ._alerts.history import Fired
    from ._alerts.monitor import AlertMonitor
    from ._alerts.rules import AlertRule
    from ._budgets.ledger import BudgetLedger
    from ._budgets.states import CounterState, Reservation
    from ._settings import Settings
    from ._storage.store import Store
    from ._storage.writer import Writer

__all__ = ["Tally"]

F = TypeVar("F", bound=Callable[..., Any])

_new_tuple = tuple.__new__


class Tally(Adapters, Reading, Tracking):
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
        alerts: where budget warnings and rule alerts go: ``"log"``, callables taking a dict,
            webhook URLs (Slack, Discord, Teams, Feishu/Lark, DingTalk and WeCom ones are
            recognised by their host; any other gets the dict as JSON) and sink tables
            (``{"type": "dingtalk", "url": ..., "secret": ...}``, ``{"type": "email", ...}``);
            delivered off the caller's thread, 5 s timeout, 3 attempts.
        alert_rules: :class:`AlertRule` values, evaluated from the ledger every
            ``alert_interval_s`` seconds (60) on a background thread (docs/alerts.md).
        dashboard_url: linked from each alert.
        language: ``"en"``, ``"zh"`` or ``"ko"``: the language of alert texts.
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
        alerts: Sequence[str | Mapping[str, Any] | Callable[[dict[str, Any]], Any]] = ("log",),
        alert_rules: Sequence[AlertRule] = (),
        alert_interval_s: float = 60,
        dashboard_url: str | None = None,
        language: str = "en",
        reservation_ttl_s: float = DEFAULT_RESERVATION_TTL_S,
        max_output_estimate: int = DEFAULT_MAX_OUTPUT_ESTIMATE,
        unpriced: str = "allow",
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        arguments = {name: value for name, value in locals().items() if name != "self"}
        from ._settings import Settings

        settings = Settings.of(arguments)  # before anything is made: a bad value creates no file
        from ._storage.store import Store
        from ._storage.store_urls import DEFAULT_DATABASE_URL

        self.prices = PriceBook(settings.prices or None, currency=settings.currency,
                                rates=settings.rates or None, price_map=settings.price_map)
        self.prices.known_models()  # load the map now: a bad map file fails here, not at a call
        self.currency = self.prices.currency
        # on its own: a Tally made inside another's scope() block does not inherit that scope
        self._default_scope = _scope.attribution(**settings.scope)
        self._clock = settings.clock or _utc_now
        writer_options: dict[str, Any] = {
            name: value for name, value in (
                ("batch_size", settings.batch_size), ("flush_interval_s", settings.flush_interval_s),
                ("max_queue", settings.max_queue),
            ) if value is not None
        }
        self.durability = settings.durability
        self._sync = settings.durability == "sync"
        url = settings.database_url or os.environ.get("LLMTALLY_DATABASE_URL") or DEFAULT_DATABASE_URL
        # last of the checks: it creates the SQLite file
        self.store: Store = Store(url, durable_commits=self._sync)
        try:
            self._build_parts(settings, writer_options)
        except BaseException:  # a half-made Tally leaves no thread running and no file open
            writer = self.__dict__.get("_writer")
            if writer is not None:
                writer.close(0)
            self.store.close()
            raise

    def _build_parts(self, settings: Settings, writer_options: dict[str, Any]) -> None:
        """The writer, the recording service, the budgets and their guard, over the store."""
        from ._storage.spill import SpillFile
        from ._storage.writer import Writer

        self.spill_path = (Path(settings.spill_path) if settings.spill_path
                           else default_spill_path(self.store))
        self._writer: Writer = Writer(self.store, SpillFile(self.spill_path), **writer_options)
        self._recording = Recording(self.store, self._writer, prices=self.prices, sync=self._sync,
                                    spill_path=self.spill_path, clock=self._clock,
                                    attribution=self._attribution_here)
        self._record = self._recording.record  # bound once: record() runs for every call
        # the integrations this Tally built (one each), made under the lock
        self._init_adapters()
        self._before_flush = self._recording.before_flush  # integrations drain here first
        self.tz = zone(settings.timezone)  # calendar windows of budgets and reports
        self.language = settings.language  # alerts' and the CLI's text (_i18n.py)
        from ._notify.notifier import Notifier

        self.notifier = Notifier(settings.alerts)  # budget warnings and rule alerts
        self.alert_monitor: AlertMonitor | None = None
        if settings.alert_rules:
            self.alert_monitor = self._alert_monitor(settings)
        self.budgets: BudgetLedger | None = None
        if settings.budgets:
            from ._budgets.ledger import BudgetLedger

            self.budgets = BudgetLedger(
                self.store, settings.budgets, tz=self.tz, currency=self.currency,
                reservation_ttl=timedelta(seconds=settings.reservation_ttl_s), clock=self._clock,
                timezone_name=settings.timezone or "UTC")
        self._guard = BudgetGuard(
            self.budgets, prices=self.prices, writer=self._writer, clock=self._clock,
            attribution=self._attribution_here, record=self.record_event, flush=self.flush,
            integration_holds=self._integration_holds, notifier=self.notifier,
            language=settings.language,
            fail_closed=settings.fail_closed, max_output_estimate=settings.max_output_estimate,
            unpriced=settings.unpriced)
        from ._budgets.charges import EventCharges

        # Every event this Tally writes is charged to every budget defined in the ledger (by any
        # process), in the transaction that stores it; crossed thresholds alert from here.
        self._writer.charges = EventCharges(self._clock, on_crossings=self._guard.deliver)
        self._recording.on_flush = self._guard.publish
        self._recording.on_close = self._guard.drain_alerts
        self._guard.publish()
        self._recording.close_at_exit(self)

    def _alert_monitor(self, settings: Settings) -> AlertMonitor:
        from sqlalchemy import select

        from ._alerts.monitor import AlertMonitor, check_rules
        from ._pricing.names import litellm_routes
        from ._storage.tables import HourlyRollup

        def seen_providers() -> set[str]:
            try:
                with self.store.connect() as conn:
                    column = HourlyRollup.__table__.c.provider
                    return {p for p in conn.execute(select(column).distinct()).scalars() if p}
            except Exception:  # the ledger cannot be asked now: do not refuse for that
                return {provider for rule in settings.alert_rules
                        for provider in [rule.scope.get("provider")] if provider}

        check_rules(settings.alert_rules, settings.alert_interval_s, litellm_routes(),
                    seen_providers)
        monitor = AlertMonitor(self.store, settings.alert_rules, self.notifier,
                               interval_s=settings.alert_interval_s, clock=self._clock,
                               currency=self.currency, link=settings.dashboard_url,
                               language=settings.language)
        monitor.start()
        return monitor

    def check_alerts(self) -> list[Fired]:
        """Evaluate the alert rules now (after a flush, so this Tally's own calls count) and
        send what fires; returns the alerts sent. The rules also run every ``alert_interval_s``
        seconds on a background thread."""
        if self.alert_monitor is None:
            return []
        self.flush(DEFAULT_EXIT_FLUSH_TIMEOUT_S)
        return self.alert_monitor.check()

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
        return self._record(event, event_id(id), reservation)

    def record_event(self, event: CallEvent, *, reservation: Reservation | None = None) -> str:
        """Record one :class:`CallEvent` (what :meth:`record` does with its arguments);
        returns its event id. Never raises (not even for something that is no CallEvent:
        that is logged, and nothing is recorded)."""
        given = event.id if type(event) is CallEvent else getattr(event, "id", None)
        return self._record(event, event_id(given if isinstance(given, str) else None), reservation)

    def record_later(self, build: Callable[[], CallEvent]) -> bool:
        """Have the writer thread build and record an event (for adapters whose event is
        costly to build, e.g. counting a response offline): the attribution in force on the
        writer thread is the Tally's default scope only, so ``build()`` returns an event with
        its attribution, ``id`` and ``ts`` set. Returns False, and does nothing, when the event
        must be recorded on the caller's thread (``durability="sync"``, or after close)."""
        return self._recording.record_later(build)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run (calls recorded since wait in the spill file)."""
        return self._recording.closed

    def now(self) -> datetime:
        """This Tally's clock (an aware datetime): what its events and budgets call "now"."""
        return self._clock()

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

    def asgi(self, *, token: str | None = None, refresh_seconds: int = 30,
             cache_seconds: float = 5.0) -> Any:
        """The live dashboard, JSON API and Prometheus metrics over this ledger, as an ASGI
        application (needs ``pip install "llmtally[serve]"``)::

            app.mount("/llm", tally.asgi(token=os.environ["LLMTALLY_SERVE_TOKEN"]))

        It only reads. Without ``token`` it answers anyone who reaches it: mount it only
        where that is intended. The same GET asked again within ``cache_seconds`` gets the
        answer already made (0: always fresh). See ``llmtally serve`` and docs/serve.md."""
        try:
            from ._serve.app import create_app
        except ImportError as exc:
            raise ImportError('tally.asgi() needs the serve extra: pip install "llmtally[serve]"') \
                from exc
        return create_app(self, token=token, refresh_seconds=refresh_seconds,
                          cache_seconds=cache_seconds)

    def budget_states(self) -> list[CounterState]:
        """Each budget (and each ``each=`` instance with use) in its current window. Flushes
        first, so this Tally's own calls are charged."""
        if self.budgets is None:
            return []
        self.flush(DEFAULT_EXIT_FLUSH_TIMEOUT_S)
        return self._guard.states()

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
        return self._recording.flush(timeout)

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
        if self.alert_monitor is not None:
            self.alert_monitor.stop()
        self._recording.close(timeout)

    def __enter__(self) -> Tally:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- helpers -------------------------------------------------------------------------------


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)
