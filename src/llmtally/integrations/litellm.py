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
import atexit
import functools
import gc
import inspect
import logging
import queue
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from litellm.integrations.custom_logger import CustomLogger

from .._events import scope as _scope
from .._errors import error_type
from .._events.event import CallEvent
from .._events.ids import EventIds
from .._budgets.offloop import reserve_off_loop
from .._log import warn_limited
from .._events.usage import Usage, extract_usage, response_model, response_text
from ._handoff import claim as _claim_offered, take_hold as _take_offered_hold

if TYPE_CHECKING:
    from .._budgets.states import Reservation
    from .._recorder import Recorder

__all__ = ["LiteLLMLogger", "CallStart", "litellm_event", "drain_logging_worker",
           "adrain_logging_worker", "guard"]

_CALL_TYPES = {
    "completion": "chat", "text_completion": "completion", "embedding": "embedding",
    "image_generation": "image", "image_edit": "image", "image_variation": "image",
    "transcription": "audio", "speech": "audio", "rerank": "rerank", "moderation": "moderation",
    "responses": "responses",
}
# Providers that speak OpenAI's streaming format: they send usage only when asked to.
_OPENAI_FORMAT = frozenset({"openai", "azure", "text-completion-openai", "azure_text",
                            "custom_openai", "litellm_proxy"})
_IDLE_WAIT_S = 10.0  # how long flush(timeout=None) waits for LiteLLM's logging threads
_DRAIN_WAIT_S = 30.0  # and at most for LiteLLM's async queue: a drain never hangs a flush
_MAX_PENDING_STARTS = 10_000  # calls started but not finished (abandoned streams never finish)
_MAX_PENDING_HOLDS = 10_000  # budget holds not settled yet; one dropped here expires by its TTL
_SYNC_WAIT_S = 15.0  # durability="sync": the longest a guarded call waits for its event


@dataclass(frozen=True, slots=True)
class CallStart:
    """What is known only when a call starts, on the caller's thread."""

    scope: _scope.Attribution
    stream_usage_asked: bool | None = None  # did the request ask an OpenAI-format stream for usage


def litellm_event(kwargs: Any, response_obj: Any, start_time: Any, end_time: Any, *,
                  failed: bool, call_start: CallStart | None = None,
                  abandoned: bool = False) -> CallEvent:
    """The :class:`~llmtally.CallEvent` describing one LiteLLM call.

    ``kwargs``, ``response_obj``, ``start_time`` and ``end_time`` are what LiteLLM passes to a
    ``CustomLogger``'s success or failure hook; ``call_start`` is what the logger saw when the
    call started (the attribution in force there). Tolerates any shape: missing or odd fields
    give ``None`` / 0, never an exception.
    """
    kw: Mapping[str, Any] = kwargs if isinstance(kwargs, Mapping) else {}
    params = _mapping(kw.get("litellm_params"))
    meta = _mapping(params.get("metadata"))
    provider = _text(kw.get("custom_llm_provider")) or _text(params.get("custom_llm_provider"))
    model = _text(kw.get("model")) or (None if failed else response_model(response_obj)) or "unknown"
    streamed = kw.get("stream") is True
    event: dict[str, Any] = {
        "source": "litellm", "model": model, "provider": provider,
        "call_type": _call_type(kw.get("call_type")), "streamed": streamed,
        "status": "error" if failed else "ok", "latency_ms": _ms_between(start_time, end_time),
    }
    call_id = _text(kw.get("litellm_call_id"))
    event_id = _text(kw.get(EVENT_ID_KEY))
    if event_id or call_id:
        event["id"] = event_id or _event_id(call_id, start_time)  # type: ignore[arg-type]
    if failed:
        error = kw.get("exception")
        event["error_type"] = error_type(error) if isinstance(error, BaseException) else None
    else:
        event["resolved_model"] = _provider_model(response_obj) or response_model(response_obj)
        if streamed:
            event["ttft_ms"] = _ms_between(start_time, kw.get("completion_start_time"))
        usage = None if abandoned else extract_usage(response_obj)
        if usage is None or (streamed and _usage_not_sent(kw, provider, call_start)):
            usage = _count_offline(kw, response_obj, model)
            event["estimated"] = True
        event["usage"] = usage
        if kw.get("cache_hit") is True:
            event["cache_hit"] = True
    event.update(_attribution(kw, params, meta, call_start))
    if call_id:
        event["metadata"]["litellm_call_id"] = call_id
    if abandoned:
        event["metadata"]["stream_abandoned"] = True
        event["metadata"]["llmtally_estimated"] = (
            "the caller left the stream early; prompt and the chunks consumed counted offline")
    elif event.get("estimated"):
        event["metadata"]["llmtally_estimated"] = "the provider reported no usage; tokens counted offline"
    return CallEvent(**event)


def _provider_model(response_obj: Any) -> str | None:
    """The model the provider answered with, as LiteLLM kept it: the proxy renames the
    response's ``model`` to the model group it was asked for (before deferred logging runs)."""
    try:
        hidden = getattr(response_obj, "_hidden_params", None)
    except Exception:
        return None
    return _text(hidden.get("provider_response_model")) if isinstance(hidden, dict) else None


def _attribution(kw: Mapping[str, Any], params: Mapping[str, Any], meta: Mapping[str, Any],
                 call_start: CallStart | None) -> dict[str, Any]:
    scope = call_start.scope if call_start is not None else _scope.EMPTY
    trace_id = _text(kw.get("litellm_trace_id")) or _text(params.get("litellm_trace_id"))
    tags = meta.get("tags")
    tags = (tags,) if isinstance(tags, str) else tuple(
        str(tag) for tag in tags if tag is not None) if isinstance(tags, (list, tuple)) else ()
    extra: dict[str, Any] = dict(scope.metadata)
    model_info = _mapping(params.get("model_info"))
    for key, value in (("litellm_trace_id", trace_id),
                       ("model_group", _text(meta.get("model_group"))),
                       ("deployment_id", _text(model_info.get("id")) or _text(kw.get("model_id"))),
                       ("attempted_retries", meta.get("attempted_retries")),
                       ("attempted_fallbacks", meta.get("attempted_fallbacks"))):
        if value and (isinstance(value, str) or type(value) is int):
            extra[key] = value
    proxy = _proxy_caller(kw, params, meta)
    extra.update((key, value) for key, value in proxy.items() if key not in ("team", "project"))
    if proxy.get("key_alias"):
        tags = (*tags, f"key:{proxy['key_alias']}")
    # On the proxy the authenticated key's user and team win over what the request body says,
    # so a caller cannot move its spend to someone else's user or project.
    return {
        "project": proxy.get("project") or proxy.get("team") or _text(meta.get("project"))
        or scope.project,
        "user": proxy.get("user_id") or _text(meta.get("user")) or proxy.get("end_user")
        or _text(kw.get("user")) or scope.user,
        "session": _text(meta.get("session_id")) or _text(params.get("litellm_session_id"))
        or scope.session,
        "tags": list(_scope.merge_tags(scope.tags, tags)),
        "request_id": _text(meta.get("request_id")) or scope.request_id or trace_id,
        "metadata": extra,
    }


# What the LiteLLM proxy puts as the user of requests made with its master key
# (``litellm.constants.LITELLM_PROXY_ADMIN_NAME``).
_PROXY_ADMIN = "default_user_id"
# The LiteLLM proxy's caller, as its auth step put it in the request metadata.
_PROXY_FIELDS = (("key_alias", "user_api_key_alias"), ("user_id", "user_api_key_user_id"),
                 ("team_id", "user_api_key_team_id"), ("team_alias", "user_api_key_team_alias"),
                 ("end_user", "user_api_key_end_user_id"), ("org_id", "user_api_key_org_id"),
                 ("project_id", "user_api_key_project_id"),
                 ("project_alias", "user_api_key_project_alias"))


def _proxy_caller(kw: Mapping[str, Any], params: Mapping[str, Any],
                  meta: Mapping[str, Any]) -> dict[str, str]:
    """The proxy's key alias, user, team, organisation and end user, when the call came through
    the LiteLLM proxy (``user_api_key_*`` metadata), as ``metadata`` entries plus ``project``
    (LiteLLM project, else the team) and ``team``. The key itself and its hash are never read.
    """
    sources = [meta, _mapping(params.get("litellm_metadata")),
               _mapping(_mapping(kw.get("standard_logging_object")).get("metadata"))]
    found: dict[str, str] = {}
    for name, field in _PROXY_FIELDS:
        for source in sources:
            value = _text(source.get(field))
            if value == _PROXY_ADMIN and name == "user_id":
                continue  # the master key's placeholder, not a person: the end user decides
            if value:
                found[name] = value
                break
    if not found:
        return found
    team = found.get("team_alias") or found.get("team_id")
    project = found.get("project_alias") or found.get("project_id")
    return {**found, **({"team": team} if team else {}), **({"project": project} if project else {})}


def _event_id(call_id: str, start_time: Any) -> str:
    """An event id when LiteLLM ran no hook of ours before the call (no stamp): the caller may
    choose the call id (``litellm_call_id=``, the proxy's ``x-litellm-call-id`` header), so it
    is suffixed with the call's start time, and two calls sharing an id stay two events."""
    if not isinstance(start_time, datetime):
        return call_id[:128]
    try:
        return f"{call_id[:100]}@{start_time.timestamp():.6f}"
    except (OverflowError, OSError, ValueError):
        return call_id[:128]


def _usage_not_sent(kw: Mapping[str, Any], provider: str | None,
                    call_start: CallStart | None) -> bool:
    """True when an OpenAI-format stream was not asked for usage, so the provider sent none."""
    if provider not in _OPENAI_FORMAT and provider not in _openai_compatible():
        return False
    if call_start is not None and call_start.stream_usage_asked is not None:
        return not call_start.stream_usage_asked
    return not _asks_for_usage(kw)


def _asks_for_usage(kw: Mapping[str, Any]) -> bool:
    """Whether the request body LiteLLM sent (or, failing that, the caller's arguments) asked
    the stream for usage. LiteLLM adds the option itself for api.openai.com."""
    body = _mapping(_mapping(kw.get("additional_args")).get("complete_input_dict"))
    options = body.get("stream_options") if "stream_options" in body else kw.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True


def _openai_compatible() -> frozenset[str]:
    litellm = sys.modules.get("litellm")
    names = getattr(litellm, "openai_compatible_providers", ())
    return frozenset(names) if isinstance(names, (list, tuple, set, frozenset)) else frozenset()


def _count_offline(kw: Mapping[str, Any], response_obj: Any, model: str) -> Usage:
    """Tokens counted with the offline tokenizer. The prompt is read, counted and dropped."""
    from .._events.tokens import count_messages, count_text

    messages = kw.get("messages")
    if isinstance(messages, (list, tuple)):
        prompt = count_messages(messages, model)
    else:
        inputs = kw.get("input")
        inputs = [inputs] if isinstance(inputs, str) else inputs if isinstance(inputs, list) else []
        prompt = sum(count_text(item, model) for item in inputs if isinstance(item, str))
    return Usage(input_tokens=prompt, output_tokens=count_text(response_text(response_obj), model))


def _call_type(value: Any) -> str:
    if not isinstance(value, str):
        return "other"
    name = value.removeprefix("litellm.").lower()
    if name in _CALL_TYPES:
        return _CALL_TYPES[name]
    return _CALL_TYPES.get(name[1:], "other") if name.startswith("a") else "other"


def _ms_between(start: Any, end: Any) -> float | None:
    try:
        if isinstance(start, datetime) and isinstance(end, datetime):
            seconds = (end - start).total_seconds()
        elif type(start) in (int, float) and type(end) in (int, float):
            seconds = end - start
        else:
            return None
    except (TypeError, ValueError, OverflowError):  # naive vs aware datetimes, say
        return None
    return seconds * 1000.0 if seconds >= 0 else None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


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
        _LOGGERS.add(self)
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
        key = _call_key(kwargs)
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
        meta = {**_mapping(data.get("metadata")), **_mapping(data.get("litellm_metadata")), **caller}
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
            key = _call_key(kwargs)
            if key is None:
                return
            asked = _asks_for_usage(kwargs) if kwargs.get("stream") is True else None
            scope = _scope.current()
            offered = _claim_offered(self.tally)
            if offered is not None:  # made by a LangChain run that tally.langchain() watches:
                # this logger records the call, with LangChain's attribution (see _handoff)
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
            key = _call_key(kwargs) if isinstance(kwargs, Mapping) else None
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


# Our own id for one LiteLLM call, put in its logging details (``model_call_details``) when
# LiteLLM sets the call up: every hook of the call sees it, and it becomes the event's id. The
# caller's ``litellm_call_id`` (which a client of the proxy can choose) is never trusted as a key.
EVENT_ID_KEY = "llmtally_event_id"
_PROXY_TOKEN_KEY = "llmtally_hold"  # in a proxy request's metadata: its hold, taken before routing
_ids = EventIds()


def _call_key(kwargs: Any) -> str | None:
    """The key of a call's hold and start: our stamp; failing that (a LiteLLM whose set-up hook
    could not be installed), LiteLLM's call id."""
    if not isinstance(kwargs, Mapping):
        return None
    # A call's own kwargs (the deployment hook's) may hold anything the caller passed: read the
    # stamp from its logging object. Hooks given the logging details themselves read it there.
    details = getattr(kwargs.get("litellm_logging_obj"), "model_call_details", None)
    key = details.get(EVENT_ID_KEY) if isinstance(details, dict) else kwargs.get(EVENT_ID_KEY)
    if isinstance(key, str):
        return key
    call_id = kwargs.get("litellm_call_id")
    return call_id if isinstance(call_id, str) else None


def _proxy_token(kwargs: Mapping[str, Any]) -> str | None:
    params = _mapping(kwargs.get("litellm_params"))
    for meta in (kwargs.get("metadata"), kwargs.get("litellm_metadata"), params.get("metadata"),
                 params.get("litellm_metadata")):
        token = _mapping(meta).get(_PROXY_TOKEN_KEY)
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
    with _install_lock:
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
    loggers = [logger_ for logger_ in list(_LOGGERS) if _registered(logger_)]
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
    params = _mapping(kw.get("litellm_params"))
    meta = {**_mapping(params.get("metadata")), **_mapping(kw.get("litellm_metadata")),
            **_mapping(kw.get("metadata"))}
    model, provider = _model_and_provider(kw)
    kind = _call_type(call_type)
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
    who = _attribution(kw, params, meta, CallStart(_scope.current()))
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
    model = _text(kw.get("model")) or "unknown"
    provider = _text(kw.get("custom_llm_provider"))
    try:
        import litellm

        name, found, _, _ = litellm.get_llm_provider(model=model, custom_llm_provider=provider,
                                                     api_base=_text(kw.get("api_base")))
        return (_text(name) or model), (_text(found) or provider)
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
            found = _text(_mapping(deployment.get("litellm_params")).get("model"))
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
        value = (user_api_key_dict.get(attr) if isinstance(user_api_key_dict, Mapping)
                 else getattr(user_api_key_dict, attr, None))
        if _text(value) and not (attr == "user_id" and value == _PROXY_ADMIN):
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


def drain_logging_worker(timeout: float | None = None) -> None:
    """Run the logging LiteLLM has queued but not yet run, so that ``tally.flush()`` means
    every finished call is in the ledger (registered as a before-flush drain by
    ``tally.litellm()``).

    Sync calls log from LiteLLM's logging thread pool: wait until it is idle (at most
    ``timeout``, or 10 s when None, as other threads may keep it busy). Async calls defer
    ``async_log_success_event`` to LiteLLM's ``LoggingWorker`` queue, run on the event loop
    later: run that queue to the end.
    """
    deadline = time.monotonic() + (_IDLE_WAIT_S if timeout is None else timeout)
    _wait_for_logging_threads(deadline)
    running = _collection
    if running is not None:  # an earlier flush's collection, held up in a finaliser: let it end
        running.wait(max(0.0, deadline - time.monotonic()))
    if any(not _state_of(stream).finished for stream in list(_watched)):
        # a stream left unread is freed by the cycle collector only (LiteLLM's logging object
        # and the stream refer to each other): find such streams now, off the caller's thread
        _collect_garbage(deadline)
    _wait_for_abandoned_streams(deadline)
    module = sys.modules.get("litellm.litellm_core_utils.logging_worker")
    worker = getattr(module, "GLOBAL_LOGGING_WORKER", None)
    if worker is None or getattr(worker, "_queue", None) is None:
        return
    pending = getattr(worker, "pending_count", None)
    if pending is None:
        pending = worker._queue.qsize()
    if not pending:
        return
    left = _DRAIN_WAIT_S if timeout is None else max(0.0, deadline - time.monotonic())
    bound = getattr(worker, "_bound_loop", None)
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if bound is not None and bound is not running and bound.is_running():
        # The queue's loop runs in another thread: let it do the work.
        asyncio.run_coroutine_threadsafe(worker.flush(), bound).result(left)
    elif running is None:
        _flush_on_new_loop(worker, left)
    else:
        # Our caller blocks this thread's loop, so it cannot run the queue: a fresh loop on a
        # helper thread takes the queue over (LiteLLM carries pending tasks to a new loop).
        helper = threading.Thread(target=_flush_on_new_loop, args=(worker, left),
                                  name="llmtally-litellm-drain", daemon=True)
        helper.start()
        helper.join(left)


async def adrain_logging_worker(timeout: float | None = None) -> None:
    """On a running event loop: let the logging LiteLLM runs on this loop finish. When the loop
    ends (``asyncio.run`` returning), LiteLLM's logging tasks still in flight are cancelled
    and those calls are never logged; awaiting this before then keeps them (see
    :meth:`Tally.aflush`)."""
    deadline = time.monotonic() + (_DRAIN_WAIT_S if timeout is None else timeout)
    module = sys.modules.get("litellm.litellm_core_utils.logging_worker")
    worker = getattr(module, "GLOBAL_LOGGING_WORKER", None)
    if worker is None:
        return
    # A call that returned may hand its logging to the worker a few loop turns later (more
    # when the loop is busy): drain until a few quiet turns in a row found nothing new.
    quiet = 0
    while quiet < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0)
        if getattr(worker, "_queue", None) is None:
            return
        pending = getattr(worker, "pending_count", None)
        if not isinstance(pending, int):
            pending = worker._queue.qsize()
        quiet = 0 if pending else quiet + 1
        try:  # also waits for the logging already running (the queue's unfinished tasks)
            await asyncio.wait_for(worker.flush(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            warn_limited("litellm-drain", "llmtally: LiteLLM's async logging did not finish "
                         "within %s s", timeout)
            return


def _wait_for_logging_threads(deadline: float) -> None:
    module = sys.modules.get("litellm.litellm_core_utils.thread_pool_executor")
    executor = getattr(module, "executor", None)
    slots = getattr(executor, "_pending_slots", None)  # released as each queued task ends
    capacity = getattr(executor, "_max_pending_tasks", None)
    if not isinstance(capacity, int) or not isinstance(getattr(slots, "_value", None), int):
        return
    if threading.current_thread().name.startswith("litellm-logging"):
        return  # flushing from one of LiteLLM's own logging threads: it would wait for itself
    while slots._value < capacity and time.monotonic() < deadline:
        time.sleep(0.001)


def _flush_on_new_loop(worker: Any, timeout: float | None) -> None:
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(worker.flush(), timeout))
    finally:
        try:
            loop.run_until_complete(worker.stop())  # cancel the worker task bound to this loop
        finally:
            loop.close()


# -- abandoned streams -----------------------------------------------------------------------
#
# LiteLLM logs a stream only when the caller reads it to the end. A stream left halfway (a
# ``break``, an exception in the caller's loop, a cancelled task) logs nothing, although the
# provider charged for the prompt and for what it sent. ``install_stream_watch()`` (run once by
# ``tally.litellm()``) wraps four methods of LiteLLM's ``CustomStreamWrapper``:
#
# - ``__init__`` notes, for a call one of our loggers saw starting, what the event needs (a
#   shallow copy of a few LiteLLM kwargs, the wrapper's own list of chunks returned so far) and
#   registers a ``weakref.finalize`` on the stream;
# - ``__next__`` / ``__anext__`` mark the stream finished when it ends or fails (LiteLLM then
#   logs it itself) and note when the first chunk came;
# - ``close`` / ``aclose``, called by the user (not by LiteLLM itself at the end of a stream),
#   and otherwise the finalizer when the stream object is released, hand a stream that did not
#   finish to a daemon thread that records it: ``streamed``, ``estimated``, prompt and consumed
#   chunks counted offline, ``metadata["stream_abandoned"] = True``.
#
# A stream is released by Python's cycle collector, not at once (LiteLLM's logging object and
# the stream refer to each other), so ``tally.flush()`` runs ``gc.collect()`` while watched
# streams are alive — on a thread of its own, never the caller's (see ``_collect_garbage``).
#
# The finalizer only puts the stream on a ``queue.SimpleQueue`` (safe from finalizers and GC);
# nothing is kept per stream once it is released; every wrapped method passes through what
# LiteLLM returns or raises, and a fault of ours is logged, never raised.

_STATE_ATTR = "_llmtally_stream"
_SNAPSHOT_KEYS = ("llmtally_event_id", "litellm_call_id", "model", "custom_llm_provider", "messages", "input",
                  "call_type", "litellm_params", "litellm_trace_id", "user", "stream_options",
                  "model_id")
_LOGGERS: weakref.WeakSet[LiteLLMLogger] = weakref.WeakSet()
_watched: weakref.WeakSet[Any] = weakref.WeakSet()  # streams alive and watched
_ABANDONED: queue.SimpleQueue[Any] = queue.SimpleQueue()
_install_lock = threading.Lock()
_installed = False
_recorder: threading.Thread | None = None


class _StreamState:
    __slots__ = ("call_id", "kwargs", "start_time", "chunks", "first_chunk_at", "ended_at",
                 "finished", "in_next", "finalizer")

    def __init__(self, call_id: str, kwargs: dict[str, Any], start_time: Any, chunks: list) -> None:
        self.call_id, self.kwargs, self.start_time, self.chunks = call_id, kwargs, start_time, chunks
        self.first_chunk_at: datetime | None = None
        self.ended_at: datetime | None = None
        self.finished = False
        self.in_next = False
        self.finalizer: Any = None


def install_stream_watch() -> bool:
    """Wrap LiteLLM's ``CustomStreamWrapper`` once per process so that abandoned streams are
    recorded (see the notes above). Returns False if this LiteLLM's wrapper has another shape."""
    global _installed
    with _install_lock:
        if _installed:
            return True
        try:
            from litellm.litellm_core_utils.streaming_handler import CustomStreamWrapper as cls
        except ImportError:
            return False
        if not all(callable(getattr(cls, name, None)) for name in ("__init__", "__next__", "__anext__")):
            return False
        original_init, original_next, original_anext = cls.__init__, cls.__next__, cls.__anext__

        @functools.wraps(original_init)
        def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            original_init(self, *args, **kwargs)
            _watch(self)

        @functools.wraps(original_next)
        def __next__(self):  # type: ignore[no-untyped-def]
            state = self.__dict__.get(_STATE_ATTR)
            if state is None:
                return original_next(self)
            state.in_next = True
            try:
                chunk = original_next(self)
            except Exception:  # the end (StopIteration) or a failure: LiteLLM logs both itself
                state.finished = True
                raise
            finally:
                state.in_next = False
            if state.first_chunk_at is None:
                state.first_chunk_at = datetime.now()
            return chunk

        @functools.wraps(original_anext)
        async def __anext__(self):  # type: ignore[no-untyped-def]
            state = self.__dict__.get(_STATE_ATTR)
            if state is None:
                return await original_anext(self)
            state.in_next = True
            try:
                chunk = await original_anext(self)
            except Exception:  # StopAsyncIteration or a failure; not CancelledError
                state.finished = True
                raise
            finally:
                state.in_next = False
            if state.first_chunk_at is None:
                state.first_chunk_at = datetime.now()
            return chunk

        cls.__init__, cls.__next__, cls.__anext__ = __init__, __next__, __anext__
        atexit.register(_drain_at_exit)  # after the ledger's exit flush was registered: runs before it
        if callable(getattr(cls, "close", None)):
            original_close = cls.close

            @functools.wraps(original_close)
            def close(self):  # type: ignore[no-untyped-def]
                try:
                    return original_close(self)
                finally:
                    _closed_by_caller(self)

            cls.close = close
        if callable(getattr(cls, "aclose", None)):
            original_aclose = cls.aclose

            @functools.wraps(original_aclose)
            async def aclose(self):  # type: ignore[no-untyped-def]
                try:
                    return await original_aclose(self)
                finally:
                    _closed_by_caller(self)

            cls.aclose = aclose
        _installed = True
        return True


def _watch(stream: Any) -> None:
    """Register a new stream for a call one of our loggers saw starting."""
    try:
        loggers = list(_LOGGERS)
        if not loggers:
            return
        logging_obj = getattr(stream, "logging_obj", None)
        details = getattr(logging_obj, "model_call_details", None)
        chunks = getattr(stream, "chunks", None)
        if not isinstance(details, dict) or not isinstance(chunks, list):
            return
        call_id = _call_key(details)
        if call_id is None or not any(call_id in lg._starts for lg in loggers):
            return
        state = _StreamState(call_id, {key: details[key] for key in _SNAPSHOT_KEYS if key in details},
                             getattr(logging_obj, "start_time", None), chunks)
        state.finalizer = weakref.finalize(stream, _stream_released, state)
        state.finalizer.atexit = True
        stream.__dict__[_STATE_ATTR] = state
        _watched.add(stream)
        _ensure_recorder()
    except Exception as exc:
        warn_limited("litellm-stream", "llmtally: could not watch a LiteLLM stream (%s: %s)",
                     type(exc).__name__, exc, exc_info=True)


def _state_of(stream: Any) -> _StreamState:
    return stream.__dict__[_STATE_ATTR]


def _closed_by_caller(stream: Any) -> None:
    state = stream.__dict__.get(_STATE_ATTR) if hasattr(stream, "__dict__") else None
    if state is not None and not state.in_next and not state.finished and state.finalizer is not None:
        state.finalizer()  # runs _stream_released now, once


def _stream_released(state: _StreamState) -> None:
    """The stream was closed by its caller or released: queue it if it did not finish. Runs in
    finalizer context: only a ``SimpleQueue.put``, which is safe there."""
    if not state.finished:
        state.finished = True
        state.ended_at = datetime.now()
        _ABANDONED.put(state)


def _ensure_recorder() -> None:
    global _recorder
    if _recorder is None or not _recorder.is_alive():  # also after a fork
        with _install_lock:
            if _recorder is None or not _recorder.is_alive():
                _recorder = threading.Thread(target=_record_abandoned_forever,
                                             name="llmtally-litellm-streams", daemon=True)
                _recorder.start()


def _record_abandoned_forever() -> None:
    while True:
        item = _ABANDONED.get()
        if isinstance(item, threading.Event):  # a flush waiting for what was queued before it
            item.set()
            continue
        try:
            _record_abandoned(item)
        except Exception as exc:
            warn_limited("litellm-stream", "llmtally: could not record an abandoned LiteLLM stream "
                         "(%s: %s)", type(exc).__name__, exc, exc_info=True)


def _record_abandoned(state: _StreamState) -> None:
    for logger_ in list(_LOGGERS):
        with logger_._starts_lock:
            start = logger_._starts.pop(state.call_id, None)
        if start is None:  # not this logger's call, or LiteLLM logged it after all
            continue
        held = logger_._take_hold(state.call_id)
        chunks = list(state.chunks)
        text = "".join(response_text(chunk) for chunk in chunks)
        resolved = next((model for model in map(response_model, chunks) if model), None)
        kwargs = {**state.kwargs, "stream": True, "completion_start_time": state.first_chunk_at}
        event = litellm_event(kwargs, {"model": resolved, "choices": [{"message": {"content": text}}]},
                              state.start_time, state.ended_at, failed=False, call_start=start,
                              abandoned=True)
        logger_.tally.record_event(event, reservation=held)


def _wait_for_abandoned_streams(deadline: float) -> None:
    """Return once the streams released so far are recorded (the recorder runs them in order)."""
    if _recorder is None:
        return
    _ensure_recorder()
    done = threading.Event()
    _ABANDONED.put(done)
    done.wait(max(0.0, deadline - time.monotonic()))


def _collect_garbage(deadline: float) -> None:
    """``gc.collect()`` on a thread of our own; wait for it until ``deadline``.

    A collection runs the finalisers of every object it frees, not only ours: an abandoned
    OpenAI SDK stream closes its HTTP response there, which takes httpcore's connection-pool
    lock (a ``threading.Lock``, not re-entrant). Run on the caller's thread while that thread
    holds the lock (``flush()`` from a SIGTERM handler that interrupted a request does), it
    would wait for itself forever. On a thread of ours, the finaliser waits only until the
    caller releases the lock, and the caller waits at most until ``deadline``."""
    global _collection
    done = _collection = threading.Event()

    def collect() -> None:
        global _collection
        try:
            with _collect_lock:  # one collection at a time: a second gc.collect() returns at once
                gc.collect()
        finally:
            done.set()
            if _collection is done:
                _collection = None

    threading.Thread(target=collect, name="llmtally-collect", daemon=True).start()
    done.wait(max(0.0, deadline - time.monotonic()))


_collect_lock = threading.Lock()
_collection: threading.Event | None = None  # set when the latest collection started has ended


def _drain_at_exit() -> None:
    _wait_for_abandoned_streams(time.monotonic() + 2.0)
