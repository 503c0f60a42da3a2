"""The weekly report on a big ledger: time, peak memory and file size as the ledger and the
reported week grow.

    python benchmarks/report_scale.py [--sizes 1000000,10000000] [--week-share 0.3]
                                      [--span-days 365] [--postgres URL | --postgres '']

Each ledger holds N sample events (``llmtally._sample``: several projects, users, providers,
errors, cache hits, streams, an unpriced model), written in bulk through ``Store.insert_many``
(so the hourly rollups are kept as in production): ``--week-share`` of them in the reported
week 2026-W47, the rest spread over the ``--span-days`` before it. The report is made in a
fresh process (``Tally.report``-equivalent: flush, the aggregate queries, render, atomic
write): its wall time (first run, and best of three), the peak RSS of that whole process
(Python, SQLAlchemy and Jinja2 included), and the HTML's size. PostgreSQL is measured at every
size too unless ``--postgres ''``.

Targets (issue 14): <= 2 s and <= 150 MB RSS for 10M events with 3M in the week, on SQLite
and PostgreSQL; time flat in the week's size (the report reads the week's hourly rollups,
whose count does not grow with the calls in an hour, and a few hours of events).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from _ledger import fill
from _postgres import DEFAULT_URL, scratch_schema

NOW = datetime(2026, 11, 25, 10, 0, tzinfo=timezone.utc)
WEEK = "2026-W47"
SIZES = (1_000_000, 10_000_000)
WEEK_START, WEEK_END = datetime(2026, 11, 16, tzinfo=timezone.utc), datetime(2026, 11, 23, tzinfo=timezone.utc)


def load(url: str, count: int, span_days: int, week_share: float) -> tuple[float, int]:
    """Write ``count`` sample events, ``week_share`` of them in the reported week and the rest
    in the ``span_days`` before it; returns (seconds, events in the week)."""
    return fill(url, count, WEEK_START, WEEK_END, recent_share=week_share, span_days=span_days)


def child(url: str, out_dir: str) -> None:
    """Run in a fresh process: make the report three times, print timings, RSS and size."""
    from llmtally import Tally
    from llmtally._reporting.render import write_report

    tally = Tally(url, price_map="bundled", clock=lambda: NOW,
                  spill_path=Path(out_dir) / "spill.jsonl")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(3):
        started = time.perf_counter()
        written = write_report(tally, out_dir + "/", week=WEEK)
        times.append(time.perf_counter() - started)
    tally.close()
    print(json.dumps({
        "first_s": times[0], "best_s": min(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mb": rss_before, "html_bytes": written.path.stat().st_size,
        "calls": written.report.current.calls,
    }))


def measure(url: str, out_dir: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", url, out_dir],
                            capture_output=True, text=True, timeout=1200,
                            env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    if result.returncode:
        raise SystemExit(f"the report run failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def row(database: str, count: int, load_s: float, in_week: int, figures: dict) -> str:
    return (f"{database:10} {count:>9,} {in_week:>9,} {load_s:>7.0f} s {figures['first_s']:>8.2f} s "
            f"{figures['best_s']:>8.2f} s {figures['peak_rss_mb']:>7.0f} MB "
            f"{figures['html_bytes'] / 1024:>7.1f} KiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(str(n) for n in SIZES),
                        help="event counts, comma-separated")
    parser.add_argument("--span-days", type=int, default=365,
                        help="days of history before the week the other events are spread over")
    parser.add_argument("--week-share", type=float, default=0.3,
                        help="the share of the events in the reported week")
    parser.add_argument("--postgres", default=DEFAULT_URL,
                        help="PostgreSQL URL ('' to skip)")
    parser.add_argument("--skip-sqlite", action="store_true", help="PostgreSQL only")
    parser.add_argument("--child", nargs=2, metavar=("URL", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    sizes = [int(n) for n in args.sizes.split(",") if n]
    print(f"report_scale: weekly report for {WEEK}, {args.week_share:.0%} of the events in it, "
          f"the rest over the {args.span_days} days before; python {sys.version.split()[0]}")
    header = (f"{'database':10} {'events':>9} {'in week':>9} {'load':>9} {'report':>10} "
              f"{'best of 3':>10} {'peak RSS':>10} {'HTML':>11}")
    print(header)
    print("-" * len(header))
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for count in sizes:
            url = f"sqlite:///{workdir}/ledger-{count}.db"
            if not args.skip_sqlite:
                load_s, in_week = load(url, count, args.span_days, args.week_share)
                figures = measure(url, f"{workdir}/out-{count}")
                results.append((count, figures))
                print(row("sqlite", count, load_s, in_week, figures), flush=True)
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(url[len("sqlite:///"):] + suffix)
            if args.postgres:
                with scratch_schema(args.postgres, "llmtally_report_bench") as pg:
                    load_s, in_week = load(pg, count, args.span_days, args.week_share)
                    figures = measure(pg, f"{workdir}/out-pg-{count}")
                    print(row("postgresql", count, load_s, in_week, figures), flush=True)
    if len(results) >= 2:
        (small, first), (large, last) = results[0], results[-1]
        print(f"\n{large // small}x the events (and the week's): {last['best_s'] / first['best_s']:.1f}x "
              f"the time (best of 3), HTML {last['html_bytes'] / first['html_bytes']:.2f}x the size")
    print("targets: <= 2 s and <= 150 MB for 10M events, 3M in the week; flat in the week's size")


if __name__ == "__main__":
    main()
