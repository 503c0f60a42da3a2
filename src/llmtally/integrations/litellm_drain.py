"""Flushing what LiteLLM still holds: its logging thread pool and its async LoggingWorker queue,
run to the end, so that tally.flush() means every call made so far is recorded."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from .._log import warn_limited
from . import litellm_compat as compat
from .litellm_streams import (
    collect_garbage,
    state_of,
    wait_for_abandoned_streams,
    wait_for_running_collection,
    watched,
)

__all__ = ["drain_logging_worker", "adrain_logging_worker"]

_IDLE_WAIT_S = 10.0  # how long flush(timeout=None) waits for LiteLLM's logging threads


_DRAIN_WAIT_S = 30.0  # and at most for LiteLLM's async queue: a drain never hangs a flush


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
    wait_for_running_collection(deadline)
    if any(not state_of(stream).finished for stream in list(watched)):
        # a stream left unread is freed by the cycle collector only (LiteLLM's logging object
        # and the stream refer to each other): find such streams now, off the caller's thread
        collect_garbage(deadline)
    wait_for_abandoned_streams(deadline)
    worker = compat.logging_worker()
    if worker is None or not compat.worker_pending(worker):
        return
    left = _DRAIN_WAIT_S if timeout is None else max(0.0, deadline - time.monotonic())
    bound = compat.worker_loop(worker)
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
    worker = compat.logging_worker()
    if worker is None:
        return
    # A call that returned may hand its logging to the worker a few loop turns later (more
    # when the loop is busy): drain until a few quiet turns in a row found nothing new.
    quiet = 0
    while quiet < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0)
        pending = compat.worker_pending(worker)
        if pending is None:
            return
        quiet = 0 if pending else quiet + 1
        try:  # also waits for the logging already running (the queue's unfinished tasks)
            await asyncio.wait_for(worker.flush(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            warn_limited("litellm-drain", "llmtally: LiteLLM's async logging did not finish "
                         "within %s s", timeout)
            return


def _wait_for_logging_threads(deadline: float) -> None:
    if threading.current_thread().name.startswith(compat.LOGGING_THREAD_PREFIX):
        return  # flushing from one of LiteLLM's own logging threads: it would wait for itself
    while compat.logging_threads_busy() and time.monotonic() < deadline:
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
