"""LiteLLM: ``litellm.callbacks = [tally.litellm()]`` records every SDK and Router call once.

How LiteLLM's view of a call maps onto a ledger event (checked on litellm 1.110):

- ``id`` is our own id, stamped on the call when LiteLLM sets it up (see
  :func:`install_setup_hook`), so a logger registered twice stores one row, and two calls that
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
  and whose exceptions reach the caller) and holds there; :func:`install_setup_hook` checks
  its shape and otherwise falls back to :func:`guard` (``tally.guard(litellm.completion)``).
- The proxy: ``async_pre_call_hook`` holds with the caller's attribution and turns
  ``BudgetExceeded`` into ``fastapi.HTTPException(429)``.
- Holds never settled (a stream never read nor released, a process killed mid-call) are
  dropped from memory past ``_MAX_PENDING_HOLDS`` and expire in the ledger after the TTL.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from litellm.integrations.custom_logger import CustomLogger

from .._budgets.offloop import reserve_off_loop
from .._events import scope as _scope
from .._events.ids import EventIds
from .._log import warn_limited
from ._handoff import claim as _claim_offered
from ._handoff import take_hold as _take_offered_hold
from .litellm_events import (
    EVENT_ID_KEY,
    PROXY_ADMIN,
    CallStart,
    asks_for_usage,
    attribution,
    call_key,
    call_type_of,
    litellm_event,
    mapping,
    text,
)
from .litellm_streams import (
    LOGGERS,
    install_lock,
    install_stream_watch,
)

if TYPE_CHECKING:
    from .._budgets.states import Reservation
    from .._recorder import Recorder

__all__ = ["LiteLLMLogger", "guard"]

_MAX_PENDING_STARTS = 10_000  # calls started but not finished (abandoned streams never finish)
_MAX_PENDING_HOLDS = 10_000  # budget holds not settled yet; one dropped here expires by its TTL
_SYNC_WAIT_S = 15.0  # durability="sync": the longest a guarded call waits for its event


class LiteLLMLogger(CustomLogger):
    """A LiteLLM ``CustomLogger`` that records every call in a :class:`~llmtally.Tally`.

    Get it with ``tally.litellm()`` (one instance per Recorder) and register it with
    ``litellm.callbacks = [tally.litellm()]``. Its hooks never raise into LiteLLM, except
    ``BudgetExceeded`` before a call is sent.
    """

    def __init__(self, tally: Recorder) -> None:
        super().__init__()
        self.tally = tally
        # LiteLLM keeps one logger per "key" (class name and public scalar attributes): this
        # makes each Tally's logger its own, so a second Tally's is not skipped as a duplicate.
        self.llmtally_instance = f"{id(tally):x}"
        self._starts: dict[str, CallStart] = {}
        self._starts_lock = threading.Lock()
        # Budget holds taken before a call, by the call's key (our stamp), released by the
        # transaction that stores the call's event. Guarded by _starts_lock.
        self._holds: dict[str, Reservation] = {}
        # durability="sync": call ids whose guarded caller waits until the call's event is
        # durable (set once the hook's record() returned). Guarded by _starts_lock.
        self._awaited: dict[str, threading.Event] = {}
        LOGGERS.add(self)
        install_stream_watch()
        install_setup_hook()

    # -- budgets: hold before the call is sent ------------------------------------------------

    def _before_sync_call(self, details: dict[str, Any], kwargs: Mapping[str, Any],
                          call_type: Any) -> None:
        """From LiteLLM's ``function_setup`` (see :func:`install_setup_hook`), on the caller's
        thread, for a sync SDK or Router call: hold its estimate, or raise BudgetExceeded."""
        if self.tally.budgets is None:
            return
        key = details.get(EVENT_ID_KEY)
        offered = _claim_offered(self.tally)
        if offered is not None and offered.hold is not None:  # held by the LangChain run making it
            self._hold(key, _take_offered_hold(offered))
            return
        self._hold(key, _reserve(self.tally, kwargs, call_type if isinstance(call_type, str) else None))

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
            if not _setup_installed and key in self._holds:  # held by tally.guard() (a
                return None  # LiteLLM whose set-up hook could not be installed)
            proxy_hold = self._holds.pop(_proxy_token(kwargs) or "", None)
        if proxy_hold is not None:  # held by the proxy's pre-call hook for this request
            self._hold(key, proxy_hold)
            return None
        offered = _claim_offered(self.tally)
        if offered is not None and offered.hold is not None:  # held by the LangChain run making it
            self._hold(key, _take_offered_hold(offered))
            return None
        name = getattr(call_type, "value", call_type)
        held = await reserve_off_loop(self.tally, _reserve, self.tally, kwargs,
                                      name if isinstance(name, str) else None)
        self._hold(key, held)
        return None

    async def async_pre_call_hook(self, user_api_key_dict, cache, data, call_type):  # type: ignore[no-untyped-def]
        """Budgets on the LiteLLM proxy: runs after the caller's key was checked, before the
        request is routed. The hold is attributed like the request's event (the key's user,
        team or project, key alias tag). A refusal becomes ``fastapi.HTTPException(429)`` with
        the budget's message (anything else would be a 500 for the client)."""
        if self.tally.budgets is None or not isinstance(data, dict):
            return None
        from .._budgets.budget import BudgetExceeded

        caller = _caller_metadata(user_api_key_dict)
        meta = {**mapping(data.get("metadata")), **mapping(data.get("litellm_metadata")), **caller}
        kwargs = {**data, "metadata": meta, "model": _proxy_deployment_model(data.get("model"))}
        try:
            held = await reserve_off_loop(self.tally, _reserve, self.tally, kwargs,
                                          call_type if isinstance(call_type, str) else None)
        except BudgetExceeded as exc:
            from fastapi import HTTPException

            raise HTTPException(status_code=429, detail=str(exc)) from exc
        if held is not None:
            # Our own token, never the client's call id: the deployment hook of this request
            # finds the hold by it (a client-chosen value is overwritten here).
            token = uuid.uuid4().hex
            target = "litellm_metadata" if isinstance(data.get("litellm_metadata"), dict) \
                and not isinstance(data.get("metadata"), dict) else "metadata"
            if not isinstance(data.get(target), dict):
                data[target] = {}
            data[target][_PROXY_TOKEN_KEY] = token
            self._hold(token, held)
        return None

    def _hold(self, key: Any, held: Reservation | None) -> None:
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
        return start, (self._take_hold(call_id) if start is not None else None)

    def _take_hold(self, key: Any) -> Reservation | None:
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
                self.tally.release(held) if held_already else self._hold(key, held)
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
            held = self._take_hold(key)
            if held is None and isinstance(kwargs, Mapping):  # a proxy hold no hook moved
                held = self._take_hold(_proxy_token(kwargs))
            if failed and (_is_auth_rejection(kwargs) or _is_budget_refusal(kwargs)):
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

    def _await_record(self, call_id: str) -> threading.Event:
        done = threading.Event()
        with self._starts_lock:
            self._awaited[call_id] = done
        return done

    def _recorded(self, call_id: Any) -> None:
        if isinstance(call_id, str):
            with self._starts_lock:
                done = self._awaited.pop(call_id, None)
            if done is not None:
                done.set()

    def _forget_await(self, call_id: Any) -> None:
        with self._starts_lock:
            self._awaited.pop(call_id, None)


_PROXY_TOKEN_KEY = "llmtally_hold"  # in a proxy request's metadata: its hold, taken before routing
_ids = EventIds()


def _proxy_token(kwargs: Mapping[str, Any]) -> str | None:
    params = mapping(kwargs.get("litellm_params"))
    for meta in (kwargs.get("metadata"), kwargs.get("litellm_metadata"), params.get("metadata"),
                 params.get("litellm_metadata")):
        token = mapping(meta).get(_PROXY_TOKEN_KEY)
        if isinstance(token, str):
            return token
    return None


_setup_installed = False


def install_setup_hook() -> bool:
    """Wrap ``litellm.utils.function_setup`` once per process. LiteLLM's ``client`` decorator
    (on ``completion``, ``acompletion``, ``embedding``, ``text_completion``… — also on what
    ``from litellm import completion`` bound earlier, and under ``Router``) calls it by its
    module-global name before every call, on the caller's thread, and re-raises what it raises.
    The wrapper stamps the call with our id and, for sync calls, holds its budgets there
    (async calls are held by :meth:`LiteLLMLogger.async_pre_call_deployment_hook`, off the
    event loop). Returns False, and changes nothing, if this LiteLLM's ``function_setup`` has
    another shape (then sync calls need :meth:`Tally.guard`)."""
    global _setup_installed
    with install_lock:
        if _setup_installed:
            return True
        try:
            import litellm.utils as utils
        except ImportError:
            return False
        original = getattr(utils, "function_setup", None)
        if not callable(original) or not _setup_shape_ok(original):
            warn_limited("litellm-setup", "llmtally: this LiteLLM's function_setup has an "
                         "unknown shape; sync calls are recorded but not budget-checked unless "
                         "wrapped with tally.guard()", level=logging.ERROR)
            return False

        @functools.wraps(original)
        def function_setup(original_function, rules_obj, start_time, *args, **kwargs):  # type: ignore[no-untyped-def]
            logging_obj, call_kwargs = original(original_function, rules_obj, start_time,
                                                *args, **kwargs)
            _on_setup(logging_obj, call_kwargs, original_function, args,
                      is_async=kwargs.get("is_async_call", True) is not False)
            return logging_obj, call_kwargs

        function_setup._llmtally_original = original  # type: ignore[attr-defined]
        utils.function_setup = function_setup
        _setup_installed = True
        return True


def _setup_shape_ok(function: Any) -> bool:
    try:
        names = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return False
    return names[:3] == ["original_function", "rules_obj", "start_time"] and "is_async_call" in names


def _on_setup(logging_obj: Any, kwargs: Any, call_type: Any, args: tuple[Any, ...], *,
              is_async: bool) -> None:
    """Stamp the call and, for a sync call, hold its budgets (BudgetExceeded propagates)."""
    details = getattr(logging_obj, "model_call_details", None)
    if not isinstance(details, dict) or not isinstance(kwargs, Mapping):
        return
    loggers = [logger_ for logger_ in list(LOGGERS)
               if isinstance(logger_, LiteLLMLogger) and _registered(logger_)]
    if not loggers:
        return
    details[EVENT_ID_KEY] = _ids.next_id()  # always ours: a caller's own value is replaced
    if is_async:
        return
    view = _call_view(args, kwargs)
    held: list[LiteLLMLogger] = []
    try:
        for logger_ in loggers:
            logger_._before_sync_call(details, view, call_type)
            held.append(logger_)
    except BaseException:
        key = details.get(EVENT_ID_KEY)
        for logger_ in held:  # another Tally refused: give back what the others held
            logger_.tally.release(logger_._take_hold(key))
        restore = getattr(sys.modules.get("litellm.utils"),
                          "_restore_correlation_context_if_supported", None)
        if callable(restore):  # as LiteLLM does when its own set-up fails
            try:
                restore(logging_obj)
            except Exception:
                pass
        raise


def _is_budget_refusal(kwargs: Any) -> bool:
    """A call our own budget hook stopped (LiteLLM runs its failure hooks for it too)."""
    from .._budgets.budget import BudgetExceeded

    error = kwargs.get("exception") if isinstance(kwargs, Mapping) else None
    if isinstance(error, BudgetExceeded) or isinstance(getattr(error, "__cause__", None),
                                                        BudgetExceeded):
        return True
    return type(error).__name__ in ("HTTPException", "ProxyException") and \
        str(getattr(error, "status_code", None) or getattr(error, "code", None)) == "429" and \
        str(getattr(error, "detail", None) or getattr(error, "message", "")).startswith("llmtally ")


def _reserve(tally: Recorder, kw: Mapping[str, Any], call_type: str | None) -> Reservation | None:
    """``tally.reserve()`` for a LiteLLM call described by its kwargs (as LiteLLM's hooks and
    ``litellm.completion`` see them): raises ``BudgetExceeded`` if a budget would go over.

    The estimate: the prompt (``messages``, or every ``input`` / ``prompt`` of an embedding or
    text completion, counted offline) plus ``max_tokens`` (or ``max_completion_tokens``) times
    ``n`` (or ``best_of``, the larger)."""
    params = mapping(kw.get("litellm_params"))
    meta = {**mapping(params.get("metadata")), **mapping(kw.get("litellm_metadata")),
            **mapping(kw.get("metadata"))}
    model, provider = _model_and_provider(kw)
    kind = call_type_of(call_type)
    messages = kw.get("messages")
    input_tokens = None
    if not isinstance(messages, (list, tuple)):
        messages = None
        inputs = kw.get("input")
        if inputs is None:
            inputs = kw.get("prompt")
        if inputs is not None:
            input_tokens = _count_inputs(inputs, model)
    max_tokens = kw.get("max_tokens")
    if max_tokens is None:
        max_tokens = kw.get("max_completion_tokens")
    choices = max((_positive(kw.get("n")), _positive(kw.get("best_of"))))
    who = attribution(kw, params, meta, CallStart(_scope.current()))
    return tally.reserve(model=model, provider=provider, messages=messages,
                         input_tokens=input_tokens, max_tokens=max_tokens, choices=choices,
                         call_type=kind, project=who["project"], user=who["user"],
                         session=who["session"], tags=who["tags"])


def _count_inputs(inputs: Any, model: str) -> int:
    """Tokens of every input: texts counted offline, token-id lists by their length."""
    from .._events.tokens import count_text

    if isinstance(inputs, str):
        return count_text(inputs, model)
    if not isinstance(inputs, (list, tuple)):
        return 0
    if inputs and all(type(item) is int for item in inputs):  # one input given as token ids
        return len(inputs)
    total = 0
    for item in inputs:
        if isinstance(item, str):
            total += count_text(item, model)
        elif isinstance(item, (list, tuple)):
            total += len(item)
    return total


def _positive(value: Any) -> int:
    return value if type(value) is int and value > 0 else 1


def _model_and_provider(kw: Mapping[str, Any]) -> tuple[str, str | None]:
    """The model name without its route and the provider, as the call's event will have them."""
    model = text(kw.get("model")) or "unknown"
    provider = text(kw.get("custom_llm_provider"))
    try:
        import litellm

        name, found, _, _ = litellm.get_llm_provider(model=model, custom_llm_provider=provider,
                                                     api_base=text(kw.get("api_base")))
        return (text(name) or model), (text(found) or provider)
    except Exception:
        if provider is None and "/" in model:
            provider, model = model.split("/", 1)
        return model, provider


def _proxy_deployment_model(model: Any) -> Any:
    """On the proxy, the (first) deployment's model for a model group name, so that the
    estimate is priced and ``model=`` budgets match what the event will record."""
    if not isinstance(model, str):
        return model
    try:
        from litellm.proxy.proxy_server import llm_router

        for deployment in (llm_router.get_model_list(model_name=model) or []) if llm_router else []:
            found = text(mapping(deployment.get("litellm_params")).get("model"))
            if found:
                return found
    except Exception:
        pass
    return model


_CALLER_FIELDS = (("user_api_key_alias", "key_alias"), ("user_api_key_user_id", "user_id"),
                  ("user_api_key_team_id", "team_id"), ("user_api_key_team_alias", "team_alias"),
                  ("user_api_key_end_user_id", "end_user_id"), ("user_api_key_org_id", "org_id"),
                  ("user_api_key_project_id", "project_id"),
                  ("user_api_key_project_alias", "project_alias"))


def _caller_metadata(user_api_key_dict: Any) -> dict[str, str]:
    """The proxy caller's identity (a ``UserAPIKeyAuth``) as the ``user_api_key_*`` metadata
    the proxy puts on the request's logging, so the hold is attributed like the event."""
    found: dict[str, str] = {}
    for field, attr in _CALLER_FIELDS:
        value: Any = (user_api_key_dict.get(attr) if isinstance(user_api_key_dict, Mapping)
                 else getattr(user_api_key_dict, attr, None))
        if text(value) and not (attr == "user_id" and value == PROXY_ADMIN):
            found[field] = value
    return found


def guard(logger_: LiteLLMLogger, fn: Any) -> Any:
    """See :meth:`Tally.guard`: ``logger_`` is the Tally's ``tally.litellm()``."""
    tally = logger_.tally
    if getattr(fn, "_llmtally_guarded", None) is tally:
        return fn
    sync_durable = tally.durability == "sync"
    hooked = install_setup_hook()  # then budgets are held by the set-up hook, for every call

    def begin(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Reservation | None:
        registered = _registered(logger_)
        held_by_hook = hooked and registered  # the set-up hook holds every call's budgets
        if (tally.budgets is None or held_by_hook) and not sync_durable:
            return None
        call_id = kwargs.get("litellm_call_id")
        if not isinstance(call_id, str) or not call_id:
            call_id = kwargs["litellm_call_id"] = str(uuid.uuid4())
        if sync_durable and registered:
            logger_._await_record(call_id)
        if tally.budgets is None or held_by_hook:
            return None
        if not registered:
            warn_limited("guard-unregistered", "llmtally: tally.guard() checks the budgets, but "
                         "tally.litellm() is not in litellm.callbacks, so what the call really "
                         "cost is not recorded and its hold is only released after "
                         "reservation_ttl_s: add litellm.callbacks.append(tally.litellm())")
        view = _call_view(args, kwargs)
        call_type = "embedding" if "input" in view and "messages" not in view else "completion"
        held = _reserve(tally, view, call_type)
        logger_._hold(call_id, held)
        return held

    def failed(kwargs: Mapping[str, Any], held: Reservation | None) -> None:
        logger_._forget_await(kwargs.get("litellm_call_id"))
        if held is not None:
            # The hook settles what LiteLLM logged; a hold still here was never seen by LiteLLM.
            tally.release(logger_._take_hold(kwargs.get("litellm_call_id")))

    def waiter(kwargs: Mapping[str, Any], result: Any) -> threading.Event | None:
        """The event a sync-durability caller waits on (None for streams: they are recorded
        when read to the end, after the guarded call returned them)."""
        call_id = kwargs.get("litellm_call_id")
        with logger_._starts_lock:
            done = logger_._awaited.get(call_id) if isinstance(call_id, str) else None
        if done is not None and _is_stream(result):
            logger_._forget_await(call_id)
            return None
        return done

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def guarded_async(*args: Any, **kwargs: Any) -> Any:
            held = begin(args, kwargs)
            try:
                result = await fn(*args, **kwargs)
            except BaseException:
                failed(kwargs, held)
                raise
            done = waiter(kwargs, result) if sync_durable else None
            if done is not None:
                await _wait_async(done, _SYNC_WAIT_S)  # LiteLLM logs async calls on this loop
                logger_._forget_await(kwargs.get("litellm_call_id"))
            return result
        wrapper: Any = guarded_async
    else:
        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            held = begin(args, kwargs)
            try:
                result = fn(*args, **kwargs)
            except BaseException:
                failed(kwargs, held)
                raise
            done = waiter(kwargs, result) if sync_durable else None
            if done is not None:
                done.wait(_SYNC_WAIT_S)  # LiteLLM logs sync calls on its logging thread
                logger_._forget_await(kwargs.get("litellm_call_id"))
            return result
        wrapper = guarded
    wrapper._llmtally_guarded = tally
    return wrapper


def _registered(logger_: LiteLLMLogger) -> bool:
    """Whether LiteLLM will call ``logger_``."""
    litellm = sys.modules.get("litellm")
    lists = (getattr(litellm, name, None) for name in
             ("callbacks", "success_callback", "_async_success_callback"))
    return any(isinstance(found, list) and any(cb is logger_ for cb in found) for found in lists)


def _is_stream(result: Any) -> bool:
    return hasattr(result, "__next__") or hasattr(result, "__anext__")


async def _wait_async(done: threading.Event, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.001)


def _call_view(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A LiteLLM call's arguments as keywords (``completion(model, messages)`` positionally
    too), for :func:`_reserve` (which also reads a text completion's ``prompt``)."""
    view = dict(kwargs)
    if args and "model" not in view:
        view["model"] = args[0]
    if len(args) > 1 and "messages" not in view and "input" not in view:
        view["messages" if _is_messages(args[1]) else "input"] = args[1]
    return view


def _is_messages(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and \
        all(isinstance(item, Mapping) for item in value)


def _is_auth_rejection(kwargs: Any) -> bool:
    """A LiteLLM proxy request refused by its key check (401/403 before any provider call)."""
    error = kwargs.get("exception") if isinstance(kwargs, Mapping) else None
    if type(error).__name__ not in ("HTTPException", "ProxyException"):
        return False
    code = getattr(error, "status_code", None) or getattr(error, "code", None)
    return str(code) in ("401", "403")
