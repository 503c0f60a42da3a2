"""LiteLLM: ``litellm.callbacks = [tally.litellm()]`` records every SDK and Router call once.

How LiteLLM's view of a call maps onto a ledger event (checked on litellm 1.110):

- ``id`` is our own id, stamped on the call when LiteLLM sets it up (see
  ``litellm_setup``), so a logger registered twice stores one row, and two calls that
  pass the same ``litellm_call_id`` (the caller's to choose; the proxy takes it from the
  client's ``x-litellm-call-id`` header) are two events; the caller's id is kept in
  ``metadata["litellm_call_id"]``. Each Router attempt (retry, fallback) is its own event; the attempts
  of one logical request share ``litellm_trace_id``, kept in ``metadata["litellm_trace_id"]``
  and used as ``request_id`` unless the caller gave one.
- ``provider`` is LiteLLM's ``custom_llm_provider``; ``model`` is LiteLLM's model name without
  the provider route (``openai/gpt-4o-mini`` is stored as ``gpt-4o-mini`` with provider
  ``openai``: the name the price map knows, and the same row whichever spelling was used); for
  a Router call it is the deployment that served the attempt, with the Router's model name in
  ``metadata["model_group"]`` and the deployment id in ``metadata["deployment_id"]``.
- Tokens come from the response's usage (LiteLLM's ``prompt_tokens`` already includes cache
  reads and writes, ``completion_tokens`` reasoning). A response without usage, or a stream
  whose provider sent none (an OpenAI-format stream without ``stream_options.include_usage``:
  LiteLLM then puts its own estimate in the usage), is counted offline and marked estimated.
- Attribution: ``tally.scope(...)`` at the time of the call, overridden per call by LiteLLM's
  ``metadata={"project": ..., "user": ..., "session_id": ..., "tags": [...],
  "request_id": ...}`` and the OpenAI ``user=`` parameter (used when ``metadata`` names no
  user). Prompts, responses, keys and headers are never read into the event.

Budgets (when the Tally has any; otherwise none of this runs), checked on litellm 1.110.2 and
the 1.106.12 proxy — each call's estimate is held under its stamp before anything is sent;
that call's success / failure hook records it with the hold (``record(reservation=...)``), and
the transaction storing the event releases the hold and charges the real cost:

- ``acompletion`` (streamed or not), ``aembedding`` and ``Router`` async calls:
  ``async_pre_call_deployment_hook``, which LiteLLM awaits once per attempt after choosing the
  deployment, letting what it raises reach the caller (its failure hooks run too: a
  ``BudgetExceeded`` there is not recorded again). A Router retries a blocked attempt like any
  failure (``num_retries``); each attempt is checked, and recorded as blocked, again.
- Sync ``completion`` / ``text_completion`` / ``embedding`` / ``Router.completion``: no
  ``CustomLogger`` hook that knows the call can raise into the caller, so the logger wraps
  LiteLLM's ``function_setup`` (which every SDK entry point calls before anything is sent,
  and whose exceptions reach the caller) and holds there; ``litellm_setup`` checks
  its shape and otherwise falls back to ``tally.guard(litellm.completion)`` (``litellm_guard.py``).
- The proxy: ``async_pre_call_hook`` holds with the caller's attribution and turns
  ``BudgetExceeded`` into ``fastapi.HTTPException(429)``.
- Holds never settled (a stream never read nor released, a process killed mid-call) are
  dropped from memory past ``_MAX_PENDING_HOLDS`` and expire in the ledger after the TTL.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from litellm.integrations.custom_logger import CustomLogger

from .._budgets.offloop import reserve_off_loop
from .._events import scope as _scope
from .._log import warn_limited
from . import litellm_compat as compat
from . import litellm_setup, litellm_streams
from ._handoff import claim as _claim_offered
from ._handoff import take_hold as _take_offered_hold
from .litellm_budgets import is_budget_refusal, reserve_call
from .litellm_events import EVENT_ID_KEY, CallStart, asks_for_usage, call_key, litellm_event
from .litellm_proxy import is_auth_rejection, proxy_token, put_token, request_view

if TYPE_CHECKING:
    from .._budgets.states import Reservation
    from .._recorder import Recorder

__all__ = ["LiteLLMLogger"]

_MAX_PENDING_STARTS = 10_000  # calls started but not finished (abandoned streams never finish)
_MAX_PENDING_HOLDS = 10_000  # budget holds not settled yet; one dropped here expires by its TTL


class LiteLLMLogger(CustomLogger):
    """A LiteLLM ``CustomLogger`` that records every call in a :class:`~llmtally.Tally`.

    Get it with ``tally.litellm()`` (one instance per Recorder) and register it with
    ``litellm.callbacks = [tally.litellm()]``. Its hooks never raise into LiteLLM, except
    ``BudgetExceeded`` before a call is sent.
    """

    def __init__(self, tally: Recorder) -> None:
        super().__init__()
        self.tally = tally
        # each Tally's logger its own: a second Tally's is not skipped as a duplicate
        compat.make_distinct(self, f"{id(tally):x}")
        self._starts: dict[str, CallStart] = {}
        self._starts_lock = threading.Lock()
        # Budget holds taken before a call, by the call's key (our stamp), released by the
        # transaction that stores the call's event. Guarded by _starts_lock.
        self._holds: dict[str, Reservation] = {}
        # durability="sync": call ids whose guarded caller waits until the call's event is
        # durable (set once the hook's record() returned). Guarded by _starts_lock.
        self._awaited: dict[str, threading.Event] = {}
        compat.check_attach()
        litellm_streams.LOGGERS.add(self)
        litellm_setup.LOGGERS.add(self)
        litellm_streams.install_stream_watch()
        litellm_setup.install_setup_hook()

    # -- budgets: hold before the call is sent ------------------------------------------------

    def before_sync_call(self, details: dict[str, Any], kwargs: Mapping[str, Any],
                         call_type: Any) -> None:
        """From LiteLLM's ``function_setup`` (see ``litellm_setup``), on the caller's thread,
        for a sync SDK or Router call: hold its estimate, or raise BudgetExceeded."""
        if self.tally.budgets is None:
            return
        key = details.get(EVENT_ID_KEY)
        offered = _claim_offered(self.tally)
        if offered is not None and offered.hold is not None:  # held by the LangChain run making it
            self.hold(key, _take_offered_hold(offered))
            return
        self.hold(key, reserve_call(self.tally, kwargs,
                                    call_type if isinstance(call_type, str) else None))

    async def async_pre_call_deployment_hook(self, kwargs, call_type):  # type: ignore[no-untyped-def]
        """Budgets, for ``acompletion`` (streamed or not), ``aembedding``, ``atext_completion``
        and ``Router`` async calls: LiteLLM awaits this once per attempt, after a deployment was
        chosen and before anything is sent, and lets what it raises reach the caller. Holds the
        call's estimate on a worker thread (the event loop never waits for the database);
        ``BudgetExceeded`` propagates and stops the call. Returns None: LiteLLM then sends the
        kwargs unchanged."""
        if self.tally.budgets is None or not isinstance(kwargs, Mapping):
            return None
        key = call_key(kwargs)
        if key is None:
            return None
        with self._starts_lock:
            if not litellm_setup.setup_hook_installed() and key in self._holds:
                return None  # held by tally.guard() (its set-up hook could not be installed)
            proxy_hold = self._holds.pop(proxy_token(kwargs) or "", None)
        if proxy_hold is not None:  # held by the proxy's pre-call hook for this request
            self.hold(key, proxy_hold)
            return None
        offered = _claim_offered(self.tally)
        if offered is not None and offered.hold is not None:  # held by the LangChain run making it
            self.hold(key, _take_offered_hold(offered))
            return None
        name = getattr(call_type, "value", call_type)
        held = await reserve_off_loop(self.tally, reserve_call, self.tally, kwargs,
                                      name if isinstance(name, str) else None)
        self.hold(key, held)
        return None

    async def async_pre_call_hook(self, user_api_key_dict, cache, data, call_type):  # type: ignore[no-untyped-def]
        """Budgets on the LiteLLM proxy: runs after the caller's key was checked, before the
        request is routed. The hold is attributed like the request's event (the key's user,
        team or project, key alias tag). A refusal becomes ``fastapi.HTTPException(429)`` with
        the budget's message (anything else would be a 500 for the client)."""
        if self.tally.budgets is None or not isinstance(data, dict):
            return None
        from .._budgets.budget import BudgetExceeded

        try:
            held = await reserve_off_loop(self.tally, reserve_call, self.tally,
                                          request_view(data, user_api_key_dict),
                                          call_type if isinstance(call_type, str) else None)
        except BudgetExceeded as exc:
            from fastapi import HTTPException

            raise HTTPException(status_code=429, detail=str(exc)) from exc
        if held is not None:  # by our own token, never the client's call id
            self.hold(put_token(data), held)
        return None

    def hold(self, key: Any, held: Reservation | None) -> None:
        """Keep ``held`` until the call ``key`` is recorded (given back if ``key`` is no key)."""
        if held is None:
            return
        if not isinstance(key, str):  # cannot be matched to its end: give it back
            self.tally.release(held)
            return
        with self._starts_lock:
            if len(self._holds) >= _MAX_PENDING_HOLDS:  # never settled: its TTL releases it
                del self._holds[next(iter(self._holds))]
            replaced = self._holds.get(key)
            self._holds[key] = held
        if replaced is not None and replaced is not held:
            self.tally.release(replaced)

    def saw_start(self, call_id: str) -> bool:
        """Whether this logger saw the call start and has not recorded it yet."""
        return call_id in self._starts

    def take_start(self, call_id: str) -> tuple[CallStart | None, Reservation | None]:
        """What this logger noted when the call started, and its hold, taken (so the call is
        recorded once: by LiteLLM's hook or, for an abandoned stream, by the stream watch)."""
        with self._starts_lock:
            start = self._starts.pop(call_id, None)
        return start, (self.take_hold(call_id) if start is not None else None)

    def take_hold(self, key: Any) -> Reservation | None:
        """The hold kept for the call ``key``, taken (None if there is none)."""
        if not isinstance(key, str):
            return None
        with self._starts_lock:
            return self._holds.pop(key, None)

    # LiteLLM finds hooks by exact method and parameter names: do not rename them.
    # It calls log_pre_api_call on the caller's thread for sync and async calls alike.

    def log_pre_api_call(self, model, messages, kwargs):  # type: ignore[no-untyped-def]
        """Capture the caller's attribution: success hooks may run where it is not visible
        (sync streams finish on a thread pool that does not copy the context)."""
        try:
            key = call_key(kwargs)
            if key is None:
                return
            asked = asks_for_usage(kwargs) if kwargs.get("stream") is True else None
            scope = _scope.current()
            offered = _claim_offered(self.tally)
            if offered is not None:  # made by a LangChain run that tally.langchain() watches:
                # this logger records the call, with LangChain's attribution (see handoff)
                scope = scope.merged(offered.attribution())
                held = _take_offered_hold(offered)
                with self._starts_lock:
                    held_already = key in self._holds
                self.tally.release(held) if held_already else self.hold(key, held)
            start = CallStart(scope, asked)
            with self._starts_lock:
                if len(self._starts) >= _MAX_PENDING_STARTS:
                    del self._starts[next(iter(self._starts))]
                self._starts[key] = start
        except Exception as exc:
            warn_limited("litellm-hook", "llmtally: LiteLLM pre-call hook failed (%s: %s)",
                         type(exc).__name__, exc, exc_info=True)

    def log_success_event(self, kwargs, response_obj, start_time, end_time):  # type: ignore[no-untyped-def]
        self._record(kwargs, response_obj, start_time, end_time, failed=False)

    def log_failure_event(self, kwargs, response_obj, start_time, end_time):  # type: ignore[no-untyped-def]
        self._record(kwargs, response_obj, start_time, end_time, failed=True)

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):  # type: ignore[no-untyped-def]
        await self._record_async(kwargs, response_obj, start_time, end_time, failed=False)

    async def async_log_failure_event(self, kwargs, response_obj, start_time, end_time):  # type: ignore[no-untyped-def]
        await self._record_async(kwargs, response_obj, start_time, end_time, failed=True)

    async def _record_async(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any,
                            *, failed: bool) -> None:
        if self.tally.durability == "sync":  # record() waits for a commit: not on the event loop
            await asyncio.to_thread(self._record, kwargs, response_obj, start_time, end_time,
                                    failed=failed)
        else:
            self._record(kwargs, response_obj, start_time, end_time, failed=failed)

    def _record(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any, *,
                failed: bool) -> None:
        try:
            key = call_key(kwargs) if isinstance(kwargs, Mapping) else None
            with self._starts_lock:
                start = self._starts.pop(key, None) if key is not None else None
            held = self.take_hold(key)
            if held is None and isinstance(kwargs, Mapping):  # a proxy hold no hook moved
                held = self.take_hold(proxy_token(kwargs))
            if failed and (is_auth_rejection(kwargs) or is_budget_refusal(kwargs)):
                # the proxy refused the caller's key: no LLM call, and no row for strangers; or
                # a budget stopped the call: reserve() recorded it as blocked already
                self.tally.release(held)
                return
            if start is None:  # not seen starting: the attribution in force here is the best guess
                start = CallStart(_scope.current())
            self.tally.record_event(litellm_event(kwargs, response_obj, start_time, end_time,
                                                  failed=failed, call_start=start),
                                    reservation=held)
        except Exception as exc:
            warn_limited("litellm-hook", "llmtally: could not record a LiteLLM call (%s: %s)",
                         type(exc).__name__, exc, exc_info=True)
        finally:
            if self._awaited:
                self._recorded(kwargs.get("litellm_call_id") if isinstance(kwargs, Mapping) else None)

    # -- durability="sync": a guarded call returns once its event is durable ----------------

    def holds_calls(self) -> bool:
        """Whether calls it held budgets for have not been recorded yet."""
        return bool(self._holds)

    def await_record(self, call_id: str) -> threading.Event:
        """An event set once the call ``call_id`` is recorded (see :meth:`Tally.guard`)."""
        done = threading.Event()
        with self._starts_lock:
            self._awaited[call_id] = done
        return done

    def awaited(self, call_id: Any) -> threading.Event | None:
        """The event :meth:`await_record` made for ``call_id``, if it is still awaited."""
        if not isinstance(call_id, str):
            return None
        with self._starts_lock:
            return self._awaited.get(call_id)

    def _recorded(self, call_id: Any) -> None:
        if isinstance(call_id, str):
            with self._starts_lock:
                done = self._awaited.pop(call_id, None)
            if done is not None:
                done.set()

    def forget_await(self, call_id: Any) -> None:
        """Stop awaiting ``call_id`` (the caller no longer waits for it)."""
        with self._starts_lock:
            self._awaited.pop(call_id, None)
