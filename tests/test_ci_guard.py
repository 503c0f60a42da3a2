"""tests/_ci_guard.py on small test files, each run by a pytest of its own (a subprocess): under
CI=true a skip fails unless ALLOWED_SKIPS names it; a timeout that fired fails even when the
test swallowed it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

CONFTEST = '''
import os

from _ci_guard import AllowedSkip, install

ALLOWED = [AllowedSkip("test_skips.py::test_allowed", r"no frobnicator here", "frobnicators are optional")]


def pytest_configure(config):
    if not os.environ.get("WITHOUT_GUARD"):
        install(config, ALLOWED, enforce_skips=os.environ.get("CI") == "true")
'''

SKIPS = '''
import gc
import time

import pytest


def test_allowed():
    pytest.skip("no frobnicator here")


def test_allowed_name_but_another_reason():
    pytest.skip("no frobnicator here either")


def test_not_listed():
    pytest.skip("some module is missing")


@pytest.fixture
def needs_something():
    pytest.skip("the fixture found nothing")


def test_skipped_by_its_fixture(needs_something):
    pass


@pytest.mark.skipif(True, reason="a marker")
def test_skipif():
    pass


def test_runs():
    pass


class Slow:
    def __del__(self):
        time.sleep(5)  # the timeout fires in here: Python reports the Timeout and moves on


@pytest.mark.timeout(1)
def test_timeout_swallowed_by_a_finaliser():
    slow = Slow()
    slow.cycle = slow
    del slow
    gc.collect()


class Faulty:
    def __del__(self):
        raise ValueError("an ordinary fault in a finaliser")


def test_another_unraisable_stays_a_warning():
    Faulty()
'''

MODULE_SKIP = '''
import pytest

pytest.importorskip("a_module_that_is_not_installed")


def test_never_collected():
    pass
'''


def _pytest(tmp_path: Path, ci: bool, *args: str, guard: bool = True) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    if ci:
        env["CI"] = "true"
    if not guard:
        env["WITHOUT_GUARD"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # only pytest-timeout (-p below): a quick start
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "pytest_timeout", "-p", "no:cacheprovider", "-rA", "--rootdir", str(tmp_path),
         "-o", "addopts=", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout + done.stderr


NO_WARNING = ("-W", "ignore::pytest.PytestUnraisableExceptionWarning")  # the guard alone


def _outcomes(output: str) -> dict[str, str]:
    """test name -> PASSED / FAILED / SKIPPED / ERROR, from the -rA summary."""
    found = {}
    for line in output.splitlines():
        match = re.match(r"(PASSED|FAILED|ERROR) \S+::(\w+)", line)
        if match:
            found[match.group(2)] = match.group(1)
        match = re.match(r"SKIPPED \[\d+\] \S+: .*", line)
        if match:
            found.setdefault("SKIPPED", "")
            found["SKIPPED"] += line + "\n"
    return found


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_skips.py").write_text(textwrap.dedent(SKIPS))
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    return tmp_path


def test_under_ci_only_listed_skips_pass_and_a_swallowed_timeout_fails(project):
    status, output = _pytest(project, True, "test_skips.py", *NO_WARNING)
    outcomes = _outcomes(output)
    assert status == 1, output
    assert {name: outcomes.get(name) for name in (
        "test_allowed_name_but_another_reason", "test_not_listed", "test_skipped_by_its_fixture",
        "test_skipif", "test_runs", "test_timeout_swallowed_by_a_finaliser")} == {
        "test_allowed_name_but_another_reason": "FAILED", "test_not_listed": "FAILED",
        "test_skipped_by_its_fixture": "ERROR", "test_skipif": "ERROR", "test_runs": "PASSED",
        "test_timeout_swallowed_by_a_finaliser": "FAILED"}, output
    assert "test_allowed" not in outcomes and "no frobnicator here" in outcomes["SKIPPED"]
    assert "CI=true and this was skipped (Skipped: some module is missing)" in output
    assert "pytest-timeout fired (>1.0 s) during call" in output
    assert "test_skips.py::test_allowed: frobnicators are optional" in output  # the summary
    assert re.search(r"3 failed, 2 passed, 1 skipped, 2 errors", output), output  # errors: setup


def test_under_ci_a_module_skipped_at_collection_fails_the_run(project):
    status, output = _pytest(project, True, "test_module_skip.py", "test_skips.py", *NO_WARNING)
    assert status != 0, output
    assert "ERROR test_module_skip.py" in output
    assert "a_module_that_is_not_installed" in output and "ALLOWED_SKIPS" in output


def test_without_ci_skips_are_skips_but_a_swallowed_timeout_still_fails(project):
    status, output = _pytest(project, False, "test_module_skip.py", "test_skips.py", *NO_WARNING)
    outcomes = _outcomes(output)
    assert status == 1, output
    assert outcomes.get("test_timeout_swallowed_by_a_finaliser") == "FAILED"
    assert re.search(r"1 failed, 2 passed, 6 skipped", output), output


def test_the_suite_s_own_run_uses_the_guard(pytestconfig):
    guard = pytestconfig.pluginmanager.get_plugin("llmtally-ci-guard")
    from conftest import ALLOWED_SKIPS, IN_CI

    assert guard is not None and guard.allowed == tuple(ALLOWED_SKIPS)
    assert guard.enforce_skips is IN_CI


def test_the_warning_filter_alone_fails_a_timeout_raised_in_a_finaliser_and_only_that(project):
    """pyproject's filter, without the guard: the Timeout's unraisable warning is an error,
    another finaliser's fault stays a warning (the LiteLLM LoggingWorker ignore still works)."""
    import tomllib

    ini = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert any("pytest-timeout" in line for line in ini["filterwarnings"])
    (project / "pytest.ini").write_text(  # the suite's filters, verbatim (-W would escape them)
        "[pytest]\nfilterwarnings =\n" + "".join(f"    {line}\n" for line in ini["filterwarnings"]))
    status, output = _pytest(project, False, "-c", "pytest.ini", "test_skips.py", guard=False)
    outcomes = _outcomes(output)
    assert status == 1, output
    assert (outcomes.get("test_timeout_swallowed_by_a_finaliser"),
            outcomes.get("test_another_unraisable_stays_a_warning")) == ("FAILED", "PASSED"), output
    assert "Timeout (>1.0s) from pytest-timeout" in output
