"""Budget overhead per call: reserve (check + hold) and settle, with 3 active budgets.

    python benchmarks/budget_check.py [--calls 2000] [--postgres URL]

For SQLite and PostgreSQL: p50/p99 of reserve + record(reservation=...) (which settles) on the
caller's thread, against record() alone in the same run (the bare, budget-less path).
Targets (issue 6): <= 1 ms p50 on SQLite, <= 2 ms on local PostgreSQL.
Also the throughput of 32 threads (one process) reserving and settling against one budget,
and the event loop's lag (issue 18): 200 concurrent ``litellm.acompletion`` calls to the
loopback fake provider, registered with ``litellm.callbacks = [tally.litellm()]``, with and
without the 3 budgets, while a 1 ms ticker coroutine measures how late it wakes up (p50/p99).
Target: budgets add <= 1 ms to the p99 lag.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time

from _postgres import DEFAULT_URL, scratch_schema

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from llmtally import Budget, BudgetExceeded, Price, Tally

BUDGETS = [Budget(usd=10_000, per="month"), Budget(usd=100, per="day", each="user"),
           Budget(tokens=10**9, per="minute", scope={"project": "bench"})]
PRICES = {"penny": Price(input=0, output=0.01, per="token"),
          "gpt-4o-mini": Price(input=0, output=0.000001, per="token")}


def percentiles(samples: list[float]) -> tuple[float, float]:
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)]


def per_call(url: str, calls: int, spill: str) -> dict[str, tuple[float, float]]:
    out = {}
    with Tally(url, price_map="bundled", spill_path=spill, prices=PRICES, budgets=BUDGETS) as tally:
        for label in ("record only", "reserve + settle"):
            samples = []
            for i in range(calls):
                started = time.perf_counter()
                held = None
                if label != "record only":
                    held = tally.reserve(model="penny", input_tokens=10, max_tokens=1,
                                         user=f"u{i % 20}", project="bench")
                tally.record(model="penny", input_tokens=10, output_tokens=1, user=f"u{i % 20}",
                             project="bench", reservation=held)
                samples.append((time.perf_counter() - started) * 1000)
            out[label] = percentiles(samples)
    return out


def throughput(url: str, spill: str, threads: int = 32, per_thread: int = 50) -> float:
    with Tally(url, price_map="bundled", spill_path=spill, prices=PRICES,
               budgets=[Budget(usd=10**6, per="day")]) as tally:
        def run() -> None:
            for _ in range(per_thread):
                try:
                    held = tally.reserve(model="penny", input_tokens=0, max_tokens=1)
                except BudgetExceeded:
                    continue
                tally.record(model="penny", output_tokens=1, reservation=held)
        workers = [threading.Thread(target=run) for _ in range(threads)]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return threads * per_thread / (time.perf_counter() - started)


def loop_lag(url: str, spill: str, budgets: list[Budget], calls: int = 200,
             rounds: int = 3) -> tuple[float, float]:
    """The ticker's lag (ms, p50 and p99 over ``rounds``) while ``calls`` acompletion calls run."""
    import asyncio

    import litellm

    from llmtally.testing import FakeProvider, FakeUsage

    lags: list[float] = []
    with FakeProvider(usage=FakeUsage(prompt_tokens=1, completion_tokens=1)) as fp, \
            Tally(url, price_map="bundled", spill_path=spill, prices=PRICES,
                  budgets=budgets) as tally:
        litellm.callbacks = [tally.litellm()]
        kwargs = {"model": "openai/gpt-4o-mini", "api_base": fp.openai_base, "api_key": "sk-x",
                  "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                  "user": "bench", "metadata": {"project": "bench"}}

        async def ticker(stop: asyncio.Event) -> None:
            while not stop.is_set():
                started = time.perf_counter()
                await asyncio.sleep(0.001)
                lags.append((time.perf_counter() - started) * 1000 - 1.0)

        async def one_round() -> None:
            stop = asyncio.Event()
            tick = asyncio.create_task(ticker(stop))
            await asyncio.gather(*(litellm.acompletion(**kwargs) for _ in range(calls)))
            await tally.aflush(30)
            stop.set()
            await tick

        for _ in range(rounds):
            asyncio.run(one_round())
        # unregister everywhere: LiteLLM keeps loggers in lists that callbacks= does not reset
        for name in ("callbacks", "success_callback", "failure_callback",
                     "_async_success_callback", "_async_failure_callback"):
            setattr(litellm, name, [])
    return percentiles(lags)


def bench(name: str, url: str, calls: int, workdir: str) -> None:
    results = per_call(url, calls, os.path.join(workdir, f"{name}.jsonl"))
    bare, budgeted = results["record only"], results["reserve + settle"]
    print(f"{name:10} record only p50 {bare[0]:.3f} ms   reserve+settle (3 budgets) p50 "
          f"{budgeted[0]:.3f} ms p99 {budgeted[1]:.3f} ms   added p50 {budgeted[0] - bare[0]:.3f} ms")
    rate = throughput(url, os.path.join(workdir, f"{name}-t.jsonl"))
    print(f"{'':10} 32 threads reserving+settling on one budget: {rate:,.0f} calls/s")
    plain = loop_lag(url, os.path.join(workdir, f"{name}-l0.jsonl"), [])
    budgeted = loop_lag(url, os.path.join(workdir, f"{name}-l3.jsonl"), BUDGETS)
    print(f"{'':10} event-loop lag, 200 acompletion in flight: without budgets p50 "
          f"{plain[0]:.2f} ms p99 {plain[1]:.2f} ms; with 3 budgets p50 {budgeted[0]:.2f} ms "
          f"p99 {budgeted[1]:.2f} ms; added p99 {budgeted[1] - plain[1]:+.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--postgres", default=DEFAULT_URL)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        bench("sqlite", f"sqlite:///{workdir}/budget.db", args.calls, workdir)
        if args.postgres:
            with scratch_schema(args.postgres, "llmtally_budget_bench") as url:
                bench("postgresql", url, args.calls, workdir)

if __name__ == "__main__":
    main()
