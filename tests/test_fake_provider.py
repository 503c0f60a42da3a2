"""The loopback fake provider, proven with real clients over real HTTP (no mocks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import MSGS

from llmtally.testing import FakeProvider, FakeUsage

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # also set by conftest.py

USAGE = FakeUsage(prompt_tokens=120, completion_tokens=30, cached_tokens=100, reasoning_tokens=7,
                  cache_creation_tokens=11, cache_read_tokens=22)
REPLY = "Hello from the fake provider."


@pytest.fixture(scope="module")
def server() -> Iterator[FakeProvider]:
    with FakeProvider() as fp:
        yield fp


@pytest.fixture
def fp(server: FakeProvider) -> FakeProvider:
    server.reset()
    server.usage = FakeUsage(**vars(USAGE))
    server.reply, server.resolved_model = REPLY, None
    return server


@pytest.fixture
def client(fp: FakeProvider) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fp.openai_base, api_key="sk-test", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def litellm():
    import litellm

    return litellm


def sse_events(resp: httpx.Response) -> list[tuple[str | None, str]]:
    """Parse an SSE body into (event name, data) pairs."""
    out, name = [], None
    for line in resp.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            out.append((name, line[6:]))
            name = None
    return out


# -- lifecycle -------------------------------------------------------------------------------


def test_starts_fast_stops_cleanly_without_thread_leaks() -> None:
    before = set(threading.enumerate())
    fp = FakeProvider().start()
    assert fp.url.startswith("http://127.0.0.1:") and fp.port > 0
    assert fp.openai_base == fp.url + "/v1" and fp.anthropic_base == fp.url
    idle = httpx.Client()  # keeps a keep-alive connection open (a handler thread waiting)
    assert idle.post(fp.openai_base + "/chat/completions", json={"model": "m", "messages": MSGS}).status_code == 200
    fp.delay(30)  # a handler asleep in delay() must not hold up stop()

    def slow_call() -> None:
        with pytest.raises(httpx.TransportError):  # the server hangs up on stop()
            httpx.post(fp.url + "/v1/messages", json={}, timeout=60)

    in_flight = threading.Thread(target=slow_call)
    in_flight.start()
    while fp.requests < 2:
        time.sleep(0.005)
    t0 = time.perf_counter()
    fp.stop()
    assert time.perf_counter() - t0 < 10  # did not wait out the 30 s delay
    in_flight.join(5)
    idle.close()
    assert set(threading.enumerate()) - before == set()
    fp.stop()  # idempotent


# -- OpenAI SDK ------------------------------------------------------------------------------


def test_openai_chat_non_stream_reports_fake_usage(fp: FakeProvider, client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert r.object == "chat.completion" and r.id and r.model == "gpt-4o-mini"
    assert r.choices[0].message.content == REPLY and r.choices[0].finish_reason == "stop"
    u = r.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (120, 30, 150)
    assert u.prompt_tokens_details.cached_tokens == 100
    assert u.completion_tokens_details.reasoning_tokens == 7
    assert fp.requests == 1
    (entry,) = fp.request_log
    assert (entry["path"], entry["model"], entry["stream"]) == ("/v1/chat/completions", "gpt-4o-mini", False)
    assert entry["headers"]["authorization"] == "***" and "sk-test" not in json.dumps(entry)
    assert entry["body"]["messages"] == MSGS


def test_resolved_model_is_reported(fp: FakeProvider, client: openai.OpenAI) -> None:
    fp.resolved_model = "gpt-4o-mini-2024-07-18"
    r = client.chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert r.model == "gpt-4o-mini-2024-07-18"
    assert fp.request_log[0]["model"] == "gpt-4o-mini"


def test_openai_stream_without_usage(fp: FakeProvider, client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, stream=True))
    assert len(chunks) == 5 and all(c.usage is None and len(c.choices) == 1 for c in chunks)
    assert "".join(c.choices[0].delta.content for c in chunks) == REPLY
    assert [c.choices[0].finish_reason for c in chunks] == [None] * 4 + ["stop"]
    assert fp.request_log[0]["stream"] is True


def test_openai_stream_with_include_usage(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, stream=True,
                                                 stream_options={"include_usage": True}))
    *content, last = chunks
    assert "".join(c.choices[0].delta.content for c in content) == REPLY
    assert last.choices == [] and (last.usage.prompt_tokens, last.usage.completion_tokens) == (120, 30)
    assert last.usage.prompt_tokens_details.cached_tokens == 100


def test_openai_raw_stream_ends_with_done(fp: FakeProvider) -> None:
    body = {"model": "m", "messages": MSGS, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", fp.openai_base + "/chat/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["transfer-encoding"] == "chunked"
        events = sse_events(resp)
    assert events[-1] == (None, "[DONE]")
    assert json.loads(events[-2][1])["usage"]["total_tokens"] == 150


def test_embeddings(fp: FakeProvider, client: openai.OpenAI) -> None:
    r = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])  # SDK asks for base64
    assert [d.index for d in r.data] == [0, 1] and len(r.data[0].embedding) == 8
    assert r.data[0].embedding != r.data[1].embedding
    assert (r.usage.prompt_tokens, r.usage.total_tokens) == (120, 120)
    again = client.embeddings.create(model="text-embedding-3-small", input="a", encoding_format="float")
    assert again.data[0].embedding == pytest.approx(r.data[0].embedding, abs=1e-6)
    tokens = client.embeddings.create(model="text-embedding-3-small", input=[[1, 2], [3]], dimensions=4,
                                      encoding_format="float")
    assert len(tokens.data) == 2 and len(tokens.data[1].embedding) == 4
    assert len(client.embeddings.create(model="e", input=[1, 2, 3]).data) == 1  # one token list
    assert fp.requests == 4


def test_legacy_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi")
    assert r.choices[0].text == REPLY and r.usage.total_tokens == 150
    chunks = list(client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi", stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == REPLY
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 120


# -- Anthropic -------------------------------------------------------------------------------


def test_anthropic_messages_non_stream_over_http(fp: FakeProvider) -> None:
    r = httpx.post(fp.anthropic_base + "/v1/messages", headers={"x-api-key": "sk-ant-test"},
                   json={"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": MSGS})
    body = r.json()
    assert r.status_code == 200 and body["type"] == "message" and body["content"][0]["text"] == REPLY
    assert body["usage"] == {"input_tokens": 120, "output_tokens": 30,
                             "cache_creation_input_tokens": 11, "cache_read_input_tokens": 22}
    assert fp.request_log[0]["headers"]["x-api-key"] == "***"


def test_anthropic_stream_event_sequence(fp: FakeProvider) -> None:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": MSGS, "stream": True}
    with httpx.stream("POST", fp.anthropic_base + "/v1/messages", json=body) as resp:
        events = sse_events(resp)
    names = [n for n, _ in events]
    assert names == ["message_start", "content_block_start", "ping"] + ["content_block_delta"] * 5 + [
        "content_block_stop", "message_delta", "message_stop"]
    data = [json.loads(d) for _, d in events]
    assert all(d["type"] == n for n, d in zip(names, data, strict=True))
    assert data[0]["message"]["usage"]["input_tokens"] == 120
    assert data[0]["message"]["usage"]["cache_read_input_tokens"] == 22
    assert "".join(d["delta"]["text"] for d in data[3:8]) == REPLY
    assert data[-2]["usage"]["output_tokens"] == 30


@pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")
def test_anthropic_sdk(fp: FakeProvider) -> None:
    anthropic = pytest.importorskip("anthropic")
    a = anthropic.Anthropic(base_url=fp.anthropic_base, api_key="sk-ant-test", max_retries=0)
    r = a.messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=MSGS)
    assert r.content[0].text == REPLY
    assert (r.usage.input_tokens, r.usage.output_tokens) == (120, 30)
    assert (r.usage.cache_creation_input_tokens, r.usage.cache_read_input_tokens) == (11, 22)
    with a.messages.stream(model="claude-sonnet-4-5", max_tokens=10, messages=MSGS) as s:
        assert "".join(s.text_stream) == REPLY
        final = s.get_final_message()
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.cache_read_input_tokens) == (120, 30, 22)
    fp.fail_next(status=429)
    with pytest.raises(anthropic.RateLimitError) as err:
        a.messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=MSGS)
    assert err.value.body["error"]["type"] == "rate_limit_error"


# -- LiteLLM ---------------------------------------------------------------------------------


def test_litellm_openai_route(fp: FakeProvider, litellm) -> None:
    r = litellm.completion(model="openai/gpt-4o-mini", api_base=fp.openai_base, api_key="sk-test", messages=MSGS)
    assert r.choices[0].message.content == REPLY
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (120, 30)
    assert r.usage.prompt_tokens_details.cached_tokens == 100
    assert r._hidden_params["response_cost"] > 0
    assert fp.request_log[0]["path"] == "/v1/chat/completions"


def test_litellm_openai_stream_with_usage(fp: FakeProvider, litellm) -> None:
    chunks = list(litellm.completion(model="openai/gpt-4o-mini", api_base=fp.openai_base, api_key="sk-test",
                                     messages=MSGS, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (120, 30)


def test_litellm_anthropic_route_api_base_forms(fp: FakeProvider, litellm) -> None:
    # LiteLLM appends /v1/messages unless api_base already ends with it.
    for base in (fp.anthropic_base, fp.anthropic_base + "/v1/messages"):
        r = litellm.completion(model="anthropic/claude-sonnet-4-5", api_base=base, api_key="sk-ant-test",
                               messages=MSGS)
        assert r.choices[0].message.content == REPLY
        assert r.usage.completion_tokens == 30
        assert r.usage.prompt_tokens == 120 + 11 + 22  # LiteLLM adds Anthropic's cache tokens in
        assert r.usage.prompt_tokens_details.cached_tokens == 22
    with pytest.raises(litellm.NotFoundError):
        litellm.completion(model="anthropic/claude-sonnet-4-5", api_base=fp.url + "/v1", api_key="sk-ant-test",
                           messages=MSGS)
    assert [e["path"] for e in fp.request_log] == ["/v1/messages", "/v1/messages", "/v1/v1/messages"]


def test_litellm_anthropic_stream(fp: FakeProvider, litellm) -> None:
    chunks = list(litellm.completion(model="anthropic/claude-sonnet-4-5", api_base=fp.anthropic_base,
                                     api_key="sk-ant-test", messages=MSGS, stream=True,
                                     stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (153, 30)


def test_litellm_embedding(fp: FakeProvider, litellm) -> None:
    r = litellm.embedding(model="openai/text-embedding-3-small", api_base=fp.openai_base, api_key="sk-test",
                          input=["a", "b"])
    assert len(r.data) == 2 and r.usage.prompt_tokens == 120
    assert fp.request_log[0]["path"] == "/v1/embeddings"


def test_litellm_failures(fp: FakeProvider, litellm) -> None:
    kw = dict(model="openai/gpt-4o-mini", api_base=fp.openai_base, api_key="sk-test", messages=MSGS)
    fp.fail_next(status=500)
    litellm.completion(**kw)  # the OpenAI client inside LiteLLM retries on its own by default...
    assert fp.requests == 2
    for status, exc in ((500, litellm.InternalServerError), (429, litellm.RateLimitError),
                        (401, litellm.AuthenticationError)):
        fp.fail_next(status=status)
        with pytest.raises(exc):
            litellm.completion(**kw, max_retries=0)  # ...unless told not to
    fp.fail_next(status=529)
    with pytest.raises(litellm.InternalServerError, match="overloaded_error"):
        litellm.completion(model="anthropic/claude-sonnet-4-5", api_base=fp.anthropic_base,
                           api_key="sk-ant-test", messages=MSGS, max_retries=0)
    assert fp.requests == 6


# -- LangChain -------------------------------------------------------------------------------


def test_langchain_chat_openai(fp: FakeProvider) -> None:
    from langchain_openai import ChatOpenAI

    msg = ChatOpenAI(base_url=fp.openai_base, api_key="sk-test", model="gpt-4o-mini").invoke("hi")
    assert msg.content == REPLY and msg.response_metadata["model_name"] == "gpt-4o-mini"
    u = msg.usage_metadata
    assert (u["input_tokens"], u["output_tokens"], u["total_tokens"]) == (120, 30, 150)
    assert u["input_token_details"]["cache_read"] == 100
    assert u["output_token_details"]["reasoning"] == 7
    streamed = None
    for chunk in ChatOpenAI(base_url=fp.openai_base, api_key="sk-test", model="gpt-4o-mini",
                            stream_usage=True).stream("hi"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed is not None and streamed.content == REPLY
    assert streamed.usage_metadata is not None and streamed.usage_metadata["total_tokens"] == 150
    assert fp.request_log[-1]["body"]["stream_options"] == {"include_usage": True}


@pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")
def test_langchain_chat_anthropic(fp: FakeProvider) -> None:
    langchain_anthropic = pytest.importorskip("langchain_anthropic")
    chat = langchain_anthropic.ChatAnthropic(base_url=fp.anthropic_base, api_key="sk-ant-test",
                                             model="claude-sonnet-4-5")
    u = chat.invoke("hi").usage_metadata
    assert (u["input_tokens"], u["output_tokens"]) == (153, 30)
    assert u["input_token_details"] == {"cache_read": 22, "cache_creation": 11}


# -- failure modes ---------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "exc"), [(500, openai.InternalServerError), (429, openai.RateLimitError),
                                              (401, openai.AuthenticationError)])
def test_fail_next_then_recover(fp: FakeProvider, client: openai.OpenAI, status: int, exc: type) -> None:
    fp.fail_next(status=status)
    with pytest.raises(exc) as err:
        client.chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert err.value.status_code == status
    assert client.chat.completions.create(model="gpt-4o-mini", messages=MSGS).choices[0].message.content == REPLY
    assert fp.requests == 2


def test_fail_next_n_and_custom_body(fp: FakeProvider, client: openai.OpenAI) -> None:
    fp.fail_next(2, status=503, body={"error": {"message": "down for lunch", "type": "x", "code": "lunch"}})
    for _ in range(2):
        with pytest.raises(openai.APIStatusError, match="down for lunch") as err:
            client.chat.completions.create(model="gpt-4o-mini", messages=MSGS)
        assert err.value.status_code == 503
    client.chat.completions.create(model="gpt-4o-mini", messages=MSGS)


def test_delay_causes_client_timeout(fp: FakeProvider, client: openai.OpenAI) -> None:
    fp.delay(0.5)
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.1).chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    fp.delay(0)
    client.with_options(timeout=2).chat.completions.create(model="gpt-4o-mini", messages=MSGS)


def test_cut_stream_openai_sdk(fp: FakeProvider, client: openai.OpenAI) -> None:
    fp.cut_stream_after(2)
    got = []
    with pytest.raises(openai.APIConnectionError) as err:
        for chunk in client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, stream=True,
                                                    stream_options={"include_usage": True}):
            got.append(chunk.choices[0].delta.content)
    assert got == ["Hello ", "from "]  # two chunks arrive, then the error
    assert type(err.value.__cause__).__name__ == "RemoteProtocolError"  # incomplete chunked read
    fp.cut_stream_after(None)
    assert len(list(client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, stream=True))) == 5


def test_cut_stream_litellm(fp: FakeProvider, litellm) -> None:
    from litellm.exceptions import MidStreamFallbackError  # not exported as litellm.MidStreamFallbackError

    fp.cut_stream_after(2)
    got = []
    with pytest.raises(litellm.ServiceUnavailableError) as err:
        for chunk in litellm.completion(model="openai/gpt-4o-mini", api_base=fp.openai_base, api_key="sk-test",
                                        messages=MSGS, stream=True, stream_options={"include_usage": True}):
            got.append(chunk.choices[0].delta.content)
    assert got == ["Hello ", "from "]
    assert isinstance(err.value, MidStreamFallbackError)
    assert "incomplete chunked read" in str(err.value) or "Connection error" in str(err.value)


def test_cut_stream_anthropic(fp: FakeProvider) -> None:
    fp.cut_stream_after(3)
    body = {"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": MSGS, "stream": True}
    got = []
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("POST", fp.anthropic_base + "/v1/messages", json=body) as resp:
            for line in resp.iter_lines():
                got.append(line)
    deltas = [json.loads(x[6:]) for x in got if x.startswith("data: ") and "text_delta" in x]
    assert len(deltas) == 3 and not any("message_stop" in x for x in got)


# -- protocol edges and bookkeeping ----------------------------------------------------------


def test_unknown_path_404_and_bad_json_400(fp: FakeProvider) -> None:
    r = httpx.post(fp.url + "/v1/nope", json={})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert httpx.get(fp.openai_base + "/models").status_code == 404
    r = httpx.post(fp.openai_base + "/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(fp.anthropic_base + "/v1/messages", content=b"[]")
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert fp.requests == 4


def test_chunked_request_body(fp: FakeProvider) -> None:
    payload = json.dumps({"model": "m", "messages": MSGS}).encode()
    with httpx.Client() as c:  # a generator body is sent with Transfer-Encoding: chunked
        for _ in range(2):  # and the connection stays usable afterwards
            r = c.post(fp.openai_base + "/chat/completions", content=iter([payload[:10], payload[10:]]))
            assert r.status_code == 200 and r.json()["model"] == "m"
    assert fp.request_log[0]["headers"]["transfer-encoding"] == "chunked"


def test_keep_alive_reuses_one_connection_across_streams(fp: FakeProvider) -> None:
    local_ports = set()
    with httpx.Client() as c:
        for stream in (False, True, False, True):
            body = {"model": "m", "messages": MSGS, "stream": stream}
            r = c.post(fp.openai_base + "/chat/completions", json=body)
            assert r.status_code == 200
            local_ports.add(r.extensions["network_stream"].get_extra_info("socket").getsockname()[1])
    assert len(local_ports) == 1 and fp.requests == 4


def test_request_counter_exact_under_concurrency(fp: FakeProvider) -> None:
    per_thread, threads = 200, 8

    def worker(i: int) -> int:
        ok = 0
        with httpx.Client() as c:
            for j in range(per_thread):
                body = {"model": f"m{i}", "messages": MSGS, "stream": j % 10 == 0}
                ok += c.post(fp.openai_base + "/chat/completions", json=body).status_code == 200
        return ok

    with ThreadPoolExecutor(threads) as pool:
        assert sum(pool.map(worker, range(threads))) == per_thread * threads
    assert fp.requests == per_thread * threads == len(fp.request_log)


def test_reset(fp: FakeProvider, client: openai.OpenAI) -> None:
    client.chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    fp.fail_next(5)
    fp.delay(10)
    fp.cut_stream_after(0)
    fp.usage = FakeUsage(prompt_tokens=1, completion_tokens=2)
    fp.reset()
    assert fp.requests == 0 and fp.request_log == []
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.total_tokens == 3  # usage survives reset()


def test_runnable_as_module() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "llmtally.testing", "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        url = proc.stdout.readline().split()[-1]
        assert url.startswith("http://127.0.0.1:")
        r = httpx.post(url + "/v1/chat/completions", json={"model": "m", "messages": MSGS})
        assert r.json()["choices"][0]["message"]["content"] == REPLY
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
