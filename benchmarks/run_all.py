"""Run every benchmark and write benchmarks/RESULTS.md (figures, the machine, the date).

    python benchmarks/run_all.py

Each benchmark prints ratios against a baseline measured in the same run; this collects their
output verbatim, so the README's performance table can be checked against one file.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["ingest.py", "import_time.py", "pricing_tokens.py", "budget_check.py",
              "litellm_overhead.py", "report_scale.py", "langchain_overhead.py",
              "soak.py", "serve_latency.py", "alert_rounds.py"]


def machine() -> str:
    memory = ""
    try:
        with open("/proc/meminfo") as handle:
            kib = int(handle.readline().split()[1])
        memory = f", {kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return (f"{platform.machine()}, {os.cpu_count()} cores{memory}, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}")


def main() -> None:
    sections = []
    for name in BENCHMARKS:
        started = time.perf_counter()
        result = subprocess.run([sys.executable, str(HERE / name)], capture_output=True,
                                text=True, cwd=HERE.parent, timeout=1800,
                                env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
        output = (result.stdout + (result.stderr if result.returncode else "")).strip()
        print(f"== {name} ({time.perf_counter() - started:.0f} s)\n{output}\n", flush=True)
        sections.append(f"## {name}\n\n`python benchmarks/{name}`"
                        f"{'' if result.returncode == 0 else f' (exit {result.returncode})'}\n\n"
                        f"```\n{output}\n```\n")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results = HERE / "RESULTS.md"
    # the "Mutation testing" section comes from benchmarks/mutation.py (a separate, slower run,
    # triaged by hand): kept as it is
    kept = results.read_text() if results.exists() else ""
    mark = "\n## Mutation testing"
    kept = kept[kept.find(mark):] if mark in kept else ""
    results.write_text(
        f"# Benchmark results\n\n{stamp} on {machine()}.\nEach figure is compared with a "
        f"baseline measured in the same run; absolute times drift on a shared machine.\n\n"
        + "\n".join(sections) + kept)
    print(f"wrote {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
