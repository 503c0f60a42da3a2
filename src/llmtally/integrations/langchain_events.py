"""A LangChain model run as a CallEvent: what the handler saw start, and the LLMResult it ended
with, read defensively (odd fields give None / 0 or an offline count, never an exception)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from uuid import UUID

from .._errors import error_type
from .._events import scope as _scope
from .._events.event import CallEvent
from .._events.usage import MAX_TOKEN_COUNT, Usage, coerce_count, extract_usage
from .._log import warn_limited

if TYPE_CHECKING:
    from .._budgets.states import Reservation
    from .._recorder import Recorder

__all__ = ["RunStart", "langchain_event"]

_INTERNAL_TAG_PREFIXES = ("seq:step:", "map:key:", "graph:step:", "langsmith:")


_MODEL_KEYS = ("model", "model_name", "model_id", "deployment_name", "azure_deployment")


_MAX_TOKEN_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "max_new_tokens",
                   "max_tokens_to_sample", "num_predict")


# Providers whose model names carry the real provider as a route: "openai/gpt-4o-mini".
_ROUTING_PROVIDERS = frozenset({"litellm"})


# Packages whose name says the provider when a model gives no ``ls_provider``.
PACKAGE_PROVIDERS = {"langchain_openai": "openai", "langchain_anthropic": "anthropic",
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
        self.provider, self.model = route(provider, model)
        self.serialized, self.call_type = serialized, call_type
        self.parent, self.root, self.tags, self.name = parent, root, tags, name
        self.project = text(metadata.get("llmtally_project"))
        self.user = text(metadata.get("llmtally_user"))
        self.session = text(metadata.get("llmtally_session"))
        self.request_id = text(metadata.get("llmtally_request_id"))
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
                                  tags=clean_tags(self.tags), request_id=self.request_id
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
    message = get(generation, "message")
    llm_output = mapping(get(response, "llm_output"))
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
        event.update(status="error", error_type=sdk_error_type(error))
    else:
        usage = None if abandoned else _reported_usage(generations, llm_output, meta)
        _add_tokens(event, meta, usage, start, generation, message, abandoned)
    event["metadata"] = meta
    return CallEvent(**event)


def later_event(start: RunStart, response: Any, run_id: Any, parent_run_id: Any, tags: Any,
                 ended: float, ts: datetime) -> CallEvent:
    """A finished run's event, built on the writer thread from what the caller's thread saw."""
    return langchain_event(start, response, run_id=run_id, parent_run_id=parent_run_id,
                           tags=tags, ended=ended)._replace(ts=ts)


def _started_event(start: RunStart, resolved: str | None, event_id: str,
                   ended: float) -> tuple[dict[str, Any], dict[str, Any]]:
    scope = start.scope  # the attribution in force where the call started
    root = event_id if start.root is start.run_id else str(start.root)
    event = {"model": start.model or route(start.provider, resolved)[1] or start.class_name,
             "provider": start.provider, "call_type": start.call_type,
             "latency_ms": (ended - start.started) * 1000.0,
             "project": start.project or scope.project, "user": start.user or scope.user,
             "session": start.session or scope.session,
             "request_id": start.request_id or scope.request_id or root,
             "tags": _scope.merge_tags(scope.tags, clean_tags(start.tags))}
    if start.first_token is not None:
        event["streamed"] = True
        event["ttft_ms"] = (start.first_token - start.started) * 1000.0
    meta = {**scope.metadata, **start.run_metadata(root)} if scope.metadata else start.run_metadata(root)
    return event, meta


def _unstarted_event(message: Any, resolved: str | None, parent_run_id: Any,
                     tags: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run whose start the handler never saw: what the response says (the attribution in
    force where it is recorded applies)."""
    provider, model = route(text(mapping(get(message, "response_metadata")).get("model_provider")),
                             resolved)
    event = {"model": model or "unknown", "provider": provider,
             "call_type": "chat" if message is not None else "completion", "tags": clean_tags(tags)}
    meta = {} if parent_run_id is None else {"langchain_parent_run_id": str(parent_run_id)}
    return event, meta


def _resolved_model(generation: Any, message: Any, llm_output: Mapping[str, Any]) -> str | None:
    """The model the provider answered with."""
    response_meta = mapping(get(message, "response_metadata"))
    return (text(response_meta.get("model_name")) or text(response_meta.get("model"))
            or text(mapping(get(generation, "generation_info")).get("model_name"))
            or text(llm_output.get("model_name")) or text(llm_output.get("model")))


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


def sdk_error_type(error: BaseException) -> str:
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
        usage_metadata = get(get(generation, "message"), "usage_metadata")
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
                    and max(input_tokens, output_tokens, read + write, reasoning) <= MAX_TOKEN_COUNT:
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
    calls = get(message, "tool_calls")
    if isinstance(calls, list) and calls:
        output += count_text(json.dumps([{"name": get(c, "name"), "args": get(c, "args")}
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
        text = get(generation, "text")
    except Exception:
        return ""
    return text if isinstance(text, str) else ""


def _generations(response: Any) -> list[Any]:
    """The generations of the (flattened) run's one prompt."""
    generations = get(response, "generations")
    if type(generations) in (list, tuple) and generations:
        first = generations[0]
        if type(first) is list:
            return first
        if isinstance(first, (list, tuple)):
            return list(first)
    return []


def get(obj: Any, key: str) -> Any:
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


def mapping(value: Any) -> Mapping[str, Any]:
    return value if type(value) is dict or isinstance(value, Mapping) else {}


def text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def route(provider: str | None, model: str | None) -> tuple[str | None, str | None]:
    """``("litellm", "openai/gpt-4o-mini")`` -> ``("openai", "gpt-4o-mini")``: the names the
    price map and the LiteLLM integration use."""
    if model and provider in _ROUTING_PROVIDERS and "/" in model:
        route, name = model.split("/", 1)
        return route or provider, name or model
    return provider, model


def clean_tags(tags: Any) -> tuple[str, ...]:
    if not isinstance(tags, (list, tuple)) or not tags:
        return ()
    return tuple(dict.fromkeys(tag for tag in tags if isinstance(tag, str) and tag
                               and not tag.startswith(_INTERNAL_TAG_PREFIXES)))


def model_name(metadata: Mapping[str, Any], params: Mapping[str, Any]) -> str | None:
    name = text(metadata.get("ls_model_name"))
    if name:
        return name
    for key in _MODEL_KEYS:
        name = text(params.get(key))
        if name:
            return name
    return None


def _class_name(serialized: Any) -> str:
    ident = get(serialized, "id")
    if isinstance(ident, (list, tuple)) and ident and isinstance(ident[-1], str) and ident[-1]:
        return ident[-1]
    return text(get(serialized, "name")) or "unknown"


def class_provider(serialized: Any) -> str | None:
    """The provider a LangChain integration package's class path names, when the model gave
    no ``ls_provider``: ``["langchain", "chat_models", "openai", "ChatOpenAI"]`` -> ``openai``."""
    ident = get(serialized, "id")
    if not isinstance(ident, (list, tuple)) or len(ident) < 3:
        return None
    package = ident[0]
    if package in PACKAGE_PROVIDERS:
        return PACKAGE_PROVIDERS[package]
    module = ident[-2]
    if isinstance(package, str) and package.startswith("langchain") and isinstance(module, str) \
            and module not in ("chat_models", "llms", "language_models", "base"):
        return module
    return None


def max_tokens(metadata: Mapping[str, Any], params: Mapping[str, Any]) -> int | None:
    for key in _MAX_TOKEN_KEYS:
        count = coerce_count(params.get(key))
        if count is not None:
            return count
    return coerce_count(metadata.get("ls_max_tokens"))
