"""``llmtally serve`` latency: the JSON API, ``/metrics`` and the dashboard's first page over a
big ledger, with one client and with many at once.

    python benchmarks/serve_latency.py [--events 1000000] [--week-share 0.3]
                                       [--span-days 365] [--postgres URL | --postgres '']
                                       [--requests 50] [--clients 1,20]

The ledger holds N sample events (``llmtally._sample``, as in ``report_scale.py``), written in
bulk through ``Store.insert_many`` (so the hourly rollups are kept as in production):
``--week-share`` of them in the 7 days before NOW, the rest spread over the ``--span-days``
before that; on PostgreSQL the tables are then VACUUM ANALYZEd (what autovacuum does by itself
on a ledger in use). The server is the real thing in a process of its own: uvicorn, with the
options ``llmtally serve`` gives it, serving ``create_app(Tally(url, clock=lambda: NOW))`` (the
CLI itself cannot fix the clock; uvicorn runs the sync endpoints in its threadpool). Clients are
threads, each with its own ``httpx.Client`` (keep-alive); each sends 3 warm-up requests, then
``--requests`` timed ones; with C clients they all start together. For each endpoint and C:
p50 and p95 of the requests' latencies and the requests per second over the timed part.
``GET /api/v1/health`` (one ``max(ts)`` on an index) is the floor: server + HTTP + a trivial
query.

Endpoints: ``/api/v1/summary?since=7d&by=model``, ``/api/v1/timeseries?since=7d&step=day``,
``/metrics`` and the dashboard's first response ``/?period=week`` (the whole HTML page).

Targets (issue 19), assuming the rollups: p95 <= 100 ms per API call (``/api/v1/...``,
``/metrics``) and <= 300 ms per page (``/``), on SQLite and PostgreSQL, for 1M events with
300k in the last 7 days.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone

from _ledger import fill
from _postgres import DEFAULT_URL, scratch_schema

NOW = datetime(2026, 11, 25, 10, 0, tzinfo=timezone.utc)
WARMUP = 3
ENDPOINTS = (  # (label, path, target p95 in ms)
    ("health", "/api/v1/health", None),
    ("summary", "/api/v1/summary?since=7d&by=model", 100),
    ("timeseries", "/api/v1/timeseries?since=7d&step=day", 100),
    ("metrics", "/metrics", 100),
    ("dashboard", "/?period=week", 300),
)


def load(url: str, count: int, span_days: int, week_share: float) -> tuple[float, int]:
    """Write ``count`` sample events, ``week_share`` of them in the 7 days before NOW and the
    rest in the ``span_days`` before that; returns (seconds, events in the 7 days)."""
    return fill(url, count, NOW - timedelta(days=7), NOW, recent_share=week_share,
                span_days=span_days)


def server(url: str, port: int, cache_seconds: float) -> None:
    """Run in a process of its own: uvicorn as ``llmtally serve`` runs it, the clock at NOW."""
    import uvicorn

    from llmtally import Tally
    from llmtally._serve.app import create_app

    tally = Tally(url, price_map="bundled", clock=lambda: NOW)
    uvicorn.run(create_app(tally, cache_seconds=cache_seconds), host="127.0.0.1", port=port, log_level="warning",
                server_header=False, proxy_headers=False)


@contextlib.contextmanager
def serving(url: str, cache_seconds: float):
    """Start the server on a free port; yield its base URL once it answers; stop it."""
    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, "--server", url, str(port), str(cache_seconds)],
                            env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}")
            try:
                if httpx.get(base + "/api/v1/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not answer within 60 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(base: str, path: str, clients: int, requests: int) -> dict:
    """``clients`` threads, each WARMUP + ``requests`` GETs of ``path``; latencies in ms."""
    import httpx

    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures: list[str] = []
    ready = threading.Barrier(clients + 1)
    done = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        try:
            with httpx.Client(base_url=base, timeout=120) as http:
                for _ in range(WARMUP):
                    http.get(path).raise_for_status()
                ready.wait()
                for _ in range(requests):
                    started = time.perf_counter()
                    response = http.get(path)
                    elapsed = time.perf_counter() - started
                    response.raise_for_status()
                    latencies[index].append(elapsed * 1000)
        except Exception as exc:  # noqa: BLE001 - reported below, the run fails
            failures.append(f"{path}: {type(exc).__name__}: {exc}")
            ready.abort()
        finally:
            with contextlib.suppress(threading.BrokenBarrierError):
                done.wait()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        ready.wait()
    started = time.perf_counter()
    with contextlib.suppress(threading.BrokenBarrierError):
        done.wait()
    wall = time.perf_counter() - started
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit("requests failed:\n" + "\n".join(failures[:5]))
    every = sorted(ms for one in latencies for ms in one)
    return {"p50": statistics.median(every), "p95": percentile(every, 95),
            "rps": len(every) / wall, "n": len(every)}


def percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of a sorted list."""
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def run(database: str, url: str, clients: list[int], requests: int, cache_seconds: float) -> list[str]:
    rows = []
    with serving(url, cache_seconds) as base:
        for label, path, target in ENDPOINTS:
            for count in clients:
                figures = measure(base, path, count, requests)
                verdict = "" if target is None else ("ok" if figures["p95"] <= target else "**missed**")
                rows.append(f"| {database} | `{path}` | {count} | {figures['p50']:.1f} | "
                            f"{figures['p95']:.1f} | {figures['rps']:.0f} | "
                            f"{'floor' if target is None else f'<= {target} ms: {verdict}'} |")
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the ledger")
    parser.add_argument("--week-share", type=float, default=0.3,
                        help="the share of the events in the 7 days before NOW")
    parser.add_argument("--span-days", type=int, default=365,
                        help="days of history before those 7 days the other events are spread over")
    parser.add_argument("--postgres", default=DEFAULT_URL, help="PostgreSQL URL ('' to skip)")
    parser.add_argument("--skip-sqlite", action="store_true", help="PostgreSQL only")
    parser.add_argument("--requests", type=int, default=50,
                        help=f"timed requests per client (after {WARMUP} warm-up ones)")
    parser.add_argument("--clients", default="1,20", help="concurrent clients, comma-separated")
    parser.add_argument("--keep", metavar="DIR",
                        help="write the SQLite ledger to DIR/ledger.db and keep it (to profile); "
                             "if it is there already, measure it without loading")
    parser.add_argument("--cache", type=float, default=5.0,
                        help="seconds the server shares an answer (llmtally serve's --cache; 0: off)")
    parser.add_argument("--server", nargs=3, metavar=("URL", "PORT", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.server:
        server(args.server[0], int(args.server[1]), float(args.server[2]))
        return
    clients = [int(n) for n in args.clients.split(",") if n]
    print(f"serve_latency: {args.events:,} events, {args.week_share:.0%} in the 7 days before "
          f"{NOW:%Y-%m-%d %H:%M}Z; {args.requests} requests per client after {WARMUP} warm-up; "
          f"{os.cpu_count()} CPUs; python {sys.version.split()[0]}", flush=True)
    header = ["| database | endpoint | clients | p50 ms | p95 ms | requests/s | target (p95) |",
              "|---|---|---:|---:|---:|---:|---|"]
    rows: list[str] = []
    loads: list[str] = []
    with tempfile.TemporaryDirectory() as workdir:
        if not args.skip_sqlite:
            url = f"sqlite:///{args.keep or workdir}/ledger.db"
            if args.keep and os.path.exists(f"{args.keep}/ledger.db"):
                loads.append(f"sqlite: the ledger kept in {args.keep} (not loaded again)")
            else:
                load_s, in_week = load(url, args.events, args.span_days, args.week_share)
                loads.append(f"sqlite: loaded in {load_s:.0f} s, {in_week:,} events in the 7 days")
            print(loads[-1], flush=True)
            print("\n".join(header), flush=True)
            rows += run("sqlite", url, clients, args.requests, args.cache)
        if args.postgres:
            with scratch_schema(args.postgres, "llmtally_serve_bench") as pg:
                load_s, in_week = load(pg, args.events, args.span_days, args.week_share)
                loads.append(f"postgresql: loaded in {load_s:.0f} s, {in_week:,} events in the 7 days")
                print(loads[-1], flush=True)
                print("\n".join(header), flush=True)
                rows += run("postgresql", pg, clients, args.requests, args.cache)
    print("\n" + "\n".join(loads))
    print("\n".join(header + rows))
    print("targets (issue 19), assuming the rollups: p95 <= 100 ms per API call, <= 300 ms per page")


if __name__ == "__main__":
    main()
