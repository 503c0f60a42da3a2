"""Every LiteLLM behaviour llmtally relies on that LiteLLM does not document as public API, in one
place: private module paths, attributes of its logging objects, its stream wrapper, its logging
thread pool and async queue, its callback lists and the proxy's metadata field names.

Each is reached through one small function or constant here, whose docstring says what LiteLLM
does that we count on; ``tests/test_litellm_compat.py`` holds one contract test per item, run on
each supported release (``scripts/litellm_contract.sh``). Every function here tolerates a
LiteLLM that changed: it returns None / False / an empty value instead of raising, and the
caller falls back (the public ``CustomLogger`` hooks still record every call).

The supported releases are :data:`SUPPORTED`, the same specifier as pyproject's ``litellm``
extra. :func:`check_attach` (run when ``tally.litellm()`` makes its logger) logs one warning on
another release, and one per hook whose target is gone, naming what is lost.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import logging
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

from .._log import warn_limited
from .._versions import satisfies

__all__ = [
    "SUPPORTED", "PROXY_ADMIN", "PROXY_CALLER_FIELDS", "LOGGER_KEY_ATTR",
    "LOGGING_THREAD_PREFIX", "installed_version", "is_supported", "check_version",
    "check_attach", "warn_lost", "make_distinct", "is_registered", "call_details",
    "logging_obj_of", "logged_metadata", "sent_request_body", "provider_response_model",
    "openai_compatible_providers", "llm_provider", "proxy_deployment_models", "deployment_models",
    "wrap_function_setup", "function_setup_wrapped", "restore_correlation_context",
    "stream_wrapper_class", "stream_call", "logging_threads_busy", "logging_worker",
    "worker_pending", "worker_loop",
]

# The releases checked by the contract tests; equal to pyproject's ``litellm`` extra (a test
# compares them). 1.107.x: reported compromised releases.
SUPPORTED = ">=1.106,<1.111,!=1.107.*"

_FOREVER = float("inf")  # warn_limited interval: once per process


# -- the version gate ------------------------------------------------------------------------


def installed_version() -> str | None:
    """The installed ``litellm`` distribution's version, or None when it is not installed."""
    try:
        return importlib.metadata.version("litellm")
    except importlib.metadata.PackageNotFoundError:
        return None


def is_supported(version: str) -> bool:
    """Whether ``version`` is inside :data:`SUPPORTED`."""
    return satisfies(version, SUPPORTED)


def check_version(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed litellm's) is supported; if not, log one
    warning (once per process and version) naming it and the supported range. Never raises."""
    version = installed_version() if version is None else version
    if version is None:
        return False
    try:
        if is_supported(version):
            return True
    except ValueError:
        pass
    warn_limited(f"litellm-version-{version}", "llmtally: litellm %s is outside the releases this "
                 "llmtally was tested with (litellm%s); it keeps recording through LiteLLM's "
                 "public callbacks, and each private hook it cannot find is skipped with a "
                 "warning", version, SUPPORTED, interval_s=_FOREVER)
    return False


def warn_lost(hook: str, lost: str, *, level: int = logging.WARNING) -> None:
    """Say once per process that ``hook`` (a LiteLLM internal) was not found and what is lost."""
    warn_limited(f"litellm-lost-{hook}", "llmtally: litellm %s has no usable %s; %s",
                 installed_version() or "(unknown version)", hook, lost, level=level,
                 interval_s=_FOREVER)


def check_attach() -> None:
    """At ``tally.litellm()``: the version gate, then the hooks of ``tally.flush()``. (The
    set-up and stream hooks say what is lost when they are installed.)"""
    check_version()
    if logging_worker() is None:
        warn_lost("litellm_core_utils.logging_worker.GLOBAL_LOGGING_WORKER",
                  "tally.flush() cannot run the logging LiteLLM defers for async calls "
                  "(they are recorded when LiteLLM runs it)")
    if logging_threads_busy() is None:
        warn_lost("litellm_core_utils.thread_pool_executor.executor",
                  "tally.flush() cannot wait for LiteLLM's logging threads (sync calls "
                  "finished just before a flush may be recorded after it)")


# -- registration ----------------------------------------------------------------------------

# LiteLLM keeps one CustomLogger per key, the class name plus its public str/bool/int
# attributes (``LoggingCallbackManager._get_custom_logger_key``): a second instance of one class
# is dropped unless such an attribute differs.
LOGGER_KEY_ATTR = "llmtally_instance"

_CALLBACK_LISTS = ("callbacks", "success_callback", "_async_success_callback")


def make_distinct(logger: object, tag: str) -> None:
    """Give ``logger`` its own LiteLLM key: LiteLLM drops a second logger of one class whose
    public scalar attributes are all equal to a registered one's."""
    setattr(logger, LOGGER_KEY_ATTR, tag)


def is_registered(logger: object) -> bool:
    """Whether LiteLLM will call ``logger``: it is in ``litellm.callbacks``,
    ``success_callback`` or ``_async_success_callback`` (LiteLLM copies ``callbacks`` into the
    other lists and reads all three)."""
    litellm = sys.modules.get("litellm")
    lists = (getattr(litellm, name, None) for name in _CALLBACK_LISTS)
    return any(isinstance(found, list) and any(cb is logger for cb in found) for found in lists)


# -- a call's logging object and what the hooks are given --------------------------------------


def call_details(logging_obj: Any) -> dict[str, Any] | None:
    """The call's ``Logging.model_call_details``: the dict every hook of one call is given as
    ``kwargs``, so a key put there at set-up is seen by all of them."""
    details = getattr(logging_obj, "model_call_details", None)
    return details if isinstance(details, dict) else None


def logging_obj_of(kwargs: Mapping[str, Any]) -> Any:
    """The call's logging object, which LiteLLM passes in a call's own kwargs (those of
    ``async_pre_call_deployment_hook``) as ``litellm_logging_obj``."""
    return kwargs.get("litellm_logging_obj")


def logged_metadata(kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
    """``kwargs["standard_logging_object"]["metadata"]``: where the proxy's caller
    (``user_api_key_*``) is found when the request's own metadata lacks it."""
    logged = kwargs.get("standard_logging_object")
    meta = logged.get("metadata") if isinstance(logged, Mapping) else None
    return meta if isinstance(meta, Mapping) else {}


def sent_request_body(kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
    """``kwargs["additional_args"]["complete_input_dict"]``: the body LiteLLM sent the provider
    (it adds ``stream_options`` itself for some providers)."""
    extra = kwargs.get("additional_args")
    body = extra.get("complete_input_dict") if isinstance(extra, Mapping) else None
    return body if isinstance(body, Mapping) else {}


def provider_response_model(response_obj: Any) -> str | None:
    """``response._hidden_params["provider_response_model"]``: the model the provider answered
    with (the proxy renames the response's ``model`` to the model group before logging)."""
    try:
        hidden = getattr(response_obj, "_hidden_params", None)
    except Exception:
        return None
    found = hidden.get("provider_response_model") if isinstance(hidden, dict) else None
    return found if isinstance(found, str) and found else None


def openai_compatible_providers() -> frozenset[str]:
    """``litellm.openai_compatible_providers``: providers speaking OpenAI's format (streams
    carry usage only when asked for it)."""
    names = getattr(sys.modules.get("litellm"), "openai_compatible_providers", ())
    return frozenset(names) if isinstance(names, (list, tuple, set, frozenset)) else frozenset()


def llm_provider(model: str, provider: str | None, api_base: str | None) -> tuple[str, str | None]:
    """``litellm.get_llm_provider``: the model name without its route and the provider, as
    LiteLLM resolves them (``openai/gpt-4o-mini`` → ``gpt-4o-mini``, ``openai``). Raises what
    LiteLLM raises for a model it cannot route."""
    import litellm

    found = litellm.get_llm_provider(model=model, custom_llm_provider=provider, api_base=api_base)
    name, route = found[0], found[1]
    return (name if isinstance(name, str) and name else model,
            route if isinstance(route, str) and route else provider)


# -- the proxy -------------------------------------------------------------------------------

# What the proxy puts as the user of requests made with its master key
# (``litellm.constants.LITELLM_PROXY_ADMIN_NAME``): a placeholder, not a person.
PROXY_ADMIN = "default_user_id"

# The proxy's caller: (our name, the ``user_api_key_*`` metadata field the proxy's auth step puts
# on the request's logging, the ``UserAPIKeyAuth`` attribute it comes from).
PROXY_CALLER_FIELDS = (
    ("key_alias", "user_api_key_alias", "key_alias"),
    ("user_id", "user_api_key_user_id", "user_id"),
    ("team_id", "user_api_key_team_id", "team_id"),
    ("team_alias", "user_api_key_team_alias", "team_alias"),
    ("end_user", "user_api_key_end_user_id", "end_user_id"),
    ("org_id", "user_api_key_org_id", "org_id"),
    ("project_id", "user_api_key_project_id", "project_id"),
    ("project_alias", "user_api_key_project_alias", "project_alias"),
)


def proxy_deployment_models(model_group: str) -> list[str]:
    """:func:`deployment_models` of the running proxy's router
    (``litellm.proxy.proxy_server.llm_router``); empty outside the proxy."""
    try:
        from litellm.proxy.proxy_server import llm_router
    except Exception:
        return []
    return deployment_models(llm_router, model_group) if llm_router is not None else []


def deployment_models(router: Any, model_group: str) -> list[str]:
    """The ``litellm_params.model`` of each deployment of ``model_group`` in a ``Router``:
    ``router.registry().deployments(name)`` where it exists (1.109+), else
    ``router.get_model_list(model_name=name)`` (deprecated since); each a dict."""
    try:
        registry = getattr(router, "registry", None)
        deployments = registry().deployments(model_group) if callable(registry) \
            else router.get_model_list(model_name=model_group)
    except Exception:
        return []
    params = (d.get("litellm_params") for d in deployments or [] if isinstance(d, dict))
    models = (p.get("model") for p in params if isinstance(p, dict))
    return [model for model in models if isinstance(model, str) and model]


# -- litellm.utils.function_setup --------------------------------------------------------------

SetupHook = Callable[[Any, Any, Any, tuple[Any, ...], bool], None]
_install_lock = threading.Lock()
_setup_wrapped = False


def wrap_function_setup(after: SetupHook) -> bool:
    """Wrap ``litellm.utils.function_setup(original_function, rules_obj, start_time, *args,
    is_async_call=..., **kwargs) -> (logging_obj, kwargs)`` once per process, so that
    ``after(logging_obj, call_kwargs, original_function, args, is_async)`` runs after it.

    LiteLLM's ``client`` decorator (on ``completion``, ``acompletion``, ``embedding``,
    ``text_completion``… also on what ``from litellm import completion`` bound earlier, and
    under ``Router``) calls it by its module-global name once per call, on the caller's
    thread, before anything is sent, and re-raises what it raises. Returns False, changing
    nothing, when this LiteLLM's ``function_setup`` is missing or has another signature."""
    global _setup_wrapped
    with _install_lock:
        if _setup_wrapped:
            return True
        try:
            import litellm.utils as utils
        except ImportError:
            return False
        original = getattr(utils, "function_setup", None)
        if not callable(original) or not _setup_shape_ok(original):
            return False

        @functools.wraps(original)
        def function_setup(original_function, rules_obj, start_time, *args, **kwargs):  # type: ignore[no-untyped-def]
            logging_obj, call_kwargs = original(original_function, rules_obj, start_time,
                                                *args, **kwargs)
            after(logging_obj, call_kwargs, original_function, args,
                  kwargs.get("is_async_call", True) is not False)
            return logging_obj, call_kwargs

        function_setup._llmtally_original = original  # type: ignore[attr-defined]
        utils.function_setup = function_setup
        _setup_wrapped = True
        return True


def function_setup_wrapped() -> bool:
    """Whether :func:`wrap_function_setup` has wrapped LiteLLM's ``function_setup``."""
    return _setup_wrapped


def _setup_shape_ok(function: Any) -> bool:
    try:
        names = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return False
    return names[:3] == ["original_function", "rules_obj", "start_time"] and "is_async_call" in names


def restore_correlation_context(logging_obj: Any) -> None:
    """``litellm.utils._restore_correlation_context_if_supported(logging_obj)``, as LiteLLM's
    ``client`` wrapper runs it when its own set-up fails (a no-op where it is missing)."""
    restore = getattr(sys.modules.get("litellm.utils"),
                      "_restore_correlation_context_if_supported", None)
    if callable(restore):
        try:
            restore(logging_obj)
        except Exception:
            pass


# -- the stream wrapper ----------------------------------------------------------------------


def stream_wrapper_class() -> type | None:
    """``litellm.litellm_core_utils.streaming_handler.CustomStreamWrapper``, the iterator every
    streamed SDK call returns, if it has ``__init__``, ``__next__`` and ``__anext__``; else
    None."""
    try:
        from litellm.litellm_core_utils.streaming_handler import CustomStreamWrapper as cls
    except ImportError:
        return None
    if not all(callable(getattr(cls, name, None)) for name in ("__init__", "__next__", "__anext__")):
        return None
    return cls


def stream_call(stream: Any) -> tuple[dict[str, Any], list[Any], Any] | None:
    """A ``CustomStreamWrapper``'s call: its logging object's ``model_call_details``, its own
    list ``chunks`` of the chunks returned so far (appended to in place), and the logging
    object's ``start_time``. None when the stream has another shape."""
    logging_obj = getattr(stream, "logging_obj", None)
    details = call_details(logging_obj)
    chunks = getattr(stream, "chunks", None)
    if details is None or not isinstance(chunks, list):
        return None
    return details, chunks, getattr(logging_obj, "start_time", None)


# -- LiteLLM's logging thread pool and async queue ---------------------------------------------

# The name prefix of LiteLLM's logging threads (``thread_pool_executor.executor``).
LOGGING_THREAD_PREFIX = "litellm-logging"


def logging_threads_busy() -> bool | None:
    """Whether LiteLLM's logging thread pool (``litellm_core_utils.thread_pool_executor.
    executor``, where sync calls run their success hooks) has tasks not finished: its
    ``_pending_slots`` semaphore is below ``_max_pending_tasks``. None when it has another
    shape."""
    module = sys.modules.get("litellm.litellm_core_utils.thread_pool_executor")
    executor = getattr(module, "executor", None)
    slots = getattr(getattr(executor, "_pending_slots", None), "_value", None)
    capacity = getattr(executor, "_max_pending_tasks", None)
    if not isinstance(capacity, int) or not isinstance(slots, int):
        return None
    return slots < capacity


def logging_worker() -> Any:
    """``litellm_core_utils.logging_worker.GLOBAL_LOGGING_WORKER``, the queue where async calls'
    success hooks wait to run on an event loop (``flush()`` and ``stop()`` coroutines); None
    when it is missing or has another shape."""
    module = sys.modules.get("litellm.litellm_core_utils.logging_worker")
    worker = getattr(module, "GLOBAL_LOGGING_WORKER", None)
    if worker is None or not all(callable(getattr(worker, name, None)) for name in ("flush", "stop")):
        return None
    return worker


def worker_pending(worker: Any) -> int | None:
    """How many hooks the worker has not run (its ``pending_count``, else its ``_queue``'s
    size); None when it has no queue yet (nothing was ever queued on this loop)."""
    queue = getattr(worker, "_queue", None)
    if queue is None:
        return None
    pending = getattr(worker, "pending_count", None)
    return pending if isinstance(pending, int) else int(queue.qsize())


def worker_loop(worker: Any) -> Any:
    """The event loop the worker's queue is bound to (``_bound_loop``), or None."""
    return getattr(worker, "_bound_loop", None)
