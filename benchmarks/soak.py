"""Soak throughput: LiteLLM calls per second to the loopback fake provider, with and without
``litellm.callbacks = [tally.litellm()]``, in the same run.

    python benchmarks/soak.py [--calls 1000] [--threads 8] [--postgres URL]

First, what ``durability="sync"`` costs: ``tally.record()`` latency on the caller's thread,
batched vs sync, from 1 and from 8 threads (sync records from several threads share a
commit). Then the fake provider runs in a process of its own (``python -m llmtally.testing``),
so this process only runs LiteLLM and llmtally. Workloads, each timed without and with llmtally in
alternating rounds: ``--threads`` threads of sync ``litellm.completion``, and one event loop
with as many ``acompletion`` calls in flight. The ledger is SQLite (batched and
``durability="sync"``) and, unless ``--postgres ''``, PostgreSQL. Prints calls/s and the
ratio with/without, and how many calls the ledger holds against how many were made with
llmtally registered: the two must be equal. (LiteLLM runs a sync call's success callbacks on
its logging thread pool after the call has returned, and reads the registered callbacks only
then, so a call of a "without" round whose logging is still pending when llmtally is
registered would be recorded too: each "without" round waits for LiteLLM's logging to be idle
before the switch, as ``tally.flush()`` does after each "with" round.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import version

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import

import litellm  # noqa: E402
from _postgres import DEFAULT_URL, scratch_schema  # noqa: E402

from llmtally import Tally  # noqa: E402
from llmtally.integrations.litellm_drain import adrain_logging_worker, drain_logging_worker

MSGS = [{"role": "user", "content": "hello"}]
ROUNDS = 3


def start_provider() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "llmtally.testing", "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"the fake provider did not start: {line!r}")
    return proc, f"http://127.0.0.1:{match.group(1)}/v1"


def sync_calls(base: str, calls: int, threads: int) -> float:
    """Seconds for ``calls`` completions from ``threads`` threads."""
    per_thread = calls // threads

    def run() -> None:
        for _ in range(per_thread):
            litellm.completion(model="openai/gpt-4o-mini", api_base=base, api_key="sk-bench",
                               messages=MSGS)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return time.perf_counter() - started


def async_calls(base: str, calls: int, in_flight: int) -> float:
    async def run() -> None:
        for start in range(0, calls, in_flight):
            await asyncio.gather(*(litellm.acompletion(
                model="openai/gpt-4o-mini", api_base=base, api_key="sk-bench", messages=MSGS)
                for _ in range(min(in_flight, calls - start))))
        await adrain_logging_worker()  # what tally.aflush() does first; both ways, to be fair

    started = time.perf_counter()
    asyncio.run(run())
    return time.perf_counter() - started


def register(logger) -> None:
    """Make ``logger`` LiteLLM's only callback (or none). Assigning ``litellm.callbacks`` alone
    leaves loggers registered before in LiteLLM's internal lists."""
    litellm.callbacks = [logger] if logger is not None else []
    for name in ("success_callback", "failure_callback", "_async_success_callback",
                 "_async_failure_callback", "input_callback"):
        setattr(litellm, name, [])
    manager = getattr(litellm, "logging_callback_manager", None)
    if manager is not None:
        manager._reset_all_callbacks()
    litellm.callbacks = [logger] if logger is not None else []


def recorded_calls(tally: Tally) -> int:
    return sum(row.calls for row in tally.summary(since="1h"))


def compare(name: str, tally: Tally, workload, calls: int) -> int:
    """Print calls/s without and with llmtally; return how many calls were made with it."""
    workload(calls // 10)  # warm up
    without, with_ = [], []
    for number in range(ROUNDS):
        register(None)
        without.append(workload(calls))
        drain_logging_worker()  # no call of this round may be logged once llmtally is registered
        before = recorded_calls(tally)
        register(tally.litellm())
        with_.append(workload(calls))
        tally.flush()
        recorded = recorded_calls(tally) - before
        if recorded != calls:
            print(f"{name}: round {number + 1} recorded {recorded:,} calls of {calls:,} made: "
                  "MISMATCH", flush=True)
    register(None)
    bare, tallied = calls / min(without), calls / min(with_)
    print(f"{name:<42} without {bare:7.0f} calls/s   with {tallied:7.0f} calls/s   "
          f"({tallied / bare:.2f}x)", flush=True)
    return ROUNDS * calls


def record_latency(label: str, url: str, spill: str, records: int = 400) -> None:
    """p50 / p99 of record() per durability, from 1 and from 8 threads."""
    for durability in ("batched", "sync"):
        for threads in (1, 8):
            with Tally(url, price_map="bundled", spill_path=spill, durability=durability) as tally:
                tally.record(model="gpt-4o-mini", input_tokens=1)
                tally.flush()
                samples: list[float] = []

                def run() -> None:
                    for number in range(records):
                        started = time.perf_counter()
                        tally.record(model="gpt-4o-mini", provider="openai",
                                     input_tokens=number, output_tokens=3)
                        samples.append(time.perf_counter() - started)

                workers = [threading.Thread(target=run) for _ in range(threads)]
                started = time.perf_counter()
                for worker in workers:
                    worker.start()
                for worker in workers:
                    worker.join()
                elapsed = time.perf_counter() - started
            samples.sort()
            print(f"record() {label} {durability:<8} {threads} thread{'s' if threads > 1 else ' '}"
                  f"   p50 {samples[len(samples) // 2] * 1e6:7.0f} µs   p99 "
                  f"{samples[int(len(samples) * 0.99)] * 1e6:7.0f} µs   "
                  f"{records * threads / elapsed:8,.0f} records/s", flush=True)


def bench(label: str, url: str, spill: str, args: argparse.Namespace, base: str) -> None:
    for durability in ("batched", "sync"):
        with Tally(url, price_map="bundled", spill_path=spill, durability=durability) as tally:
            before = recorded_calls(tally)
            made = compare(f"{label} {durability}, {args.threads} threads sync", tally,
                           lambda n: sync_calls(base, n, args.threads), args.calls)
            made += compare(f"{label} {durability}, {args.threads} in flight async", tally,
                            lambda n: async_calls(base, n, args.threads), args.calls)
            recorded = recorded_calls(tally) - before
            print(f"{'':<42} ({recorded:,} calls recorded of {made:,} made with llmtally"
                  f"{'' if recorded == made else ': MISMATCH'})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--postgres", default=DEFAULT_URL,
                        help="PostgreSQL URL ('' to skip); a scratch schema is used and dropped")
    args = parser.parse_args()
    provider, base = start_provider()
    print(f"soak: {args.calls:,} calls per round, best of {ROUNDS} rounds, litellm "
          f"{version('litellm')}, fake provider in its own process", flush=True)
    try:
        with tempfile.TemporaryDirectory() as workdir:
            # One spill file per ledger: a spill file is replayed into whichever ledger the
            # Tally that finds it writes to.
            record_latency("sqlite", f"sqlite:///{workdir}/latency.db", f"{workdir}/s1.jsonl")
            if args.postgres:
                with scratch_schema(args.postgres, "llmtally_soak") as url:
                    record_latency("postgresql", url, f"{workdir}/s2.jsonl")
            bench("sqlite", f"sqlite:///{workdir}/soak.db", f"{workdir}/s3.jsonl", args, base)
            if args.postgres:
                with scratch_schema(args.postgres, "llmtally_soak") as url:
                    bench("postgresql", url, f"{workdir}/s4.jsonl", args, base)
    finally:
        provider.terminate()
        provider.wait(10)


if __name__ == "__main__":
    main()
