"""The spill file under faults, beyond tests/test_spill.py (corrupted last line, replayed twice,
two replayers at once, a dead replayer's claim): a replay killed halfway, and appends racing a
replay in another process — no event lost, none twice."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import CLOSED_PORT_URL, fetch_events, require_postgres

from .conftest import wait_until, worker_env


def _python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=worker_env())


def _spill_events(spill, count: int) -> list[str]:
    """``count`` events in ``spill``, written by a process whose ledger is unreachable."""
    proc = _python(f"""
        import json
        from llmtally import Tally
        tally = Tally({CLOSED_PORT_URL!r}, price_map="bundled", spill_path={str(spill)!r})
        ids = [tally.record(model="gpt-4o-mini", provider="openai", input_tokens=i)
               for i in range({count})]
        assert tally.flush(60)
        print(json.dumps(ids))
    """)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out)


@pytest.mark.slow
def test_a_replay_killed_halfway_is_finished_by_the_next_process_once(sqlite_url, tmp_path):
    require_postgres()  # the unreachable ledger's URL needs psycopg
    spill = tmp_path / "spill.jsonl"
    ids = _spill_events(spill, 30_000)
    with open(spill, "ab") as handle:
        handle.write(b'{"id": "cut-by-a-power-failure", "ts": "2026-')  # a torn last line
    replayer = _python(f"""
        from llmtally import Tally
        Tally({sqlite_url!r}, price_map="bundled", spill_path={str(spill)!r}, batch_size=500)
        import time; time.sleep(60)
    """)
    try:
        # kill it once part of the backlog is in the ledger, the rest not yet
        assert wait_until(lambda: (tmp_path / "ledger.db").exists() and
                          0 < _count(sqlite_url) < len(ids), timeout=60, interval=0.005)
        replayer.send_signal(signal.SIGKILL)
        replayer.communicate(timeout=30)
    finally:
        if replayer.poll() is None:
            replayer.kill()
    halfway = _count(sqlite_url)
    assert 0 < halfway < len(ids)
    claims = list(tmp_path.glob("spill.jsonl.replaying.*"))
    assert len(claims) == 1  # the dead replayer's claim is left behind
    for _ in range(2):  # the next process takes the claim over; a second one finds nothing
        proc = _python(f"""
            from llmtally import Tally
            with Tally({sqlite_url!r}, price_map="bundled", spill_path={str(spill)!r}) as tally:
                assert tally.flush(60)
        """)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    rows = fetch_events(sqlite_url)
    assert len(rows) == len(ids) and sorted(r["id"] for r in rows) == sorted(ids)
    assert sum(r["input_tokens"] for r in rows) == sum(range(len(ids)))
    assert not list(tmp_path.glob("spill.jsonl*"))
    print(f"\nreplay killed after {halfway:,} of {len(ids):,} events; finished by the next process")


def _count(url: str) -> int:
    try:
        return len(fetch_events(url))
    except Exception:  # the schema is being created
        return 0


@pytest.mark.slow
def test_appends_racing_replays_in_other_processes_lose_nothing(sqlite_url, tmp_path):
    require_postgres()
    spill = tmp_path / "spill.jsonl"
    spiller = _python(f"""
        import json
        from llmtally import Tally
        tally = Tally({CLOSED_PORT_URL!r}, price_map="bundled", spill_path={str(spill)!r})
        ids = []
        for i in range(1500):   # each flush() appends what is queued to the spill file
            ids.append(tally.record(model="gpt-4o-mini", provider="openai", input_tokens=1))
            if i % 3 == 0:
                assert tally.flush(30)
        assert tally.flush(30)
        print(json.dumps(ids))
    """)
    replay = f"""
        import sys, time
        from llmtally import Tally
        tally = Tally({sqlite_url!r}, price_map="bundled", spill_path={str(spill)!r})
        deadline = time.monotonic() + float(sys.argv[1])
        while time.monotonic() < deadline:   # replay whatever is there, again and again
            tally.flush(30)
        tally.close()
    """
    replayers = [_python(replay, "25") for _ in range(2)]
    out, err = spiller.communicate(timeout=180)
    assert spiller.returncode == 0, err
    ids = json.loads(out)
    for proc in replayers:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    final = _python(f"""
        from llmtally import Tally
        with Tally({sqlite_url!r}, price_map="bundled", spill_path={str(spill)!r}) as tally:
            assert tally.flush(60)
    """)
    _, err = final.communicate(timeout=120)
    assert final.returncode == 0, err
    time.sleep(0.1)
    rows = fetch_events(sqlite_url)
    assert sorted(r["id"] for r in rows) == sorted(ids)  # every event, once
    assert not list(tmp_path.glob("spill.jsonl*"))
