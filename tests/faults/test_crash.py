"""A worker process making real LiteLLM calls is killed mid-run. After each call returned, the
worker wrote its id and the time to a side file: that is what the application saw complete.

- SIGKILL with ``durability="sync"`` (calls through ``tally.guard``): no completed call missing.
- SIGKILL with the default batched writer: only calls that completed within
  ``LOSS_BOUND_S`` of the kill may be missing (the README states this bound).
- SIGTERM (default action) and a normal exit without flush()/close(): nothing missing.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import call_id_of, fetch_events, rollups_mismatch

from llmtally.testing import FakeProvider

from .conftest import WORKER, wait_until, worker_env

pytest.importorskip("litellm")

LOSS_BOUND_S = 1.0  # batched mode: the README's bound on what a SIGKILL can lose
CALLS_BEFORE_KILL = 200


def _url(backend: str, request: pytest.FixtureRequest, tmp_path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'crash.db'}"
    return request.getfixturevalue("pg_url")


def _start(url: str, tmp_path, base: str, durability: str, **extra) -> subprocess.Popen:
    config = {"mode": "loop", "url": url, "base": base, "spill": str(tmp_path / "spill.jsonl"),
              "side": str(tmp_path / "side.txt"), "threads": 4, "durability": durability, **extra}
    return subprocess.Popen([sys.executable, str(WORKER), json.dumps(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=worker_env())


def _completed(tmp_path) -> list[tuple[str, float]]:
    """The calls the application saw return: (id, when), complete lines only."""
    side = tmp_path / "side.txt"
    if not side.exists():
        return []
    out = []
    for line in side.read_text().split("\n")[:-1]:
        call_id, _, when = line.partition(" ")
        out.append((call_id, float(when)))
    return out


def _run_until_killed(url, tmp_path, durability, sig) -> tuple[list[tuple[str, float]], float, int]:
    with FakeProvider() as provider:
        proc = _start(url, tmp_path, provider.openai_base, durability)
        try:
            assert wait_until(lambda: len(_completed(tmp_path)) >= CALLS_BEFORE_KILL, timeout=90,
                              interval=0.02), proc.stderr.read() if proc.poll() is not None else "slow"
            killed_at = time.time()
            proc.send_signal(sig)
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    return _completed(tmp_path), killed_at, proc.returncode


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_sigkill_with_sync_durability_loses_no_completed_call(backend, request, tmp_path):
    url = _url(backend, request, tmp_path)
    completed, _, code = _run_until_killed(url, tmp_path, "sync", signal.SIGKILL)
    assert code == -signal.SIGKILL
    stored = {call_id_of(row) for row in fetch_events(url)}
    missing = [call_id for call_id, _ in completed if call_id not in stored]
    assert len(completed) >= CALLS_BEFORE_KILL and missing == []
    print(f"\nsync {backend}: {len(completed)} completed calls before SIGKILL, 0 missing, "
          f"{len(stored) - len(completed)} more recorded than seen returning")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_sigkill_with_batched_writes_loses_at_most_the_last_second(backend, request, tmp_path):
    url = _url(backend, request, tmp_path)
    completed, killed_at, code = _run_until_killed(url, tmp_path, "batched", signal.SIGKILL)
    assert code == -signal.SIGKILL
    stored = {call_id_of(row) for row in fetch_events(url)}
    lost_ages = [killed_at - when for call_id, when in completed if call_id not in stored]
    assert len(completed) >= CALLS_BEFORE_KILL
    assert all(age <= LOSS_BOUND_S for age in lost_ages), sorted(lost_ages)[-5:]
    assert rollups_mismatch(url) == []  # a killed writer's transaction left both or neither
    print(f"\nbatched {backend}: {len(completed)} completed, {len(lost_ages)} lost to SIGKILL, "
          f"the oldest completed {max(lost_ages, default=0) * 1000:.0f} ms before the kill")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_sigterm_flushes_everything_completed_before_it(backend, request, tmp_path):
    url = _url(backend, request, tmp_path)
    completed, term_at, code = _run_until_killed(url, tmp_path, "batched", signal.SIGTERM)
    assert code == -signal.SIGTERM  # still dies of SIGTERM, as without llmtally
    stored = {call_id_of(row) for row in fetch_events(url)}
    before = [call_id for call_id, when in completed if when < term_at]
    assert len(before) >= CALLS_BEFORE_KILL
    assert [call_id for call_id in before if call_id not in stored] == []
    assert not (tmp_path / "spill.jsonl").exists()


@pytest.mark.slow
def test_a_normal_exit_without_flush_keeps_every_call(tmp_path):
    url = f"sqlite:///{tmp_path / 'exit.db'}"
    with FakeProvider() as provider:
        proc = _start(url, tmp_path, provider.openai_base, "batched", stop_after=300)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    completed = [call_id for call_id, _ in _completed(tmp_path)]
    assert len(completed) == 300
    assert sorted(call_id_of(row) for row in fetch_events(url)) == sorted(completed)
