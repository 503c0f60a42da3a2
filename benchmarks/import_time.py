"""`import llmtally` time and the cost of `tally.record()` on the caller's thread.

    python benchmarks/import_time.py [--runs 15] [--records 20000]

Import: median over fresh interpreters of (python -c "import llmtally") minus (python -c "pass"),
measured in the same run. Targets (issue 3): import < 150 ms; record() p50 < 20 us.
record(): per-call wall time on the caller's thread (pricing, attribution, queueing; the
database write happens on the background writer), with and without an active scope, against a
baseline of building the same keyword dict in the same loop.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time


def interpreter_ms(code: str, runs: int) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def percentiles(samples: list[float]) -> tuple[float, float]:
    samples.sort()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.99)]


def record_us(count: int) -> dict[str, tuple[float, float]]:
    from llmtally import Tally

    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        with Tally(f"sqlite:///{workdir}/bench.db", price_map="bundled",
                   spill_path=f"{workdir}/s.jsonl") as tally:
            clock = time.perf_counter_ns
            for label in ("baseline", "record", "record in scope"):
                samples = []
                scope = tally.scope(project="search", user="alice", tags=["beta"])
                if label == "record in scope":
                    scope.__enter__()
                for i in range(count):
                    started = clock()
                    if label == "baseline":
                        dict(model="gpt-4o-mini", provider="openai", input_tokens=1000 + i,
                             output_tokens=200, latency_ms=850.0)
                    else:
                        tally.record(model="gpt-4o-mini", provider="openai", input_tokens=1000 + i,
                                     output_tokens=200, latency_ms=850.0)
                    samples.append((clock() - started) / 1000)
                if label == "record in scope":
                    scope.__exit__(None, None, None)
                results[label] = percentiles(samples)
                tally.flush()
    return results


def record_cpu_us(rounds: int = 12, calls: int = 5_000) -> float:
    """record()'s cost in CPU time of the calling thread (``time.thread_time``), best of
    ``rounds`` loops of ``calls``, the writer kept idle meanwhile: less disturbed by other
    processes on a busy machine than the wall-clock percentiles."""
    from llmtally import Tally

    best = float("inf")
    with tempfile.TemporaryDirectory() as workdir:
        with Tally(f"sqlite:///{workdir}/cpu.db", price_map="bundled",
                   spill_path=f"{workdir}/s.jsonl", max_queue=10**7, flush_interval_s=60,
                   batch_size=10**6) as tally:
            for _ in range(rounds):
                started = time.thread_time()
                for _ in range(calls):
                    tally.record(model="gpt-4o-mini", input_tokens=120, output_tokens=30,
                                 latency_ms=412.0)
                best = min(best, (time.thread_time() - started) / calls * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--records", type=int, default=20_000)
    args = parser.parse_args()
    bare = interpreter_ms("pass", args.runs)
    with_import = interpreter_ms("import llmtally", args.runs)
    print(f"import llmtally: {with_import - bare:.1f} ms (interpreter {with_import:.1f} ms vs "
          f"bare {bare:.1f} ms, median of {args.runs}); target < 150 ms")
    for label, (p50, p99) in record_us(args.records).items():
        print(f"{label:16} p50 {p50:6.2f} us   p99 {p99:7.2f} us   ({args.records:,} calls)")
    print(f"record CPU time  best {record_cpu_us():6.2f} us   (12 x 5,000 calls, writer idle)")
    print("target: record() p50 < 20 us on the caller's thread")


if __name__ == "__main__":
    main()
