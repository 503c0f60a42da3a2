"""The price engine and the offline token counter, per call.

    python benchmarks/pricing_tokens.py

- PriceBook.cost() with a warm cache (the work record() does per event), against a plain dict
  lookup plus the same arithmetic in the same run;
- count_text() on 1 KB of English with tiktoken (o200k, when its files are on disk) and with
  the heuristic, against len() of the same text.
"""

from __future__ import annotations

import statistics
import time

from llmtally._events.tokens import count_text, heuristic_count, tokenizer_name
from llmtally._pricing.book import PriceBook


def p50_us(call, runs: int = 20_000) -> float:
    call()
    samples = []
    for _ in range(runs):
        started = time.perf_counter_ns()
        call()
        samples.append(time.perf_counter_ns() - started)
    return statistics.median(samples) / 1000


def main() -> None:
    book = PriceBook(price_map="bundled")
    prices = {"gpt-4o-mini": (0.15e-6, 0.075e-6, 0.6e-6)}
    baseline = p50_us(lambda: (lambda p: 20 * p[0] + 100 * p[1] + 30 * p[2])(prices["gpt-4o-mini"]))
    cost = p50_us(lambda: book.cost(model="gpt-4o-mini", provider="openai", input_tokens=120,
                                    cache_read_tokens=100, output_tokens=30))
    print(f"PriceBook.cost()  p50 {cost:6.2f} us   (dict lookup + arithmetic: {baseline:.2f} us, "
          f"{cost / baseline:.0f}x)")
    text = ("The quick brown fox jumps over the lazy dog; 12345 tokens. " * 20)[:1024]
    length = p50_us(lambda: len(text.encode()), 2000)
    for label, call in ((f"count_text [{tokenizer_name('gpt-4o')}]", lambda: count_text(text, "gpt-4o")),
                        ("count_text [heuristic]", lambda: heuristic_count(text))):
        print(f"{label:34} p50 {p50_us(call, 2000):7.1f} us on 1 KB   (len(text.encode()): {length:.2f} us)")


if __name__ == "__main__":
    main()
