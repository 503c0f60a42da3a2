"""A LiteLLM call's budget hold, estimated from the call's arguments before anything is sent:
the prompt counted offline plus ``max_tokens`` times the number of choices asked for."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._events import scope as _scope
from . import litellm_compat as compat
from .litellm_events import CallStart, attribution, call_type_of, mapping, text

if TYPE_CHECKING:
    from .._budgets.states import Reservation
    from .._recorder import Recorder

__all__ = ["reserve_call", "call_view", "is_budget_refusal"]


def reserve_call(tally: Recorder, kw: Mapping[str, Any], call_type: str | None) -> Reservation | None:
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
        return compat.llm_provider(model, provider, text(kw.get("api_base")))
    except Exception:
        if provider is None and "/" in model:
            provider, model = model.split("/", 1)
        return model, provider


def call_view(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A LiteLLM call's arguments as keywords (``completion(model, messages)`` positionally
    too), for :func:`reserve_call` (which also reads a text completion's ``prompt``)."""
    view = dict(kwargs)
    if args and "model" not in view:
        view["model"] = args[0]
    if len(args) > 1 and "messages" not in view and "input" not in view:
        view["messages" if _is_messages(args[1]) else "input"] = args[1]
    return view


def _is_messages(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and \
        all(isinstance(item, Mapping) for item in value)


def is_budget_refusal(kwargs: Any) -> bool:
    """A call our own budget hook stopped (LiteLLM runs its failure hooks for it too)."""
    from .._budgets.budget import BudgetExceeded

    error = kwargs.get("exception") if isinstance(kwargs, Mapping) else None
    if isinstance(error, BudgetExceeded) or isinstance(getattr(error, "__cause__", None),
                                                        BudgetExceeded):
        return True
    return type(error).__name__ in ("HTTPException", "ProxyException") and \
        str(getattr(error, "status_code", None) or getattr(error, "code", None)) == "429" and \
        str(getattr(error, "detail", None) or getattr(error, "message", "")).startswith("llmtally ")
