"""@tally.track on code that calls SDKs directly, against the loopback fake provider over HTTP."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from conftest import ledger_rows

from llmtally._events.tokens import count_text
from llmtally.testing import FakeUsage

openai = pytest.importorskip("openai")


FAKE_PROVIDER = {"usage": FakeUsage(prompt_tokens=1200, completion_tokens=300, cached_tokens=1000,
                                     reasoning_tokens=40),
                 "resolved_model": "gpt-4o-mini-2024-07-18"}


def test_openai_sdk_call_is_recorded_with_usage_cost_and_latency(provider, make_tally):
    tally = make_tally()
    client = openai.OpenAI(base_url=provider.openai_base, api_key="sk-test", max_retries=0)

    @tally.track(model="gpt-4o-mini", provider="openai", project="etl")
    def ask(question: str):
        return client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": question}])

    started = time.perf_counter()
    response = ask("hello")
    wall_ms = (time.perf_counter() - started) * 1000
    assert response.choices[0].message.content  # the caller gets the SDK's own object back
    [row] = ledger_rows(tally)
    assert (row["provider"], row["model"], row["resolved_model"]) == \
        ("openai", "gpt-4o-mini", "gpt-4o-mini-2024-07-18")
    assert (row["input_tokens"], row["output_tokens"], row["cache_read_tokens"],
            row["reasoning_tokens"]) == (1200, 300, 1000, 40)
    assert row["cost"] == pytest.approx(200 * 0.15e-6 + 1000 * 0.075e-6 + 300 * 0.6e-6, abs=1e-12)
    assert 0 < row["latency_ms"] <= wall_ms
    assert (row["status"], row["project"], row["cost_status"]) == ("ok", "etl", "priced")
    assert provider.requests == 1


def test_async_functions_are_tracked_too(provider, make_tally):
    tally = make_tally()
    client = openai.AsyncOpenAI(base_url=provider.openai_base, api_key="sk-test", max_retries=0)

    @tally.track(model="deepseek/deepseek-chat")
    async def ask():
        return await client.chat.completions.create(
            model="deepseek-chat", messages=[{"role": "user", "content": "hi"}])

    async def main():
        with tally.scope(user="alice"):
            return await asyncio.gather(ask(), ask())

    asyncio.run(main())
    rows = ledger_rows(tally)
    assert len(rows) == 2
    for row in rows:
        assert (row["model"], row["provider"], row["user"]) == \
            ("deepseek-chat", "deepseek", "alice")  # the route is the provider
        assert row["cost"] == pytest.approx(200 * 0.28e-6 + 1000 * 0.028e-6 + 300 * 0.42e-6,
                                            abs=1e-12)


@pytest.mark.parametrize(("status", "error_class"), [
    (500, "openai.InternalServerError"),
    (429, "openai.RateLimitError"),
    (401, "openai.AuthenticationError"),
])
def test_a_failed_call_is_recorded_and_the_exception_is_unchanged(provider, make_tally, status,
                                                                  error_class):
    tally = make_tally()
    client = openai.OpenAI(base_url=provider.openai_base, api_key="sk-test", max_retries=0)

    @tally.track(model="gpt-4o-mini")
    def ask():
        return client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])

    provider.fail_next(status=status)
    with pytest.raises(openai.APIStatusError) as info:
        ask()
    assert info.value.status_code == status
    assert f"{type(info.value).__module__.split('.')[0]}.{type(info.value).__name__}" == error_class
    [row] = ledger_rows(tally)
    assert (row["status"], row["error_type"], row["model"]) == ("error", error_class, "gpt-4o-mini")
    assert (row["input_tokens"], row["output_tokens"], row["cost"]) == (0, 0, 0.0)


def test_a_timeout_is_recorded_as_an_error(provider, make_tally):
    tally = make_tally()
    client = openai.OpenAI(base_url=provider.openai_base, api_key="sk-test", max_retries=0,
                           timeout=0.2)
    provider.delay(2)
    with pytest.raises(openai.APITimeoutError):
        tally.track(model="gpt-4o-mini")(lambda: client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]))()
    provider.delay(0)
    [row] = ledger_rows(tally)
    assert (row["status"], row["error_type"]) == ("error", "openai.APITimeoutError")


def test_embeddings_are_tracked(provider, make_tally):
    tally = make_tally()
    provider.usage = FakeUsage(prompt_tokens=5000)
    client = openai.OpenAI(base_url=provider.openai_base, api_key="sk-test", max_retries=0)
    embed = tally.track(call_type="embedding")(client.embeddings.create)
    embed(model="text-embedding-3-small", input=["a", "b"])
    [row] = ledger_rows(tally)
    assert (row["call_type"], row["model"], row["input_tokens"], row["output_tokens"]) == \
        ("embedding", "text-embedding-3-small", 5000, 0)
    assert row["cost"] == pytest.approx(5000 * 0.02e-6, abs=1e-15)


@pytest.mark.filterwarnings("ignore:The model 'claude-sonnet-4-5' is deprecated")
def test_anthropic_sdk_usage_is_normalised(provider, make_tally):
    anthropic = pytest.importorskip("anthropic")
    tally = make_tally()
    provider.usage = FakeUsage(prompt_tokens=100, completion_tokens=50,
                               cache_creation_tokens=2000, cache_read_tokens=3000)
    provider.resolved_model = None
    client = anthropic.Anthropic(base_url=provider.anthropic_base, api_key="sk-ant-test",
                                 max_retries=0)

    @tally.track(provider="anthropic")
    def ask():
        return client.messages.create(model="claude-sonnet-4-5", max_tokens=100,
                                      messages=[{"role": "user", "content": "hi"}])

    ask()
    [row] = ledger_rows(tally)
    # Anthropic reports input_tokens without the cached parts; the ledger's input includes them.
    assert (row["input_tokens"], row["cache_write_tokens"], row["cache_read_tokens"],
            row["output_tokens"]) == (5100, 2000, 3000, 50)
    expected = 100 * 3e-6 + 2000 * 3.75e-6 + 3000 * 0.3e-6 + 50 * 15e-6
    assert row["cost"] == pytest.approx(expected, abs=1e-12)


def test_litellm_responses_are_read(provider, make_tally):
    litellm = pytest.importorskip("litellm")
    tally = make_tally()

    @tally.track
    def ask():
        return litellm.completion(model="openai/gpt-4o-mini", api_base=provider.openai_base,
                                  api_key="sk-test", messages=[{"role": "user", "content": "hi"}])

    ask()
    [row] = ledger_rows(tally)
    assert (row["model"], row["input_tokens"], row["cache_read_tokens"], row["output_tokens"]) == \
        ("gpt-4o-mini-2024-07-18", 1200, 1000, 300)
    assert row["cost"] == pytest.approx(2.85e-4, abs=1e-12)


def test_a_response_without_usage_is_counted_offline_and_marked_estimated(make_tally):
    tally = make_tally()

    @tally.track(model="gpt-4o-mini", provider="openai")
    def ask():
        return {"choices": [{"message": {"content": "Hello there, general Kenobi."}}]}

    ask()
    [row] = ledger_rows(tally)
    assert row["cost_status"] == "estimated"
    assert (row["input_tokens"], row["output_tokens"]) == (0, 7)  # the reply, counted offline
    assert count_text("Hello there, general Kenobi.", "gpt-4o-mini") == 7
    assert row["cost"] == pytest.approx(row["output_tokens"] * 0.6e-6, abs=1e-15)
    assert "counted offline" in json.loads(row["metadata"])["llmtally_estimated"]


@pytest.mark.parametrize(("response", "cost_status"), [
    (None, "estimated"), (42, "estimated"), ("text", "estimated"), ({"usage": None}, "estimated"),
    ({"usage": "junk"}, "estimated"), ({"usage": {"prompt_tokens": "x"}}, "priced"),
    ({"usage": {"prompt_tokens": -3, "completion_tokens": None}}, "priced"), (object(), "estimated"),
])
def test_odd_responses_never_break_the_call(make_tally, response, cost_status):
    tally = make_tally()
    assert tally.track(model="gpt-4o-mini")(lambda: response)() is response
    [row] = ledger_rows(tally)
    # no count that can be read is no count (0); usage that is not there at all is "estimated"
    assert (row["status"], row["input_tokens"], row["output_tokens"], row["cost"], row["cost_status"]) == \
        ("ok", 0, 0, 0, cost_status)


def test_track_refuses_unknown_options_at_decoration_time(make_tally):
    tally = make_tally()
    with pytest.raises(TypeError, match="team"):
        tally.track(team="x")
