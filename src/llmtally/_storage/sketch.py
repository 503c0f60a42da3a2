"""Durations kept as a mergeable sketch: counts in log-spaced buckets, so percentiles of any
period and any grouping come from summing bucket counts, never from the rows.

The buckets are DDSketch's (Masson, Rim and Lee, VLDB 2019): bucket ``i`` holds the values in
``(GAMMA**(i-1), GAMMA**i]`` with ``GAMMA = (1 + RELATIVE_ERROR) / (1 - RELATIVE_ERROR)``, and
is read back as ``2 * GAMMA**i / (GAMMA + 1)``, which is within ``RELATIVE_ERROR`` of every
value in it. A percentile is the value of the bucket that holds the call of that rank, so it
is within ``RELATIVE_ERROR`` (1 %) of the exact nearest-rank percentile of the same calls.
Durations up to ``MIN_VALUE_MS`` (1 µs) share one bucket, read back as 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

__all__ = ["RELATIVE_ERROR", "MIN_VALUE_MS", "ZERO_BUCKET", "bucket_of", "value_of",
           "percentile", "merged"]

RELATIVE_ERROR = 0.01
GAMMA = (1 + RELATIVE_ERROR) / (1 - RELATIVE_ERROR)
_LOG_GAMMA = math.log(GAMMA)
MIN_VALUE_MS = 0.001
ZERO_BUCKET = math.ceil(math.log(MIN_VALUE_MS) / _LOG_GAMMA) - 1
"""The bucket of every duration up to ``MIN_VALUE_MS`` (0 ms included)."""


def bucket_of(value_ms: float) -> int:
    """The bucket of a duration in milliseconds (0 and negative values: ``ZERO_BUCKET``)."""
    if value_ms <= MIN_VALUE_MS:
        return ZERO_BUCKET
    return math.ceil(math.log(value_ms) / _LOG_GAMMA)


def value_of(bucket: int) -> float:
    """The value a bucket stands for: within ``RELATIVE_ERROR`` of every duration in it."""
    if bucket <= ZERO_BUCKET:
        return 0.0
    return 2 * GAMMA ** bucket / (GAMMA + 1)


def percentile(counts: Mapping[int, int], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile (0 < p <= 100) of the durations counted in
    ``counts`` (bucket -> calls): the value of the bucket holding the call of rank
    ``ceil(p * n / 100)``. None when nothing is counted."""
    total = sum(counts.values())
    if total <= 0:
        return None
    rank = max(1, math.ceil(p * total / 100))
    seen = 0
    for bucket in sorted(counts):
        seen += counts[bucket]
        if seen >= rank:
            return value_of(bucket)
    raise AssertionError("unreachable: the ranks add up to the total")


def merged(parts: Iterable[tuple[int, int]]) -> dict[int, int]:
    """(bucket, calls) pairs summed into one sketch."""
    out: dict[int, int] = {}
    for bucket, calls in parts:
        out[bucket] = out.get(bucket, 0) + calls
    return out
