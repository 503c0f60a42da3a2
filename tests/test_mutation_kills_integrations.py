"""Tests that kill mutants mutmut left alive in the integrations' event mapping
(``integrations/litellm_events.py``, ``integrations/langchain_events.py``); see
benchmarks/RESULTS.md, "Mutation testing". Each asserts what a user would check: the stored
event's tokens, cost, names and status."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from conftest import MSGS, ledger_rows

from llmtally import CallEvent
from llmtally._events.scope import EMPTY as EMPTY_SCOPE
from llmtally._events.tokens import count_messages, count_text
from llmtally._events.usage import Usage
from llmtally.testing import FakeUsage

litellm = pytest.importorskip("litellm")
from litellm import ModelResponse  # noqa: E402

from llmtally.integrations.litellm_events import (  # noqa: E402
    CallStart,
    call_key,
    call_type_of,
    litellm_event,
)

REPLY = "Hello from the fake provider."
IN, CACHED, OUT = 0.15e-6, 0.075e-6, 0.6e-6  # gpt-4o-mini, USD per token
FAKE_PROVIDER = {"usage": FakeUsage(prompt_tokens=120, completion_tokens=30, cached_tokens=100),
                 "resolved_model": "gpt-4o-mini-2024-07-18", "reply": REPLY}
REGISTER_LITELLM = True
MINI_COST = 20 * IN + 100 * CACHED + 30 * OUT


def _openai(fp, **kw):
    return {"model": "openai/gpt-4o-mini", "api_base": fp.openai_base, "api_key": "sk-test",
            "messages": MSGS, **kw}


def _one_call(tally, provider, **kw) -> dict:
    litellm.completion(**_openai(provider, **kw))
    [row] = ledger_rows(tally)
    assert (row["status"], row["input_tokens"], row["output_tokens"]) == ("ok", 120, 30)
    assert row["cost"] == pytest.approx(MINI_COST, abs=1e-12)
    return row


# -- litellm_events.py: the LiteLLM proxy's caller (user_api_key_* metadata) ------------------


def test_a_proxy_key_with_team_and_project_attributes_the_call(tally, provider):
    row = _one_call(tally, provider, user="body-user", metadata={
        "user": "meta-user", "project": "meta-project", "tags": ["t1"],
        "user_api_key_alias": "alice-laptop", "user_api_key_user_id": "alice",
        "user_api_key_team_id": "team-search", "user_api_key_team_alias": "search",
        "user_api_key_end_user_id": "customer-42", "user_api_key_org_id": "org-1",
        "user_api_key_project_id": "proj-7", "user_api_key_project_alias": "checkout"})
    meta = json.loads(row["metadata"])
    # the key's user and LiteLLM project win over what the request body says
    assert (row["user"], row["project"], json.loads(row["tags"])) == \
        ("alice", "checkout", ["t1", "key:alice-laptop"])
    assert {k: meta[k] for k in ("key_alias", "user_id", "team_id", "team_alias", "end_user",
                                 "org_id", "project_id", "project_alias")} == {
        "key_alias": "alice-laptop", "user_id": "alice", "team_id": "team-search",
        "team_alias": "search", "end_user": "customer-42", "org_id": "org-1",
        "project_id": "proj-7", "project_alias": "checkout"}
    assert "team" not in meta and "project" not in meta


@pytest.mark.parametrize(("fields", "project"), [
    ({"user_api_key_team_id": "team-search", "user_api_key_team_alias": "search"}, "search"),
    ({"user_api_key_team_id": "team-search"}, "team-search"),
    ({"user_api_key_team_alias": "search", "user_api_key_project_id": "proj-7"}, "proj-7"),
])
def test_the_proxy_project_is_the_litellm_project_else_the_team(tally, provider, fields, project):
    row = _one_call(tally, provider, metadata={"project": "meta-project",
                                               "user_api_key_user_id": "alice", **fields})
    assert (row["project"], row["user"]) == (project, "alice")
    assert json.loads(row["tags"]) == []  # no key alias, no key tag


def test_the_master_keys_placeholder_user_leaves_the_user_to_the_end_user(tally, provider):
    row = _one_call(tally, provider, metadata={"user_api_key_user_id": "default_user_id",
                                               "user_api_key_end_user_id": "customer-42"})
    meta = json.loads(row["metadata"])
    assert (row["user"], row["project"], meta["end_user"]) == ("customer-42", None, "customer-42")
    assert "user_id" not in meta


def test_the_request_metadata_user_comes_before_the_proxy_end_user(tally, provider):
    row = _one_call(tally, provider, user="body-user",
                    metadata={"user": "meta-user", "user_api_key_end_user_id": "customer-42"})
    assert row["user"] == "meta-user"


# -- litellm_events.py: streams of OpenAI-compatible providers ---------------------------------


def test_an_openai_compatible_stream_not_asked_for_usage_is_counted_offline(tally, provider):
    """deepseek speaks OpenAI's format (``litellm.openai_compatible_providers``, not one of
    llmtally's own OpenAI names): unasked, it sends no usage, and LiteLLM's own guess is not
    taken as the provider's count."""
    for _ in litellm.completion(model="deepseek/deepseek-chat", api_base=provider.openai_base,
                                api_key="sk-test", messages=MSGS, stream=True):
        pass
    [row] = ledger_rows(tally)
    expected_in, expected_out = count_messages(MSGS, "deepseek-chat"), count_text(REPLY, "deepseek-chat")
    assert (row["provider"], row["model"], row["streamed"], row["cost_status"]) == \
        ("deepseek", "deepseek-chat", True, "estimated")
    assert (row["input_tokens"], row["output_tokens"]) == (expected_in, expected_out)
    assert row["cost"] == pytest.approx(tally.prices.cost(
        model="deepseek-chat", provider="deepseek", input_tokens=expected_in,
        output_tokens=expected_out).cost, abs=1e-9) and row["cost"] > 0
    assert json.loads(row["metadata"])["llmtally_estimated"] == \
        "the provider reported no usage; tokens counted offline"


def test_an_openai_compatible_stream_asked_for_usage_keeps_the_providers_count(tally, provider):
    for _ in litellm.completion(model="deepseek/deepseek-chat", api_base=provider.openai_base,
                                api_key="sk-test", messages=MSGS, stream=True,
                                stream_options={"include_usage": True}):
        pass
    [row] = ledger_rows(tally)
    assert (row["provider"], row["input_tokens"], row["output_tokens"], row["cost_status"]) == \
        ("deepseek", 120, 30, "priced")


def _response(usage: dict | None = None, reply: str = REPLY, **kw) -> ModelResponse:
    """A real LiteLLM ModelResponse, as a success hook is given it."""
    return ModelResponse(model=kw.pop("model", "gpt-4o-mini-2024-07-18"), choices=[
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}],
        usage=usage or {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150}, **kw)


def _stream_kwargs(**kw) -> dict:
    return {"model": "gpt-4o-mini", "custom_llm_provider": "openai", "stream": True,
            "messages": MSGS, "call_type": "completion", **kw}


@pytest.mark.parametrize("asked", [True, False])
def test_what_the_caller_asked_at_the_start_decides_whether_a_stream_has_usage(asked):
    """The start's answer wins over the request body the hook sees (here: none)."""
    event = litellm_event(_stream_kwargs(), _response(), None, None, failed=False,
                          call_start=CallStart(scope=EMPTY_SCOPE, stream_usage_asked=asked))
    if asked:
        assert (event.usage.input_tokens, event.usage.output_tokens, event.estimated) == (120, 30, False)
    else:
        assert (event.usage.input_tokens, event.usage.output_tokens, event.estimated) == \
            (count_messages(MSGS, "gpt-4o-mini"), count_text(REPLY, "gpt-4o-mini"), True)


def test_a_stream_whose_start_was_not_seen_reads_the_request_body():
    asked = _stream_kwargs(additional_args={"complete_input_dict": {
        "stream_options": {"include_usage": True}}}, stream_options=None)
    event = litellm_event(asked, _response(), None, None, failed=False)
    assert (event.usage.input_tokens, event.usage.output_tokens, event.estimated) == (120, 30, False)
    # the body LiteLLM sent wins over the caller's arguments
    not_asked = _stream_kwargs(additional_args={"complete_input_dict": {
        "stream": True, "stream_options": {"include_usage": False}}},
        stream_options={"include_usage": True})
    event = litellm_event(not_asked, _response(), None, None, failed=False)
    assert (event.usage.output_tokens, event.estimated) == (count_text(REPLY, "gpt-4o-mini"), True)
    # no body: the caller's arguments
    event = litellm_event(_stream_kwargs(stream_options={"include_usage": True}), _response(),
                          None, None, failed=False)
    assert (event.usage.input_tokens, event.estimated) == (120, False)


def test_an_unstamped_calls_id_is_its_call_id_cut_to_fit_and_suffixed_with_its_start():
    """A call no set-up hook of ours stamped: the event id is LiteLLM's call id (which a proxy
    client may choose, and make long), suffixed with the start so two calls stay two."""
    long_id = "c" * 300
    kwargs = {"model": "gpt-4o-mini", "custom_llm_provider": "openai", "litellm_call_id": long_id}
    started = datetime(2026, 12, 2, 10, 0, 0, 250000, tzinfo=timezone.utc)
    event = litellm_event(kwargs, _response(), started, started + timedelta(seconds=1), failed=False)
    assert event.id == "c" * 100 + f"@{started.timestamp():.6f}" == "c" * 100 + "@1796205600.250000"
    assert event.latency_ms == 1000.0 and event.metadata["litellm_call_id"] == long_id
    for start in (None, 1.5, datetime.min):  # no start time, a number, one without a timestamp
        event = litellm_event(kwargs, _response(), start, None, failed=False)
        assert event.id == "c" * 128
    stamped = litellm_event({**kwargs, "llmtally_event_id": "ours"}, _response(), started, None,
                            failed=False)
    assert stamped.id == "ours"


# -- litellm_events.py: attribution from the request ------------------------------------------


def test_request_metadata_ids_and_a_single_tag_attribute_the_call(tally, provider):
    row = _one_call(tally, provider, litellm_trace_id="trace-1", litellm_session_id="sess-2",
                    metadata={"tags": "solo", "request_id": "req-3", "attempted_retries": 2,
                              "attempted_fallbacks": 1, "model_group": "chat"})
    meta = json.loads(row["metadata"])
    assert (row["session"], row["request_id"], json.loads(row["tags"])) == ("sess-2", "req-3", ["solo"])
    assert (meta["litellm_trace_id"], meta["model_group"], meta["attempted_retries"],
            meta["attempted_fallbacks"]) == ("trace-1", "chat", 2, 1)


def test_the_trace_id_is_the_request_id_when_nothing_else_names_one(tally, provider):
    row = _one_call(tally, provider, litellm_trace_id="trace-1",
                    metadata={"tags": ["a", None, 7], "attempted_retries": 0,
                              "attempted_fallbacks": True, "session_id": "meta-session"})
    meta = json.loads(row["metadata"])
    assert (row["session"], row["request_id"], json.loads(row["tags"])) == \
        ("meta-session", "trace-1", ["a", "7"])
    # zero retries and a flag that is no count are left out
    assert "attempted_retries" not in meta and "attempted_fallbacks" not in meta


# -- litellm_events.py: call types, times and names -------------------------------------------


def test_text_completions_sync_and_async_are_completion_calls(tally, provider):
    kw = {"model": "text-completion-openai/gpt-3.5-turbo-instruct", "prompt": "Say hello.",
          "api_base": provider.openai_base, "api_key": "sk-test"}
    litellm.text_completion(**kw)
    asyncio.run(litellm.atext_completion(**kw))
    rows = ledger_rows(tally)
    assert [(row["call_type"], row["model"], row["input_tokens"], row["output_tokens"], row["status"])
            for row in rows] == [("completion", "gpt-3.5-turbo-instruct", 120, 30, "ok")] * 2
    for row in rows:
        assert row["cost"] == pytest.approx(tally.prices.cost(
            model="gpt-3.5-turbo-instruct", provider="text-completion-openai", input_tokens=120,
            output_tokens=30, cache_read_tokens=100).cost, abs=1e-9) and row["cost"] > 0


@pytest.mark.parametrize(("name", "kind"), [
    ("completion", "chat"), ("acompletion", "chat"), ("litellm.acompletion", "chat"),
    ("ACompletion", "chat"), ("atext_completion", "completion"), ("aembedding", "embedding"),
    ("aimage_generation", "image"), ("speech", "audio"), ("arerank", "rerank"),
    ("amoderation", "moderation"), ("aresponses", "responses"), ("a", "other"),
    ("aacompletion", "other"), ("bcompletion", "other"), ("xembedding", "other"),
    ("litellm.", "other"), ("", "other"), (None, "other"), (3, "other"),
])
def test_litellm_call_type_names_map_to_the_ledgers_kinds(name, kind):
    assert call_type_of(name) == kind


def test_latency_and_time_to_first_token_from_what_litellm_passes():
    start = datetime(2026, 12, 2, 10, 0, tzinfo=timezone.utc)
    kwargs = _stream_kwargs(stream_options={"include_usage": True},
                            completion_start_time=start + timedelta(milliseconds=40))
    event = litellm_event(kwargs, _response(), start, start + timedelta(milliseconds=250), failed=False)
    assert (event.latency_ms, event.ttft_ms, event.streamed) == (250.0, 40.0, True)
    # plain numbers (seconds) too, but not booleans; an end before the start is no latency
    for begin, end, latency in ((10, 10.5, 500.0), (10.0, 12, 2000.0), (3, 3, 0.0), (True, 2, None),
                                (2.0, 1.0, None), (start, start.replace(tzinfo=None), None),
                                (start, 12.0, None), ("1", "2", None)):
        assert litellm_event(kwargs, _response(), begin, end, failed=False).latency_ms == latency
    # a call that did not stream has no time to first token
    plain = litellm_event({**kwargs, "stream": False}, _response(), start, start, failed=False)
    assert (plain.ttft_ms, plain.streamed, plain.latency_ms) == (None, False, 0.0)


def test_the_resolved_model_is_the_one_the_provider_answered_with():
    """Behind the proxy, the response's ``model`` is the model group; LiteLLM keeps the
    provider's answer in its hidden params."""
    renamed = _response(model="chat")
    renamed._hidden_params = {"provider_response_model": "gpt-4o-mini-2024-07-18"}
    kwargs = {"model": "gpt-4o-mini", "custom_llm_provider": "openai", "model_id": "dep-9",
              "litellm_params": {"model_info": {"name": "no id"}}}
    event = litellm_event(kwargs, renamed, None, None, failed=False)
    assert (event.model, event.resolved_model, event.metadata["deployment_id"]) == \
        ("gpt-4o-mini", "gpt-4o-mini-2024-07-18", "dep-9")
    plain = litellm_event({"custom_llm_provider": "openai"}, _response(model="chat"), None, None,
                          failed=False)
    assert (plain.model, plain.resolved_model, plain.provider) == ("chat", "chat", "openai")
    odd = _response(model="chat")
    odd._hidden_params = {"provider_response_model": 5}
    assert litellm_event(kwargs, odd, None, None, failed=False).resolved_model == "chat"


def test_a_failed_call_reads_no_response_and_names_only_real_exceptions():
    kwargs = {"custom_llm_provider": "openai", "litellm_params": {"custom_llm_provider": "azure"},
              "exception": litellm.RateLimitError("slow down", "openai", "gpt-4o-mini")}
    event = litellm_event(kwargs, _response(model="gpt-4o-mini"), None, None, failed=True)
    assert (event.status, event.error_type, event.model, event.provider, event.resolved_model,
            event.usage.input_tokens) == ("error", "litellm.RateLimitError", "unknown", "openai", None, 0)
    event = litellm_event({"model": "gpt-4o-mini", "exception": "text", "litellm_params": {
        "custom_llm_provider": "azure"}}, None, None, None, failed=True)
    assert (event.status, event.error_type, event.model, event.provider) == \
        ("error", None, "gpt-4o-mini", "azure")


def test_an_embedding_without_reported_usage_counts_its_inputs_offline():
    kwargs = {"model": "text-embedding-3-small", "custom_llm_provider": "openai",
              "call_type": "aembedding", "input": ["one two three", 5, "four"]}
    event = litellm_event(kwargs, {"model": "text-embedding-3-small"}, None, None, failed=False)
    expected = count_text("one two three", "text-embedding-3-small") + count_text(
        "four", "text-embedding-3-small")
    assert (event.call_type, event.usage.input_tokens, event.usage.output_tokens, event.estimated) == \
        ("embedding", expected, 0, True)
    assert event.metadata["llmtally_estimated"] == \
        "the provider reported no usage; tokens counted offline"
    alone = litellm_event({**kwargs, "input": "one two three"}, None, None, None, failed=False)
    assert alone.usage.input_tokens == count_text("one two three", "text-embedding-3-small") > 0
    assert litellm_event({**kwargs, "input": 7}, None, None, None, failed=False).usage.input_tokens == 0


def test_an_abandoned_stream_says_so_and_counts_what_was_consumed():
    kwargs = _stream_kwargs(stream_options={"include_usage": True}, litellm_call_id="call-1")
    event = litellm_event(kwargs, _response(), None, None, failed=False, abandoned=True)
    assert (event.usage.input_tokens, event.usage.output_tokens, event.estimated, event.streamed) == \
        (count_messages(MSGS, "gpt-4o-mini"), count_text(REPLY, "gpt-4o-mini"), True, True)
    assert dict(event.metadata) == {
        "litellm_call_id": "call-1", "stream_abandoned": True,
        "llmtally_estimated": "the caller left the stream early; prompt and the chunks consumed "
                              "counted offline"}


def test_a_prompt_and_answer_counted_offline_use_the_models_own_encoding():
    text = "Пожалуйста, поздоровайся с журналом расходов. नमस्ते दुनिया"
    messages = [{"role": "user", "content": text}]
    event = litellm_event(_stream_kwargs(messages=messages), _response(reply=text), None, None,
                          failed=False)
    assert event.usage.input_tokens == count_messages(messages, "gpt-4o-mini") != \
        count_messages(messages, None)
    assert event.usage.output_tokens == count_text(text, "gpt-4o-mini") != count_text(text, None)
    assert event.estimated


def test_events_are_built_in_a_process_that_never_imported_litellm(monkeypatch):
    """Hook arguments kept and mapped later (no ``litellm`` module loaded): a stream of a
    provider llmtally does not know as OpenAI-format keeps the usage it reported."""
    monkeypatch.delitem(sys.modules, "litellm")
    kwargs = {"model": "deepseek-chat", "custom_llm_provider": "deepseek", "stream": True,
              "messages": MSGS}
    event = litellm_event(kwargs, {"model": "deepseek-chat", "usage": {
        "prompt_tokens": 120, "completion_tokens": 30}}, None, None, failed=False)
    assert (event.provider, event.usage.input_tokens, event.usage.output_tokens, event.estimated) == \
        ("deepseek", 120, 30, False)


def test_a_responses_call_counts_its_input_with_the_models_encoding():
    """The Responses API passes ``input`` (not ``messages``): a stream not asked for usage
    counts it with the model's own encoding."""
    text = "Пожалуйста, поздоровайся с журналом расходов. नमस्ते दुनिया"
    kwargs = {"model": "gpt-4o-mini", "custom_llm_provider": "openai", "call_type": "aresponses",
              "stream": True, "input": text}
    event = litellm_event(kwargs, _response(), None, None, failed=False)
    assert (event.call_type, event.usage.input_tokens, event.estimated) == \
        ("responses", count_text(text, "gpt-4o-mini"), True)
    assert count_text(text, "gpt-4o-mini") != count_text(text, None)


def test_a_calls_key_is_our_stamp_else_litellms_call_id():
    logging_obj = SimpleNamespace(model_call_details={"llmtally_event_id": "stamp-1"})
    # a deployment hook's kwargs hold what the caller passed: the logging object's stamp wins
    assert call_key({"litellm_logging_obj": logging_obj, "llmtally_event_id": "caller's",
                     "litellm_call_id": "call-1"}) == "stamp-1"
    unstamped = SimpleNamespace(model_call_details={"other": 1})
    assert call_key({"litellm_logging_obj": unstamped, "llmtally_event_id": "caller's",
                     "litellm_call_id": "call-1"}) == "call-1"
    # hooks given the logging details themselves
    assert call_key({"llmtally_event_id": "stamp-2", "litellm_call_id": "call-1"}) == "stamp-2"
    assert call_key({"llmtally_event_id": 5, "litellm_call_id": "call-1"}) == "call-1"
    assert call_key({"litellm_call_id": 7}) is None
    assert call_key(["llmtally_event_id"]) is None and call_key(None) is None


def test_the_scope_at_call_time_fills_what_the_request_leaves_out(tally, provider):
    with tally.scope(project="scoped-project", user="scoped-user", session="scoped-session",
                     tags=["scoped"], request_id="scoped-req", metadata={"ticket": "T-1"}):
        row = _one_call(tally, provider, litellm_trace_id="trace-1",
                        metadata={"tags": ["beta"], "model_group": 7,
                                  "user_api_key_team_id": "team-ads"})
    meta = json.loads(row["metadata"])
    assert (row["project"], row["user"], row["session"], row["request_id"], json.loads(row["tags"])) == \
        ("team-ads", "scoped-user", "scoped-session", "scoped-req", ["scoped", "beta"])
    assert (meta["ticket"], meta["litellm_trace_id"], meta["team_id"]) == ("T-1", "trace-1", "team-ads")
    assert "model_group" not in meta  # a number where a name belongs is left out


def test_a_call_without_a_start_or_a_scope_is_attributed_by_its_request_alone():
    kwargs = {"model": "gpt-4o-mini", "custom_llm_provider": "openai", "user": "body-user",
              "litellm_trace_id": "trace-1", "litellm_params": {
                  "metadata": {"project": "p", "session_id": 5},
                  "litellm_session_id": "sess-2", "litellm_trace_id": "params-trace"}}
    event = litellm_event(kwargs, _response(), None, None, failed=False)
    assert (event.project, event.user, event.session, event.request_id, event.tags) == \
        ("p", "body-user", "sess-2", "trace-1", [])
    assert dict(event.metadata) == {"litellm_trace_id": "trace-1"}
    from_params = litellm_event({**kwargs, "litellm_trace_id": None}, _response(), None, None,
                                failed=False)
    assert from_params.request_id == from_params.metadata["litellm_trace_id"] == "params-trace"


def test_the_proxy_caller_is_read_from_each_place_litellm_keeps_it_first_one_winning():
    """``litellm_params.metadata``, then ``litellm_metadata`` (the proxy's newer routes),
    then the standard logging object's metadata."""
    kwargs = {"model": "gpt-4o-mini", "custom_llm_provider": "openai", "litellm_params": {
        "metadata": {"user_api_key_alias": "from-metadata", "user_api_key_user_id": ""},
        "litellm_metadata": {"user_api_key_alias": "from-litellm-metadata",
                             "user_api_key_user_id": "alice", "user_api_key_team_id": 5}},
        "standard_logging_object": {"metadata": {
            "user_api_key_user_id": "bob", "user_api_key_team_id": "team-ads",
            "user_api_key_org_id": "org-1"}}}
    event = litellm_event(kwargs, _response(), None, None, failed=False)
    assert (event.user, event.project, event.tags) == ("alice", "team-ads", ["key:from-metadata"])
    assert dict(event.metadata) == {"key_alias": "from-metadata", "user_id": "alice",
                                    "team_id": "team-ads", "org_id": "org-1"}
    only_logging_object = {"standard_logging_object": {"metadata": {"user_api_key_user_id": "bob"}}}
    event = litellm_event(only_logging_object, _response(), None, None, failed=False)
    assert (event.user, event.project, dict(event.metadata)) == ("bob", None, {"user_id": "bob"})


def test_the_master_keys_placeholder_in_one_place_does_not_hide_a_user_in_the_next():
    kwargs = {"model": "gpt-4o-mini", "litellm_params": {
        "metadata": {"user_api_key_user_id": "default_user_id"},
        "litellm_metadata": {"user_api_key_user_id": "alice"}}}
    event = litellm_event(kwargs, _response(), None, None, failed=False)
    assert (event.user, dict(event.metadata)) == ("alice", {"user_id": "alice"})


def test_a_plain_success_is_exactly_this_event():
    start = datetime(2026, 12, 2, 10, 0, tzinfo=timezone.utc)
    kwargs = {"model": "gpt-4o-mini", "custom_llm_provider": "openai", "call_type": "completion",
              "stream": False, "messages": MSGS, "litellm_call_id": "call-1",
              "llmtally_event_id": "ev-1", "cache_hit": True}
    event = litellm_event(kwargs, _response(), start, start + timedelta(milliseconds=5), failed=False)
    assert event == CallEvent(
        model="gpt-4o-mini", provider="openai", usage=Usage(input_tokens=120, output_tokens=30),
        status="ok", error_type=None, call_type="chat", streamed=False,
        resolved_model="gpt-4o-mini-2024-07-18", estimated=False, cache_hit=True, latency_ms=5.0,
        ttft_ms=None, id="ev-1", source="litellm", project=None, user=None, session=None, tags=[],
        request_id=None, metadata={"litellm_call_id": "call-1"})
    assert litellm_event({**kwargs, "cache_hit": "yes"}, _response(), None, None,
                         failed=False).cache_hit is False
    # what is not a mapping is no arguments at all
    odd = litellm_event(["model", "gpt-4o-mini"], _response(), None, None, failed=False)
    assert (odd.model, odd.provider, odd.status, odd.source, odd.id) == \
        ("gpt-4o-mini-2024-07-18", None, "ok", "litellm", None)


def test_the_routers_deployment_id_comes_before_the_calls_model_id():
    kwargs = {"model": "gpt-4o-mini", "model_id": "dep-9",
              "litellm_params": {"model_info": {"id": "dep-openai"}}}
    event = litellm_event(kwargs, _response(), None, None, failed=False)
    assert dict(event.metadata) == {"deployment_id": "dep-openai"}


def test_the_request_metadatas_session_comes_before_litellms_session_id():
    kwargs = {"model": "gpt-4o-mini", "litellm_params": {
        "metadata": {"session_id": "meta-session"}, "litellm_session_id": "sess-2"}}
    assert litellm_event(kwargs, _response(), None, None, failed=False).session == "meta-session"


# -- langchain_events.py ----------------------------------------------------------------------


def _partner_error(base: type[BaseException], module: str, name: str) -> type[BaseException]:
    """An exception class as a LangChain partner package defines it (its module's name)."""
    return type(name, (base,), {"__module__": module})


def test_langchain_error_classes_are_named_after_the_sdk_class_they_wrap():
    import openai
    from langchain_openai.chat_models.base import OpenAIAuthenticationError

    from llmtally.integrations.langchain_events import sdk_error_type

    def error(cls: type[BaseException]) -> BaseException:
        return BaseException.__new__(cls)

    assert sdk_error_type(error(OpenAIAuthenticationError)) == "openai.AuthenticationError"
    # a partner's own base class between: skipped, the SDK's class named
    middle = _partner_error(openai.RateLimitError, "langchain_partner.errors", "PartnerRateLimit")
    leaf = _partner_error(middle, "langchain_partner.chat_models", "PartnerChatRateLimit")
    assert sdk_error_type(error(leaf)) == "openai.RateLimitError"
    # only builtins behind it: the class's own name
    own = _partner_error(ValueError, "langchain_partner.errors", "PartnerValueError")
    assert sdk_error_type(own("x")) == "langchain_partner.errors.PartnerValueError"
    assert sdk_error_type(openai.APIConnectionError.__new__(openai.APIConnectionError)) == \
        "openai.APIConnectionError"
    # a mixin that is no exception first behind it: the class's own name too
    mixin = type("Retryable", (), {"__module__": "partner_sdk.mixins"})
    mixed = type("PartnerError", (mixin, ValueError), {"__module__": "langchain_partner.errors"})
    assert sdk_error_type(mixed("x")) == "langchain_partner.errors.PartnerError"


def test_the_output_limit_a_langchain_call_asks_for_is_read_from_each_providers_parameter():
    from llmtally.integrations.langchain_events import max_tokens

    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens", "max_new_tokens",
                "max_tokens_to_sample", "num_predict"):
        assert max_tokens({"ls_max_tokens": 5}, {key: 300}) == 300
    assert max_tokens({}, {"max_tokens": None, "max_completion_tokens": 200, "num_predict": 7}) == 200
    assert max_tokens({"ls_max_tokens": 64}, {"temperature": 0}) == 64
    assert max_tokens({"ls_max_tokens": "many"}, {"max_tokens": "x"}) is None
    assert max_tokens({}, {}) is None


def test_chat_litellm_hands_the_langchain_attribution_to_the_litellm_event(tally, provider):
    """Both handlers: the LiteLLM event (the one recorded) carries LangChain's project,
    session and request id from the run's metadata."""
    import uuid

    from langchain_litellm import ChatLiteLLM

    handler = tally.langchain()
    model = ChatLiteLLM(model="openai/gpt-4o-mini", api_base=provider.openai_base, api_key="sk-test")
    run_id = uuid.uuid4()
    model.invoke("Say hello.", config={"callbacks": [handler], "run_id": run_id, "metadata": {
        "llmtally_project": "search", "llmtally_user": "alice", "llmtally_session": "s-1",
        "llmtally_request_id": "req-7"}})
    with tally.scope(request_id="scope-req"):
        model.invoke("Say hello.", config={"callbacks": [handler]})
    first, second = ledger_rows(tally)
    assert (first["source"], first["project"], first["user"], first["session"], first["request_id"]) == \
        ("litellm", "search", "alice", "s-1", "req-7")
    assert json.loads(first["metadata"])["langchain_run_id"] == str(run_id)
    assert (first["input_tokens"], first["output_tokens"]) == (120, 30)
    assert first["cost"] == pytest.approx(MINI_COST, abs=1e-9)
    assert (second["project"], second["session"], second["request_id"]) == (None, None, "scope-req")


def test_a_run_never_seen_starting_takes_its_provider_from_the_answer():
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration, LLMResult

    from llmtally.integrations.langchain_events import langchain_event

    def ended(provider: str, model: str):
        message = AIMessage(REPLY, usage_metadata={"input_tokens": 7, "output_tokens": 3,
                                                   "total_tokens": 10},
                            response_metadata={"model_name": model, "model_provider": provider})
        result = LLMResult(generations=[[ChatGeneration(message=message)]])
        return langchain_event(None, result, run_id="run-1")

    event = ended("anthropic", "claude-house-1")
    assert (event.provider, event.model, event.resolved_model, event.call_type, event.usage.input_tokens) == \
        ("anthropic", "claude-house-1", "claude-house-1", "chat", 7)
    routed = ended("litellm", "openai/gpt-4o-mini")
    assert (routed.provider, routed.model, routed.resolved_model) == \
        ("openai", "gpt-4o-mini", "openai/gpt-4o-mini")


def test_a_legacy_run_never_seen_starting_is_an_unknown_completion_under_its_parent():
    from langchain_core.outputs import Generation, LLMResult

    from llmtally.integrations.langchain_events import langchain_event

    result = LLMResult(generations=[[Generation(text=REPLY)]],
                       llm_output={"token_usage": {"prompt_tokens": 9, "completion_tokens": 4}})
    event = langchain_event(None, result, run_id="run-2", parent_run_id="parent-1",
                            tags=["seq:step:1", "mine", "mine"])
    assert (event.model, event.provider, event.call_type, event.source, event.id, event.status) == \
        ("unknown", None, "completion", "langchain", "run-2", "ok")
    assert (event.usage.input_tokens, event.usage.output_tokens, event.tags) == (9, 4, ("mine",))
    assert event.metadata == {"langchain_parent_run_id": "parent-1"}
    assert langchain_event(None, result, run_id="run-3").metadata == {}


@pytest.mark.parametrize(("ident", "provider"), [
    (["langchain", "chat_models", "openai", "ChatOpenAI"], "openai"),
    (["langchain_anthropic", "chat_models", "ChatAnthropic"], "anthropic"),
    (["langchain_partner", "chat_models", "ChatPartner"], None),
    (["langchain_partner", "llms", "PartnerLLM"], None),
    (["langchain_partner", "language_models", "PartnerLM"], None),
    (["langchain_partner", "base", "PartnerBase"], None),
    (["langchain_community", "chat_models", "house", "ChatHouse"], "house"),
    (["my_company", "chat", "house", "ChatHouse"], None),
    (["langchain", "openai"], None), (("langchain", "house", "Chat"), "house"), ("langchain.x.y", None),
])
def test_the_provider_a_langchain_class_path_names(ident, provider):
    from llmtally.integrations.langchain_events import class_provider

    assert class_provider({"id": ident}) == provider


def test_a_langchain_models_class_name_from_its_serialized_form():
    from llmtally.integrations.langchain_events import _class_name

    assert _class_name({"id": ["langchain", "chat_models", "openai", "ChatOpenAI"]}) == "ChatOpenAI"
    assert _class_name({"id": ["x", ""], "name": "Named"}) == "Named"
    assert _class_name({"id": ["x", "", "ChatY"], "name": "Named"}) == "ChatY"
    assert _class_name({"id": "ChatOpenAI", "name": "Named"}) == "Named"
    assert _class_name({"id": ["ChatA", 5], "name": ""}) == "unknown"
    assert _class_name(None) == "unknown"


def test_an_answer_never_seen_starting_without_usage_is_counted_with_the_models_encoding():
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration, LLMResult

    from llmtally.integrations.langchain_events import langchain_event

    text = "Пожалуйста, поздоровайся с журналом расходов. नमस्ते दुनिया"
    message = AIMessage(text, response_metadata={"model_name": "gpt-4o-mini", "model_provider": "openai"})
    event = langchain_event(None, LLMResult(generations=[[ChatGeneration(message=message)]]), run_id="r")
    assert (event.usage.input_tokens, event.usage.output_tokens, event.estimated) == \
        (0, count_text(text, "gpt-4o-mini"), True)
    assert count_text(text, "gpt-4o-mini") != count_text(text, None)


def test_tool_calls_without_usage_are_counted_as_output():
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration, LLMResult

    from llmtally.integrations.langchain_events import langchain_event

    city = "Pneumonoultramicroscopicsilicovolcanoconiosis"  # o200k and cl100k count it apart
    calls = [{"name": "lookup", "args": {"city": city}, "id": "c1"},
             {"name": "weather", "args": {"day": datetime(2026, 12, 2).date()}, "id": "c2"}]
    message = AIMessage("Looking.", tool_calls=calls, response_metadata={"model_name": "gpt-4o-mini"})
    event = langchain_event(None, LLMResult(generations=[[ChatGeneration(message=message)]]), run_id="r")
    as_json = json.dumps([{"name": "lookup", "args": {"city": city}},
                          {"name": "weather", "args": {"day": "2026-12-02"}}])
    expected = count_text("Looking.", "gpt-4o-mini") + count_text(as_json, "gpt-4o-mini")
    assert (event.usage.input_tokens, event.usage.output_tokens, event.estimated) == (0, expected, True)
    assert count_text(as_json, "gpt-4o-mini") != count_text(as_json, None)


# -- langchain_events.py: the rest of the module (second mutmut run) -------------------------

RUSSIAN = "Пожалуйста, поздоровайся с журналом расходов. नमस्ते दुनिया"


def _run_start(*, model="gpt-4o-mini", provider="openai", prompt=None, first_token=None):
    """What the handler keeps when a chat model run starts (real LangChain messages as the
    prompt)."""
    import uuid

    from llmtally.integrations.langchain_events import RunStart

    run_id = uuid.uuid4()
    start = RunStart(None, run_id, provider=provider, model=model,
                     serialized={"id": ["langchain", "chat_models", "openai", "ChatOpenAI"]},
                     call_type="chat", parent=None, root=run_id, tags=["mine"], metadata={},
                     name=None, prompt=prompt)
    if first_token is not None:
        start.first_token = start.started + first_token
    return start


def test_a_prompt_counted_offline_uses_the_models_encoding_for_text_and_messages():
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_core.outputs import ChatGeneration, LLMResult

    from llmtally.integrations.langchain_events import langchain_event

    messages = [SystemMessage("Ты помощник."), HumanMessage(RUSSIAN)]
    for prompt, expected in ((RUSSIAN, count_text(RUSSIAN, "gpt-4o-mini")),
                             (messages, count_messages(messages, "gpt-4o-mini"))):
        assert expected != (count_text(RUSSIAN, None) if isinstance(prompt, str)
                            else count_messages(messages, None))
        start = _run_start(prompt=prompt)
        answer = ChatGeneration(message=AIMessage_("Привет!"))
        event = langchain_event(start, LLMResult(generations=[[answer]]), run_id=start.run_id)
        assert (event.usage.input_tokens, event.usage.output_tokens, event.estimated) == \
            (expected, count_text("Привет!", "gpt-4o-mini"), True)
        assert start.count_prompt() == expected
    # a prompt of no known shape counts nothing
    start = _run_start(prompt=None)
    event = langchain_event(start, LLMResult(generations=[[ChatGeneration(message=AIMessage_("Hi"))]]),
                            run_id=start.run_id)
    assert (event.usage.input_tokens, event.usage.output_tokens) == (0, count_text("Hi", "gpt-4o-mini"))


def AIMessage_(content, **kw):  # noqa: N802 - a real AIMessage
    from langchain_core.messages import AIMessage

    return AIMessage(content, **kw)


class _UnreadableMessage:
    """A message whose content raises when read (a provider object of a shape nobody knows)."""

    type = "human"

    @property
    def content(self):
        raise RuntimeError("content is gone")


def test_a_prompt_that_cannot_be_counted_counts_zero_and_says_why(caplog):
    from llmtally import _log
    from llmtally.integrations.langchain_events import _count_prompt

    _log._last_said.pop("langchain-count", None)
    with caplog.at_level("WARNING", logger=_log.logger.name):
        assert _count_prompt([_UnreadableMessage()], "gpt-4o-mini") == 0
    assert [r.getMessage() for r in caplog.records] == \
        ["llmtally: could not count a LangChain prompt (RuntimeError: content is gone)"]


def test_a_started_run_without_a_model_name_takes_the_one_the_provider_answered_with():
    from langchain_core.outputs import ChatGeneration, LLMResult

    from llmtally.integrations.langchain_events import langchain_event

    start = _run_start(model=None)
    message = AIMessage_(REPLY, usage_metadata={"input_tokens": 7, "output_tokens": 3, "total_tokens": 10},
                         response_metadata={"model_name": "gpt-4o-mini-2024-07-18"})
    event = langchain_event(start, LLMResult(generations=[[ChatGeneration(message=message)]]),
                            run_id=start.run_id)
    assert (event.model, event.resolved_model, event.provider, event.usage.input_tokens) == \
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini-2024-07-18", "openai", 7)


def test_a_legacy_answer_names_its_model_in_its_generation_info():
    from langchain_core.outputs import Generation, LLMResult

    from llmtally.integrations.langchain_events import langchain_event

    result = LLMResult(generations=[[Generation(text=REPLY, generation_info={"model_name": "house-1"})]],
                       llm_output={"token_usage": {"prompt_tokens": 9, "completion_tokens": 4}})
    event = langchain_event(None, result, run_id="run-4")
    assert (event.model, event.resolved_model, event.usage.input_tokens, event.usage.output_tokens) == \
        ("house-1", "house-1", 9, 4)


def test_a_cancelled_run_is_an_error_unless_its_answer_had_begun():
    from langchain_core.outputs import ChatGeneration, LLMResult

    from llmtally.integrations.langchain_events import langchain_event

    cancelled = asyncio.CancelledError()
    # started, nothing streamed, no partial answer: the call failed
    start = _run_start(prompt=RUSSIAN)
    event = langchain_event(start, None, run_id=start.run_id, error=cancelled)
    assert (event.status, event.error_type, event.streamed, event.usage) == \
        ("error", "asyncio.CancelledError", False, Usage())
    # a first token came: the caller left the stream, what came is counted
    start = _run_start(prompt=RUSSIAN, first_token=0.25)
    event = langchain_event(start, None, run_id=start.run_id, error=cancelled)
    assert (event.status, event.error_type, event.streamed, event.estimated) == ("ok", None, True, True)
    assert (event.usage.input_tokens, event.usage.output_tokens) == (count_text(RUSSIAN, "gpt-4o-mini"), 0)
    assert event.metadata["stream_abandoned"] is True
    # a partial answer without a first token seen
    start = _run_start(prompt=RUSSIAN)
    partial = LLMResult(generations=[[ChatGeneration(message=AIMessage_("Прив"))]])
    event = langchain_event(start, partial, run_id=start.run_id, error=cancelled)
    assert (event.status, event.streamed, event.usage.output_tokens) == \
        ("ok", True, count_text("Прив", "gpt-4o-mini"))
    # a run never seen starting, left: abandoned too
    event = langchain_event(None, None, run_id="r", error=GeneratorExit())
    assert (event.status, event.streamed, event.usage) == ("ok", True, Usage())


def test_odd_usage_details_and_answer_text_are_read_without_raising():
    from llmtally.integrations.langchain_events import langchain_event

    for details in ({"input_token_details": ["cache_read"]}, {"output_token_details": "reasoning"}):
        usage = {"input_tokens": 10, "output_tokens": 3, "total_tokens": 13, **details}
        response = {"generations": [[{"message": {"usage_metadata": usage}, "text": REPLY}]]}
        event = langchain_event(None, response, run_id="r")
        assert (event.usage.input_tokens, event.usage.output_tokens, event.estimated) == (10, 3, False)
    # an answer whose text is no string counts no output
    event = langchain_event(None, {"generations": [[{"text": 123456789}]]}, run_id="r")
    assert (event.usage.input_tokens, event.usage.output_tokens, event.estimated) == (0, 0, True)


def test_responses_of_other_mapping_and_sequence_types_are_read_alike():
    from types import MappingProxyType

    from langchain_core.outputs import Generation

    from llmtally.integrations.langchain_events import langchain_event

    usage = {"input_tokens": 10, "output_tokens": 3, "total_tokens": 13}
    generation = MappingProxyType({"message": {"usage_metadata": usage,
                                               "response_metadata": {"model_name": "house-1"}},
                                   "text": REPLY})
    event = langchain_event(None, {"generations": [[generation]]}, run_id="r")
    assert (event.resolved_model, event.usage.input_tokens, event.usage.output_tokens, event.estimated) == \
        ("house-1", 10, 3, False)
    llm_output = MappingProxyType({"token_usage": {"prompt_tokens": 9, "completion_tokens": 4},
                                   "model_name": "house-2"})
    for generations in ([[Generation(text=REPLY)]], [(Generation(text=REPLY),)]):
        event = langchain_event(None, {"generations": generations, "llm_output": llm_output}, run_id="r")
        assert (event.resolved_model, event.usage.input_tokens, event.usage.output_tokens, event.estimated) == \
            ("house-2", 9, 4, False)


def test_a_model_name_that_is_no_text_is_passed_over():
    from langchain_core.outputs import ChatGeneration, LLMResult

    from llmtally.integrations.langchain_events import langchain_event

    for odd in (42, "", ["gpt-4o"]):
        message = AIMessage_(REPLY, usage_metadata={"input_tokens": 7, "output_tokens": 3, "total_tokens": 10},
                             response_metadata={"model_name": odd, "model": "gpt-4o-mini-2024-07-18"})
        event = langchain_event(None, LLMResult(generations=[[ChatGeneration(message=message)]]), run_id="r")
        assert (event.resolved_model, event.model) == ("gpt-4o-mini-2024-07-18", "gpt-4o-mini-2024-07-18")


def test_usage_metadata_with_odd_counts_is_read_as_the_shared_reader_reads_it():
    """The plain-dict shortcut: exact for plain counts, and no shortcut for negative, huge or
    non-int counts (the shared reader clamps and converts them)."""
    from langchain_core.outputs import ChatGeneration, LLMResult

    from llmtally._events.usage import MAX_TOKEN_COUNT, extract_usage
    from llmtally.integrations.langchain_events import langchain_event

    def read(usage):
        message = AIMessage_(REPLY, response_metadata={"model_name": "gpt-4o-mini"})
        message.usage_metadata = usage  # as a provider package may leave it, unchecked
        return langchain_event(None, LLMResult(generations=[[ChatGeneration(message=message)]]),
                               run_id="r").usage

    assert read({"input_tokens": 10, "output_tokens": 3, "total_tokens": 13}) == Usage(10, 3, 0, 0, 0)
    assert read({"input_tokens": 100, "output_tokens": 30, "input_token_details": {
        "cache_read": 60, "cache_creation": 20}, "output_token_details": {"reasoning": 10}}) == \
        Usage(100, 30, 60, 20, 10)
    fields = {"input_tokens": 100, "output_tokens": 30}
    details = {"cache_read": 60, "cache_creation": 20, "reasoning": 10}
    for odd in (-5, 2.0, MAX_TOKEN_COUNT + 1):
        for key in (*fields, *details):
            usage = dict(fields, input_token_details={k: v for k, v in details.items() if k != "reasoning"},
                         output_token_details={"reasoning": details["reasoning"]})
            if key in fields:
                usage[key] = odd
            elif key == "reasoning":
                usage["output_token_details"] = {"reasoning": odd}
            else:
                usage["input_token_details"] = {**usage["input_token_details"], key: odd}
            expected = extract_usage({"usage_metadata": usage})
            assert read(usage) == expected, (key, odd)
            assert all(type(n) is int and 0 <= n <= MAX_TOKEN_COUNT for n in expected)
