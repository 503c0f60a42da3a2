"""Mutation testing of the core modules with mutmut, one module at a time.

    python benchmarks/mutation.py                      # every module below
    python benchmarks/mutation.py reservations store   # some of them
    python benchmarks/mutation.py --list               # the modules and their tests
    python benchmarks/mutation.py store --recheck      # what mutmut left, against today's tests

Each module runs in a scratch copy of its own (``.mutation/<module>/``, git-ignored): mutmut
copies ``src/`` and ``tests/`` there, mutates only that module (``only_mutate``) and, per
mutant, runs only the tests of that module's list that executed the mutated function
(``pytest -x``, a per-test timeout, mutmut's own wall-clock limit). The shared settings are
in ``pyproject.toml`` ``[tool.mutmut]``; this script adds each module's file and tests.

Needs the test PostgreSQL (``LLMTALLY_TEST_POSTGRES_URL``, as the test suite) and
``pip install mutmut==3.8.1``. Prints, per module, killed / survived / timeout / no tests, the
score and the surviving mutants (``mutmut show <name>`` in the module's scratch directory
shows one). Slow (tens of minutes per module on 2 cores): a weekly job like the benchmarks,
not part of ``.ci/run``. The triaged figures are in benchmarks/RESULTS.md ("Mutation testing").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / ".mutation"

# the budget tests on the ledger itself (LiteLLM's and LangChain's budget tests go through the
# same functions more slowly)
BUDGET_TESTS = ["tests/test_budgets.py", "tests/test_budgets_exact.py",
                "tests/test_budget_recovery.py", "tests/test_mutation_kills.py"]
# module -> (the file, or the area's files as a glob ending in *, mutated; tests run against it)
MODULES: dict[str, tuple[str, list[str]]] = {
    # what was _reservations.py: the ledger, counters, charges, states and tables of _budgets
    "reservations": ("src/llmtally/_budgets/*", BUDGET_TESTS),
    # store.py and store_urls.py, store_outage.py, store_connections.py
    "store": ("src/llmtally/_storage/store*",
              ["tests/test_ledger.py", "tests/test_schema.py", "tests/test_record.py",
               "tests/test_spill.py", "tests/test_budget_recovery.py",
               "tests/test_mutation_kills.py", "tests/test_mutation_kills_store.py",
               # a batch holding an id twice and an id stored before, through the Store itself
               # (the writer's one-by-one retry would hide a failing batch)
               "tests/test_rollups.py::test_rollups_count_an_id_once_however_often_it_is_written",
               "tests/test_pg_rows.py",
               "tests/faults/test_disk.py::test_the_outage_message_names_a_full_disk"]),
    "spill": ("src/llmtally/_storage/spill.py",
              ["tests/test_spill.py", "tests/faults/test_spill_faults.py",
               "tests/test_mutation_kills.py",
               # two replaying processes: flaky on a loaded 2-core machine (the first process
               # to record may not have spilled everything yet), so a false kill or a failed
               # clean run; the claim logic it covers has unit tests in test_mutation_kills.py
               "--deselect=tests/test_spill.py::test_two_processes_replaying_one_spill_file_add_each_event_once"]),
    # writer.py and writer_waits.py, writer_spill.py, writer_rows.py
    "writer": ("src/llmtally/_storage/writer*",
               ["tests/test_ledger.py", "tests/test_record.py", "tests/test_spill.py",
                "tests/test_hostile_writer.py", "tests/test_mutation_kills.py",
                "tests/test_mutation_kills_writer.py",
                # a replay charges budgets like any write
                "tests/test_budgets_exact.py::test_a_spill_replay_is_charged_once",
                # hostile metadata bounded and cleaned on the writer's thread (writer_rows.py)
                "tests/test_hostile.py",
                # durability="sync" end to end (tests/faults/test_outage.py, a 10 s outage
                # taking 20 s a mutant, is left out: test_mutation_kills_writer.py covers
                # spilling past max_pending and spill_after_s directly)
                "tests/faults/test_durability.py"]),
    "litellm": ("src/llmtally/integrations/litellm*",
                ["tests/test_litellm.py", "tests/test_litellm_budgets.py",
                 "tests/test_litellm_compat.py", "tests/test_mutation_kills.py"]),
    "langchain": ("src/llmtally/integrations/langchain*",
                  ["tests/test_langchain.py", "tests/test_langchain_budgets.py",
                   "tests/test_mutation_kills.py"]),
    # the two integrations' event mapping (hook arguments / LLMResult -> CallEvent), each file
    # alone; two slow tests that check flushing and clean-up, not the mapping, are left out
    "litellm_events": ("src/llmtally/integrations/litellm_events.py",
                       ["tests/test_mutation_kills_integrations.py", "tests/test_litellm.py",
                        "tests/test_hostile.py", "tests/test_mutation_kills.py",
                        "--deselect=tests/test_litellm.py::test_flush_on_a_thread_holding_httpcore_s_pool_lock_returns",
                        "--deselect=tests/test_litellm.py::test_abandoned_streams_leave_nothing_behind"]),
    "langchain_events": ("src/llmtally/integrations/langchain_events.py",
                         ["tests/test_mutation_kills_integrations.py", "tests/test_langchain.py",
                          "tests/test_mutation_kills.py",
                          # runs examples/, which the scratch copy leaves out
                          "--deselect=tests/test_langchain.py::test_the_example_runs_offline"]),
    # the hourly rollups: the fold, the upserts, the sketch, and the reads over them
    "rollups": ("src/llmtally/_storage/rollups.py",
                ["tests/test_rollups.py", "tests/test_report.py", "tests/test_transfer.py"]),
    "sketch": ("src/llmtally/_storage/sketch.py", ["tests/test_rollups.py", "tests/test_report.py"]),
    # a batch as few INSERT statements (SQLite)
    "many_rows": ("src/llmtally/_storage/many_rows.py",
                  ["tests/test_many_rows.py", "tests/test_ledger.py", "tests/test_rollups.py"]),
    # PostgreSQL's batch: COPY through a temporary table, VALUES upserts, the executemany fallback
    "pg_rows": ("src/llmtally/_storage/pg_rows.py",
                ["tests/test_pg_rows.py", "tests/test_rollups.py", "tests/test_hostile_writer.py",
                 "tests/test_transfer.py", "tests/test_ledger.py"]),
    "facts": ("src/llmtally/_reporting/facts.py",
              ["tests/test_rollups.py", "tests/test_report.py", "tests/test_record.py"]),
    # the price-parity sweep (tests/test_price_parity.py, ~30 s) is left out: too slow per mutant
    "pricing": ("src/llmtally/_pricing/*",
                ["tests/test_pricing.py", "tests/test_names.py", "tests/test_common_names.py",
                 "tests/test_mutation_kills.py"]),
}
def _copy_tests(target: Path) -> None:
    """The repository's tests/ at ``target``, replacing what is there."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(ROOT / "tests", target, ignore=shutil.ignore_patterns("__pycache__", ".hypothesis"))


def _existing(tests: list[str]) -> list[str]:
    """A module's test selection without the files this checkout does not have."""
    return [t for t in tests if t.startswith("-") or (ROOT / t.split("::")[0]).exists()]


def _test_env(here: Path) -> dict[str, str]:
    """The environment the module's tests run in: the mutated copy on PYTHONPATH, so the
    subprocesses a test starts import it too (mutmut's own sys.path set-up only reaches the
    test process), and the test PostgreSQL."""
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "PYTHONPATH": str(here / "mutants" / "src")}
    env.setdefault("LLMTALLY_TEST_POSTGRES_URL",
                   "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    return env


def _toml_list(values: list[str]) -> str:
    return json.dumps(values)  # a TOML array of strings is valid JSON


def _scratch_for(name: str, path: str, tests: list[str]) -> Path:
    """A directory with src/, tests/ and a pyproject.toml whose [tool.mutmut] names only
    this module and its tests (mutmut reads its settings from the working directory)."""
    here = SCRATCH / name
    if here.exists():
        shutil.rmtree(here)
    here.mkdir(parents=True)
    shutil.copytree(ROOT / "src", here / "src",
                    ignore=shutil.ignore_patterns("__pycache__"))
    _copy_tests(here / "tests")
    # tests/test_pricing.py runs scripts/update_prices.py from the repository next to tests/
    shutil.copytree(ROOT / "scripts", here / "scripts",
                    ignore=shutil.ignore_patterns("__pycache__"))
    _write_config(here, path, tests)
    return here


def _write_config(here: Path, path: str, tests: list[str]) -> None:
    """The scratch copy's pyproject.toml: pytest's settings, and [tool.mutmut] naming only
    this module and those of its tests that exist."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    settings = dict(project["tool"]["mutmut"])
    settings["only_mutate"] = [path]
    settings["also_copy"] = ["scripts"]
    settings["pytest_add_cli_args_test_selection"] = _existing(tests)
    pytest_options = project["tool"]["pytest"]["ini_options"]
    lines = ["[tool.pytest.ini_options]"]
    for key, value in pytest_options.items():
        lines.append(f"{key} = {json.dumps(value)}")
    lines.append("\n[tool.mutmut]")
    for key, value in settings.items():
        lines.append(f"{key} = {_toml_list(value) if isinstance(value, list) else json.dumps(value)}")
    (here / "pyproject.toml").write_text("\n".join(lines) + "\n")


def _results(here: Path) -> dict[str, str]:
    """mutant name -> status, from mutmut's meta files."""
    from mutmut.stats import status_by_exit_code

    out: dict[str, str] = {}
    for meta in (here / "mutants").rglob("*.py.meta"):
        data = json.loads(meta.read_text())
        for mutant, code in data.get("exit_code_by_key", {}).items():
            out[mutant] = status_by_exit_code[code]
    return out


def run_module(name: str, children: int, *, functions: list[str] | None = None,
               keep: bool = False) -> dict[str, object]:
    path, tests = MODULES[name]
    here = SCRATCH / name
    if keep and (here / "mutants").is_dir():
        # re-run in the same scratch copy (mutmut keeps its test map and verdicts): refresh the
        # tests, so new ones count
        for target in (here / "tests", here / "mutants" / "tests"):
            _copy_tests(target)
        _write_config(here, path, tests)  # tests added since are selected too
    else:
        here = _scratch_for(name, path, tests)
    env = _test_env(here)
    # PYTHONPATH names mutants/src before mutmut creates it: make it now, or the import system
    # caches "no such directory" for that entry and imports the installed llmtally instead
    (here / "mutants" / "src").mkdir(parents=True, exist_ok=True)
    mutmut = Path(sys.executable).with_name("mutmut")
    module = path.removeprefix("src/").removesuffix(".py").replace("/", ".")
    names = [f"{module}.{f}" for f in functions or []]
    started = time.monotonic()
    with open(here / "mutmut.log", "a" if keep else "w") as log:
        code = subprocess.run([str(mutmut), "run", "--max-children", str(children), *names],
                              cwd=here,
                              env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    elapsed = time.monotonic() - started
    results = _results(here)
    counts: dict[str, int] = {}
    for status in results.values():
        counts[status] = counts.get(status, 0) + 1
    killed, survived = counts.get("killed", 0), counts.get("survived", 0)
    timeout = counts.get("timeout", 0)
    tested = killed + survived + timeout
    return {"module": name, "file": path, "exit": code, "seconds": round(elapsed),
            "counts": counts, "score": round(100 * (killed + timeout) / tested, 1) if tested else None,
            "survived": sorted(m for m, s in results.items() if s == "survived"),
            "no_tests": sorted(m for m, s in results.items() if s == "no tests"),
            "log": str(here / "mutmut.log")}


# One pytest process for many mutants: mutmut's trampolines read MUTANT_UNDER_TEST at each
# call, so only the environment changes between runs, and the imports (LiteLLM's take seconds)
# are paid once. "none" first and last: the tests must pass with no mutant.
_RECHECK = """
import os, sys, pytest
tests, names = sys.argv[1:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1:]
for name in ["none", *names, "none"]:
    os.environ["MUTANT_UNDER_TEST"] = name
    code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", "--no-header", *tests])
    print(f"@@ {'survived' if code == 0 else 'killed'} {name}", flush=True)
"""


def recheck(name: str, mutants: list[str]) -> dict[str, str]:
    """Run ``mutants`` (default: those mutmut left survived, with no tests, or not reached) of
    a module already run, each against all of the module's current tests, in one process."""
    tests = MODULES[name][1]
    here = SCRATCH / name
    if not (here / "mutants").is_dir():
        raise SystemExit(f"no scratch copy for {name}: run `python benchmarks/mutation.py {name}` first")
    _copy_tests(here / "mutants" / "tests")
    if not mutants:
        mutants = sorted(m for m, s in _results(here).items()
                         if s in ("survived", "no tests", "not checked"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    run = subprocess.run([sys.executable, "-c", _RECHECK, *project["pytest_add_cli_args"],
                          *_existing(tests), "--", *mutants], cwd=here / "mutants", env=_test_env(here),
                         capture_output=True, text=True)
    verdicts = [line.split()[1:] for line in run.stdout.splitlines() if line.startswith("@@ ")]
    if len(verdicts) != len(mutants) + 2 or verdicts[0] != ["survived", "none"] != verdicts[-1]:
        raise SystemExit(f"the tests do not pass without a mutant (or the run broke):\n{run.stdout[-3000:]}")
    return {mutant: verdict for verdict, mutant in verdicts[1:-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"some of: {', '.join(MODULES)}")
    parser.add_argument("--children", type=int, default=2, help="mutants run in parallel")
    parser.add_argument("--list", action="store_true", help="print the modules and their tests")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--only", nargs="+", metavar="GLOB",
                        help="only the mutants of these functions (mutmut names, e.g. "
                             "'x_seed__mutmut_*' or 'xǁEventChargesǁafter_insert__mutmut_*')")
    parser.add_argument("--keep", action="store_true",
                        help="re-use the module's scratch copy and mutmut's verdicts (with "
                             "--only: re-run those mutants against the current tests)")
    parser.add_argument("--recheck", nargs="*", metavar="MUTANT",
                        help="run these mutants (default: every one mutmut did not kill) of the "
                             "module's last run against its current tests, in one process")
    args = parser.parse_args()
    if args.recheck is not None:
        if len(args.modules) != 1:
            parser.error("--recheck takes exactly one module")
        for mutant, verdict in recheck(args.modules[0], args.recheck).items():
            print(f"{verdict:8} {mutant}")
        return
    if args.list:
        for name, (path, tests) in MODULES.items():
            print(f"{name:13} {path}\n{'':13} {' '.join(tests)}")
        return
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; choose from {', '.join(MODULES)}")
    report = []
    for name in args.modules or list(MODULES):
        result = run_module(name, args.children, functions=args.only, keep=args.keep)
        report.append(result)
        counts = result["counts"]
        print(f"== {name} ({result['file']}): {result['seconds']} s, mutmut exit {result['exit']}")
        print("   " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
              + f"; score {result['score']}% (killed+timeout of tested)")
        for mutant in result["survived"]:
            print(f"   survived: {mutant}")
        for mutant in result["no_tests"]:
            print(f"   no tests: {mutant}")
        print(f"   log: {result['log']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
