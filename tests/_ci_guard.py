"""A green run means every test ran, and ran to its end in time.

- Under ``CI=true`` a skipped test fails, and so does a module skipped at collection (a
  module-level ``pytest.importorskip``), unless an entry of the allowlist names the test, the
  skip's message and why it may skip (``ALLOWED_SKIPS`` in tests/conftest.py).
- Always: a test whose pytest-timeout fired fails, even when the ``Timeout`` exception never
  reached pytest (raised inside a finaliser or a ``__del__`` it is only an "unraisable"
  warning, and the test would count as passed).

Registered by tests/conftest.py (``install``); tests/test_ci_guard.py runs it on small test
files in a pytest of their own.
"""

from __future__ import annotations

import fnmatch
import re
import signal
from collections.abc import Iterable
from dataclasses import dataclass

import pytest

_TIMEOUT_FIRED = pytest.StashKey[float]()
_TIMEOUT_REPORTED = pytest.StashKey[bool]()


@dataclass(frozen=True)
class AllowedSkip:
    """A skip CI accepts: tests whose node id matches ``nodeid`` (fnmatch) skipping with a
    message that matches ``message`` (a regex, searched), for the reason ``why``."""

    nodeid: str
    message: str
    why: str

    def allows(self, nodeid: str, message: str) -> bool:
        return fnmatch.fnmatchcase(nodeid, self.nodeid) and re.search(self.message, message) is not None


def _skip_message(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: ...")
        return str(longrepr[2])
    return str(longrepr)


class CIGuard:
    def __init__(self, allowed: Iterable[AllowedSkip], enforce_skips: bool) -> None:
        self.allowed = tuple(allowed)
        self.enforce_skips = enforce_skips
        self.allowed_seen: dict[str, str] = {}  # node id -> why, for the closing summary

    # -- skips -------------------------------------------------------------------------------

    def _refuse(self, report: pytest.CollectReport | pytest.TestReport) -> None:
        message = _skip_message(report)
        for entry in self.allowed:
            if entry.allows(report.nodeid, message):
                self.allowed_seen[report.nodeid] = entry.why
                return
        report.outcome = "failed"
        report.longrepr = (f"CI=true and this was skipped ({message}); a skip under CI must be "
                           "on ALLOWED_SKIPS in tests/conftest.py, with the reason why")

    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(self, collector: pytest.Collector):  # type: ignore[no-untyped-def]
        report = yield
        if self.enforce_skips and report.skipped:  # e.g. a module-level importorskip
            self._refuse(report)
        return report

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
        report = yield
        fired = item.stash.get(_TIMEOUT_FIRED, None)
        if fired is not None and not item.stash.get(_TIMEOUT_REPORTED, False):
            item.stash[_TIMEOUT_REPORTED] = True
            if not report.failed:  # the Timeout was swallowed on its way (see the docstring)
                report.outcome = "failed"
                report.longrepr = (f"pytest-timeout fired (>{fired} s) during {report.when}, but "
                                   "its Timeout never reached pytest (raised inside a finaliser, "
                                   "__del__ or an except BaseException): the test hung")
                return report
        if self.enforce_skips and report.skipped and not hasattr(report, "wasxfail"):
            self._refuse(report)
        return report

    def pytest_terminal_summary(self, terminalreporter) -> None:  # type: ignore[no-untyped-def]
        if self.allowed_seen:
            terminalreporter.section("skips CI allows (ALLOWED_SKIPS)", sep="-")
            for nodeid, why in sorted(self.allowed_seen.items()):
                terminalreporter.line(f"{nodeid}: {why}")

    # -- timeouts ----------------------------------------------------------------------------

    @pytest.hookimpl(wrapper=True, optionalhook=True)
    def pytest_timeout_set_timer(self, item: pytest.Item, settings):  # type: ignore[no-untyped-def]
        """Note on the item when pytest-timeout's alarm goes off (method "signal"; the "thread"
        method ends the whole process with exit status 1, which fails the run anyway)."""
        result = yield
        handler = signal.getsignal(signal.SIGALRM) if hasattr(signal, "SIGALRM") else None
        if callable(handler):
            def noting(signum, frame):  # type: ignore[no-untyped-def]
                item.stash[_TIMEOUT_FIRED] = settings.timeout
                return handler(signum, frame)

            signal.signal(signal.SIGALRM, noting)
        return result


def install(config: pytest.Config, allowed: Iterable[AllowedSkip], enforce_skips: bool) -> CIGuard:
    guard = CIGuard(allowed, enforce_skips)
    config.pluginmanager.register(guard, "llmtally-ci-guard")
    return guard
