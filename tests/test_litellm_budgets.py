"""Budgets inside LiteLLM calls: blocked before any request leaves, settled by the same call's hook.

Real LiteLLM over real HTTP to the loopback fake provider. Every call costs exactly $0.01 (one
output token, or one input token for embeddings, at $0.01 a token, ``max_tokens=1``), so the
estimate equals the real cost: a $0.02 budget lets two calls through and blocks the third, and
the budget's ``spent`` must equal the ledger's cost of the calls that went through.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import MSGS, assert_two_through_third_blocked, fetch_events, reset_litellm_callbacks

from llmtally import Budget, BudgetExceeded, Price
from llmtally.testing import FakeProvider, FakeUsage

litellm = pytest.importorskip("litellm")

PRICES = {"gpt-4o-mini": Price(input=0, output=0.01, per="token"),
          "text-embedding-3-small": Price(input=0.01, output=0, per="token")}


FAKE_PROVIDER = {"usage": FakeUsage(prompt_tokens=1, completion_tokens=1)}
TALLY = {"prices": PRICES, "budgets": [Budget(usd=0.02, per="day")]}
REGISTER_LITELLM = True


def _chat(fp, **kw):
    return {"model": "openai/gpt-4o-mini", "api_base": fp.openai_base, "api_key": "sk-test",
            "messages": MSGS, "max_tokens": 1, **kw}


def _embed(fp, **kw):
    return {"model": "openai/text-embedding-3-small", "api_base": fp.openai_base,
            "api_key": "sk-test", "input": ["hi"], **kw}


def _router(fp):
    return litellm.Router(num_retries=0, model_list=[
        {"model_name": "gpt-4o-mini", "litellm_params": {
            "model": "openai/gpt-4o-mini", "api_base": fp.openai_base, "api_key": "sk-test"}}])


def _assert_two_through_third_blocked(tally, provider, call):
    rows = assert_two_through_third_blocked(tally, provider, call)
    assert tally.litellm()._holds == {}
    return rows


def _run(coro_fn):
    return lambda: asyncio.run(coro_fn())


# -- async: LiteLLM's deployment hook blocks ---------------------------------------------------


def test_acompletion_is_blocked_before_sending_and_settled(tally, provider):
    async def call():
        await litellm.acompletion(**_chat(provider))

    rows = _assert_two_through_third_blocked(tally, provider, _run(call))
    assert {(row["model"], row["provider"]) for row in rows} == {("gpt-4o-mini", "openai")}


def test_async_stream_is_blocked_and_settled_when_read_to_the_end(tally, provider):
    async def call():
        stream = await litellm.acompletion(**_chat(provider, stream=True,
                                                   stream_options={"include_usage": True}))
        async for _ in stream:
            pass

    rows = _assert_two_through_third_blocked(tally, provider, _run(call))
    assert [row["streamed"] for row in rows if row["status"] == "ok"] == [True, True]


def test_aembedding_is_blocked_and_settled(tally, provider):
    async def call():
        await litellm.aembedding(**_embed(provider))

    rows = _assert_two_through_third_blocked(tally, provider, _run(call))
    assert {row["call_type"] for row in rows if row["status"] == "ok"} == {"embedding"}


def test_router_acompletion_is_blocked_and_settled(tally, provider):
    router = _router(provider)

    async def call():
        await router.acompletion(model="gpt-4o-mini", messages=MSGS, max_tokens=1)

    _assert_two_through_third_blocked(tally, provider, _run(call))


def test_the_hold_is_attributed_from_litellm_metadata(make_tally, provider):
    tally = make_tally(prices=PRICES, budgets=[Budget(usd=0.01, per="day", each="user")])
    litellm.callbacks = [tally.litellm()]

    async def main():
        await litellm.acompletion(**_chat(provider, metadata={"user": "alice"}))
        with pytest.raises(BudgetExceeded, match="user=alice"):
            await litellm.acompletion(**_chat(provider, metadata={"user": "alice"}))
        with tally.scope(user="bob"):
            await litellm.acompletion(**_chat(provider))

    asyncio.run(main())
    assert provider.requests == 2
    assert tally.flush(10)
    rows = fetch_events(tally.store.url)
    assert sorted((row["user"], row["status"]) for row in rows) == \
        [("alice", "blocked"), ("alice", "ok"), ("bob", "ok")]
    assert {state.instance: state.spent for state in tally.budget_states()} == \
        pytest.approx({"alice": 0.01, "bob": 0.01})


def test_a_failed_async_call_releases_its_hold(make_tally):
    tally = make_tally(prices=PRICES, budgets=[Budget(usd=0.01, per="day")])
    litellm.callbacks = [tally.litellm()]
    with FakeProvider(usage=FakeUsage(prompt_tokens=1, completion_tokens=1)) as fp:
        fp.fail_next(1, status=400)  # not retried

        async def main():
            with pytest.raises(litellm.BadRequestError):
                await litellm.acompletion(**_chat(fp))
            await litellm.acompletion(**_chat(fp))  # the failed call's $0.01 was given back

        asyncio.run(main())
    assert tally.flush(10)
    [state] = tally.budget_states()
    assert (state.spent, state.reserved) == (pytest.approx(0.01, abs=1e-12), 0)


# -- sync: tally.guard() ----------------------------------------------------------------------


def test_guarded_completion_is_blocked_and_settled(tally, provider):
    completion = tally.guard(litellm.completion)
    rows = _assert_two_through_third_blocked(tally, provider, lambda: completion(**_chat(provider)))
    assert all(len(json.loads(row["metadata"])["litellm_call_id"]) == 36  # the guard's uuid
               for row in rows if row["status"] == "ok")


def test_a_guard_without_the_callback_registered_says_how_to_fix_it(make_tally, provider, caplog):
    tally = make_tally(prices=PRICES, budgets=[Budget(usd=0.02, per="day")])
    reset_litellm_callbacks()  # tally.litellm() is not registered
    tally.guard(litellm.completion)(**_chat(provider))
    assert provider.requests == 1  # the call itself is never broken
    assert "tally.litellm() is not in litellm.callbacks" in caplog.text
    assert "litellm.callbacks.append(tally.litellm())" in caplog.text


def test_guarded_completion_takes_positional_model_and_messages(tally, provider):
    completion = tally.guard(litellm.completion)
    _assert_two_through_third_blocked(
        tally, provider, lambda: completion("openai/gpt-4o-mini", MSGS, api_base=provider.openai_base,
                                            api_key="sk-test", max_tokens=1))


def test_guarded_sync_stream_is_blocked_and_settled(tally, provider):
    completion = tally.guard(litellm.completion)

    def call():
        for _ in completion(**_chat(provider, stream=True, stream_options={"include_usage": True})):
            pass

    rows = _assert_two_through_third_blocked(tally, provider, call)
    assert [row["streamed"] for row in rows if row["status"] == "ok"] == [True, True]


def test_guarded_embedding_is_blocked_and_settled(tally, provider):
    embedding = tally.guard(litellm.embedding)
    _assert_two_through_third_blocked(tally, provider, lambda: embedding(**_embed(provider)))


def test_guarded_router_completion_is_blocked_and_settled(tally, provider):
    completion = tally.guard(_router(provider).completion)
    _assert_two_through_third_blocked(
        tally, provider, lambda: completion(model="gpt-4o-mini", messages=MSGS, max_tokens=1))


def test_guarded_async_function_is_blocked_once(tally, provider):
    acompletion = tally.guard(litellm.acompletion)

    async def call():
        await acompletion(**_chat(provider))

    _assert_two_through_third_blocked(tally, provider, _run(call))


def test_a_guarded_call_that_fails_before_litellm_logs_releases_its_hold(tally):
    def broken(**kwargs):
        raise RuntimeError("before any logging")

    guarded = tally.guard(broken)
    for _ in range(3):
        with pytest.raises(RuntimeError):
            guarded(model="openai/gpt-4o-mini", messages=MSGS, max_tokens=1)
    [state] = tally.budget_states()
    assert (state.spent, state.reserved) == (0, 0)
    assert tally.litellm()._holds == {}


# -- without budgets ----------------------------------------------------------------------------


def test_without_budgets_nothing_is_reserved(make_tally, provider, monkeypatch):
    tally = make_tally(prices=PRICES)
    litellm.callbacks = [tally.litellm()]

    def no_reserve(**kwargs):
        raise AssertionError("reserve() called without budgets")

    monkeypatch.setattr(tally, "reserve", no_reserve)
    completion = tally.guard(litellm.completion)
    completion(**_chat(provider))
    asyncio.run(litellm.acompletion(**_chat(provider)))
    assert provider.requests == 2
    assert tally.flush(10)
    assert [row["status"] for row in fetch_events(tally.store.url)] == ["ok", "ok"]
    assert tally.litellm()._holds == {} and tally.budget_states() == []
