"""Budget checks from async code: the database work runs on a worker thread."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

__all__ = ["reserve_off_loop"]


async def reserve_off_loop(tally: Any, reserve: Callable[..., Any], *args: Any) -> Any:
    """Run ``reserve(*args)`` (returning a reservation or None, or raising BudgetExceeded) on a
    worker thread, so the event loop never waits for the database; the scope in force is
    carried over. If the caller is cancelled meanwhile, the hold the thread still takes is
    given back rather than left to expire."""
    job = asyncio.ensure_future(asyncio.to_thread(reserve, *args))
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        def give_back(done: asyncio.Future[Any]) -> None:
            if not done.cancelled() and done.exception() is None and done.result() is not None:
                asyncio.get_running_loop().run_in_executor(None, tally.release, done.result())

        job.add_done_callback(give_back)
        raise
