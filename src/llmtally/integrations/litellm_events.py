"""A LiteLLM call as a CallEvent: what a CustomLogger hook is given, read defensively (any shape:
odd fields give None / 0, never an exception); see ``integrations.litellm`` for the mapping."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .._errors import error_type
from .._events import scope as _scope
from .._events.event import CallEvent
from .._events.usage import Usage, extract_usage, response_model, response_text
from . import litellm_compat as compat
from .litellm_compat import PROXY_ADMIN

__all__ = ["CallStart", "litellm_event", "PROXY_ADMIN"]

_CALL_TYPES = {
    "completion": "chat", "text_completion": "completion", "embedding": "embedding",
    "image_generation": "image", "image_edit": "image", "image_variation": "image",
    "transcription": "audio", "speech": "audio", "rerank": "rerank", "moderation": "moderation",
    "responses": "responses",
}


# Providers that speak OpenAI's streaming format: they send usage only when asked to.
_OPENAI_FORMAT = frozenset({"openai", "azure", "text-completion-openai", "azure_text",
                            "custom_openai", "litellm_proxy"})


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
    params = mapping(kw.get("litellm_params"))
    meta = mapping(params.get("metadata"))
    provider = text(kw.get("custom_llm_provider")) or text(params.get("custom_llm_provider"))
    model = text(kw.get("model")) or (None if failed else response_model(response_obj)) or "unknown"
    streamed = kw.get("stream") is True
    event: dict[str, Any] = {
        "source": "litellm", "model": model, "provider": provider,
        "call_type": call_type_of(kw.get("call_type")), "streamed": streamed,
        "status": "error" if failed else "ok", "latency_ms": _ms_between(start_time, end_time),
    }
    call_id = text(kw.get("litellm_call_id"))
    event_id = text(kw.get(EVENT_ID_KEY))
    if event_id or call_id:
        event["id"] = event_id or _event_id(call_id, start_time)  # type: ignore[arg-type]
    if failed:
        error = kw.get("exception")
        event["error_type"] = error_type(error) if isinstance(error, BaseException) else None
    else:
        event["resolved_model"] = compat.provider_response_model(response_obj) or \
            response_model(response_obj)
        if streamed:
            event["ttft_ms"] = _ms_between(start_time, kw.get("completion_start_time"))
        usage = None if abandoned else extract_usage(response_obj)
        if usage is None or (streamed and _usage_not_sent(kw, provider, call_start)):
            usage = _count_offline(kw, response_obj, model)
            event["estimated"] = True
        event["usage"] = usage
        if kw.get("cache_hit") is True:
            event["cache_hit"] = True
    event.update(attribution(kw, params, meta, call_start))
    if call_id:
        event["metadata"]["litellm_call_id"] = call_id
    if abandoned:
        event["metadata"]["stream_abandoned"] = True
        event["metadata"]["llmtally_estimated"] = (
            "the caller left the stream early; prompt and the chunks consumed counted offline")
    elif event.get("estimated"):
        event["metadata"]["llmtally_estimated"] = "the provider reported no usage; tokens counted offline"
    return CallEvent(**event)


def attribution(kw: Mapping[str, Any], params: Mapping[str, Any], meta: Mapping[str, Any],
                 call_start: CallStart | None) -> dict[str, Any]:
    scope = call_start.scope if call_start is not None else _scope.EMPTY
    trace_id = text(kw.get("litellm_trace_id")) or text(params.get("litellm_trace_id"))
    tags = meta.get("tags")
    tags = (tags,) if isinstance(tags, str) else tuple(
        str(tag) for tag in tags if tag is not None) if isinstance(tags, (list, tuple)) else ()
    extra: dict[str, Any] = dict(scope.metadata)
    model_info = mapping(params.get("model_info"))
    for key, value in (("litellm_trace_id", trace_id),
                       ("model_group", text(meta.get("model_group"))),
                       ("deployment_id", text(model_info.get("id")) or text(kw.get("model_id"))),
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
        "project": proxy.get("project") or proxy.get("team") or text(meta.get("project"))
        or scope.project,
        "user": proxy.get("user_id") or text(meta.get("user")) or proxy.get("end_user")
        or text(kw.get("user")) or scope.user,
        "session": text(meta.get("session_id")) or text(params.get("litellm_session_id"))
        or scope.session,
        "tags": list(_scope.merge_tags(scope.tags, tags)),
        "request_id": text(meta.get("request_id")) or scope.request_id or trace_id,
        "metadata": extra,
    }


def _proxy_caller(kw: Mapping[str, Any], params: Mapping[str, Any],
                  meta: Mapping[str, Any]) -> dict[str, str]:
    """The proxy's key alias, user, team, organisation and end user, when the call came through
    the LiteLLM proxy (``user_api_key_*`` metadata), as ``metadata`` entries plus ``project``
    (LiteLLM project, else the team) and ``team``. The key itself and its hash are never read.
    """
    sources = [meta, mapping(params.get("litellm_metadata")), compat.logged_metadata(kw)]
    found: dict[str, str] = {}
    for name, field, _ in compat.PROXY_CALLER_FIELDS:
        for source in sources:
            value = text(source.get(field))
            if value == PROXY_ADMIN and name == "user_id":
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
    if provider not in _OPENAI_FORMAT and provider not in compat.openai_compatible_providers():
        return False
    if call_start is not None and call_start.stream_usage_asked is not None:
        return not call_start.stream_usage_asked
    return not asks_for_usage(kw)


def asks_for_usage(kw: Mapping[str, Any]) -> bool:
    """Whether the request body LiteLLM sent (or, failing that, the caller's arguments) asked
    the stream for usage. LiteLLM adds the option itself for api.openai.com."""
    body = compat.sent_request_body(kw)
    options = body.get("stream_options") if "stream_options" in body else kw.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True


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


def call_type_of(value: Any) -> str:
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


def mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


# Our own id for one LiteLLM call, put in its logging details (``model_call_details``) when
# LiteLLM sets the call up: every hook of the call sees it, and it becomes the event's id. The
# caller's ``litellm_call_id`` (which a client of the proxy can choose) is never trusted as a key.
EVENT_ID_KEY = "llmtally_event_id"


def call_key(kwargs: Any) -> str | None:
    """The key of a call's hold and start: our stamp; failing that (a LiteLLM whose set-up hook
    could not be installed), LiteLLM's call id."""
    if not isinstance(kwargs, Mapping):
        return None
    # A call's own kwargs (the deployment hook's) may hold anything the caller passed: read the
    # stamp from its logging object. Hooks given the logging details themselves read it there.
    details = compat.call_details(compat.logging_obj_of(kwargs))
    key = details.get(EVENT_ID_KEY) if details is not None else kwargs.get(EVENT_ID_KEY)
    if isinstance(key, str):
        return key
    call_id = kwargs.get("litellm_call_id")
    return call_id if isinstance(call_id, str) else None
