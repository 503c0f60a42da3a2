"""A worker process for the fault suite: an application making real LiteLLM calls over HTTP to
the fake provider, with ``litellm.callbacks = [tally.litellm()]``.

    python _worker.py '{"mode": "soak", "url": ..., "base": ..., ...}'

Modes:

- ``soak``: ``threads`` threads make ``calls`` calls in all (sync, sync streams, errors; the
  last ``async_threads`` threads run an event loop with ``acompletion``, async streams and
  async errors, several at a time); writes the ids the application saw per kind to ``out``.
- ``loop``: ``threads`` threads call until the process is killed; after each call returns,
  its id and the time go to ``side`` (one line, flushed); with ``durability == "sync"`` the
  calls go through ``tally.guard(litellm.completion)``. With ``stop_after`` calls it exits
  normally instead (no flush, no close: the exit handler must write them).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
import uuid

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402

from llmtally import Tally  # noqa: E402

MSGS = [{"role": "user", "content": "Count this call once."}]


TALLY: Tally | None = None  # the process's Tally, for the async workers' aflush()


def main() -> None:
    global TALLY
    config = json.loads(sys.argv[1])
    tally = TALLY = Tally(config["url"], price_map="bundled", spill_path=config["spill"],
                  durability=config.get("durability", "batched"))
    litellm.callbacks = [tally.litellm()]
    if config["mode"] == "soak":
        soak(tally, config)
    else:
        loop(tally, config)


def _args(config: dict, **extra) -> dict:
    return {"model": "openai/gpt-4o-mini", "api_base": config["base"], "api_key": "sk-fault",
            "messages": MSGS, "max_retries": 0, **extra}


def _bad(config: dict, **extra) -> dict:
    """A call the provider answers with 404 (no such route): a deterministic error."""
    return _args(config, api_base=config["base"].rsplit("/v1", 1)[0] + "/missing", **extra)


# -- soak -------------------------------------------------------------------------------------


def soak(tally: Tally, config: dict) -> None:
    threads, async_threads = config["threads"], config.get("async_threads", 0)
    per_thread = config["calls"] // threads
    seen: dict[str, list[str]] = {"ok": [], "error": []}
    lock = threading.Lock()

    def keep(kind: str, ids: list[str]) -> None:
        with lock:
            seen[kind].extend(ids)

    workers = [threading.Thread(target=_sync_calls, args=(config, per_thread, keep))
               for _ in range(threads - async_threads)]
    workers += [threading.Thread(target=lambda: asyncio.run(_async_calls(config, per_thread, keep)))
                for _ in range(async_threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    assert tally.flush(120), "flush timed out"
    with open(config["out"], "w") as handle:
        json.dump({**seen, "seconds": elapsed, "pid": os.getpid()}, handle)


def _sync_calls(config: dict, count: int, keep) -> None:
    ok, errors = [], []
    for number in range(count):
        kind = number % 10
        if kind < 6:  # a plain call: the id LiteLLM made, as the response carries it
            response = litellm.completion(**_args(config))
            ok.append(response._hidden_params["litellm_call_id"])
        elif kind < 9:  # a stream, read to the end, with usage
            call_id = str(uuid.uuid4())
            for _ in litellm.completion(**_args(config, stream=True, litellm_call_id=call_id,
                                                stream_options={"include_usage": True})):
                pass
            ok.append(call_id)
        else:
            call_id = str(uuid.uuid4())
            try:
                litellm.completion(**_bad(config, litellm_call_id=call_id))
            except litellm.NotFoundError:
                errors.append(call_id)
            else:
                raise AssertionError("the bad route answered")
    keep("ok", ok)
    keep("error", errors)


async def _async_calls(config: dict, count: int, keep) -> None:
    async def one(number: int) -> tuple[str, str]:
        kind = number % 10
        if kind < 6:
            response = await litellm.acompletion(**_args(config))
            return "ok", response._hidden_params["litellm_call_id"]
        call_id = str(uuid.uuid4())
        if kind < 9:
            stream = await litellm.acompletion(**_args(config, stream=True, litellm_call_id=call_id,
                                                       stream_options={"include_usage": True}))
            async for _ in stream:
                pass
            return "ok", call_id
        try:
            await litellm.acompletion(**_bad(config, litellm_call_id=call_id))
        except litellm.NotFoundError:
            return "error", call_id
        raise AssertionError("the bad route answered")

    for start in range(0, count, 8):  # eight calls in flight at a time
        results = await asyncio.gather(*(one(n) for n in range(start, min(start + 8, count))))
        for kind in ("ok", "error"):
            keep(kind, [call_id for got, call_id in results if got == kind])
    if TALLY is not None:  # before the loop ends: LiteLLM cancels logging still running then
        await TALLY.aflush()  # see Tally.aflush


# -- loop until killed ----------------------------------------------------------------------


def loop(tally: Tally, config: dict) -> None:
    complete = litellm.completion
    if config.get("durability") == "sync":
        complete = tally.guard(litellm.completion)
    side = open(config["side"], "a", buffering=1)
    lock = threading.Lock()
    stop_after = config.get("stop_after")
    counter = iter(range(10**9))

    def run() -> None:
        while True:
            with lock:
                number = next(counter)
            if stop_after is not None and number >= stop_after:
                return
            response = complete(**_args(config))
            call_id = response._hidden_params["litellm_call_id"]
            with lock:
                side.write(f"{call_id} {time.time():.6f}\n")

    workers = [threading.Thread(target=run, daemon=True) for _ in range(config["threads"])]
    for worker in workers:
        worker.start()
    print("running", flush=True)
    for worker in workers:
        worker.join()
    side.close()
    # stop_after reached: leave without flush() or close(); the exit handler writes the rest


if __name__ == "__main__":
    main()
