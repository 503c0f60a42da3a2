"""Budgets in LangChain calls: blocked before any request leaves, settled when the call ends.

Real ``ChatOpenAI`` (and ``ChatLiteLLM``, ``OpenAIEmbeddings``) over real HTTP to the loopback
fake provider. Every chat call costs exactly $0.01 (one output token at $0.01 a token,
``max_tokens=1``, input free), so the estimate equals the real cost: a $0.02 budget lets two
calls through and blocks the third, and the budget's ``spent`` must equal the ledger's cost of
the calls that went through.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest
from conftest import assert_two_through_third_blocked, fetch_events, reset_litellm_callbacks

from llmtally import Budget, BudgetExceeded, Price
from llmtally.testing import FakeProvider, FakeUsage

pytest.importorskip("langchain_openai")
import openai  # noqa: E402
from langchain_core.runnables import RunnableLambda  # noqa: E402
from langchain_openai import ChatOpenAI, OpenAIEmbeddings  # noqa: E402

PRICES = {"gpt-4o-mini": Price(input=0, output=0.01, per="token"),
          "text-embedding-3-small": Price(input=0.01, output=0, per="token")}


FAKE_PROVIDER = {"usage": FakeUsage(prompt_tokens=1, completion_tokens=1)}
TALLY = {"prices": PRICES, "budgets": [Budget(usd=0.02, per="day")]}


@pytest.fixture
def tally_url(ledger_url):
    """``tally`` on a real SQLite file and on the real PostgreSQL."""
    return ledger_url


def _chat(fp: FakeProvider, **kw: Any) -> ChatOpenAI:
    return ChatOpenAI(model="gpt-4o-mini", base_url=fp.openai_base, api_key="sk-test",
                      max_retries=0, **{"max_tokens": 1, **kw})


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _assert_two_through_third_blocked(tally, provider, call) -> list[dict]:
    rows = assert_two_through_third_blocked(tally, provider, call)
    [blocked] = [row for row in rows if row["status"] == "blocked"]
    assert (blocked["model"], blocked["provider"]) == ("gpt-4o-mini", "openai")
    assert "langchain_root_run_id" in _json(blocked["metadata"])
    assert tally.langchain()._runs == {}
    return rows


def test_invoke_is_blocked_before_sending_and_settled(tally, provider):
    model = _chat(provider)
    rows = _assert_two_through_third_blocked(
        tally, provider, lambda: model.invoke("hi", config={"callbacks": [tally.langchain()]}))
    assert {row["source"] for row in rows if row["status"] == "ok"} == {"langchain"}


def test_ainvoke_is_blocked_before_sending_and_settled(tally, provider):
    model = _chat(provider)

    async def call() -> None:
        await model.ainvoke("hi", config={"callbacks": [tally.langchain()]})

    with asyncio.Runner() as runner:  # one loop: the model's HTTP client is bound to it
        _assert_two_through_third_blocked(tally, provider, lambda: runner.run(call()))


def test_stream_is_blocked_before_sending_and_settled(tally, provider):
    model = _chat(provider, stream_usage=True)

    def call() -> None:
        for _ in model.stream("hi", config={"callbacks": [tally.langchain()]}):
            pass

    rows = _assert_two_through_third_blocked(tally, provider, call)
    assert [bool(row["streamed"]) for row in rows if row["status"] == "ok"] == [True, True]


def test_astream_is_blocked_before_sending_and_settled(tally, provider):
    model = _chat(provider, stream_usage=True)

    async def consume() -> None:
        async for _ in model.astream("hi", config={"callbacks": [tally.langchain()]}):
            pass

    with asyncio.Runner() as runner:
        _assert_two_through_third_blocked(tally, provider, lambda: runner.run(consume()))


def test_a_chain_stops_at_the_blocked_call(make_tally, provider):
    tally = make_tally(prices=PRICES, budgets=[Budget(usd=0.01, per="day")])
    model = _chat(provider)
    twice = RunnableLambda(lambda q: model.invoke(model.invoke(q).content))
    with pytest.raises(BudgetExceeded):
        twice.invoke("hi", config={"callbacks": [tally.langchain()]})
    assert provider.requests == 1
    assert tally.flush(10)
    assert sorted(row["status"] for row in fetch_events(tally.store.url)) == ["blocked", "ok"]
    assert tally.langchain()._roots == {}


def test_the_hold_settles_to_the_actual_cost(make_tally, provider):
    # max_tokens=3 reserves $0.03; the provider reports one output token: $0.01 is spent
    tally = make_tally(prices=PRICES, budgets=[Budget(usd=0.05, per="day"),
                                               Budget(tokens=100, per="hour")])
    model = _chat(provider, max_tokens=3)
    model.invoke("hi", config={"callbacks": [tally.langchain()]})
    usd, tokens = tally.budget_states()
    assert (usd.spent, usd.reserved) == (pytest.approx(0.01, abs=1e-12), 0)
    assert (tokens.spent, tokens.reserved) == (2, 0)  # one input and one output token


def test_a_failed_call_releases_its_hold(make_tally, provider):
    tally = make_tally(prices=PRICES, budgets=[Budget(usd=0.01, per="day"),
                                               Budget(requests=5, per="day")])
    provider.fail_next(status=500)
    with pytest.raises(openai.InternalServerError):
        _chat(provider).invoke("hi", config={"callbacks": [tally.langchain()]})
    usd, requests = tally.budget_states()
    assert (usd.spent, usd.reserved) == (0, 0)
    assert (requests.spent, requests.reserved) == (1, 0)  # a failed call still was a request
    _chat(provider).invoke("hi", config={"callbacks": [tally.langchain()]})  # the $0.01 is free again
    assert provider.requests == 2


def test_each_user_budget_follows_langchain_metadata(make_tally, provider):
    tally = make_tally(prices=PRICES, budgets=[Budget(usd=0.01, per="day", each="user")])
    model = _chat(provider)

    def ask(user: str) -> None:
        model.invoke("hi", config={"callbacks": [tally.langchain()],
                                   "metadata": {"llmtally_user": user}})

    ask("alice")
    with pytest.raises(BudgetExceeded, match="user=alice"):
        ask("alice")
    ask("bob")
    assert provider.requests == 2
    assert {state.instance: state.spent for state in tally.budget_states()} == \
        pytest.approx({"alice": 0.01, "bob": 0.01})


def test_wrapped_embeddings_are_blocked_before_sending(make_tally, provider):
    tally = make_tally(prices=PRICES, budgets=[Budget(tokens=3, per="day")])
    emb = tally.wrap_embeddings(OpenAIEmbeddings(
        model="text-embedding-3-small", base_url=provider.openai_base, api_key="sk-test",
        check_embedding_ctx_length=False, max_retries=0))
    emb.embed_query("hi")  # 1 token counted offline
    with pytest.raises(BudgetExceeded, match="tokens 3/day"):
        emb.embed_documents(["one two three", "four"])
    assert provider.requests == 1
    assert tally.flush(10)
    assert sorted((row["call_type"], row["status"]) for row in fetch_events(tally.store.url)) == \
        [("embedding", "blocked"), ("embedding", "ok")]


# -- ChatLiteLLM with both integrations: one hold, settled by LiteLLM --------------------------


@pytest.fixture
def both(make_tally):
    litellm = pytest.importorskip("litellm")
    pytest.importorskip("langchain_litellm")
    # $0.01 exactly: a second hold for the same call (LiteLLM's own) would be refused
    tally = make_tally(prices=PRICES, budgets=[Budget(usd=0.01, per="day")])
    litellm.callbacks = [tally.litellm()]
    yield tally
    reset_litellm_callbacks()


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
def test_chat_litellm_is_held_once_and_settled_by_litellm(both, provider, mode):
    from langchain_litellm import ChatLiteLLM

    tally = both
    model = ChatLiteLLM(model="openai/gpt-4o-mini", api_base=provider.openai_base,
                        api_key="sk-test", max_tokens=1)
    config = {"callbacks": [tally.langchain()]}

    def call() -> None:
        if mode == "invoke":
            model.invoke("hi", config=config)
        else:
            asyncio.run(model.ainvoke("hi", config=config))

    call()
    with pytest.raises(BudgetExceeded):
        call()
    assert provider.requests == 1
    assert tally.flush(10)
    rows = fetch_events(tally.store.url)
    assert sorted((row["status"], row["source"]) for row in rows) == \
        [("blocked", "manual"), ("ok", "litellm")]
    [state] = tally.budget_states()
    assert (state.spent, state.reserved) == (pytest.approx(0.01, abs=1e-12), 0)
    assert tally.litellm()._holds == {} and tally.langchain()._runs == {}


def test_ainvoke_takes_its_hold_off_the_event_loop_and_invoke_still_blocks(tally, provider,
                                                                           monkeypatch):
    """Under ainvoke the budget check runs on a worker thread (the loop never waits for the
    database); under invoke it runs on the caller's thread; both stop a call over budget."""
    threads = []
    real = tally.budgets.reserve

    def spy(*args, **kwargs):
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(tally.budgets, "reserve", spy)
    model = _chat(provider)
    handler = tally.langchain()

    async def main():
        await model.ainvoke("hi", config={"callbacks": [handler]})
        return threading.current_thread()

    loop_thread = asyncio.run(main())
    assert len(threads) == 1 and threads[0] is not loop_thread
    model.invoke("hi", config={"callbacks": [handler]})
    assert threads[1] is threading.current_thread()
    with pytest.raises(BudgetExceeded):
        asyncio.run(model.ainvoke("hi", config={"callbacks": [handler]}))
    with pytest.raises(BudgetExceeded):
        model.invoke("hi", config={"callbacks": [handler]})
    assert provider.requests == 2
    assert tally.flush(10)
    [state] = tally.budget_states()
    assert (round(state.spent, 9), state.reserved) == (0.02, 0)
