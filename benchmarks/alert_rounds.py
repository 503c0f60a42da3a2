"""The cost of one alert-rule round on a big ledger.

    python benchmarks/alert_rounds.py [--events 1000000] [--rounds 30] [--postgres URL | --postgres '']

The ledger holds ``--events`` sample events (``llmtally._sample.bulk_load``, rollups kept as in
production) over the 30 days before NOW, the last 15 minutes among them. A round evaluates the
six rules of docs/alerts.md (error rate, auth failures, 429s, latency p95, spend spike, new
unpriced model) and stores what fires: ``AlertMonitor.check()``, with nothing to send. The
baseline, measured in the same run, is the least any round must do: one ``COUNT(*)`` of the
window's events through the ``ts`` index.

Target (issue 15): under 50 ms per round on SQLite, for 1 M events.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from _ledger import fill
from _postgres import DEFAULT_URL, scratch_schema

NOW = datetime(2026, 11, 25, 10, 7, tzinfo=timezone.utc)


def load(url: str, count: int) -> float:
    """``count`` sample events over the 30 days before NOW; returns the seconds it took."""
    return fill(url, count, NOW - timedelta(days=30), NOW, recent_share=1.0, span_days=0)[0]


def measure(url: str, rounds: int) -> dict[str, float]:
    from sqlalchemy import func, select

    from llmtally import AlertRule, Tally
    from llmtally._storage.tables import UsageEvent

    rules = [AlertRule("error_rate", threshold=0.2, min_calls=20), AlertRule("auth_failure"),
             AlertRule("rate_limited", threshold=5),
             AlertRule("latency_p95", threshold=8000, per="model"),
             AlertRule("spend_spike", threshold=3, per="project"),
             AlertRule("unpriced_model")]
    tally = Tally(url, clock=lambda: NOW, alert_rules=rules, alerts=[lambda alert: None],
                  price_map="bundled", alert_interval_s=900)
    monitor = tally.alert_monitor
    assert monitor is not None
    ts = UsageEvent.__table__.c.ts
    start = (NOW - timedelta(minutes=15)).replace(tzinfo=None)
    baseline, rule_rounds = [], []
    try:
        for _ in range(rounds):
            began = time.perf_counter()
            with tally.store.connect() as conn:
                conn.execute(select(func.count()).where(ts >= start)).scalar()
            baseline.append(time.perf_counter() - began)
            began = time.perf_counter()
            monitor.check()
            rule_rounds.append(time.perf_counter() - began)
    finally:
        tally.close()
    return {"baseline_ms": statistics.median(baseline) * 1000,
            "round_p50_ms": statistics.median(rule_rounds) * 1000,
            "round_p95_ms": sorted(rule_rounds)[int(0.95 * (len(rule_rounds) - 1))] * 1000,
            "first_ms": rule_rounds[0] * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--postgres", default=DEFAULT_URL, help="'' to skip PostgreSQL")
    args = parser.parse_args()
    print("| database | events | load s | baseline ms | round p50 ms | round p95 ms | first round ms | p50 / baseline |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        targets = [("SQLite", f"sqlite:///{Path(scratch) / 'ledger.db'}")]
        for name, url in targets:
            _report(name, url, args)
    if args.postgres:
        with scratch_schema(args.postgres, "bench_alert_rounds") as url:
            _report("PostgreSQL", url, args)


def _report(name: str, url: str, args: argparse.Namespace) -> None:
    seconds = load(url, args.events)
    figures = measure(url, args.rounds)
    print(f"| {name} | {args.events:,} | {seconds:.0f} | {figures['baseline_ms']:.2f} | "
          f"{figures['round_p50_ms']:.1f} | {figures['round_p95_ms']:.1f} | "
          f"{figures['first_ms']:.1f} | {figures['round_p50_ms'] / figures['baseline_ms']:.0f}× |",
          flush=True)


if __name__ == "__main__":
    main()
