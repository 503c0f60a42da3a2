"""LiteLLM's call set-up, wrapped: every SDK and Router call is stamped with our own event id
there and, for a sync call, its budgets are held there, on the caller's thread, before anything
is sent (``BudgetExceeded`` reaches the caller). See ``litellm_compat.wrap_function_setup``."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from .._events.ids import EventIds
from . import litellm_compat as compat
from .litellm_budgets import call_view
from .litellm_events import EVENT_ID_KEY

if TYPE_CHECKING:
    from .._budgets.states import Reservation
    from .._recorder import Recorder

__all__ = ["SetupLogger", "LOGGERS", "install_setup_hook", "setup_hook_installed"]


class SetupLogger(Protocol):
    """What the set-up hook asks of a LiteLLM logger (``LiteLLMLogger``)."""

    tally: Recorder

    def before_sync_call(self, details: dict[str, Any], kwargs: Mapping[str, Any],
                         call_type: Any) -> None: ...

    def take_hold(self, key: Any) -> Reservation | None: ...


LOGGERS: weakref.WeakSet[SetupLogger] = weakref.WeakSet()  # the loggers made in this process
_ids = EventIds()


def install_setup_hook() -> bool:
    """Wrap LiteLLM's ``function_setup`` once per process (see the module docstring); async
    calls are held by ``LiteLLMLogger.async_pre_call_deployment_hook`` instead, off the event
    loop. Returns False, changing nothing, and logs once what is lost, if this LiteLLM's
    ``function_setup`` is missing or has another shape (then sync calls need
    :meth:`Tally.guard`)."""
    if compat.wrap_function_setup(_on_setup):
        return True
    compat.warn_lost("litellm.utils.function_setup", "sync budget checks before send are off: "
                     "wrap sync calls with tally.guard(litellm.completion) (calls are still "
                     "recorded, and async calls still checked)", level=logging.ERROR)
    return False


def setup_hook_installed() -> bool:
    """Whether :func:`install_setup_hook` succeeded in this process."""
    return compat.function_setup_wrapped()


def _on_setup(logging_obj: Any, kwargs: Any, call_type: Any, args: tuple[Any, ...],
              is_async: bool) -> None:
    """Stamp the call and, for a sync call, hold its budgets (BudgetExceeded propagates)."""
    details = compat.call_details(logging_obj)
    if details is None or not isinstance(kwargs, Mapping):
        return
    loggers = [logger_ for logger_ in list(LOGGERS) if compat.is_registered(logger_)]
    if not loggers:
        return
    details[EVENT_ID_KEY] = _ids.next_id()  # always ours: a caller's own value is replaced
    if is_async:
        return
    view = call_view(args, kwargs)
    held: list[SetupLogger] = []
    try:
        for logger_ in loggers:
            logger_.before_sync_call(details, view, call_type)
            held.append(logger_)
    except BaseException:
        key = details.get(EVENT_ID_KEY)
        for logger_ in held:  # another Tally refused: give back what the others held
            logger_.tally.release(logger_.take_hold(key))
        compat.restore_correlation_context(logging_obj)  # as LiteLLM does when its set-up fails
        raise
