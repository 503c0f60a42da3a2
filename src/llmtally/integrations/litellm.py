"""LiteLLM: ``litellm.callbacks = [tally.litellm()]`` records every SDK and Router call once.

How LiteLLM's view of a call maps onto a ledger event (checked on litellm 1.110):

- ``id`` is LiteLLM's ``litellm_call_id``, so a logger registered twice (two instances,
  ``callbacks`` plus ``success_callback``, a re-assigned ``litellm.callbacks``) stores one row.
  Each Router attempt (retry, fallback) has its own call id and is its own event; the attempts
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
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from litellm.integrations.custom_logger import CustomLogger

from .. import _scope
from .._log import warn_limited
from .._usage import Usage, extract_usage, response_model, response_text

if TYPE_CHECKING:
    from .._tally import Tally

__all__ = ["LiteLLMLogger", "CallStart", "litellm_event", "drain_logging_worker"]

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
_MAX_PENDING_STARTS = 10_000  # calls started but not finished (abandoned streams never finish)


@dataclass(frozen=True, slots=True)
class CallStart:
    """What is known only when a call starts, on the caller's thread."""

    scope: _scope.Attribution
    stream_usage_asked: bool | None = None  # did the request ask an OpenAI-format stream for usage


def litellm_event(kwargs: Any, response_obj: Any, start_time: Any, end_time: Any, *,
                  failed: bool, call_start: CallStart | None = None) -> dict[str, Any]:
    """The keyword arguments for ``tally.record(...)`` describing one LiteLLM call.

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
    if call_id:
        event["id"] = call_id
    if failed:
        error = kw.get("exception")
        event["error_type"] = error_type(error) if isinstance(error, BaseException) else None
    else:
        event["resolved_model"] = response_model(response_obj)
        if streamed:
            event["ttft_ms"] = _ms_between(start_time, kw.get("completion_start_time"))
        usage = extract_usage(response_obj)
        if usage is None or (streamed and _usage_not_sent(kw, provider, call_start)):
            usage = _count_offline(kw, response_obj, model)
            event["estimated"] = True
        event.update(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                     cache_read_tokens=usage.cache_read_tokens,
                     cache_write_tokens=usage.cache_write_tokens,
                     reasoning_tokens=usage.reasoning_tokens)
        if kw.get("cache_hit") is True:
            event["cache_hit"] = True
    event.update(_attribution(kw, params, meta, call_start))
    if event.get("estimated"):
        event["metadata"]["llmtally_estimated"] = "the provider reported no usage; tokens counted offline"
    return event


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
    return {
        "project": _text(meta.get("project")) or scope.project,
        "user": _text(meta.get("user")) or _text(kw.get("user")) or scope.user,
        "session": _text(meta.get("session_id")) or _text(params.get("litellm_session_id"))
        or scope.session,
        "tags": list(_scope.merge_tags(scope.tags, tags)),
        "request_id": _text(meta.get("request_id")) or scope.request_id or trace_id,
        "metadata": extra,
    }


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
    from .._tokens import count_messages, count_text

    messages = kw.get("messages")
    if isinstance(messages, (list, tuple)):
        prompt = count_messages(messages, model)
    else:
        inputs = kw.get("input")
        inputs = [inputs] if isinstance(inputs, str) else inputs if isinstance(inputs, list) else []
        prompt = sum(count_text(item, model) for item in inputs if isinstance(item, str))
    return Usage(input_tokens=prompt, output_tokens=count_text(response_text(response_obj), model))


def error_type(error: BaseException) -> str:
    """``litellm.RateLimitError`` for classes the top-level package exports, else
    ``module.Class`` with private module parts dropped."""
    cls = type(error)
    top = cls.__module__.split(".", 1)[0]
    if getattr(sys.modules.get(top), cls.__name__, None) is cls:
        return f"{top}.{cls.__name__}"
    public = ".".join(part for part in cls.__module__.split(".") if not part.startswith("_"))
    return f"{public}.{cls.__qualname__}" if public and public != "builtins" else cls.__qualname__


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

    Get it with ``tally.litellm()`` (one instance per Tally) and register it with
    ``litellm.callbacks = [tally.litellm()]``. Its hooks never raise into LiteLLM.
    """

    def __init__(self, tally: Tally) -> None:
        super().__init__()
        self.tally = tally
        self._starts: dict[str, CallStart] = {}
        self._starts_lock = threading.Lock()

    # LiteLLM finds hooks by exact method and parameter names: do not rename them.
    # It calls log_pre_api_call on the caller's thread for sync and async calls alike.

    def log_pre_api_call(self, model, messages, kwargs):  # type: ignore[no-untyped-def]
        """Capture the caller's attribution: success hooks may run where it is not visible
        (sync streams finish on a thread pool that does not copy the context)."""
        try:
            call_id = kwargs.get("litellm_call_id")
            if not isinstance(call_id, str):
                return
            asked = _asks_for_usage(kwargs) if kwargs.get("stream") is True else None
            start = CallStart(_scope.current(), asked)
            with self._starts_lock:
                if len(self._starts) >= _MAX_PENDING_STARTS:
                    del self._starts[next(iter(self._starts))]
                self._starts[call_id] = start
        except Exception as exc:
            warn_limited("litellm-hook", "llmtally: LiteLLM pre-call hook failed (%s: %s)",
                         type(exc).__name__, exc, exc_info=True)

    def log_success_event(self, kwargs, response_obj, start_time, end_time):  # type: ignore[no-untyped-def]
        self._record(kwargs, response_obj, start_time, end_time, failed=False)

    def log_failure_event(self, kwargs, response_obj, start_time, end_time):  # type: ignore[no-untyped-def]
        self._record(kwargs, response_obj, start_time, end_time, failed=True)

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):  # type: ignore[no-untyped-def]
        self._record(kwargs, response_obj, start_time, end_time, failed=False)

    async def async_log_failure_event(self, kwargs, response_obj, start_time, end_time):  # type: ignore[no-untyped-def]
        self._record(kwargs, response_obj, start_time, end_time, failed=True)

    def _record(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any, *,
                failed: bool) -> None:
        try:
            call_id = kwargs.get("litellm_call_id") if isinstance(kwargs, Mapping) else None
            with self._starts_lock:
                start = self._starts.pop(call_id, None) if isinstance(call_id, str) else None
            if start is None:  # not seen starting: the attribution in force here is the best guess
                start = CallStart(_scope.current())
            self.tally.record(**litellm_event(kwargs, response_obj, start_time, end_time,
                                              failed=failed, call_start=start))
        except Exception as exc:
            warn_limited("litellm-hook", "llmtally: could not record a LiteLLM call (%s: %s)",
                         type(exc).__name__, exc, exc_info=True)


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
    module = sys.modules.get("litellm.litellm_core_utils.logging_worker")
    worker = getattr(module, "GLOBAL_LOGGING_WORKER", None)
    if worker is None or getattr(worker, "_queue", None) is None:
        return
    pending = getattr(worker, "pending_count", None)
    if pending is None:
        pending = worker._queue.qsize()
    if not pending:
        return
    left = None if timeout is None else max(0.0, deadline - time.monotonic())
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
