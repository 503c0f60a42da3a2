"""``@tally.track``: a function that calls an LLM SDK directly, each call checked against the
budgets first, timed, its usage read from the return value, and recorded."""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

from ._errors import error_type
from ._events.event import NO_USAGE, CallEvent
from ._events.scope import SCOPE_KEYS
from ._events.usage import Usage, extract_usage, response_model, response_text
from ._log import warn_limited

if TYPE_CHECKING:
    from ._budgets.states import Reservation
    from ._recorder import Recorder

__all__ = ["Tracking", "tracked"]

F = TypeVar("F", bound=Callable[..., Any])


class Tracking:
    """``tally.track``, mixed into :class:`~llmtally.Tally`."""

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
        unknown = set(attribution) - set(SCOPE_KEYS)
        if unknown:
            raise TypeError(f"track() got unexpected keyword arguments {sorted(unknown)}; "
                            f"allowed: model, provider, call_type, {', '.join(SCOPE_KEYS)}")

        def decorate(func: F) -> F:
            return tracked(cast("Recorder", self), func, model=model, provider=provider, call_type=call_type,
                           attribution=attribution)

        return decorate(fn) if fn is not None else decorate


def tracked(recorder: Recorder, func: F, *, model: str | None, provider: str | None,
            call_type: str, attribution: Mapping[str, Any]) -> F:
    """``func`` wrapped so that each call is checked against the budgets, timed and recorded
    (see :meth:`Tally.track`)."""
    if inspect.iscoroutinefunction(func):
        @functools.wraps(func)
        async def async_tracked(*args: Any, **kwargs: Any) -> Any:
            held = _reserve(recorder, model, provider, call_type, kwargs, attribution)
            started = time.perf_counter()
            try:
                result = await func(*args, **kwargs)
            except BaseException as exc:
                _record(recorder, None, exc, started, model, provider, call_type, kwargs,
                    attribution, held)
                raise
            _record(recorder, result, None, started, model, provider, call_type, kwargs,
                    attribution, held)
            return result
        return async_tracked  # type: ignore[return-value]

    @functools.wraps(func)
    def sync_tracked(*args: Any, **kwargs: Any) -> Any:
        held = _reserve(recorder, model, provider, call_type, kwargs, attribution)
        started = time.perf_counter()
        try:
            result = func(*args, **kwargs)
        except BaseException as exc:
            _record(recorder, None, exc, started, model, provider, call_type, kwargs,
                    attribution, held)
            raise
        _record(recorder, result, None, started, model, provider, call_type, kwargs,
                    attribution, held)
        return result
    return sync_tracked  # type: ignore[return-value]


def _reserve(recorder: Recorder, model: str | None, provider: str | None, call_type: str,
                     call_kwargs: Mapping[str, Any],
                     attribution: Mapping[str, Any]) -> Reservation | None:
    """Budgets first: raises BudgetExceeded before the decorated function runs."""
    if recorder.budgets is None:
        return None
    messages = call_kwargs.get("messages")
    return recorder.reserve(
        model=model or _text_kwarg(call_kwargs, "model") or "unknown", provider=provider,
        messages=messages if isinstance(messages, (list, tuple)) else None,
        max_tokens=call_kwargs.get("max_tokens") or call_kwargs.get("max_completion_tokens"),
        call_type=call_type, **{k: v for k, v in attribution.items()
                                if k in ("project", "user", "session", "tags")})

def _record(recorder: Recorder, result: Any, error: BaseException | None, started: float,
                    model: str | None, provider: str | None, call_type: str,
                    call_kwargs: Mapping[str, Any], attribution: Mapping[str, Any],
                    held: Reservation | None = None) -> None:
    try:
        latency_ms = (time.perf_counter() - started) * 1000.0
        answered = response_model(result) if error is None else None
        requested = model or _text_kwarg(call_kwargs, "model") or answered or "unknown"
        usage = extract_usage(result) if error is None else None
        estimated = False
        metadata = dict(attribution.get("metadata") or {})
        if error is None and usage is None:
            from ._events.tokens import count_text

            usage = Usage(output_tokens=count_text(response_text(result), requested))
            estimated = True
            metadata["llmtally_estimated"] = "the response reported no usage; output counted offline"
        attributes = {**attribution, "metadata": metadata or None}
        recorder.record_event(CallEvent(
            model=requested, provider=provider, usage=usage or NO_USAGE,
            latency_ms=latency_ms, status="ok" if error is None else "error",
            error_type=error_type(error) if error is not None else None,
            call_type=call_type, resolved_model=answered, estimated=estimated,
            **attributes), reservation=held)
    except Exception as exc:
        warn_limited("track", "llmtally: could not record a tracked call (%s: %s)",
                     type(exc).__name__, exc, exc_info=True)

def _text_kwarg(kwargs: Mapping[str, Any], name: str) -> str | None:
    value = kwargs.get(name)
    return value if isinstance(value, str) and value else None
