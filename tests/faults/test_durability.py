"""``durability="sync"``: ``record()`` returns once its event is committed, or fsync'd in the
spill file while the database is unreachable; how it is configured; what SIGTERM does."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import CLOSED_PORT_URL, call_id_of, fetch_events, require_postgres, reset_litellm_callbacks

from llmtally import Tally
from llmtally._config import load_settings
from llmtally._errors import ConfigError
from llmtally.testing import FakeProvider

from .conftest import worker_env


def test_a_sync_record_is_in_the_ledger_when_it_returns(ledger_url, make_tally):
    tally = make_tally(ledger_url, durability="sync", flush_interval_s=60)  # no timer would help
    for number in range(10):
        event_id = tally.record(model="gpt-4o-mini", provider="openai", input_tokens=number)
        assert event_id in {row["id"] for row in fetch_events(ledger_url)}
    ids: list[str] = []

    def record_many() -> None:
        ids.extend(tally.record(model="gpt-4o-mini", input_tokens=1) for _ in range(50))

    threads = [threading.Thread(target=record_many) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stored = {row["id"] for row in fetch_events(ledger_url)}  # read without any flush()
    assert len(ids) == 400 and set(ids) <= stored
    assert tally._writer.written == 410


def test_a_sync_record_is_fsynced_in_the_spill_file_while_the_database_is_down(tmp_path):
    require_postgres()
    spill = tmp_path / "spill.jsonl"
    with Tally(CLOSED_PORT_URL, price_map="bundled", spill_path=spill, durability="sync") as tally:
        for number in range(5):
            started = time.perf_counter()
            event_id = tally.record(model="gpt-4o-mini", input_tokens=number)
            assert time.perf_counter() - started < 2.0
            assert event_id in {json.loads(line)["id"] for line in spill.read_text().splitlines()}


def test_batched_is_the_default_and_sqlite_syncs_fully_only_in_sync_mode(make_tally, tmp_path):
    batched = make_tally()
    synced = make_tally(f"sqlite:///{tmp_path / 'synced.db'}", durability="sync")
    assert batched.durability == "batched"
    for tally, expected in ((batched, 1), (synced, 2)):  # NORMAL = 1, FULL = 2
        with tally.store.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == expected


def test_durability_is_configured_and_validated(tmp_path):
    with pytest.raises(ConfigError, match="durability='fast'.*\"sync\""):
        Tally(f"sqlite:///{tmp_path / 'x.db'}", durability="fast")
    config = tmp_path / "llmtally.toml"
    config.write_text('durability = "sync"\n')
    assert load_settings(config, environ={})["durability"] == "sync"
    assert load_settings(None, environ={"LLMTALLY_DURABILITY": "SYNC"})["durability"] == "sync"
    assert load_settings(config, environ={"LLMTALLY_DURABILITY": "batched"})["durability"] == "batched"
    config.write_text("durability = true\n")
    with pytest.raises(ConfigError, match=r"llmtally.toml: durability = True is not allowed"):
        load_settings(config, environ={})
    with pytest.raises(ConfigError, match="durability = 'eventually'"):
        load_settings(None, environ={"LLMTALLY_DURABILITY": "eventually"})


def test_guarded_litellm_calls_return_once_their_event_is_durable(make_tally):
    litellm = pytest.importorskip("litellm")
    tally = make_tally(durability="sync", flush_interval_s=60)
    litellm.callbacks = [tally.litellm()]
    try:
        with FakeProvider() as provider:
            args = {"model": "openai/gpt-4o-mini", "api_base": provider.openai_base,
                    "api_key": "sk-x", "messages": [{"role": "user", "content": "hi"}]}
            sync_id = tally.guard(litellm.completion)(**args)._hidden_params["litellm_call_id"]
            assert sync_id in {call_id_of(row) for row in fetch_events(tally.store.url)}

            async def call() -> str:
                response = await tally.guard(litellm.acompletion)(**args)
                return response._hidden_params["litellm_call_id"]

            async_id = asyncio.run(call())
            assert async_id in {call_id_of(row) for row in fetch_events(tally.store.url)}
    finally:
        reset_litellm_callbacks()


def test_sigterm_handler_is_installed_only_where_the_application_has_none(tmp_path):
    script = textwrap.dedent(f"""
        import signal, sys
        mode = sys.argv[1]
        if mode == "app":
            def mine(signum, frame):
                print("the application's handler ran", flush=True)
                sys.exit(0)
            signal.signal(signal.SIGTERM, mine)
        from llmtally import Tally
        tally = Tally("sqlite:///{tmp_path / 'term.db'}", price_map="bundled",
                      spill_path="{tmp_path / 's.jsonl'}")
        print("ours" if signal.getsignal(signal.SIGTERM).__module__ == "llmtally._signals"
              else "theirs", flush=True)
        tally.record(id=f"before-term-{{mode}}", model="gpt-4o-mini", input_tokens=1)
        print("ready", flush=True)
        import time; time.sleep(60)
    """)
    for mode, owner, code in (("default", "ours", -signal.SIGTERM), ("app", "theirs", 0)):
        proc = subprocess.Popen([sys.executable, "-c", script, mode], stdout=subprocess.PIPE,
                                text=True, env=worker_env())
        assert proc.stdout.readline().strip() == owner
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == code
    # Both ways the event was flushed: by llmtally's handler, or by atexit after sys.exit().
    assert {row["id"] for row in fetch_events(f"sqlite:///{tmp_path / 'term.db'}")} == \
        {"before-term-default", "before-term-app"}


def test_aflush_keeps_async_calls_that_finish_as_the_event_loop_ends(make_tally):
    litellm = pytest.importorskip("litellm")
    tally = make_tally(flush_interval_s=60)
    litellm.callbacks = [tally.litellm()]

    async def burst(base: str) -> None:
        for _ in range(25):  # 200 calls, 8 in flight, the last ones ending with the loop
            await asyncio.gather(*(litellm.acompletion(
                model="openai/gpt-4o-mini", api_base=base, api_key="sk-x",
                messages=[{"role": "user", "content": "hi"}]) for _ in range(8)))
        await tally.aflush()

    try:
        with FakeProvider() as provider:
            for runs in (1, 2):
                asyncio.run(burst(provider.openai_base))
                # every call is in the ledger as the loop ends, without another flush()
                assert len(fetch_events(tally.store.url)) == 200 * runs
    finally:
        reset_litellm_callbacks()
