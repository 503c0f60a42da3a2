"""LangChain: ``config={"callbacks": [tally.langchain()]}`` records every model call once.

How LangChain's view of a call maps onto a ledger event (checked on langchain-core 1.8,
langchain-openai 1.7, langchain-anthropic 1.7, langchain-litellm 0.11):

- Only model runs are events: ``on_chat_model_start`` (``call_type="chat"``) and
  ``on_llm_start`` (legacy text-completion ``LLM`` models, ``call_type="completion"``), each
  ended by ``on_llm_end`` or ``on_llm_error``. Chains, tools and retrievers are not counted;
  their start and end are followed only to know each model call's root run.
- ``id`` is the LangChain run id; ``source="langchain"``. ``metadata`` keeps
  ``langchain_parent_run_id`` (when there is a parent) and ``langchain_root_run_id`` (the
  outermost run seen; the call's own id for a bare model call), and ``request_id`` is the root
  run id unless one was given, so a report can group the calls of one chain or agent run.
- ``provider`` is LangChain's ``ls_provider`` metadata (else the model's integration package);
  ``model`` its ``ls_model_name`` (else the invocation parameters' model, else the model the
  response names, else the model's class name — which prices nothing, so the call is
  ``unpriced``, never dropped); ``resolved_model`` the response's ``model_name``. ``ChatLiteLLM``
  names its model ``openai/gpt-4o-mini`` with provider ``litellm``: it is stored as model
  ``gpt-4o-mini``, provider ``openai``, as the LiteLLM integration stores it.
- Tokens come from ``AIMessage.usage_metadata``, whose convention is the ledger's:
  ``input_tokens`` includes cache reads and writes (``input_token_details.cache_read`` /
  ``cache_creation``), ``output_tokens`` includes reasoning (``output_token_details.reasoning``);
  the parts go to ``cache_read_tokens``, ``cache_write_tokens`` and ``reasoning_tokens`` and the
  price engine prices each part once. Legacy ``LLM`` models report ``llm_output["token_usage"]``
  (OpenAI's shape). No usage at all (a ChatOpenAI stream without ``stream_usage=True``) → the
  prompt and the answer are counted offline and the event is ``estimated``.
- A stream left early (``break``, a closed or cancelled stream) arrives as ``on_llm_error``
  with ``GeneratorExit`` / ``CancelledError``: recorded like an abandoned LiteLLM stream
  (``ok``, ``estimated``, the prompt and the chunks received counted offline,
  ``metadata["stream_abandoned"]``). Any other error → ``status="error"`` with its type.
- Attribution: ``tally.scope(...)`` where the call starts, overridden per call by the run
  config's ``metadata={"llmtally_project": ..., "llmtally_user": ..., "llmtally_session": ...,
  "llmtally_request_id": ...}``; the run's ``tags`` (inherited from parent runs too) are added
  to the scope's, except LangChain's own bookkeeping tags (``seq:step:2``, ``map:key:x``,
  ``graph:step:3``, ``langsmith:*``). Other metadata and prompts are never stored.

Budgets: the handler runs inline (``run_inline=True``: no thread-pool hop under ``ainvoke``)
and with ``raise_error=True``, so ``BudgetExceeded`` raised in ``on_chat_model_start`` /
``on_llm_start`` stops ``invoke``/``ainvoke``/``batch``/``stream``/``astream`` before the
request is sent. Everything else that could go wrong in the handler is caught and logged.

LiteLLM underneath (``ChatLiteLLM``): when ``tally.litellm()`` is registered too, the call is
recorded once, by LiteLLM, with LangChain's attribution added (see ``_handoff``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.embeddings import Embeddings

from .._budgets.budget import BudgetExceeded
from .._budgets.offloop import reserve_off_loop
from .._errors import error_type
from .._events import scope as _scope
from .._events.event import CallEvent
from .._events.usage import MAX_TOKEN_COUNT, Usage, coerce_count, extract_usage
from .._log import warn_limited
from . import _handoff

if TYPE_CHECKING:
    from .._budgets.states import Reservation
    from .._recorder import Recorder

__all__ = ["LangChainHandler", "RunStart", "langchain_event", "TalliedEmbeddings",
           "wrap_embeddings"]

T = TypeVar("T")

_MAX_RUNS = 100_000  # runs started and never ended (a callback LangChain never sent): oldest forgotten
_MAX_ENDED = 256  # recently ended run ids, so a start arriving after its end is ignored
_INTERNAL_TAG_PREFIXES = ("seq:step:", "map:key:", "graph:step:", "langsmith:")
_MODEL_KEYS = ("model", "model_name", "model_id", "deployment_name", "azure_deployment")
_MAX_TOKEN_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "max_new_tokens",
                   "max_tokens_to_sample", "num_predict")
# Providers whose model names carry the real provider as a route: "openai/gpt-4o-mini".
_ROUTING_PROVIDERS = frozenset({"litellm"})
# Packages whose name says the provider when a model gives no ``ls_provider``.
_PACKAGE_PROVIDERS = {"langchain_openai": "openai", "langchain_anthropic": "anthropic",
                      "langchain_google_genai": "gemini", "langchain_google_vertexai": "vertex_ai",
                      "langchain_mistralai": "mistral", "langchain_cohere": "cohere",
                      "langchain_aws": "bedrock", "langchain_ollama": "ollama",
                      "langchain_groq": "groq", "langchain_fireworks": "fireworks_ai",
                      "langchain_together": "together_ai", "langchain_voyageai": "voyage",
                      "langchain_deepseek": "deepseek", "langchain_xai": "xai",
                      "langchain_huggingface": "huggingface", "langchain_nvidia_ai_endpoints": "nvidia_nim"}
_ABANDONED = (GeneratorExit, asyncio.CancelledError)


class RunStart:
    """What is known about a model call when it starts (one per LangChain run)."""

    __slots__ = ("tally", "run_id", "started", "provider", "model", "serialized", "call_type", "parent",
                 "root", "tags", "project", "user", "session", "request_id", "name", "scope",
                 "prompt", "prompt_tokens", "hold", "first_token", "claimed", "ended", "token")

    def __init__(self, tally: Recorder, run_id: UUID, *, provider: str | None, model: str | None,
                 serialized: Any, call_type: str, parent: UUID | None, root: UUID, tags: Any,
                 metadata: Mapping[str, Any], name: Any, prompt: Any) -> None:
        self.tally, self.run_id = tally, run_id
        self.started = time.perf_counter()
        self.provider, self.model = _route(provider, model)
        self.serialized, self.call_type = serialized, call_type
        self.parent, self.root, self.tags, self.name = parent, root, tags, name
        self.project = _text(metadata.get("llmtally_project"))
        self.user = _text(metadata.get("llmtally_user"))
        self.session = _text(metadata.get("llmtally_session"))
        self.request_id = _text(metadata.get("llmtally_request_id"))
        self.scope = _scope.current()
        self.prompt = prompt  # LangChain's own messages / prompt text, counted only if needed
        self.prompt_tokens: int | None = None
        self.hold: Reservation | None = None
        self.first_token: float | None = None
        self.claimed = self.ended = False
        self.token: Any = None  # the hand-off ContextVar token, when offered to LiteLLM

    def run_metadata(self, root: str | None = None) -> dict[str, Any]:
        """The run ids (and run name) an event keeps in ``metadata``."""
        meta: dict[str, Any] = {"langchain_root_run_id": root or str(self.root)}
        if self.parent is not None:
            meta["langchain_parent_run_id"] = str(self.parent)
        if isinstance(self.name, str) and self.name:
            meta["langchain_run_name"] = self.name
        return meta

    def attribution(self) -> _scope.Attribution:
        """LangChain's attribution for this call, with its run id (for the LiteLLM hand-off:
        that event's id is LiteLLM's call id)."""
        return _scope.Attribution(project=self.project, user=self.user, session=self.session,
                                  tags=_clean_tags(self.tags), request_id=self.request_id
                                  or self.scope.request_id or str(self.root),
                                  metadata=MappingProxyType({"langchain_run_id": str(self.run_id),
                                                             **self.run_metadata()}))

    @property
    def class_name(self) -> str:
        """The model's class name (``ChatOpenAI``), from LangChain's serialized form."""
        return _class_name(self.serialized)

    def count_prompt(self) -> int:
        """Prompt tokens counted offline (once)."""
        if self.prompt_tokens is None:
            self.prompt_tokens = _count_prompt(self.prompt, self.model)
        return self.prompt_tokens


def langchain_event(start: RunStart | None, response: Any, *, run_id: Any, parent_run_id: Any = None,
                    tags: Any = None, error: BaseException | None = None,
                    ended: float | None = None) -> CallEvent:
    """The :class:`~llmtally.CallEvent` describing one LangChain model call.

    ``start`` is what the handler saw when the run started (None for a run it never saw
    start); ``response`` the ``LLMResult`` of ``on_llm_end`` (or the partial one given to
    ``on_llm_error`` with ``error``); ``ended`` the ``time.perf_counter()`` at its end
    (default: now). Tolerates any shape: odd fields give None / 0 or an offline count, never
    an exception.
    """
    generations = _generations(response)
    generation = generations[0] if generations else None
    message = _get(generation, "message")
    llm_output = _mapping(_get(response, "llm_output"))
    resolved = _resolved_model(generation, message, llm_output)
    event_id = str(run_id)
    if start is not None:
        event, meta = _started_event(start, resolved, event_id,
                                     time.perf_counter() if ended is None else ended)
    else:
        event, meta = _unstarted_event(message, resolved, parent_run_id, tags)
    event.update(source="langchain", id=event_id, resolved_model=resolved)
    abandoned = isinstance(error, _ABANDONED) and \
        (start is None or start.first_token is not None or generation is not None)
    if error is not None and not abandoned:
        event.update(status="error", error_type=_error_type(error))
    else:
        usage = None if abandoned else _reported_usage(generations, llm_output, meta)
        _add_tokens(event, meta, usage, start, generation, message, abandoned)
    event["metadata"] = meta
    return CallEvent(**event)


def _later_event(start: RunStart, response: Any, run_id: Any, parent_run_id: Any, tags: Any,
                 ended: float, ts: datetime) -> CallEvent:
    """A finished run's event, built on the writer thread from what the caller's thread saw."""
    return langchain_event(start, response, run_id=run_id, parent_run_id=parent_run_id,
                           tags=tags, ended=ended)._replace(ts=ts)


def _started_event(start: RunStart, resolved: str | None, event_id: str,
                   ended: float) -> tuple[dict[str, Any], dict[str, Any]]:
    scope = start.scope  # the attribution in force where the call started
    root = event_id if start.root is start.run_id else str(start.root)
    event = {"model": start.model or _route(start.provider, resolved)[1] or start.class_name,
             "provider": start.provider, "call_type": start.call_type,
             "latency_ms": (ended - start.started) * 1000.0,
             "project": start.project or scope.project, "user": start.user or scope.user,
             "session": start.session or scope.session,
             "request_id": start.request_id or scope.request_id or root,
             "tags": _scope.merge_tags(scope.tags, _clean_tags(start.tags))}
    if start.first_token is not None:
        event["streamed"] = True
        event["ttft_ms"] = (start.first_token - start.started) * 1000.0
    meta = {**scope.metadata, **start.run_metadata(root)} if scope.metadata else start.run_metadata(root)
    return event, meta


def _unstarted_event(message: Any, resolved: str | None, parent_run_id: Any,
                     tags: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run whose start the handler never saw: what the response says (the attribution in
    force where it is recorded applies)."""
    provider, model = _route(_text(_mapping(_get(message, "response_metadata")).get("model_provider")),
                             resolved)
    event = {"model": model or "unknown", "provider": provider,
             "call_type": "chat" if message is not None else "completion", "tags": _clean_tags(tags)}
    meta = {} if parent_run_id is None else {"langchain_parent_run_id": str(parent_run_id)}
    return event, meta


def _resolved_model(generation: Any, message: Any, llm_output: Mapping[str, Any]) -> str | None:
    """The model the provider answered with."""
    response_meta = _mapping(_get(message, "response_metadata"))
    return (_text(response_meta.get("model_name")) or _text(response_meta.get("model"))
            or _text(_mapping(_get(generation, "generation_info")).get("model_name"))
            or _text(llm_output.get("model_name")) or _text(llm_output.get("model")))


def _add_tokens(event: dict[str, Any], meta: dict[str, Any], usage: Usage | None,
                start: RunStart | None, generation: Any, message: Any, abandoned: bool) -> None:
    if usage is not None and usage.input_tokens == 0 and usage.output_tokens and start is not None \
            and start.prompt:
        # No call reads nothing: a stream whose provider left the prompt out of its usage
        # (an Anthropic-format server sending output_tokens only). Count the prompt.
        usage = usage._replace(input_tokens=start.count_prompt())
        event["estimated"] = True
        meta["llmtally_estimated"] = "the model reported no input tokens; prompt counted offline"
    if usage is None:
        usage = _count_offline(start, generation, message, event["model"])
        event["estimated"] = True
        meta["llmtally_estimated"] = (
            "the caller left the stream early; prompt and the chunks received counted offline"
            if abandoned else "the model reported no usage; tokens counted offline")
    if abandoned:
        event["streamed"] = True
        meta["stream_abandoned"] = True
    event["usage"] = usage


def _error_type(error: BaseException) -> str:
    """The exception's type, named after the provider SDK's class when a LangChain package
    subclassed it (``langchain_openai``'s ``OpenAIRateLimitError`` -> ``openai.RateLimitError``),
    so errors group the same way whichever integration saw them."""
    cls = type(error)
    if cls.__module__.startswith("langchain"):
        for base in cls.__mro__[1:]:
            module = base.__module__
            if module.startswith("langchain") or module == "builtins":
                continue
            if issubclass(base, BaseException):
                return error_type(BaseException.__new__(base))
            break
    return error_type(error)


def _reported_usage(generations: list[Any], llm_output: Mapping[str, Any],
                    meta: dict[str, Any]) -> Usage | None:
    """The usage the model reported, normalised; None if it reported none."""
    for generation in generations:
        usage_metadata = _get(_get(generation, "message"), "usage_metadata")
        if usage_metadata is not None:
            usage = _from_usage_metadata(usage_metadata)
            if usage is not None and not _empty_with_text(usage, generation):
                return usage
            break
    token_usage = llm_output.get("token_usage")
    if isinstance(token_usage, Mapping) and not token_usage:
        # LLMResult.flatten(): a batch request's usage stays with its first run; the others
        # get an empty token_usage (counting them offline would count the batch twice)
        meta["llmtally_usage"] = "reported on the first run of this batch request"
        return Usage()
    raw = token_usage or llm_output.get("usage")
    usage = extract_usage({"usage": raw}) if raw is not None else None
    if usage is not None and _empty_with_text(usage, generations[0] if generations else None):
        return None
    return usage


def _from_usage_metadata(value: Any) -> Usage | None:
    """LangChain's ``usage_metadata``: the common case (a dict of plain counts) read directly,
    anything else by the shared reader."""
    if type(value) is dict:
        details_in = value.get("input_token_details") or {}
        details_out = value.get("output_token_details") or {}
        if type(details_in) is dict and type(details_out) is dict:
            input_tokens, output_tokens = value.get("input_tokens"), value.get("output_tokens")
            read = details_in.get("cache_read") or 0
            write = details_in.get("cache_creation") or 0
            reasoning = details_out.get("reasoning") or 0
            if type(input_tokens) is int and type(output_tokens) is int and type(read) is int \
                    and type(write) is int and type(reasoning) is int \
                    and min(input_tokens, output_tokens, read, write, reasoning) >= 0 \
                    and max(input_tokens, output_tokens, read + write) <= MAX_TOKEN_COUNT:
                return Usage(max(input_tokens, read + write), max(output_tokens, reasoning),
                             read, write, reasoning)
    return extract_usage({"usage_metadata": value})


def _empty_with_text(usage: Usage, generation: Any) -> bool:
    """Zero tokens for an answer with text: a stream whose provider sent no usage."""
    return usage.input_tokens == 0 and usage.output_tokens == 0 and bool(_answer_text(generation))


def _count_offline(start: RunStart | None, generation: Any, message: Any, model: str) -> Usage:
    from .._events.tokens import count_text

    prompt = start.count_prompt() if start is not None else 0
    output = count_text(_answer_text(generation), model)
    calls = _get(message, "tool_calls")
    if isinstance(calls, list) and calls:
        output += count_text(json.dumps([{"name": _get(c, "name"), "args": _get(c, "args")}
                                         for c in calls], default=str), model)
    return Usage(input_tokens=prompt, output_tokens=output)


def _count_prompt(prompt: Any, model: str | None) -> int:
    from .._events.tokens import count_messages, count_text

    try:
        if isinstance(prompt, str):
            return count_text(prompt, model)
        if isinstance(prompt, (list, tuple)):
            return count_messages(prompt, model)
    except Exception as exc:  # a message of a shape the counter does not know
        warn_limited("langchain-count", "llmtally: could not count a LangChain prompt (%s: %s)",
                     type(exc).__name__, exc)
    return 0


def _answer_text(generation: Any) -> str:
    try:
        text = _get(generation, "text")
    except Exception:
        return ""
    return text if isinstance(text, str) else ""


def _generations(response: Any) -> list[Any]:
    """The generations of the (flattened) run's one prompt."""
    generations = _get(response, "generations")
    if type(generations) in (list, tuple) and generations:
        first = generations[0]
        if type(first) is list:
            return first
        if isinstance(first, (list, tuple)):
            return list(first)
    return []


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if type(obj) is dict:
        return obj.get(key)
    try:
        value = getattr(obj, key, None)
        if value is None and isinstance(obj, Mapping):
            return obj.get(key)
    except Exception:  # properties of odd objects may raise
        return None
    return value


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if type(value) is dict or isinstance(value, Mapping) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _route(provider: str | None, model: str | None) -> tuple[str | None, str | None]:
    """``("litellm", "openai/gpt-4o-mini")`` -> ``("openai", "gpt-4o-mini")``: the names the
    price map and the LiteLLM integration use."""
    if model and provider in _ROUTING_PROVIDERS and "/" in model:
        route, name = model.split("/", 1)
        return route or provider, name or model
    return provider, model


def _clean_tags(tags: Any) -> tuple[str, ...]:
    if not isinstance(tags, (list, tuple)) or not tags:
        return ()
    return tuple(dict.fromkeys(tag for tag in tags if isinstance(tag, str) and tag
                               and not tag.startswith(_INTERNAL_TAG_PREFIXES)))


def _model_name(metadata: Mapping[str, Any], params: Mapping[str, Any]) -> str | None:
    name = _text(metadata.get("ls_model_name"))
    if name:
        return name
    for key in _MODEL_KEYS:
        name = _text(params.get(key))
        if name:
            return name
    return None


def _class_name(serialized: Any) -> str:
    ident = _get(serialized, "id")
    if isinstance(ident, (list, tuple)) and ident and isinstance(ident[-1], str) and ident[-1]:
        return ident[-1]
    return _text(_get(serialized, "name")) or "unknown"


def _class_provider(serialized: Any) -> str | None:
    """The provider a LangChain integration package's class path names, when the model gave
    no ``ls_provider``: ``["langchain", "chat_models", "openai", "ChatOpenAI"]`` -> ``openai``."""
    ident = _get(serialized, "id")
    if not isinstance(ident, (list, tuple)) or len(ident) < 3:
        return None
    package = ident[0]
    if package in _PACKAGE_PROVIDERS:
        return _PACKAGE_PROVIDERS[package]
    module = ident[-2]
    if isinstance(package, str) and package.startswith("langchain") and isinstance(module, str) \
            and module not in ("chat_models", "llms", "language_models", "base"):
        return module
    return None


def _max_tokens(metadata: Mapping[str, Any], params: Mapping[str, Any]) -> int | None:
    for key in _MAX_TOKEN_KEYS:
        count = coerce_count(params.get(key))
        if count is not None:
            return count
    return coerce_count(metadata.get("ls_max_tokens"))


def _async_dispatch_code() -> Any:
    """The code of LangChain's async callback dispatch (it awaits a handler method that is a
    coroutine function), or None if this langchain-core has another shape."""
    try:
        from langchain_core.callbacks import manager
    except ImportError:
        return None
    function = getattr(manager, "_ahandle_event_for_handler", None)
    return getattr(function, "__code__", None)


_ASYNC_DISPATCH = _async_dispatch_code()


class _StartHook:
    """A start callback that is sync for LangChain's sync callback manager (``invoke``,
    ``stream``: a ``BudgetExceeded`` raised there stops the call) and a coroutine function for
    its async manager (``ainvoke``, ``astream``: the hold is then taken on a worker thread, so
    the event loop never waits for the database). LangChain decides how to call a handler
    method when it looks it up, so the lookup answers by who is asking. An async handler under
    the sync manager would have its errors swallowed, hence not simply ``async def``."""

    def __init__(self, sync_name: str, async_name: str) -> None:
        self.sync_name, self.async_name = sync_name, async_name

    def __get__(self, handler: Any, owner: type | None = None) -> Any:
        if handler is None:
            return self
        if _ASYNC_DISPATCH is not None and handler.tally.budgets is not None and \
                sys._getframe(1).f_code is _ASYNC_DISPATCH:
            return getattr(handler, self.async_name)
        return getattr(handler, self.sync_name)


class LangChainHandler(BaseCallbackHandler):
    """A LangChain callback handler that records every model call in a :class:`~llmtally.Tally`.

    Get it with ``tally.langchain()`` (one per Tally) and pass it in a run's config
    (``chain.invoke(x, config={"callbacks": [handler]})``) or bind it to a model
    (``model.with_config(callbacks=[handler])``). It runs inline and never raises into the
    chain, except :class:`~llmtally.BudgetExceeded` when a budget stops a call before it is sent.
    """

    raise_error = True  # for BudgetExceeded only: every other fault is caught here
    run_inline = True  # no thread-pool hop under ainvoke

    def __init__(self, tally: Recorder) -> None:
        super().__init__()
        self.tally = tally
        # keyed by _key(run id)
        self._runs: dict[Any, RunStart] = {}
        self._roots: dict[Any, UUID] = {}  # chain / tool / retriever run -> its root run
        self._ended: OrderedDict[Any, None] = OrderedDict()
        self._lock = threading.Lock()  # only for trimming the tables; single dict ops are atomic

    def __repr__(self) -> str:
        return f"<llmtally LangChainHandler for {self.tally!r}>"

    # -- model runs -------------------------------------------------------------------------

    def _on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[Any]], *,
                             run_id: UUID, parent_run_id: UUID | None = None,
                             tags: list[str] | None = None, metadata: dict[str, Any] | None = None,
                             **kwargs: Any) -> None:
        """A chat model call starts: remember it; hold its estimate on the budgets."""
        prompt = messages[0] if isinstance(messages, (list, tuple)) and len(messages) == 1 else None
        self._start(serialized, prompt, "chat", run_id, parent_run_id, tags, metadata, kwargs)

    async def _aon_chat_model_start(self, serialized: dict[str, Any], messages: list[list[Any]],
                                    *, run_id: UUID, parent_run_id: UUID | None = None,
                                    tags: list[str] | None = None,
                                    metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        prompt = messages[0] if isinstance(messages, (list, tuple)) and len(messages) == 1 else None
        await self._astart(serialized, prompt, "chat", run_id, parent_run_id, tags, metadata, kwargs)

    def _on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID,
                      parent_run_id: UUID | None = None, tags: list[str] | None = None,
                      metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """A text-completion (legacy ``LLM``) call starts."""
        prompt = prompts[0] if isinstance(prompts, (list, tuple)) and len(prompts) == 1 else None
        self._start(serialized, prompt, "completion", run_id, parent_run_id, tags, metadata, kwargs)

    async def _aon_llm_start(self, serialized: dict[str, Any], prompts: list[str], *,
                             run_id: UUID, parent_run_id: UUID | None = None,
                             tags: list[str] | None = None,
                             metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        prompt = prompts[0] if isinstance(prompts, (list, tuple)) and len(prompts) == 1 else None
        await self._astart(serialized, prompt, "completion", run_id, parent_run_id, tags,
                           metadata, kwargs)

    on_chat_model_start = _StartHook("_on_chat_model_start", "_aon_chat_model_start")
    on_llm_start = _StartHook("_on_llm_start", "_aon_llm_start")

    def on_llm_new_token(self, token: str, *, run_id: UUID, **kwargs: Any) -> None:
        """A streamed chunk: the first one gives the time to first token."""
        try:
            run = self._runs.get(_key(run_id))
            if run is not None and run.first_token is None:
                run.first_token = time.perf_counter()
        except Exception as exc:
            _fault("on_llm_new_token", exc)

    def on_llm_end(self, response: Any, *, run_id: UUID, parent_run_id: UUID | None = None,
                   tags: list[str] | None = None, **kwargs: Any) -> None:
        """The call ended: one event, and its budget hold settled to the real cost."""
        self._finish(response, run_id, parent_run_id, tags, None)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, parent_run_id: UUID | None = None,
                     tags: list[str] | None = None, **kwargs: Any) -> None:
        """The call failed (or its stream was left): an ``error`` event, its hold released."""
        self._finish(kwargs.get("response"), run_id, parent_run_id, tags, error)

    def _start(self, serialized: Any, prompt: Any, call_type: str, run_id: UUID,
               parent_run_id: UUID | None, tags: Any, metadata: Any, kwargs: Mapping[str, Any]) -> None:
        try:
            started = self._new_run(serialized, prompt, call_type, run_id, parent_run_id, tags,
                                    metadata, kwargs)
            if started is None:
                return
            run, meta, params = started
            if self.tally.budgets is not None:
                run.hold = self._reserve(run, meta, params)
            self._started(run)
        except BudgetExceeded:
            raise
        except Exception as exc:
            _fault("on_llm_start", exc)

    async def _astart(self, serialized: Any, prompt: Any, call_type: str, run_id: UUID,
                      parent_run_id: UUID | None, tags: Any, metadata: Any,
                      kwargs: Mapping[str, Any]) -> None:
        """:meth:`_start` under LangChain's async callback manager: the hold is taken on a
        worker thread, so the event loop never waits for the database; the rest (the offer
        to LiteLLM is a context variable) stays in the caller's context."""
        try:
            started = self._new_run(serialized, prompt, call_type, run_id, parent_run_id, tags,
                                    metadata, kwargs)
            if started is None:
                return
            run, meta, params = started
            run.hold = await reserve_off_loop(self.tally, self._reserve, run, meta, params)
            self._started(run)
        except BudgetExceeded:
            raise
        except Exception as exc:
            _fault("on_llm_start", exc)

    def _new_run(self, serialized: Any, prompt: Any, call_type: str, run_id: UUID,
                 parent_run_id: UUID | None, tags: Any, metadata: Any,
                 kwargs: Mapping[str, Any]) -> tuple[RunStart, Mapping[str, Any], Mapping[str, Any]] | None:
        key = _key(run_id)
        if key in self._ended or key in self._runs:
            return None  # a start after its own end (out of order), or a repeated start
        meta = metadata if type(metadata) is dict or isinstance(metadata, Mapping) else {}
        params = _mapping(kwargs.get("invocation_params"))
        run = RunStart(
            self.tally, run_id, provider=_text(meta.get("ls_provider")) or _class_provider(serialized),
            model=_model_name(meta, params), serialized=serialized,
            call_type=call_type, parent=parent_run_id,
            root=self._roots.get(_key(parent_run_id), parent_run_id) if parent_run_id else run_id,
            tags=tags, metadata=meta, name=kwargs.get("name"), prompt=prompt)
        return run, meta, params

    def _started(self, run: RunStart) -> None:
        if self.tally.litellm_attached:
            run.token = _handoff.offer(run)
        self._remember(self._runs, _key(run.run_id), run, _MAX_RUNS)

    def _reserve(self, run: RunStart, meta: Mapping[str, Any],
                 params: Mapping[str, Any]) -> Reservation | None:
        """Hold the call's estimate (raises BudgetExceeded: the call is not sent). A blocked
        call's event carries the run ids through a scope around the check."""
        with _scope.attributed(request_id=run.request_id or run.scope.request_id or str(run.root),
                               metadata=run.run_metadata()):
            return self.tally.reserve(
                model=run.model or run.class_name, provider=run.provider,
                input_tokens=run.count_prompt(), max_tokens=_max_tokens(meta, params),
                call_type=run.call_type, project=run.project, user=run.user,
                session=run.session, tags=_clean_tags(run.tags))

    def _finish(self, response: Any, run_id: Any, parent_run_id: Any, tags: Any,
                error: BaseException | None) -> None:
        try:
            key = _key(run_id)
            run = self._runs.pop(key, None)
            self._mark_ended(key)
            if run is not None:
                _handoff.withdraw(run, run.token)
                if run.claimed:  # LiteLLM recorded this call and settles its hold
                    self.tally.release(_handoff.take_hold(run), sent=True)
                    return
            if isinstance(error, BudgetExceeded):  # stopped by a budget: recorded as blocked
                if run is not None:
                    self.tally.release(run.hold)
                return
            if run is not None and run.hold is None and error is None and self.tally.record_later(
                    functools.partial(_later_event, run, response, run_id, parent_run_id, tags,
                                      time.perf_counter(), self.tally.now())):
                return  # the usual case: the event is read and priced on the writer thread
            event = langchain_event(run, response, run_id=run_id, parent_run_id=parent_run_id,
                                    tags=tags, error=error)
            self.tally.record_event(event, reservation=run.hold if run is not None else None)
        except Exception as exc:
            _fault("on_llm_end", exc)

    # -- the runs around model calls: followed only to know each call's root run ------------

    def on_chain_start(self, serialized: Any, inputs: Any, *, run_id: UUID,
                       parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        """Note the chain's root run."""
        self._enter(run_id, parent_run_id)

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the chain."""
        self._roots.pop(_key(run_id), None)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the chain."""
        self._roots.pop(_key(run_id), None)

    def on_tool_start(self, serialized: Any, input_str: Any, *, run_id: UUID,
                      parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        """Note the tool's root run (a tool may call a model)."""
        self._enter(run_id, parent_run_id)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the tool run."""
        self._roots.pop(_key(run_id), None)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the tool run."""
        self._roots.pop(_key(run_id), None)

    def on_retriever_start(self, serialized: Any, query: Any, *, run_id: UUID,
                           parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        """Note the retriever's root run (a retriever may call a model)."""
        self._enter(run_id, parent_run_id)

    def on_retriever_end(self, documents: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the retriever run."""
        self._roots.pop(_key(run_id), None)

    def on_retriever_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the retriever run."""
        self._roots.pop(_key(run_id), None)

    def _enter(self, run_id: Any, parent_run_id: Any) -> None:
        try:
            root = self._roots.get(_key(parent_run_id), parent_run_id) if parent_run_id else run_id
            self._remember(self._roots, _key(run_id), root, _MAX_RUNS)
        except Exception as exc:
            _fault("on_chain_start", exc)

    def _mark_ended(self, key: Any) -> None:
        ended = self._ended
        ended[key] = None
        if len(ended) > _MAX_ENDED:
            try:
                ended.popitem(last=False)
            except KeyError:  # emptied meanwhile
                pass

    def _remember(self, table: dict[Any, Any], key: Any, value: Any, limit: int) -> None:
        table[key] = value
        if len(table) > limit:
            with self._lock:
                while len(table) > limit:
                    try:
                        del table[next(iter(table))]
                    except (KeyError, RuntimeError, StopIteration):  # changed meanwhile
                        break


def _key(run_id: Any) -> Any:
    """The tables' key for a run id: its integer (``UUID.__hash__`` runs in Python)."""
    return run_id.int if type(run_id) is UUID else run_id


def _fault(hook: str, exc: BaseException) -> None:
    warn_limited("langchain-hook", "llmtally: LangChain %s handling failed (%s: %s)", hook,
                 type(exc).__name__, exc, exc_info=True)




# -- embeddings ------------------------------------------------------------------------------


class _EmbeddingCall:
    """An embeddings call in progress, offered to the LiteLLM logger like a model run."""

    __slots__ = ("tally", "hold", "claimed", "ended", "scope")

    def __init__(self, tally: Recorder, hold: Reservation | None, scope: _scope.Attribution) -> None:
        self.tally, self.hold, self.scope = tally, hold, scope
        self.claimed = self.ended = False

    def attribution(self) -> _scope.Attribution:
        return _scope.EMPTY


class TalliedEmbeddings(Embeddings):
    """LangChain ``Embeddings`` that record each call (see :meth:`Tally.wrap_embeddings`).

    ``embed_documents``, ``embed_query`` and their ``aembed_*`` twins become one event each
    (``call_type="embedding"``, ``source="langchain"``), with the input tokens counted offline
    (LangChain's embeddings return no usage: the event is ``estimated``), checked against the
    budgets first. Every other attribute is the wrapped object's.
    """

    def __init__(self, tally: Recorder, embeddings: Embeddings, *, model: str | None = None,
                 provider: str | None = None) -> None:
        self._tally = tally
        self._inner = embeddings
        found_provider, found_model = _route(provider or _embeddings_provider(embeddings),
                                             model or _embeddings_model(embeddings))
        self._provider, self._model = found_provider, found_model or type(embeddings).__name__

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __repr__(self) -> str:
        return f"TalliedEmbeddings({self._inner!r})"

    @property
    def wrapped(self) -> Embeddings:
        """The embeddings object this one records."""
        return self._inner

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """``embed_documents`` of the wrapped object, recorded."""
        return self._call(texts, lambda: self._inner.embed_documents(texts))

    def embed_query(self, text: str) -> list[float]:
        """``embed_query`` of the wrapped object, recorded."""
        return self._call([text], lambda: self._inner.embed_query(text))

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """``aembed_documents`` of the wrapped object, recorded."""
        return await self._acall(texts, lambda: self._inner.aembed_documents(texts))

    async def aembed_query(self, text: str) -> list[float]:
        """``aembed_query`` of the wrapped object, recorded."""
        return await self._acall([text], lambda: self._inner.aembed_query(text))

    def _call(self, texts: Sequence[Any], fn: Callable[[], T]) -> T:
        call, tokens, offered = self._begin(texts)
        started = time.perf_counter()
        try:
            result = fn()
        except BaseException as exc:
            self._end(call, tokens, offered, started, exc)
            raise
        self._end(call, tokens, offered, started, None)
        return result

    async def _acall(self, texts: Sequence[Any], fn: Callable[[], Awaitable[T]]) -> T:
        call, tokens, offered = self._begin(texts)
        started = time.perf_counter()
        try:
            result = await fn()
        except BaseException as exc:
            self._end(call, tokens, offered, started, exc)
            raise
        self._end(call, tokens, offered, started, None)
        return result

    def _begin(self, texts: Sequence[Any]) -> tuple[_EmbeddingCall, int, Any]:
        """Count the input and hold it on the budgets (raises BudgetExceeded before the call)."""
        tokens = 0
        try:
            from .._events.tokens import count_text

            tokens = sum(count_text(text, self._model) for text in texts if isinstance(text, str))
        except Exception as exc:
            _fault("embeddings", exc)
        hold = None
        if self._tally.budgets is not None:
            hold = self._tally.reserve(model=self._model, provider=self._provider,
                                       input_tokens=tokens, max_tokens=0, call_type="embedding")
        call = _EmbeddingCall(self._tally, hold, _scope.current())
        offered = None
        if self._tally.litellm_attached:
            offered = _handoff.offer(call)
        return call, tokens, offered

    def _end(self, call: _EmbeddingCall, tokens: int, offered: Any, started: float,
             error: BaseException | None) -> None:
        try:
            _handoff.withdraw(call, offered)
            if call.claimed:  # LiteLLM recorded it
                self._tally.release(_handoff.take_hold(call), sent=True)
                return
            scope = call.scope
            self._tally.record_event(CallEvent(
                model=self._model, provider=self._provider,  # type: ignore[arg-type]
                usage=Usage(input_tokens=0 if error else tokens),
                latency_ms=(time.perf_counter() - started) * 1000.0,
                status="ok" if error is None else "error",
                error_type=_error_type(error) if error is not None else None,
                call_type="embedding", estimated=error is None, source="langchain",
                project=scope.project, user=scope.user, session=scope.session, tags=scope.tags,
                request_id=scope.request_id, metadata=dict(scope.metadata) or None),
                reservation=call.hold)
        except Exception as exc:
            _fault("embeddings", exc)


def _embeddings_model(embeddings: Any) -> str | None:
    for key in ("model", "model_name", "model_id", "deployment"):
        name = _text(_get(embeddings, key))
        if name:
            return name
    return None


def _embeddings_provider(embeddings: Any) -> str | None:
    module = type(embeddings).__module__.split(".", 1)[0]
    if type(embeddings).__name__.startswith("Azure"):
        return "azure"
    if module == "langchain_litellm":
        return "litellm"
    return _PACKAGE_PROVIDERS.get(module)


def wrap_embeddings(tally: Recorder, embeddings: Any, *, model: str | None = None,
                    provider: str | None = None) -> TalliedEmbeddings:
    """See :meth:`Tally.wrap_embeddings`."""
    if isinstance(embeddings, TalliedEmbeddings):
        if embeddings._tally is tally:
            return embeddings
        embeddings = embeddings.wrapped
    if not isinstance(embeddings, Embeddings):
        raise TypeError(f"wrap_embeddings() takes LangChain Embeddings, not {type(embeddings).__name__}")
    return TalliedEmbeddings(tally, embeddings, model=model, provider=provider)
