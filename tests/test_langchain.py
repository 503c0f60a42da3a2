"""`config={"callbacks": [tally.langchain()]}`: real LangChain models over real HTTP to the fake provider.

Chat models are langchain-openai's ``ChatOpenAI`` and langchain-anthropic's ``ChatAnthropic``
(plus ``OpenAI`` for legacy text completion, ``OpenAIEmbeddings`` and langchain-litellm's
``ChatLiteLLM``), each pointed at the loopback :class:`~llmtally.testing.FakeProvider`. Handler
methods are called directly only for input LangChain itself never sends (the "bad input" part).
Costs are checked against prices read off LiteLLM's price map by hand.
"""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import fetch_events, ledger_rows, reset_litellm_callbacks, rollups_mismatch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmtally.testing import FakeProvider, FakeToolCall, FakeUsage

pytest.importorskip("langchain_core")
langchain_openai = pytest.importorskip("langchain_openai")
import openai  # noqa: E402
from langchain_core.callbacks import UsageMetadataCallbackHandler  # noqa: E402
from langchain_core.embeddings import Embeddings  # noqa: E402
from langchain_core.language_models import BaseChatModel  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.outputs import ChatGeneration, ChatResult, Generation, LLMResult  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_core.runnables import RunnableLambda, RunnableParallel, chain  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langchain_openai import ChatOpenAI, OpenAI, OpenAIEmbeddings  # noqa: E402

from llmtally._events.tokens import count_messages, count_text  # noqa: E402
from llmtally.integrations.langchain import LangChainHandler
from llmtally.integrations.langchain_embeddings import TalliedEmbeddings

REPLY = "Hello from the fake provider."
PROMPT = "Say hello to the ledger, please."
# gpt-4o-mini, USD per token (LiteLLM's map): input, cached input, output (reasoning: output rate)
IN, CACHED, OUT = 0.15e-6, 0.075e-6, 0.6e-6
MINI_COST = 20 * IN + 100 * CACHED + 30 * OUT  # 120 prompt incl. 100 cached, 30 out incl. 10 reasoning
# claude-sonnet-4-5: input, cache write (5 min), cache read, output
S_IN, S_WRITE, S_READ, S_OUT = 3e-6, 3.75e-6, 0.3e-6, 15e-6
# gpt-3.5-turbo-instruct and text-embedding-3-small
INSTRUCT_IN, INSTRUCT_OUT, EMBED_IN = 1.5e-6, 2e-6, 0.02e-6


FAKE_PROVIDER = {"usage": FakeUsage(prompt_tokens=120, completion_tokens=30, cached_tokens=100,
                                     reasoning_tokens=10),
                 "resolved_model": "gpt-4o-mini-2024-07-18", "reply": REPLY}
FAKE_ANTHROPIC = {"usage": FakeUsage(prompt_tokens=100, completion_tokens=50,
                                     cache_creation_tokens=2000, cache_read_tokens=3000),
                  "reply": REPLY}


@pytest.fixture
def handler(tally):
    return tally.langchain()


def _chat(fp: FakeProvider, **kw: Any) -> ChatOpenAI:
    return ChatOpenAI(model="gpt-4o-mini", base_url=fp.openai_base, api_key="sk-test",
                      max_retries=0, **kw)


def _claude(fp: FakeProvider, **kw: Any):
    from langchain_anthropic import ChatAnthropic

    return ChatAnthropic(model="claude-sonnet-4-5", base_url=fp.anthropic_base, api_key="sk-test",
                         max_retries=0, **kw)


def _json(value: Any) -> Any:
    """A JSON column as read back: text on SQLite, already decoded on PostgreSQL."""
    return json.loads(value) if isinstance(value, str) else value


def _meta(row: dict) -> dict:
    return _json(row["metadata"]) or {}


def _tags(row: dict) -> list[str]:
    return _json(row["tags"]) or []


def _assert_mini(row: dict, *, streamed: bool = False) -> None:
    """One exact gpt-4o-mini call as the fake provider reports it."""
    assert (row["source"], row["provider"], row["model"], row["resolved_model"], row["call_type"],
            row["status"], bool(row["streamed"])) == \
        ("langchain", "openai", "gpt-4o-mini", "gpt-4o-mini-2024-07-18", "chat", "ok", streamed)
    assert (row["input_tokens"], row["cache_read_tokens"], row["cache_write_tokens"],
            row["output_tokens"], row["reasoning_tokens"]) == (120, 100, 0, 30, 10)
    assert row["cost"] == pytest.approx(MINI_COST, abs=1e-9) and row["cost_status"] == "priced"
    assert row["currency"] == "USD" and row["price_source"].startswith("litellm-map:")


# -- 1. every way of calling a chat model ----------------------------------------------------


def test_invoke_is_one_exact_event(make_tally, ledger_url, provider):
    tally = make_tally(ledger_url)
    run_id = uuid.uuid4()
    answer = _chat(provider).invoke(PROMPT, config={"callbacks": [tally.langchain()], "run_id": run_id})
    assert answer.content == REPLY
    [row] = ledger_rows(tally)
    _assert_mini(row)
    assert row["id"] == str(run_id) and row["request_id"] == str(run_id)
    assert row["cost"] == pytest.approx(tally.prices.cost(
        model="gpt-4o-mini", provider="openai", input_tokens=120, output_tokens=30,
        cache_read_tokens=100, reasoning_tokens=10).cost, abs=1e-12)
    assert _meta(row) == {"langchain_root_run_id": str(run_id)}
    assert 0 < row["latency_ms"] < 10_000 and row["ttft_ms"] is None
    assert tally.langchain()._runs == {}
    assert rollups_mismatch(ledger_url) == []


def test_the_event_is_built_later_but_timed_when_the_call_ended(make_tally, provider):
    """Without a budget hold, the handler leaves reading and pricing to the writer thread; the
    latency and timestamp are still taken on the caller's thread when the call ends."""
    tally = make_tally(flush_interval_s=60)  # the writer sleeps until flush()
    began = datetime.now(timezone.utc)
    started = time.perf_counter()
    _chat(provider).invoke(PROMPT, config={"callbacks": [tally.langchain()]})
    wall_ms = (time.perf_counter() - started) * 1000
    ended = datetime.now(timezone.utc)
    time.sleep(0.3)
    [row] = ledger_rows(tally)
    _assert_mini(row)
    assert 0 < row["latency_ms"] <= wall_ms
    ts = datetime.fromisoformat(str(row["ts"]))  # SQLite hands back text
    assert began.replace(tzinfo=None) <= ts <= ended.replace(tzinfo=None)


def test_without_langchain_the_error_names_the_extra(tmp_path):
    code = f"""
import sys
sys.modules["langchain_core"] = None  # as if langchain-core were not installed
from llmtally import Tally
with Tally({str(tmp_path / 'l.db')!r}) as tally:
    for method in (tally.langchain, lambda: tally.wrap_embeddings(None)):
        try:
            method()
        except ImportError as exc:
            print(exc)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        'tally.langchain() needs LangChain: pip install "llmtally[langchain]"',
        'tally.wrap_embeddings() needs LangChain: pip install "llmtally[langchain]"']


def test_the_handler_is_the_same_object_each_time(tally):
    handler = tally.langchain()
    assert handler is tally.langchain() and isinstance(handler, LangChainHandler)
    assert handler.run_inline is True and handler.raise_error is True


def test_ainvoke_runs_the_handler_inline_on_the_event_loop_thread(tally, provider):
    threads: list[int] = []

    class Watching(LangChainHandler):
        def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
            threads.append(threading.get_ident())
            super().on_chat_model_start(*args, **kwargs)

    async def main() -> int:
        await _chat(provider).ainvoke(PROMPT, config={"callbacks": [Watching(tally)]})
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert threads == [loop_thread]
    [row] = ledger_rows(tally)
    _assert_mini(row)


def test_batch_and_abatch_are_one_event_per_input(tally, handler, provider):
    model = _chat(provider)
    model.batch(["a", "b", "c"], config={"callbacks": [handler]})
    asyncio.run(model.abatch(["d", "e"], config={"callbacks": [handler]}))
    rows = ledger_rows(tally)
    assert provider.requests == 5 and len(rows) == 5 and len({row["id"] for row in rows}) == 5
    for row in rows:
        _assert_mini(row)
    assert sum(row["cost"] for row in rows) == pytest.approx(5 * MINI_COST, abs=1e-9)


def test_stream_with_usage_is_exact_and_timed(tally, handler, provider):
    chunks = list(_chat(provider, stream_usage=True).stream(PROMPT, config={"callbacks": [handler]}))
    assert "".join(chunk.content for chunk in chunks) == REPLY
    [row] = ledger_rows(tally)
    _assert_mini(row, streamed=True)
    assert 0 < row["ttft_ms"] <= row["latency_ms"]


def test_stream_without_usage_is_counted_offline_and_estimated(tally, handler, provider):
    for _ in _chat(provider).stream(PROMPT, config={"callbacks": [handler]}):
        pass
    [row] = ledger_rows(tally)
    prompt = count_messages([HumanMessage(PROMPT)], "gpt-4o-mini")
    answer = count_text(REPLY, "gpt-4o-mini")
    assert prompt > 5 and answer > 3
    assert (row["input_tokens"], row["output_tokens"], row["cache_read_tokens"], row["streamed"],
            row["cost_status"]) == (prompt, answer, 0, True, "estimated")
    assert row["cost"] == pytest.approx(prompt * IN + answer * OUT, abs=1e-9)
    assert "counted offline" in _meta(row)["llmtally_estimated"]


def test_astream_and_astream_events(tally, handler, provider):
    model = _chat(provider, stream_usage=True)

    async def main() -> list[str]:
        async for _ in model.astream(PROMPT, config={"callbacks": [handler]}):
            pass
        return [event["event"] async for event in
                model.astream_events(PROMPT, config={"callbacks": [handler]}, version="v2")]

    kinds = asyncio.run(main())
    assert kinds[0] == "on_chat_model_start" and kinds[-1] == "on_chat_model_end"
    rows = ledger_rows(tally)
    assert len(rows) == 2 and provider.requests == 2
    for row in rows:
        _assert_mini(row, streamed=True)
    assert rollups_mismatch(tally.database_url) == []


@pytest.mark.filterwarnings("ignore:The model 'claude-sonnet-4-5' is deprecated")
def test_anthropic_cache_tokens_are_priced_once_each(tally, handler, anthropic_provider):
    claude = _claude(anthropic_provider)
    claude.invoke(PROMPT, config={"callbacks": [handler]})
    for _ in claude.stream(PROMPT, config={"callbacks": [handler]}):
        pass
    rows = ledger_rows(tally)
    assert [bool(row["streamed"]) for row in rows] == [False, True]
    by_hand = 100 * S_IN + 2000 * S_WRITE + 3000 * S_READ + 50 * S_OUT
    for row in rows:
        assert (row["provider"], row["model"], row["resolved_model"]) == \
            ("anthropic", "claude-sonnet-4-5", "claude-sonnet-4-5")
        # LangChain's input_tokens already include both cache parts: 100 + 2000 + 3000
        assert (row["input_tokens"], row["cache_write_tokens"], row["cache_read_tokens"],
                row["output_tokens"]) == (5100, 2000, 3000, 50)
        assert row["cost"] == pytest.approx(by_hand, abs=1e-9) and row["cost_status"] == "priced"


# -- 3. chains, agents, nested runnables -----------------------------------------------------


def test_a_chain_with_two_model_calls_counts_each_once_under_its_root(tally, handler, provider):
    model = _chat(provider)
    prompt = ChatPromptTemplate.from_messages([("user", "{question}")])
    follow_up = RunnableLambda(lambda text: [HumanMessage(f"Shorter: {text}")])
    pipeline = prompt | model | StrOutputParser() | follow_up | model | StrOutputParser()
    root = uuid.uuid4()
    assert pipeline.invoke({"question": PROMPT}, config={"callbacks": [handler], "run_id": root,
                                                         "tags": ["pipeline"]}) == REPLY
    rows = ledger_rows(tally)
    assert provider.requests == 2 and len(rows) == 2
    for row in rows:
        _assert_mini(row)
        meta = _meta(row)
        assert meta["langchain_root_run_id"] == str(root) == meta["langchain_parent_run_id"]
        assert row["request_id"] == str(root)
        assert _tags(row) == ["pipeline"]  # not LangChain's "seq:step:N"
    assert handler._runs == {} and handler._roots == {}


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"Sunny in {city}."


def test_a_tool_calling_agent_loop_counts_model_calls_not_tools(tally, handler, provider):
    provider.queue_replies([FakeToolCall("get_weather", {"city": "Paris"})],
                           [FakeToolCall("get_weather", {"city": "Rome"})], "Sunny in both.")
    model = _chat(provider).bind_tools([get_weather])

    @chain
    def agent(question: str) -> str:
        messages: list[Any] = [HumanMessage(question)]
        while True:
            answer = model.invoke(messages)
            messages.append(answer)
            if not answer.tool_calls:
                return answer.content
            messages.extend(get_weather.invoke(call) for call in answer.tool_calls)

    root = uuid.uuid4()
    assert agent.invoke("Weather in Paris and Rome?",
                        config={"callbacks": [handler], "run_id": root}) == "Sunny in both."
    rows = ledger_rows(tally)
    assert provider.requests == 3 and len(rows) == 3  # three model calls; the two tool runs are not events
    assert all(row["model"] == "gpt-4o-mini" and row["cost"] == pytest.approx(MINI_COST, abs=1e-9)
               for row in rows)
    assert {_meta(row)["langchain_root_run_id"] for row in rows} == {str(root)}
    assert {_meta(row)["langchain_parent_run_id"] for row in rows} == {str(root)}
    tool_results = [m for m in provider.request_log[-1]["body"]["messages"] if m["role"] == "tool"]
    assert [m["content"] for m in tool_results] == ["Sunny in Paris.", "Sunny in Rome."]
    assert handler._runs == {} and handler._roots == {}


def test_nested_runnables_keep_the_outermost_root(tally, handler, provider):
    model = _chat(provider)
    branches = RunnableParallel(first=model, second=RunnableLambda(lambda q: model.invoke(q)))
    inner = RunnableLambda(lambda q: branches.invoke(q))
    outer = RunnableLambda(lambda q: inner.invoke(q))
    root = uuid.uuid4()
    result = outer.invoke(PROMPT, config={"callbacks": [handler], "run_id": root})
    assert set(result) == {"first", "second"}
    rows = ledger_rows(tally)
    assert len(rows) == 2 and provider.requests == 2
    assert {_meta(row)["langchain_root_run_id"] for row in rows} == {str(root)}
    assert all(_meta(row)["langchain_parent_run_id"] != str(root) for row in rows)  # inner runs
    assert handler._roots == {}


def test_a_handler_bound_to_the_model_only(tally, handler, provider):
    model = _chat(provider).with_config(callbacks=[handler])
    parent = uuid.uuid4()
    RunnableLambda(lambda q, config: model.invoke(q, config)).invoke(PROMPT, config={"run_id": parent})
    # LangChain fact: without the config passed on, the bound callbacks replace the parent's
    RunnableLambda(lambda q: model.invoke(q)).invoke(PROMPT, config={"run_id": uuid.uuid4()})
    first, second = ledger_rows(tally)
    assert _meta(first)["langchain_parent_run_id"] == str(parent) == _meta(first)["langchain_root_run_id"]
    assert "langchain_parent_run_id" not in _meta(second)
    assert _meta(second)["langchain_root_run_id"] == second["id"]


# -- 4. errors -------------------------------------------------------------------------------


def test_a_failed_call_is_an_error_event_and_the_exception_is_unchanged(tally, handler, provider):
    pipeline = ChatPromptTemplate.from_messages([("user", "{q}")]) | _chat(provider)
    provider.fail_next(status=429)
    with pytest.raises(openai.RateLimitError) as bare:
        pipeline.invoke({"q": PROMPT})
    provider.fail_next(status=429)
    with pytest.raises(openai.RateLimitError) as caught:
        pipeline.invoke({"q": PROMPT}, config={"callbacks": [handler]})
    # langchain-openai raises its own subclass; the handler changes nothing about it
    assert type(caught.value) is type(bare.value) and str(caught.value) == str(bare.value)
    assert "Injected failure 429" in str(caught.value)
    [row] = ledger_rows(tally)
    assert (row["status"], row["error_type"], row["input_tokens"], row["output_tokens"],
            row["cost"], row["model"]) == \
        ("error", "openai.RateLimitError", 0, 0, 0.0, "gpt-4o-mini")
    assert handler._runs == {} and handler._roots == {}


def test_a_stream_cut_by_the_provider_is_an_error_event(tally, handler, provider):
    provider.cut_stream_after(2)
    with pytest.raises(openai.APIConnectionError):
        for _ in _chat(provider).stream(PROMPT, config={"callbacks": [handler]}):
            pass
    [row] = ledger_rows(tally)
    assert (row["status"], row["error_type"], row["streamed"]) == ("error", "openai.APIConnectionError", True)


def test_a_stream_left_early_is_recorded_with_what_was_received(tally, handler, provider):
    for chunk in _chat(provider).stream(PROMPT, config={"callbacks": [handler]}):
        break
    [row] = ledger_rows(tally)
    received = count_text(chunk.content, "gpt-4o-mini")
    assert (row["status"], row["streamed"], row["cost_status"]) == ("ok", True, "estimated")
    assert (row["input_tokens"], row["output_tokens"]) == \
        (count_messages([HumanMessage(PROMPT)], "gpt-4o-mini"), received)
    assert _meta(row)["stream_abandoned"] is True


# -- 5. legacy text-completion models --------------------------------------------------------


def test_legacy_llm_invoke_and_batch(tally, handler, provider):
    llm = OpenAI(model="gpt-3.5-turbo-instruct", base_url=provider.openai_base, api_key="sk-test",
                 max_retries=0)
    assert llm.invoke(PROMPT, config={"callbacks": [handler]}) == REPLY
    [row] = ledger_rows(tally)
    assert (row["source"], row["provider"], row["model"], row["resolved_model"], row["call_type"],
            row["input_tokens"], row["output_tokens"]) == \
        ("langchain", "openai", "gpt-3.5-turbo-instruct", "gpt-3.5-turbo-instruct", "completion", 120, 30)
    assert row["cost"] == pytest.approx(120 * INSTRUCT_IN + 30 * INSTRUCT_OUT, abs=1e-9)
    # A batch is one request for three prompts: three runs, the usage on the first one only.
    llm.batch(["a", "b", "c"], config={"callbacks": [handler]})
    rows = ledger_rows(tally)[1:]
    assert provider.requests == 2 and len(rows) == 3
    assert sorted((row["input_tokens"], row["output_tokens"]) for row in rows) == [(0, 0), (0, 0), (120, 30)]
    assert sum(row["cost"] for row in rows) == pytest.approx(120 * INSTRUCT_IN + 30 * INSTRUCT_OUT, abs=1e-9)
    assert all(row["cost_status"] == "priced" for row in rows)


# -- 6. embeddings ---------------------------------------------------------------------------


def test_wrapped_embeddings_record_each_call_with_counted_tokens(tally, provider):
    plain = OpenAIEmbeddings(model="text-embedding-3-small", base_url=provider.openai_base,
                             api_key="sk-test", check_embedding_ctx_length=False, max_retries=0)
    emb = tally.wrap_embeddings(plain)
    assert isinstance(emb, Embeddings) and isinstance(emb, TalliedEmbeddings)
    assert emb.model == "text-embedding-3-small" and tally.wrap_embeddings(emb) is emb
    docs = ["The ledger counts every call.", "Budgets stop calls before they are sent."]
    with tally.scope(project="search"):
        vectors = emb.embed_documents(docs)
        query = emb.embed_query("What does the ledger count?")

        async def main():
            return await emb.aembed_documents(docs), await emb.aembed_query("budgets?")

        async_vectors, async_query = asyncio.run(main())
    assert vectors == plain.embed_documents(docs) == async_vectors and len(query) == len(async_query) == 8
    rows = ledger_rows(tally)
    assert provider.requests == 5 and len(rows) == 4  # the unwrapped call above is not recorded
    expected = [sum(count_text(d, "text-embedding-3-small") for d in docs),
                count_text("What does the ledger count?", "text-embedding-3-small"),
                sum(count_text(d, "text-embedding-3-small") for d in docs),
                count_text("budgets?", "text-embedding-3-small")]
    assert sorted(row["input_tokens"] for row in rows) == sorted(expected)
    for row in rows:
        assert (row["source"], row["call_type"], row["provider"], row["model"], row["output_tokens"],
                row["cost_status"], row["project"]) == \
            ("langchain", "embedding", "openai", "text-embedding-3-small", 0, "estimated", "search")
        assert row["cost"] == pytest.approx(row["input_tokens"] * EMBED_IN, abs=1e-12)


def test_a_failed_embeddings_call_is_recorded_and_reraised(tally, provider):
    emb = tally.wrap_embeddings(OpenAIEmbeddings(
        model="text-embedding-3-small", base_url=provider.openai_base, api_key="sk-test",
        check_embedding_ctx_length=False, max_retries=0))
    provider.fail_next(status=500)
    with pytest.raises(openai.InternalServerError):
        emb.embed_query("hi")
    [row] = ledger_rows(tally)
    assert (row["status"], row["error_type"], row["call_type"]) == \
        ("error", "openai.InternalServerError", "embedding")


def test_wrap_embeddings_refuses_what_is_not_embeddings(tally):
    with pytest.raises(TypeError, match="LangChain Embeddings"):
        tally.wrap_embeddings(object())


# -- 7. ChatLiteLLM with both integrations: one event ----------------------------------------


@pytest.fixture
def litellm_registered(tally):
    litellm = pytest.importorskip("litellm")
    litellm.callbacks = [tally.litellm()]
    yield tally
    reset_litellm_callbacks()


def _chat_litellm(fp: FakeProvider, **kw: Any):
    from langchain_litellm import ChatLiteLLM

    return ChatLiteLLM(model="openai/gpt-4o-mini", api_base=fp.openai_base, api_key="sk-test", **kw)


def test_chat_litellm_with_both_handlers_is_one_event_with_both_views(litellm_registered, handler,
                                                                       provider):
    tally = litellm_registered
    model = _chat_litellm(provider)
    config = {"callbacks": [handler], "metadata": {"llmtally_user": "alice"}, "tags": ["lc"]}
    run_ids = [uuid.uuid4() for _ in range(3)]
    model.invoke(PROMPT, config={**config, "run_id": run_ids[0]})
    asyncio.run(model.ainvoke(PROMPT, config={**config, "run_id": run_ids[1]}))
    for _ in model.stream(PROMPT, config={**config, "run_id": run_ids[2]}):
        pass
    rows = ledger_rows(tally)
    assert provider.requests == 3 and len(rows) == 3
    for row in sorted(rows, key=lambda r: (r["streamed"], r["ts"])):
        # LiteLLM's view: the real provider, the model without its route, what the provider
        # answered, cache and reasoning tokens; LangChain's: the user, tags and run ids.
        assert (row["source"], row["provider"], row["model"], row["resolved_model"]) == \
            ("litellm", "openai", "gpt-4o-mini", "gpt-4o-mini-2024-07-18")
        assert (row["input_tokens"], row["cache_read_tokens"], row["output_tokens"]) == (120, 100, 30)
        assert row["cost"] == pytest.approx(MINI_COST, abs=1e-9)
        assert row["user"] == "alice" and _tags(row) == ["lc"]
    assert {_meta(row)["langchain_run_id"] for row in rows} == {str(r) for r in run_ids}
    assert {row["request_id"] for row in rows} == {str(r) for r in run_ids}
    assert handler._runs == {} and tally.litellm()._holds == {}


def test_chat_litellm_with_the_langchain_handler_alone_is_priced_under_its_real_provider(
        tally, handler, provider):
    _chat_litellm(provider).invoke(PROMPT, config={"callbacks": [handler]})
    [row] = ledger_rows(tally)
    assert (row["source"], row["provider"], row["model"], row["input_tokens"], row["cache_read_tokens"],
            row["output_tokens"]) == ("langchain", "openai", "gpt-4o-mini", 120, 100, 30)
    assert row["cost"] == pytest.approx(MINI_COST, abs=1e-9)


def test_litellm_calls_outside_langchain_runs_are_not_claimed(litellm_registered, handler, provider):
    import litellm

    tally = litellm_registered
    _chat(provider).invoke(PROMPT, config={"callbacks": [handler]})  # offered, then withdrawn
    litellm.completion(model="openai/gpt-4o-mini", api_base=provider.openai_base, api_key="sk-test",
                       messages=[{"role": "user", "content": PROMPT}])
    rows = ledger_rows(tally)
    assert sorted(row["source"] for row in rows) == ["langchain", "litellm"]
    assert "langchain_run_id" not in _meta([r for r in rows if r["source"] == "litellm"][0])


def test_litellm_embeddings_with_both_integrations_is_one_exact_event(litellm_registered, provider):
    from langchain_litellm import LiteLLMEmbeddings

    tally = litellm_registered
    emb = tally.wrap_embeddings(LiteLLMEmbeddings(model="openai/text-embedding-3-small",
                                                  api_base=provider.openai_base, api_key="sk-test"))
    with tally.scope(project="search"):
        emb.embed_documents(["one", "two"])
        asyncio.run(emb.aembed_query("three"))
    rows = ledger_rows(tally)
    assert provider.requests == 2 and len(rows) == 2
    for row in rows:  # LiteLLM's exact usage (the provider's 120 tokens), not an offline count
        assert (row["source"], row["call_type"], row["provider"], row["model"], row["input_tokens"],
                row["cost_status"], row["project"]) == \
            ("litellm", "embedding", "openai", "text-embedding-3-small", 120, "priced", "search")
        assert row["cost"] == pytest.approx(120 * EMBED_IN, abs=1e-12)


# -- 8. attribution --------------------------------------------------------------------------


def test_scope_metadata_and_tags_attribute_the_call(make_tally, provider):
    tally = make_tally(scope={"project": "default", "tags": ["prod"]})
    handler = tally.langchain()
    model = _chat(provider)
    with tally.scope(project="support", user="alice", tags=["beta"], metadata={"ticket": 7}):
        model.invoke(PROMPT, config={"callbacks": [handler]})
        model.invoke(PROMPT, config={"callbacks": [handler], "tags": ["eval"], "metadata": {
            "llmtally_user": "bob", "llmtally_session": "s-1", "llmtally_project": "research",
            "llmtally_request_id": "req-9", "private": "never stored"}})
    model.invoke(PROMPT, config={"callbacks": [handler]})
    first, second, third = ledger_rows(tally)
    assert (first["project"], first["user"], first["session"], _tags(first)) == \
        ("support", "alice", None, ["prod", "beta"])
    assert _meta(first)["ticket"] == 7
    assert (second["project"], second["user"], second["session"], second["request_id"],
            _tags(second)) == ("research", "bob", "s-1", "req-9", ["prod", "beta", "eval"])
    assert "never stored" not in second["metadata"]
    assert (third["project"], third["user"], _tags(third)) == ("default", None, ["prod"])


def test_scope_follows_batch_threads(tally, handler, provider):
    with tally.scope(project="batch"):
        _chat(provider).batch(["a", "b"], config={"callbacks": [handler]})
    assert [row["project"] for row in ledger_rows(tally)] == ["batch", "batch"]


# -- bad input (handler methods called directly with what LangChain never sends) --------------


CHAT_MODEL = {"lc": 1, "type": "constructor", "id": ["langchain", "chat_models", "openai", "ChatOpenAI"]}
OPENAI_META = {"ls_provider": "openai", "ls_model_name": "gpt-4o-mini"}


def _result(message: Any = None, llm_output: Any = None, text: str = REPLY) -> LLMResult:
    message = message if message is not None else AIMessage(REPLY)
    return LLMResult(generations=[[ChatGeneration(message=message, text=text)]], llm_output=llm_output)


def test_no_usage_metadata_and_no_llm_output_is_estimated(tally, handler):
    run_id = uuid.uuid4()
    handler.on_chat_model_start(CHAT_MODEL, [[HumanMessage(PROMPT)]], run_id=run_id, metadata=OPENAI_META)
    handler.on_llm_end(_result(llm_output=None), run_id=run_id)
    [row] = ledger_rows(tally)
    assert (row["model"], row["provider"], row["cost_status"]) == ("gpt-4o-mini", "openai", "estimated")
    assert (row["input_tokens"], row["output_tokens"]) == \
        (count_messages([HumanMessage(PROMPT)], "gpt-4o-mini"), count_text(REPLY, "gpt-4o-mini"))


def test_an_unknown_model_class_without_a_model_name_is_unpriced_under_its_class(tally, handler):
    run_id = uuid.uuid4()
    handler.on_chat_model_start({"id": ["my_company", "models", "HouseChat"]}, [[HumanMessage("hi")]],
                                run_id=run_id, metadata={}, invocation_params={"temperature": 0})
    usage = {"input_tokens": 10, "output_tokens": 4, "total_tokens": 14}
    handler.on_llm_end(_result(AIMessage("ok", usage_metadata=usage)), run_id=run_id)
    [row] = ledger_rows(tally)
    assert (row["model"], row["provider"], row["cost"], row["cost_status"], row["input_tokens"],
            row["output_tokens"]) == ("HouseChat", None, None, "unpriced", 10, 4)
    assert [u.model for u in tally.unpriced()] == ["HouseChat"]


def test_a_stream_usage_without_input_tokens_has_its_prompt_counted(tally, handler):
    """An Anthropic-format server that sends output tokens only in ``message_delta`` makes
    ChatAnthropic report 0 input tokens: the prompt is counted rather than priced at $0."""
    run_id = uuid.uuid4()
    handler.on_chat_model_start(CHAT_MODEL, [[HumanMessage(PROMPT)]], run_id=run_id, metadata=OPENAI_META)
    handler.on_llm_end(_result(AIMessage(REPLY, usage_metadata={
        "input_tokens": 0, "output_tokens": 30, "total_tokens": 30})), run_id=run_id)
    [row] = ledger_rows(tally)
    prompt = count_messages([HumanMessage(PROMPT)], "gpt-4o-mini")
    assert (row["input_tokens"], row["output_tokens"], row["cost_status"]) == (prompt, 30, "estimated")
    assert row["cost"] == pytest.approx(prompt * IN + 30 * OUT, abs=1e-12)


def test_unknown_run_ids_and_callbacks_out_of_order_are_tolerated(tally, handler):
    handler.on_llm_new_token("x", run_id=uuid.uuid4())  # never started: ignored
    orphan, failed, late = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    usage = {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}
    message = AIMessage("ok", usage_metadata=usage,
                        response_metadata={"model_name": "gpt-4o-mini", "model_provider": "openai"})
    handler.on_llm_end(_result(message), run_id=orphan, parent_run_id=uuid.uuid4(), tags=["t"])
    handler.on_llm_end(_result(message), run_id=orphan)  # the same end again: one row
    handler.on_llm_error(ValueError("boom"), run_id=failed)
    handler.on_llm_end(_result(message), run_id=late)  # its start arrives after its end
    handler.on_chat_model_start(CHAT_MODEL, [[HumanMessage("hi")]], run_id=late, metadata=OPENAI_META)
    handler.on_chain_end({}, run_id=uuid.uuid4())
    handler.on_tool_error(ValueError(), run_id=uuid.uuid4())
    assert handler._runs == {} and handler._roots == {}
    rows = {row["id"]: row for row in ledger_rows(tally)}
    assert set(rows) == {str(orphan), str(failed), str(late)}
    assert (rows[str(orphan)]["model"], rows[str(orphan)]["provider"], rows[str(orphan)]["input_tokens"],
            _tags(rows[str(orphan)])) == ("gpt-4o-mini", "openai", 7, ["t"])
    assert rows[str(orphan)]["cost"] == pytest.approx(7 * IN + 3 * OUT, abs=1e-12)
    assert (rows[str(failed)]["status"], rows[str(failed)]["error_type"], rows[str(failed)]["model"]) == \
        ("error", "ValueError", "unknown")


def test_garbage_arguments_never_raise(tally, handler, caplog):
    run_id = uuid.uuid4()
    handler.on_chat_model_start(None, None, run_id=run_id, metadata="not a mapping", tags=42,
                                invocation_params=["x"])
    handler.on_llm_new_token(None, run_id=run_id)
    handler.on_llm_end("not a result", run_id=run_id)
    handler.on_llm_start(None, "prompts", run_id=[1, 2])  # an unhashable run id
    handler.on_llm_end(None, run_id=uuid.uuid4())
    handler.on_chain_start(None, None, run_id={}, parent_run_id=[])
    rows = ledger_rows(tally)
    assert len(rows) == 2 and {row["model"] for row in rows} == {"unknown"}
    assert handler._runs == {}


_junk = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                  max_size=3),
                     max_leaves=8)
_counts = st.one_of(st.integers(min_value=-5, max_value=10**13), st.floats(), st.text(max_size=4), st.none())
_usage = st.one_of(_junk, st.fixed_dictionaries({}, optional={
    "input_tokens": _counts, "output_tokens": _counts, "total_tokens": _counts,
    "input_token_details": st.one_of(_junk, st.fixed_dictionaries(
        {}, optional={"cache_read": _counts, "cache_creation": _counts})),
    "output_token_details": st.one_of(_junk, st.fixed_dictionaries({}, optional={"reasoning": _counts})),
}))


@st.composite
def _responses(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["chat", "llm", "junk", "namespace"]))
    llm_output = draw(st.one_of(st.none(), _junk, st.fixed_dictionaries({}, optional={
        "token_usage": _junk, "model_name": _junk, "usage": _junk})))
    if kind == "chat":
        message = AIMessage.model_construct(content=draw(st.text(max_size=20)), usage_metadata=draw(_usage),
                                            response_metadata=draw(_junk), tool_calls=draw(_junk))
        generation = ChatGeneration.model_construct(message=message, text=draw(_junk),
                                                    generation_info=draw(_junk))
        return LLMResult.model_construct(generations=[[generation]], llm_output=llm_output)
    if kind == "llm":
        generation = Generation.model_construct(text=draw(_junk), generation_info=draw(_junk))
        return LLMResult.model_construct(generations=draw(st.sampled_from([[[generation]], [], [[]]])),
                                         llm_output=llm_output)
    if kind == "namespace":
        return SimpleNamespace(generations=draw(_junk), llm_output=draw(_junk))
    return draw(_junk)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(response=_responses(), started=st.booleans(), metadata=_junk, invocation_params=_junk)
def test_any_response_shape_is_recorded_and_never_raises(tally, handler, response, started, metadata,
                                                          invocation_params):
    run_id = uuid.uuid4()
    if started:
        handler.on_chat_model_start(CHAT_MODEL, [[HumanMessage("hi")]], run_id=run_id, metadata=metadata,
                                    invocation_params=invocation_params)
    handler.on_llm_end(response, run_id=run_id)
    assert run_id.int not in handler._runs
    assert tally.flush(10)
    ids = {row["id"] for row in fetch_events(tally.store.url)}
    assert str(run_id) in ids


# -- memory: thousands of concurrent runs on one handler -------------------------------------


class _TinyChat(BaseChatModel):
    """An in-process chat model with usage: every call waits until ``crowd`` calls are in flight."""

    crowd: int = 1
    arrived: Any = None
    everyone: Any = None
    peak: list[int] = []
    handler: Any = None

    @property
    def _llm_type(self) -> str:
        return "tiny"

    def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any) -> ChatResult:
        return self._result()

    async def _agenerate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any) -> ChatResult:
        self.arrived[0] += 1
        if self.arrived[0] == self.crowd:
            self.peak.append(len(self.handler._runs))
            self.everyone.set()
        await self.everyone.wait()
        return self._result()

    @staticmethod
    def _result() -> ChatResult:
        message = AIMessage("ok", usage_metadata={"input_tokens": 3, "output_tokens": 1, "total_tokens": 4},
                            response_metadata={"model_name": "gpt-4o-mini"})
        return ChatResult(generations=[ChatGeneration(message=message)])


def test_thousands_of_concurrent_runs_leave_no_state_behind(make_tally, tmp_path):
    tally = make_tally(f"sqlite:///{tmp_path / 'memory.db'}")
    handler = tally.langchain()

    async def wave(crowd: int) -> None:
        model = _TinyChat(crowd=crowd, arrived=[0], everyone=asyncio.Event(), handler=handler,
                          peak=[])
        await asyncio.gather(*(model.ainvoke("hi", config={"callbacks": [handler]}) for _ in range(crowd)))
        assert model.peak == [crowd]  # every run was in flight at once

    def settled() -> int:
        assert tally.flush(30)
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    asyncio.run(wave(2000))  # also warms up imports, caches and the ended-run ring
    assert handler._runs == {} and handler._roots == {} and len(handler._ended) == 256
    tracemalloc.start()  # traced waves are smaller: tracing makes LangChain 3x slower
    try:
        for _ in range(2):  # until the ring holds traced ids only and dict tables have settled
            asyncio.run(wave(300))
        before = settled()
        for _ in range(2):
            asyncio.run(wave(300))
        grown = settled() - before
    finally:
        tracemalloc.stop()
    assert handler._runs == {} and handler._roots == {} and len(handler._ended) == 256
    # a run kept by mistake would hold ~1 KB (its state, LangChain's messages): 600 KB here
    assert grown < 64_000, f"{grown} bytes kept after 600 runs"
    assert len(fetch_events(tally.store.url)) == 3200


def test_the_example_runs_offline(tmp_path):
    example = Path(__file__).resolve().parent.parent / "examples" / "langchain_chain.py"
    result = subprocess.run([sys.executable, str(example)], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "blocked before sending (0 requests sent)" in result.stdout
    assert "alice    3 calls" in result.stdout and "bob      2 calls" in result.stdout
    assert (tmp_path / "llmtally-langchain.db").exists()


# -- facts about LangChain the handler relies on ---------------------------------------------


def test_fact_usage_metadata_input_includes_cache_and_output_includes_reasoning(provider):
    answer = _chat(provider).invoke(PROMPT)
    assert answer.usage_metadata["input_tokens"] == 120
    assert answer.usage_metadata["input_token_details"]["cache_read"] == 100
    assert answer.usage_metadata["output_tokens"] == 30
    assert answer.usage_metadata["output_token_details"]["reasoning"] == 10


def test_fact_usage_metadata_handler_drops_calls_without_a_model_name():
    counter = UsageMetadataCallbackHandler()
    counter.on_llm_end(_result(AIMessage("ok", usage_metadata={"input_tokens": 1, "output_tokens": 1,
                                                                 "total_tokens": 2})))
    assert counter.usage_metadata == {}


def test_fact_chat_openai_streams_carry_no_usage_unless_asked(provider):
    chunks = list(_chat(provider).stream(PROMPT))
    assert all(chunk.usage_metadata is None for chunk in chunks)
