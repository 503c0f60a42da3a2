"""`litellm.callbacks = [tally.litellm()]`: real LiteLLM over real HTTP to the loopback fake provider.

The tests under "LiteLLM facts" pin down what LiteLLM itself does (the integration relies on
each of them); the rest check the ledger rows the integration writes.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import gc
import json
import subprocess
import sys
import threading
import time

import pytest
from conftest import MSGS, fetch_events, ledger_rows, rollups_mismatch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmtally.testing import FakeUsage

litellm = pytest.importorskip("litellm")
from litellm.integrations.custom_logger import CustomLogger  # noqa: E402

from llmtally._events.tokens import count_messages, count_text  # noqa: E402
from llmtally.integrations.litellm import LiteLLMLogger
from llmtally.integrations.litellm_events import litellm_event

REPLY = "Hello from the fake provider."
# gpt-4o-mini, USD per token: input, cached input, output
IN, CACHED, OUT = 0.15e-6, 0.075e-6, 0.6e-6
FAKE_PROVIDER = {"usage": FakeUsage(prompt_tokens=120, completion_tokens=30, cached_tokens=100),
                 "resolved_model": "gpt-4o-mini-2024-07-18", "reply": REPLY}
FAKE_ANTHROPIC = {"usage": FakeUsage(prompt_tokens=100, completion_tokens=50,
                                     cache_creation_tokens=2000, cache_read_tokens=3000)}
REGISTER_LITELLM = True


def _openai(fp, **kw):
    return {"model": "openai/gpt-4o-mini", "api_base": fp.openai_base, "api_key": "sk-test",
            "messages": MSGS, **kw}


def _mini_cost(tally, row):
    return tally.prices.cost(model="gpt-4o-mini", provider="openai",
                             input_tokens=row["input_tokens"], output_tokens=row["output_tokens"],
                             cache_read_tokens=row["cache_read_tokens"]).cost


# -- completions ---------------------------------------------------------------------------


def test_sync_completion_is_recorded_with_tokens_cost_and_latency(tally, provider):
    started = time.perf_counter()
    response = litellm.completion(**_openai(provider))
    wall_ms = (time.perf_counter() - started) * 1000
    [row] = ledger_rows(tally)
    # the event id is our own; LiteLLM's (caller-choosable) call id is kept in the metadata
    assert json.loads(row["metadata"])["litellm_call_id"] == response._hidden_params["litellm_call_id"]
    assert row["id"] != response._hidden_params["litellm_call_id"]
    assert (row["source"], row["provider"], row["model"], row["resolved_model"], row["call_type"],
            row["streamed"], row["status"]) == \
        ("litellm", "openai", "gpt-4o-mini", "gpt-4o-mini-2024-07-18", "chat", False, "ok")
    assert (row["input_tokens"], row["cache_read_tokens"], row["output_tokens"]) == (120, 100, 30)
    assert row["cost"] == pytest.approx(20 * IN + 100 * CACHED + 30 * OUT, abs=1e-12)
    assert row["cost"] == pytest.approx(_mini_cost(tally, row), abs=1e-12)
    assert row["cost_status"] == "priced"
    assert 0 < row["latency_ms"] <= wall_ms and row["ttft_ms"] is None


@pytest.mark.filterwarnings("ignore:The model 'claude-sonnet-4-5' is deprecated")
def test_anthropic_route_cache_tokens_follow_the_ledger_convention(tally, anthropic_provider):
    litellm.completion(model="anthropic/claude-sonnet-4-5", api_base=anthropic_provider.anthropic_base,
                       api_key="sk-test", messages=MSGS)
    [row] = ledger_rows(tally)
    assert (row["provider"], row["model"]) == ("anthropic", "claude-sonnet-4-5")
    # LiteLLM's prompt_tokens already include both cache parts (100 + 2000 + 3000).
    assert (row["input_tokens"], row["cache_write_tokens"], row["cache_read_tokens"],
            row["output_tokens"]) == (5100, 2000, 3000, 50)
    by_hand = 100 * 3e-6 + 2000 * 3.75e-6 + 3000 * 0.3e-6 + 50 * 15e-6
    assert row["cost"] == pytest.approx(by_hand, abs=1e-12)
    assert row["cost"] == pytest.approx(tally.prices.cost(
        model="claude-sonnet-4-5", provider="anthropic", input_tokens=5100, output_tokens=50,
        cache_read_tokens=3000, cache_write_tokens=2000).cost, abs=1e-12)


def test_async_completion_is_in_the_ledger_after_flush(tally, provider):
    started = time.perf_counter()
    asyncio.run(litellm.acompletion(**_openai(provider)))
    wall_ms = (time.perf_counter() - started) * 1000
    [row] = ledger_rows(tally)
    assert (row["input_tokens"], row["output_tokens"], row["status"]) == (120, 30, "ok")
    assert row["cost"] == pytest.approx(20 * IN + 100 * CACHED + 30 * OUT, abs=1e-12)
    assert 0 < row["latency_ms"] <= wall_ms


def test_closing_the_tally_writes_the_async_events_litellm_deferred(tally, provider):
    """``with Tally() as t:`` ends with close(), not flush(): it drains LiteLLM's queue too."""
    asyncio.run(litellm.acompletion(**_openai(provider)))
    tally.close()
    [row] = fetch_events(tally.store.url)
    assert (row["input_tokens"], row["output_tokens"], row["status"]) == (120, 30, "ok")


def test_flush_inside_a_running_event_loop_once_litellm_has_queued_the_event(tally, provider):
    """LiteLLM first schedules a task on the caller's loop that queues the logging; a flush
    that blocks that loop cannot run it, so the loop must have turned once (any await)."""
    async def main():
        await litellm.acompletion(**_openai(provider))
        await asyncio.sleep(0)
        assert tally.flush(10)  # blocks this loop: the queue is drained on a helper thread
        return fetch_events(tally.store.url)

    assert len(asyncio.run(main())) == 1
    asyncio.run(litellm.acompletion(**_openai(provider)))  # LiteLLM still works on a new loop
    assert len(ledger_rows(tally)) == 2


def test_flush_drains_a_loop_running_in_another_thread(tally, provider):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(litellm.acompletion(**_openai(provider)), loop).result(10)
        assert len(ledger_rows(tally)) == 1
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


# -- streams --------------------------------------------------------------------------------


def test_sync_stream_with_usage_is_one_exact_event(tally, provider):
    started = time.perf_counter()
    text = "".join(chunk.choices[0].delta.content or "" for chunk in litellm.completion(
        **_openai(provider, stream=True, stream_options={"include_usage": True})) if chunk.choices)
    assert text == REPLY
    [row] = ledger_rows(tally)
    # LiteLLM stamps a sync stream's end on its logging thread, after the caller's loop ends
    # (how long after depends on the machine's load): the event is in the ledger, so the
    # stamp is before now.
    wall_ms = (time.perf_counter() - started) * 1000
    assert (row["streamed"], row["input_tokens"], row["cache_read_tokens"], row["output_tokens"],
            row["cost_status"]) == (True, 120, 100, 30, "priced")
    assert row["cost"] == pytest.approx(20 * IN + 100 * CACHED + 30 * OUT, abs=1e-12)
    assert 0 < row["ttft_ms"] <= row["latency_ms"] <= wall_ms
    assert rollups_mismatch(tally.database_url) == []


def test_stream_without_usage_is_counted_offline_and_marked_estimated(tally, provider):
    for _ in litellm.completion(**_openai(provider, stream=True)):
        pass
    [row] = ledger_rows(tally)
    expected_in, expected_out = count_messages(MSGS, "gpt-4o-mini"), count_text(REPLY, "gpt-4o-mini")
    assert (row["input_tokens"], row["output_tokens"], row["cost_status"]) == \
        (expected_in, expected_out, "estimated")
    assert row["cost"] == pytest.approx(expected_in * IN + expected_out * OUT, abs=1e-12) and row["cost"] > 0
    assert "counted offline" in json.loads(row["metadata"])["llmtally_estimated"]


@pytest.mark.parametrize("with_usage", [True, False])
def test_async_streams_are_one_event_each(tally, provider, with_usage):
    extra = {"stream_options": {"include_usage": True}} if with_usage else {}

    async def main():
        stream = await litellm.acompletion(**_openai(provider, stream=True, **extra))
        return [chunk async for chunk in stream]

    asyncio.run(main())
    [row] = ledger_rows(tally)
    assert row["streamed"] and 0 < row["ttft_ms"] <= row["latency_ms"]
    if with_usage:
        assert (row["input_tokens"], row["output_tokens"], row["cost_status"]) == (120, 30, "priced")
    else:
        assert (row["output_tokens"], row["cost_status"]) == (count_text(REPLY, "gpt-4o-mini"), "estimated")


@pytest.mark.filterwarnings("ignore:The model 'claude-sonnet-4-5' is deprecated")
def test_anthropic_stream_usage_is_reported_not_estimated(tally, anthropic_provider):
    for _ in litellm.completion(model="anthropic/claude-sonnet-4-5", api_key="sk-test",
                                api_base=anthropic_provider.anthropic_base, messages=MSGS, stream=True):
        pass
    [row] = ledger_rows(tally)
    assert (row["input_tokens"], row["cache_read_tokens"], row["output_tokens"], row["cost_status"]) == \
        (5100, 3000, 50, "priced")


def _abandoned(row):
    meta = json.loads(row["metadata"])
    return meta.get("stream_abandoned") is True


def _consumed_text(chunks):
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def _assert_abandoned_row(row, text, call_id):
    assert json.loads(row["metadata"])["litellm_call_id"] == call_id and _abandoned(row)
    assert (row["streamed"], row["status"], row["cost_status"], row["provider"], row["model"]) == \
        (True, "ok", "estimated", "openai", "gpt-4o-mini")
    assert row["input_tokens"] == count_messages(MSGS, "gpt-4o-mini")
    assert 0 < row["output_tokens"] == count_text(text, "gpt-4o-mini")
    assert row["cost"] == pytest.approx(row["input_tokens"] * IN + row["output_tokens"] * OUT, abs=1e-12)
    assert 0 < row["ttft_ms"] <= row["latency_ms"]


@pytest.mark.parametrize("usage", [True, False])
def test_a_stream_left_with_break_is_recorded_with_the_tokens_seen(tally, provider, usage):
    extra = {"stream_options": {"include_usage": True}} if usage else {}
    stream = litellm.completion(**_openai(provider, stream=True, **extra))
    call_id = stream.logging_obj.litellm_call_id
    seen = []
    for chunk in stream:
        seen.append(chunk)
        if len(seen) == 2:
            break
    text = _consumed_text(seen)
    assert text and text != REPLY
    del stream, chunk  # released: that is when LiteLLM's stream is known to be left (flush collects it)
    [row] = ledger_rows(tally)
    _assert_abandoned_row(row, text, call_id)
    assert json.loads(row["metadata"])["litellm_trace_id"]


def test_closing_a_stream_early_records_it_at_once(tally, provider):
    with litellm.completion(**_openai(provider, stream=True)) as stream:
        first = next(stream)
        keep = stream  # still referenced: close() alone records it
    [row] = ledger_rows(tally)
    _assert_abandoned_row(row, _consumed_text([first]), keep.logging_obj.litellm_call_id)
    keep.close()
    del keep
    assert len(ledger_rows(tally)) == 1


def test_an_abandoned_async_stream_is_recorded_with_scope(tally, provider):
    async def leave():
        stream = await litellm.acompletion(**_openai(provider, stream=True))
        first = await stream.__anext__()
        await stream.aclose()
        return _consumed_text([first]), stream.logging_obj.litellm_call_id

    with tally.scope(project="search", user="alice"):
        text, call_id = asyncio.run(leave())
    [row] = ledger_rows(tally)
    _assert_abandoned_row(row, text, call_id)
    assert (row["project"], row["user"]) == ("search", "alice")


def test_a_cancelled_task_s_stream_is_recorded(tally, provider):
    seen, ids = [], []

    async def consume(started):
        stream = await litellm.acompletion(**_openai(provider, stream=True))
        ids.append(stream.logging_obj.litellm_call_id)
        async for chunk in stream:
            seen.append(chunk)
            started.set()
            await asyncio.sleep(60)  # the caller's own slow work, cancelled below

    async def main():
        started = asyncio.Event()
        task = asyncio.create_task(consume(started))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    gc.collect()
    [row] = ledger_rows(tally)
    _assert_abandoned_row(row, _consumed_text(seen), ids[0])


@pytest.mark.parametrize("mode", ["sync", "async", "sync-closed", "async-closed"])
def test_a_fully_read_stream_is_still_one_normal_event(tally, provider, mode):
    kw = _openai(provider, stream=True, stream_options={"include_usage": True})
    if mode.startswith("sync"):
        stream = litellm.completion(**kw)
        text = _consumed_text(list(stream))
        if mode == "sync-closed":
            stream.close()
    else:
        async def main():
            stream = await litellm.acompletion(**kw)
            chunks = [chunk async for chunk in stream]
            if mode == "async-closed":
                await stream.aclose()
            return stream, _consumed_text(chunks)

        stream, text = asyncio.run(main())
    assert text == REPLY
    del stream
    gc.collect()
    [row] = ledger_rows(tally)
    assert not _abandoned(row)
    assert (row["input_tokens"], row["output_tokens"], row["cost_status"]) == (120, 30, "priced")


@pytest.mark.timeout(120)  # ~15 s; a hang (see below) fails here, not after the suite's 300 s
def test_abandoned_streams_leave_nothing_behind(tally, provider):
    from llmtally.integrations import litellm_streams as integration

    read = {}  # call id -> the text of the one chunk read
    for _ in range(20):
        stream = litellm.completion(**_openai(provider, stream=True))
        read[stream.logging_obj.litellm_call_id] = _consumed_text([next(stream)])
        del stream
        # Collect here: left to a collection that happens to run inside the next request,
        # openai's stream generator closes its response under httpcore's pool lock, which
        # that request holds (a deadlock of openai/httpcore, not of the code under test).
        gc.collect()
    unread = litellm.completion(**_openai(provider, stream=True))  # never read: the prompt was paid
    read[unread.logging_obj.litellm_call_id] = ""
    del unread
    gc.collect()
    rows = ledger_rows(tally)
    assert len(rows) == 21 and len({row["id"] for row in rows}) == 21
    by_call = {json.loads(row["metadata"])["litellm_call_id"]: row for row in rows}
    assert set(by_call) == set(read)
    prompt = count_messages(MSGS, "gpt-4o-mini")
    for call_id, text in read.items():
        row = by_call[call_id]
        assert _abandoned(row) and (row["streamed"], row["status"]) == (True, "ok")
        assert (row["input_tokens"], row["output_tokens"]) == (prompt, count_text(text, "gpt-4o-mini"))
    assert sum(row["output_tokens"] == 0 for row in rows) == sum(text == "" for text in read.values())
    assert tally.litellm()._starts == {}
    assert not [obj for obj in gc.get_objects() if isinstance(obj, integration._StreamState)]


FLUSH_HOLDING_THE_POOL_LOCK = """
import gc, json, sys, time
import litellm
from llmtally import Tally
from llmtally.testing import FakeProvider

with FakeProvider() as fp, Tally(sys.argv[1], price_map="bundled", spill_path=sys.argv[2]) as tally:
    litellm.callbacks = [tally.litellm()]
    stream = litellm.completion(model="openai/gpt-4o-mini", api_base=fp.openai_base,
                                api_key="sk-test", messages=[{"role": "user", "content": "hi"}],
                                stream=True)
    next(stream)
    [pool] = {s._pool for s in gc.get_objects() if type(s).__name__ == "PoolByteStream"}
    gc.disable()  # only flush()'s own collection may free the stream
    del stream  # abandoned, half read: its generator closes its response when it is collected
    with pool._optional_thread_lock:  # held as httpcore holds it while handing out a connection
        started = time.monotonic()
        tally.flush(1)  # a SIGTERM landing in a request runs llmtally's flush right here
        under_lock = time.monotonic() - started
    assert tally.flush(10)
    print(json.dumps({"under_lock_s": under_lock}))
"""


def test_flush_on_a_thread_holding_httpcore_s_pool_lock_returns(tmp_path):
    """flush() collects abandoned streams; the collector runs every finaliser it frees, and an
    abandoned OpenAI stream's takes httpcore's pool lock (not re-entrant). On the flushing
    thread itself (as from the SIGTERM handler inside a request) that waited forever; the
    collection runs on a thread of llmtally's, so flush() keeps its timeout."""
    db = tmp_path / "ledger.db"
    script = tmp_path / "flush_under_lock.py"
    script.write_text(FLUSH_HOLDING_THE_POOL_LOCK)
    done = subprocess.run([sys.executable, str(script), f"sqlite:///{db}", str(tmp_path / "spill")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1])["under_lock_s"] < 1.5 + 3  # timeout 1 s
    [row] = fetch_events(f"sqlite:///{db}")  # collected once the lock was free, recorded once
    assert _abandoned(row) and (row["input_tokens"], row["streamed"]) == (count_messages(
        [{"role": "user", "content": "hi"}], "gpt-4o-mini"), True)


def test_a_stream_the_provider_cuts_is_a_failure_not_an_abandoned_stream(tally, provider):
    provider.cut_stream_after(2)
    with pytest.raises(Exception):  # noqa: B017 - whatever LiteLLM raises for a cut stream
        for _ in litellm.completion(**_openai(provider, stream=True, max_retries=0, num_retries=0)):
            pass
    gc.collect()
    rows = ledger_rows(tally)
    [row] = rows  # the failure, once: not also an abandoned stream when the iterator is collected
    assert not _abandoned(row)
    assert (row["status"], row["error_type"], row["streamed"]) == ("error", "openai.APIConnectionError", 1)
    assert (row["input_tokens"], row["output_tokens"], row["cost"]) == (0, 0, 0.0)


# -- embeddings -----------------------------------------------------------------------------


def test_embeddings_sync_and_async_record_input_tokens_and_cost(tally, provider):
    kw = {"model": "openai/text-embedding-3-small", "input": ["a", "b"],
          "api_base": provider.openai_base, "api_key": "sk-test"}
    litellm.embedding(**kw)
    asyncio.run(litellm.aembedding(**kw))
    rows = ledger_rows(tally)
    assert len(rows) == 2
    for row in rows:
        assert (row["call_type"], row["model"], row["input_tokens"], row["output_tokens"]) == \
            ("embedding", "text-embedding-3-small", 120, 0)
        assert row["cost"] == pytest.approx(120 * 0.02e-6, abs=1e-15)
        assert row["cost"] == pytest.approx(tally.prices.cost(
            model="text-embedding-3-small", provider="openai", input_tokens=120).cost, abs=1e-15)


# -- failures and retries -------------------------------------------------------------------


def _failing_call(provider, status):
    if status == "timeout":
        provider.delay(1.0)
        return _openai(provider, max_retries=0, num_retries=0, timeout=0.2)
    provider.fail_next(1, status=status)
    return _openai(provider, max_retries=0, num_retries=0)


@pytest.mark.parametrize(("status", "error_type"), [
    (500, "litellm.InternalServerError"), (429, "litellm.RateLimitError"),
    (401, "litellm.AuthenticationError"), ("timeout", "litellm.Timeout"),
])
def test_a_failed_call_is_one_error_event_and_the_exception_is_unchanged(
        make_tally, provider, status, error_type):
    with pytest.raises(Exception) as bare:  # the same call without llmtally, for comparison
        litellm.completion(**_failing_call(provider, status))
    provider.reset()
    tally = make_tally()
    litellm.callbacks = [tally.litellm()]
    with pytest.raises(Exception) as tallied:
        litellm.completion(**_failing_call(provider, status))
    assert type(tallied.value) is type(bare.value) and str(tallied.value) == str(bare.value)
    [row] = ledger_rows(tally)
    assert (row["status"], row["error_type"], row["provider"], row["model"]) == \
        ("error", error_type, "openai", "gpt-4o-mini")
    assert (row["input_tokens"], row["cost"]) == (0, 0)


def test_async_failure_is_recorded(tally, provider):
    provider.fail_next(1, status=429)
    with pytest.raises(litellm.RateLimitError):
        asyncio.run(litellm.acompletion(**_openai(provider, max_retries=0, num_retries=0)))
    [row] = ledger_rows(tally)
    assert (row["status"], row["error_type"]) == ("error", "litellm.RateLimitError")


def test_sdk_retries_are_invisible_to_callbacks_so_one_event_is_recorded(tally, provider):
    provider.fail_next(2, status=500)  # the OpenAI client's own retries (2 by default)
    litellm.completion(**_openai(provider))
    provider.fail_next(2, status=500)  # LiteLLM's num_retries
    litellm.completion(**_openai(provider, max_retries=0, num_retries=2))
    assert provider.requests == 6
    rows = ledger_rows(tally)
    assert [row["status"] for row in rows] == ["ok", "ok"]


# -- Router ---------------------------------------------------------------------------------


@pytest.fixture
def router(provider, anthropic_provider):
    return litellm.Router(model_list=[
        {"model_name": "chat", "model_info": {"id": "dep-openai"},
         "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": provider.openai_base,
                            "api_key": "sk-test", "max_retries": 0}},
        {"model_name": "chat", "model_info": {"id": "dep-anthropic"},
         "litellm_params": {"model": "anthropic/claude-sonnet-4-5", "api_key": "sk-test",
                            "api_base": anthropic_provider.anthropic_base}},
    ], num_retries=2)


@pytest.mark.filterwarnings("ignore:The model 'claude-sonnet-4-5' is deprecated")
def test_router_events_name_the_deployment_that_served_them(tally, router, provider,
                                                            anthropic_provider):
    for _ in range(6):
        router.completion(model="chat", messages=MSGS)

    async def main():
        for _ in range(6):
            await router.acompletion(model="chat", messages=MSGS)

    asyncio.run(main())
    rows = ledger_rows(tally)
    assert len(rows) == 12
    served = {("openai", "gpt-4o-mini", "dep-openai"): provider.requests,
              ("anthropic", "claude-sonnet-4-5", "dep-anthropic"): anthropic_provider.requests}
    seen = {key: 0 for key in served}
    for row in rows:
        meta = json.loads(row["metadata"])
        assert meta["model_group"] == "chat"
        seen[(row["provider"], row["model"], meta["deployment_id"])] += 1
    assert seen == served


@pytest.mark.filterwarnings("ignore:The model 'claude-sonnet-4-5' is deprecated")
def test_router_retries_are_one_event_per_attempt_with_one_request_id(tally, router, provider,
                                                                      anthropic_provider):
    provider.fail_next(1, status=500)
    anthropic_provider.fail_next(1, status=500)
    router.completion(model="chat", messages=MSGS)
    rows = ledger_rows(tally)
    attempts = provider.requests + anthropic_provider.requests  # the router picks at random
    assert attempts >= 2 and len(rows) == attempts
    assert sorted(row["status"] for row in rows) == ["error"] * (attempts - 1) + ["ok"]
    assert len({row["id"] for row in rows}) == attempts
    assert len({row["request_id"] for row in rows}) == 1
    assert {json.loads(row["metadata"])["litellm_trace_id"] for row in rows} == {rows[0]["request_id"]}


# -- attribution ----------------------------------------------------------------------------


def test_litellm_metadata_and_user_parameter_attribute_the_call(tally, provider):
    with tally.scope(project="outer", user="scope-user", tags=["scoped"]):
        litellm.completion(**_openai(provider, user="end-user",
                                     metadata={"project": "search", "tags": ["beta", "x"],
                                               "session_id": "s-1"}))
        litellm.completion(**_openai(provider, metadata={"user": "alice"}))
    first, second = ledger_rows(tally)
    assert (first["project"], first["user"], first["session"], json.loads(first["tags"])) == \
        ("search", "end-user", "s-1", ["scoped", "beta", "x"])
    assert (second["project"], second["user"]) == ("outer", "alice")


@pytest.mark.parametrize("mode", ["sync", "sync-stream", "async", "async-stream"])
def test_scope_at_call_time_attributes_every_kind_of_call(tally, provider, mode):
    async def run_async(stream):
        response = await litellm.acompletion(**_openai(provider, stream=stream))
        if stream:
            async for _ in response:
                pass

    with tally.scope(project="search", user="alice", tags=["beta"], request_id="req-1"):
        if mode == "sync":
            litellm.completion(**_openai(provider))
        elif mode == "sync-stream":
            for _ in litellm.completion(**_openai(provider, stream=True)):
                pass
        else:
            asyncio.run(run_async(mode == "async-stream"))
    [row] = ledger_rows(tally)
    assert (row["project"], row["user"], json.loads(row["tags"]), row["request_id"]) == \
        ("search", "alice", ["beta"], "req-1")


# -- exactly once ---------------------------------------------------------------------------


class _CountingLogger(LiteLLMLogger):
    """A second logger of the same Tally that counts the success hooks LiteLLM ran on it. Its
    class name differs, so LiteLLM keeps it beside ``tally.litellm()`` (LiteLLM drops a logger
    whose class and scalar attributes match one it has): both record every call."""

    def __init__(self, tally) -> None:
        super().__init__(tally)
        self.successes = 0

    def log_success_event(self, kwargs, response_obj, start_time, end_time):  # type: ignore[no-untyped-def]
        self.successes += 1
        super().log_success_event(kwargs, response_obj, start_time, end_time)

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):  # type: ignore[no-untyped-def]
        self.successes += 1
        await super().async_log_success_event(kwargs, response_obj, start_time, end_time)


def test_registering_twice_never_records_a_call_twice(tally, provider, tmp_path, caplog):
    assert tally.litellm() is tally.litellm()
    second = _CountingLogger(tally)
    litellm.callbacks = [tally.litellm(), LiteLLMLogger(tally), second]
    litellm.success_callback = [tally.litellm()]
    litellm.completion(**_openai(provider))
    litellm.callbacks = [tally.litellm()]  # re-assigned: the old loggers stay registered
    litellm.completion(**_openai(provider))
    asyncio.run(litellm.acompletion(**_openai(provider)))
    rows = ledger_rows(tally)
    assert second.successes == 3  # each call was handed to two of our loggers: recorded twice
    assert len(rows) == 3 and len({json.loads(row["metadata"])["litellm_call_id"] for row in rows}) == 3
    # stored once by the ledger itself (the event id), not set aside as refused rows
    assert sorted(path.name for path in tmp_path.iterdir() if "spill" in path.name) == []
    assert not [r for r in caplog.records if r.name.startswith("llmtally") and r.levelno >= 30]


def test_a_cache_hit_is_recorded_at_zero_cost(tally, provider):
    for module in ("fastapi", "soundfile"):  # the dev extra has both
        pytest.importorskip(module, reason="litellm 1.110's in-memory cache lookup imports it")
    from litellm.caching.caching import Cache

    litellm.cache = Cache()
    try:
        for _ in range(2):
            litellm.completion(**_openai(provider, caching=True))
    finally:
        litellm.cache = None
    paid, hit = ledger_rows(tally)
    assert provider.requests == 1
    assert paid["cost"] > 0 and hit["cost"] == 0 and json.loads(hit["metadata"])["cache_hit"] is True
    assert rollups_mismatch(tally.database_url) == []


def test_cache_hit_kwarg_becomes_a_zero_cost_flagged_event(make_tally):
    tally = make_tally()
    event = litellm_event({"model": "gpt-4o-mini", "custom_llm_provider": "openai", "cache_hit": True,
                           "litellm_call_id": "c-1"},
                          {"model": "gpt-4o-mini", "usage": {"prompt_tokens": 10, "completion_tokens": 2}},
                          None, None, failed=False)
    tally.record_event(event)
    [row] = ledger_rows(tally)
    assert (row["input_tokens"], row["cost"], json.loads(row["metadata"])["cache_hit"]) == (10, 0, True)


# -- hooks ------------------------------------------------------------------------------------


HOOKS = ("log_pre_api_call", "log_success_event", "log_failure_event", "async_log_success_event",
         "async_log_failure_event")


def _count_hooks(logger):
    counts = dict.fromkeys(HOOKS, 0)
    for name in HOOKS:
        original = getattr(logger, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        if asyncio.iscoroutinefunction(original):
            async def counting_async(*args, _counting=counting, **kwargs):
                return await _counting(*args, **kwargs)
            setattr(logger, name, functools.wraps(original)(counting_async))
        else:
            setattr(logger, name, functools.wraps(original)(counting))
    return counts


def test_each_hook_fires_on_a_real_call_and_records(tally, provider):
    counts = _count_hooks(tally.litellm())
    litellm.completion(**_openai(provider))
    provider.fail_next(1, status=500)
    with pytest.raises(litellm.InternalServerError):
        litellm.completion(**_openai(provider, max_retries=0, num_retries=0))

    async def main():
        await litellm.acompletion(**_openai(provider))
        provider.fail_next(1, status=500)
        with pytest.raises(litellm.InternalServerError):
            await litellm.acompletion(**_openai(provider, max_retries=0, num_retries=0))

    asyncio.run(main())
    rows = ledger_rows(tally)  # rows exist only if the hooks' own code ran
    assert sorted(row["status"] for row in rows) == ["error", "error", "ok", "ok"]
    assert counts == {"log_pre_api_call": 4, "log_success_event": 1, "log_failure_event": 1,
                      "async_log_success_event": 1, "async_log_failure_event": 1}


# -- odd input never breaks a call ----------------------------------------------------------


_junk = st.recursive(
    st.none() | st.booleans() | st.integers(-10**15, 10**15) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10)
_usage = st.fixed_dictionaries({}, optional={
    key: _junk for key in ("prompt_tokens", "completion_tokens", "prompt_tokens_details",
                           "completion_tokens_details", "cache_creation_input_tokens")})
_kwargs = st.fixed_dictionaries({}, optional={
    "model": _junk, "custom_llm_provider": _junk, "litellm_call_id": _junk, "call_type": _junk,
    "stream": _junk, "cache_hit": _junk, "exception": _junk | st.just(ValueError("x")),
    "messages": _junk, "input": _junk, "user": _junk, "completion_start_time": _junk,
    "litellm_params": st.fixed_dictionaries({}, optional={"metadata": _junk, "model_info": _junk})})
_response = _junk | st.fixed_dictionaries({}, optional={"usage": _usage | _junk, "model": _junk,
                                                        "choices": _junk})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kwargs=_kwargs | _junk, response=_response, start=_junk, end=_junk, failed=st.booleans())
def test_litellm_event_tolerates_any_shape(make_tally, kwargs, response, start, end, failed):
    event = litellm_event(kwargs, response, start, end, failed=failed)
    assert isinstance(event.model, str) and event.status in ("ok", "error")
    assert all(type(getattr(event.usage, name)) is int and getattr(event.usage, name) >= 0
               for name in ("input_tokens", "output_tokens", "cache_read_tokens",
                            "cache_write_tokens"))


def test_hooks_swallow_every_fault(make_tally, monkeypatch, provider):
    tally = make_tally()
    logger = tally.litellm()
    for junk in (None, 42, "x", {"litellm_call_id": object()}, {"litellm_params": 5}):
        logger.log_pre_api_call(None, None, junk)
        logger.log_success_event(junk, object(), None, None)
        logger.log_failure_event(junk, None, 1, "x")
        asyncio.run(logger.async_log_success_event(junk, junk, junk, junk))
        asyncio.run(logger.async_log_failure_event(junk, junk, junk, junk))

    def broken(*args, **kwargs):
        raise RuntimeError("ledger on fire")

    monkeypatch.setattr(tally, "record", broken)
    litellm.callbacks = [logger]
    response = litellm.completion(**_openai(provider))
    assert response.choices[0].message.content == REPLY


def test_odd_responses_from_the_provider_still_record(tally, provider):
    provider.usage = FakeUsage(prompt_tokens=-3, completion_tokens=0)
    litellm.completion(**_openai(provider))
    [row] = ledger_rows(tally)
    # a negative count is no count: 0, priced at 0
    assert (row["status"], row["input_tokens"], row["output_tokens"], row["cost"], row["cost_status"]) == \
        ("ok", 0, 0, 0, "priced")


def test_litellm_missing_is_a_clear_error(make_tally, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "litellm", None)
    with pytest.raises(ImportError, match=r'pip install "llmtally\[litellm\]"'):
        make_tally().litellm()


# -- LiteLLM facts the integration relies on (litellm 1.110) --------------------------------


_probe_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("probe", default=None)


class _Probe(CustomLogger):
    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, str | None, str]] = []

    def log_pre_api_call(self, model, messages, kwargs):
        self.seen.append(("pre", _probe_var.get(), threading.current_thread().name))

    def log_success_event(self, kwargs, response_obj, start_time, end_time):
        self.seen.append(("success", _probe_var.get(), threading.current_thread().name))

    async def async_log_pre_api_call(self, model, messages, kwargs):
        self.seen.append(("async_pre", _probe_var.get(), threading.current_thread().name))

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        self.seen.append(("async_success", _probe_var.get(), threading.current_thread().name))


def _wait_for(predicate, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_fact_sync_hooks_run_off_thread_and_streams_lose_the_context(provider):
    probe = _Probe()
    litellm.callbacks = [probe]
    _probe_var.set("caller")
    litellm.completion(**_openai(provider))
    for _ in litellm.completion(**_openai(provider, stream=True)):
        pass
    _wait_for(lambda: len(probe.seen) == 4)
    pre_threads = {thread for name, _, thread in probe.seen if name == "pre"}
    plain, streamed = [(value, thread) for name, value, thread in probe.seen if name == "success"]
    assert pre_threads == {threading.current_thread().name}
    assert plain[1] != threading.current_thread().name and streamed[1] != threading.current_thread().name
    plain, streamed = plain[0], streamed[0]
    assert (plain, streamed) == ("caller", None)  # why the logger captures scope in log_pre_api_call


def test_fact_async_calls_run_sync_pre_hook_and_defer_the_success_hook(provider):
    probe = _Probe()
    litellm.callbacks = [probe]
    asyncio.run(litellm.acompletion(**_openai(provider)))
    assert [name for name, _, _ in probe.seen] == ["pre"]  # success still queued after the loop ended
    from llmtally.integrations.litellm_drain import drain_logging_worker

    drain_logging_worker(5)
    assert [name for name, _, _ in probe.seen] == ["pre", "async_success"]


def test_fact_streams_without_usage_carry_litellm_estimate_not_zero(provider):
    class Usages(CustomLogger):
        usages: list = []

        def log_success_event(self, kwargs, response_obj, start_time, end_time):
            self.usages.append(response_obj.usage.completion_tokens)

    litellm.callbacks = [Usages()]
    for _ in litellm.completion(**_openai(provider, stream=True)):
        pass
    _wait_for(lambda: Usages.usages)
    assert Usages.usages and Usages.usages[0] > 0  # NOTES said 0 on 1.106; 1.110 estimates


# -- the ledger fails: the user's calls do not -----------------------------------------------


def test_calls_succeed_while_the_ledger_is_down_and_the_events_wait_in_the_spill_file(
        make_tally, provider, tmp_path, caplog):
    import json
    import logging

    pytest.importorskip("psycopg")
    caplog.set_level(logging.WARNING, logger="llmtally")
    spill = tmp_path / "down.jsonl"
    tally = make_tally("postgresql+psycopg://postgres@127.0.0.1:1/test", spill_path=spill)
    litellm.callbacks = [tally.litellm()]
    responses = [litellm.completion(**_openai(provider)) for _ in range(5)]
    assert all(r.choices[0].message.content == REPLY for r in responses)
    assert tally.flush(20)  # durable: in the spill file, since the database is unreachable
    rows = [json.loads(line) for line in spill.read_text().splitlines()]
    assert sorted(r["metadata"]["litellm_call_id"] for r in rows) == \
        sorted(r._hidden_params["litellm_call_id"] for r in responses)
    assert len({r["id"] for r in rows}) == 5
    assert all(r["input_tokens"] == 120 and r["source"] == "litellm" for r in rows)
    outage_logs = [r for r in caplog.records if "cannot write to the ledger" in r.getMessage()]
    assert len(outage_logs) == 1  # once per interval, not once per call
