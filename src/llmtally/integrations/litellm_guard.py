"""``tally.guard(fn)``: budgets, and with ``durability="sync"`` a wait for the event, around a
LiteLLM function called directly (the explicit form of what the set-up hook does for every
call; the only form on a LiteLLM whose set-up hook could not be installed)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._log import warn_limited
from . import litellm_compat as compat
from .litellm_budgets import call_view, reserve_call
from .litellm_setup import install_setup_hook

if TYPE_CHECKING:
    from .._budgets.states import Reservation
    from .litellm import LiteLLMLogger

__all__ = ["guard"]

_SYNC_WAIT_S = 15.0  # durability="sync": the longest a guarded call waits for its event


def guard(logger_: LiteLLMLogger, fn: Any) -> Any:
    """See :meth:`Tally.guard`: ``logger_`` is the Tally's ``tally.litellm()``."""
    tally = logger_.tally
    if getattr(fn, "_llmtally_guarded", None) is tally:
        return fn
    sync_durable = tally.durability == "sync"
    hooked = install_setup_hook()  # then budgets are held by the set-up hook, for every call

    def begin(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Reservation | None:
        registered = compat.is_registered(logger_)
        held_by_hook = hooked and registered  # the set-up hook holds every call's budgets
        if (tally.budgets is None or held_by_hook) and not sync_durable:
            return None
        call_id = kwargs.get("litellm_call_id")
        if not isinstance(call_id, str) or not call_id:
            call_id = kwargs["litellm_call_id"] = str(uuid.uuid4())
        if sync_durable and registered:
            logger_.await_record(call_id)
        if tally.budgets is None or held_by_hook:
            return None
        if not registered:
            warn_limited("guard-unregistered", "llmtally: tally.guard() checks the budgets, but "
                         "tally.litellm() is not in litellm.callbacks, so what the call really "
                         "cost is not recorded and its hold is only released after "
                         "reservation_ttl_s: add litellm.callbacks.append(tally.litellm())")
        view = call_view(args, kwargs)
        call_type = "embedding" if "input" in view and "messages" not in view else "completion"
        held = reserve_call(tally, view, call_type)
        logger_.hold(call_id, held)
        return held

    def failed(kwargs: Mapping[str, Any], held: Reservation | None) -> None:
        logger_.forget_await(kwargs.get("litellm_call_id"))
        if held is not None:
            # The hook settles what LiteLLM logged; a hold still here was never seen by LiteLLM.
            tally.release(logger_.take_hold(kwargs.get("litellm_call_id")))

    def waiter(kwargs: Mapping[str, Any], result: Any) -> threading.Event | None:
        """The event a sync-durability caller waits on (None for streams: they are recorded
        when read to the end, after the guarded call returned them)."""
        call_id = kwargs.get("litellm_call_id")
        done = logger_.awaited(call_id)
        if done is not None and _is_stream(result):
            logger_.forget_await(call_id)
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
                logger_.forget_await(kwargs.get("litellm_call_id"))
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
                logger_.forget_await(kwargs.get("litellm_call_id"))
            return result
        wrapper = guarded
    wrapper._llmtally_guarded = tally
    return wrapper


def _is_stream(result: Any) -> bool:
    return hasattr(result, "__next__") or hasattr(result, "__anext__")


async def _wait_async(done: threading.Event, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
