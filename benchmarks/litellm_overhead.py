"""What `litellm.callbacks = [tally.litellm()]` adds to a LiteLLM call on the caller's thread.

Two workloads, each timed with and without the logger in the same run, in alternating rounds:
``litellm.completion(mock_response=...)`` (LiteLLM's own per-call cost, no network) and a real
HTTP call to the loopback fake provider. Prints per-call p50 for each, the added p50 in µs and
as a share of LiteLLM's own per-call time (targets: <= 50 µs and <= 5 %).

    python benchmarks/litellm_overhead.py [--calls 3000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from importlib.metadata import version

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import

import litellm  # noqa: E402

from llmtally import Tally  # noqa: E402
from llmtally.testing import FakeProvider  # noqa: E402

MSGS = [{"role": "user", "content": "hello"}]


def _time_calls(call, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        out.append(time.perf_counter() - started)
    return out


def _compare(name: str, call, logger, calls: int, rounds: int = 6) -> None:
    for _ in range(50):  # warm up both ways
        call()
    base: list[float] = []
    tallied: list[float] = []
    per_round = max(1, calls // rounds)
    for _ in range(rounds):
        litellm.callbacks = []
        base += _time_calls(call, per_round)
        litellm.callbacks = [logger]
        tallied += _time_calls(call, per_round)
    litellm.callbacks = []
    b, t = statistics.median(base) * 1e6, statistics.median(tallied) * 1e6
    added = t - b
    print(f"{name:<28} without {b:8.1f} µs   with {t:8.1f} µs   added p50 {added:+7.1f} µs "
          f"({added / b * 100:+5.1f} % of LiteLLM's own per-call time; {len(base)} calls each)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, FakeProvider() as fp:
        tally = Tally(os.path.join(tmp, "bench.db"), price_map="bundled")
        logger = tally.litellm()
        print(f"litellm {version('litellm')}, Python {sys.version.split()[0]}")
        _compare("completion(mock_response)", lambda: litellm.completion(
            model="gpt-4o-mini", messages=MSGS, mock_response="hi"), logger, args.calls)
        _compare("completion over HTTP", lambda: litellm.completion(
            model="openai/gpt-4o-mini", api_base=fp.openai_base, api_key="sk-test", messages=MSGS),
            logger, args.calls)
        tally.flush(30)
        tally.close()


if __name__ == "__main__":
    main()
