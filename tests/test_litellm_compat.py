"""Contract tests: each LiteLLM internal that ``integrations/litellm_compat.py`` reaches, and the
behaviour of it llmtally relies on, checked on the installed litellm (real litellm over HTTP to
the loopback fake provider; nothing of LiteLLM is replaced, a hook is only wrapped around the
real one). ``scripts/litellm_contract.sh`` runs this file once per supported minor release;
each test id names the release it ran on.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import threading
import time
import tomllib
import uuid
import warnings
from datetime import datetime
from importlib.util import find_spec
from pathlib import Path

import pytest
from conftest import MSGS, reset_litellm_callbacks

from llmtally._versions import satisfies, version_tuple
from llmtally.testing import FakeUsage

litellm = pytest.importorskip("litellm")
from litellm.integrations.custom_logger import CustomLogger  # noqa: E402

from llmtally.integrations import litellm_compat as compat  # noqa: E402
from llmtally.integrations.litellm_drain import drain_logging_worker  # noqa: E402

INSTALLED = compat.installed_version() or "0"
MINOR = ".".join(INSTALLED.split(".")[:2])
pytestmark = pytest.mark.parametrize("release", [INSTALLED], ids=[f"litellm-{MINOR}"])

FAKE_PROVIDER = {"usage": FakeUsage(prompt_tokens=10, completion_tokens=2),
                 "resolved_model": "gpt-4o-mini-2024-07-18"}
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _chat(fp, **kw):
    return {"model": "openai/gpt-4o-mini", "api_base": fp.openai_base, "api_key": "sk-test",
            "messages": MSGS, **kw}


def _wait_for(predicate, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.005)
    return predicate()


class _Probe(CustomLogger):
    """Notes what each hook was given (kwargs are LiteLLM's ``model_call_details``)."""

    def __init__(self, sleep_s: float = 0.0):
        super().__init__()
        self.sleep_s = sleep_s
        self.seen: list[tuple[str, dict, str]] = []
        self.done = threading.Event()

    def log_pre_api_call(self, model, messages, kwargs):  # LiteLLM updates the dict later on
        self.seen.append(("pre", dict(kwargs), threading.current_thread().name))

    def log_success_event(self, kwargs, response_obj, start_time, end_time):
        self.seen.append(("success", kwargs, threading.current_thread().name))
        time.sleep(self.sleep_s)
        self.done.set()

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        self.seen.append(("async_success", kwargs, threading.current_thread().name))

    async def async_pre_call_deployment_hook(self, kwargs, call_type):
        self.seen.append(("deployment", kwargs, threading.current_thread().name))

    def names(self):
        return [name for name, _, _ in self.seen]


@pytest.fixture(autouse=True)
def _drained():
    """Start with LiteLLM's async queue empty: what an earlier test left there runs the hooks
    registered when it runs, so it would reach this test's probes."""
    drain_logging_worker(5)


@pytest.fixture
def setup_calls(monkeypatch, provider):
    """Wrap LiteLLM's real ``function_setup`` (whatever is installed there now) to note each
    call: whether the request had been sent yet, ``is_async_call``, what it returned; and raise
    ``raise_next`` once when set."""
    original = litellm.utils.function_setup
    calls: list[dict] = []
    control: dict = {"raise_next": None}

    def function_setup(original_function, rules_obj, start_time, *args, **kwargs):
        note = {"requests_before": provider.requests,
                "is_async": kwargs.get("is_async_call", True),  # its default: async
                "call_type": original_function}
        calls.append(note)
        if control["raise_next"] is not None:
            error, control["raise_next"] = control["raise_next"], None
            raise error
        note["result"] = original(original_function, rules_obj, start_time, *args, **kwargs)
        return note["result"]

    monkeypatch.setattr(litellm.utils, "function_setup", function_setup)
    return calls, control


# -- the version gate ------------------------------------------------------------------------


def test_the_installed_litellm_is_inside_the_supported_range(release):
    assert compat.is_supported(release)
    assert compat.check_version() is True


def test_the_supported_range_is_pyprojects_litellm_extra(release):
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    [spec] = extras["litellm"]
    assert spec == f"litellm{compat.SUPPORTED}"


def test_an_unsupported_release_is_said_once_with_both_versions(release, caplog):
    caplog.set_level(logging.WARNING, logger="llmtally")
    assert [compat.check_version(v) for v in ("1.111.0", "1.111.0", "1.107.3", "1.105.9")] == \
        [False] * 4
    assert compat.check_version("1.110.9") is True and compat.check_version("1.106") is True
    said = [r.getMessage() for r in caplog.records if r.name == "llmtally"]
    assert len(said) == 3  # one per unsupported release, not one per check
    assert said[0].startswith("llmtally: litellm 1.111.0 is outside the releases this llmtally "
                              "was tested with (litellm>=1.106,<1.111,!=1.107.*)")
    assert "1.107.3" in said[1] and "1.105.9" in said[2]
    assert compat.check_version("not-a-version") is False  # never raises


def test_version_specifiers_compare_by_number(release):
    assert version_tuple("1.110.2") == (1, 110, 2)
    assert [satisfies(v, ">=1.106,<1.111,!=1.107.*") for v in
            ("1.106.0", "1.106.12", "1.107.0", "1.107.9", "1.108.14", "1.110.99", "1.111.0",
             "1.105.99", "1.1070.0")] == [True, True, False, False, True, True, False, False, False]
    assert satisfies("2.0", "==2.*") and not satisfies("2.0", "!=2.*")
    assert satisfies("1.2", "==1.2.0") and satisfies("1.3", ">1.2") and satisfies("1.2", "<=1.2")
    with pytest.raises(ValueError, match="unsupported version clause: '~=1.2'"):
        satisfies("1.2", "~=1.2")


def test_a_missing_hook_is_said_once_with_what_is_lost(release, caplog):
    caplog.set_level(logging.WARNING, logger="llmtally")
    for _ in range(3):
        compat.warn_lost("litellm.utils.function_setup", "sync budget checks before send are off")
    [said] = [r.getMessage() for r in caplog.records if r.name == "llmtally"]
    assert said == (f"llmtally: litellm {release} has no usable litellm.utils.function_setup; "
                    "sync budget checks before send are off")


# -- litellm.utils.function_setup ------------------------------------------------------------


def test_function_setup_has_the_shape_the_wrapper_expects(release):
    names = list(inspect.signature(litellm.utils.function_setup).parameters)
    assert names[:3] == ["original_function", "rules_obj", "start_time"]
    assert "is_async_call" in names
    assert callable(getattr(litellm.utils, "_restore_correlation_context_if_supported", None))


def test_function_setup_runs_once_per_call_before_the_request(release, provider, setup_calls):
    calls, _ = setup_calls
    from litellm import completion  # bound before: LiteLLM looks function_setup up per call

    completion(**_chat(provider))
    litellm.completion(**_chat(provider))
    litellm.embedding(model="openai/text-embedding-3-small", api_base=provider.openai_base,
                      api_key="sk-test", input=["hi"])
    for _ in litellm.completion(**_chat(provider, stream=True)):
        pass
    asyncio.run(litellm.acompletion(**_chat(provider)))
    router = litellm.Router(model_list=[{"model_name": "mini", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": provider.openai_base, "api_key": "sk-test"}}])
    router.completion(model="mini", messages=MSGS)
    assert [(c["call_type"], c["requests_before"], c["is_async"]) for c in calls] == [
        ("completion", 0, False), ("completion", 1, False), ("embedding", 2, False),
        ("completion", 3, False), ("acompletion", 4, True), ("completion", 5, False)]
    assert provider.requests == 6
    for note in calls:
        logging_obj, kwargs = note["result"]
        assert compat.call_details(logging_obj) is not None and isinstance(kwargs, dict)


def test_what_function_setup_raises_reaches_the_caller_unsent(release, provider, setup_calls):
    _, control = setup_calls
    control["raise_next"] = RuntimeError("stop here")
    with pytest.raises(RuntimeError, match="^stop here$"):
        litellm.completion(**_chat(provider))
    control["raise_next"] = RuntimeError("stop async")
    with pytest.raises(RuntimeError, match="^stop async$"):
        asyncio.run(litellm.acompletion(**_chat(provider)))
    assert provider.requests == 0


def test_a_key_put_in_model_call_details_at_set_up_reaches_every_hook(release, provider,
                                                                       setup_calls):
    calls, _ = setup_calls
    probe = _Probe()
    litellm.callbacks = [probe]
    original = litellm.utils.function_setup

    def stamping(*args, **kwargs):
        logging_obj, call_kwargs = original(*args, **kwargs)
        compat.call_details(logging_obj)["llmtally_probe"] = "stamped"
        return logging_obj, call_kwargs

    litellm.utils.function_setup = stamping  # undone by setup_calls' monkeypatch
    litellm.completion(**_chat(provider))
    asyncio.run(litellm.acompletion(**_chat(provider)))
    drain_logging_worker(5)
    assert _wait_for(lambda: {"success", "deployment", "async_success"} <= set(probe.names()))
    assert probe.names().count("pre") == 2
    for name, kwargs, _ in probe.seen:
        details = compat.call_details(compat.logging_obj_of(kwargs)) if name == "deployment" \
            else kwargs
        assert details["llmtally_probe"] == "stamped", name


# -- the call id, the callback lists ----------------------------------------------------------


def test_litellm_call_id_is_the_callers_else_a_fresh_uuid(release, provider):
    probe = _Probe()
    litellm.callbacks = [probe]
    mine = litellm.completion(**_chat(provider, litellm_call_id="call-1"))
    theirs = litellm.completion(**_chat(provider))
    assert _wait_for(lambda: probe.names().count("success") == 2)
    seen = [kwargs["litellm_call_id"] for name, kwargs, _ in probe.seen if name == "pre"]
    assert seen[0] == "call-1" == mine._hidden_params["litellm_call_id"]
    assert seen[1] == theirs._hidden_params["litellm_call_id"] and uuid.UUID(seen[1]).version == 4


def test_a_second_logger_of_one_class_runs_only_with_its_own_key(release, provider):
    first, second = _Probe(), _Probe()
    litellm.callbacks = [first, second]
    litellm.completion(**_chat(provider))
    assert _wait_for(lambda: "success" in first.names())
    time.sleep(0.2)
    assert "success" not in second.names()  # dropped as a duplicate of the first
    reset_litellm_callbacks()  # the first stays in LiteLLM's lists when callbacks is re-assigned
    second, third = _Probe(), _Probe()
    compat.make_distinct(third, "another")
    litellm.callbacks = [second, third]
    litellm.completion(**_chat(provider))
    assert _wait_for(lambda: "success" in second.names() and "success" in third.names())


def test_each_callback_list_is_one_litellm_reads(release, provider):
    in_callbacks, in_success, in_async = _Probe(), _Probe(), _Probe()
    compat.make_distinct(in_success, "success")
    compat.make_distinct(in_async, "async")
    assert not any(map(compat.is_registered, (in_callbacks, in_success, in_async)))
    litellm.callbacks = [in_callbacks]
    litellm.success_callback = [in_success]
    litellm._async_success_callback = [in_async]
    assert all(map(compat.is_registered, (in_callbacks, in_success, in_async)))
    litellm.completion(**_chat(provider))
    asyncio.run(litellm.acompletion(**_chat(provider)))
    drain_logging_worker(5)
    assert _wait_for(lambda: in_callbacks.names().count("success") == 1)
    assert "success" in in_success.names() and "async_success" in in_async.names()


# -- what the hooks are given -----------------------------------------------------------------


def test_the_logged_fields_we_read_are_where_we_read_them(release, provider):
    probe = _Probe()
    litellm.callbacks = [probe]
    response = litellm.completion(**_chat(provider))
    for _ in litellm.completion(**_chat(provider, stream=True,
                                        stream_options={"include_usage": True})):
        pass
    for _ in litellm.completion(**_chat(provider, stream=True)):
        pass
    assert _wait_for(lambda: probe.names().count("success") == 3)
    success = [kwargs for name, kwargs, _ in probe.seen if name == "success"]
    logged = compat.logged_metadata(success[0])
    assert {field for _, field, _ in compat.PROXY_CALLER_FIELDS} <= set(logged)
    assert compat.provider_response_model(response) == "gpt-4o-mini-2024-07-18"
    bodies = [compat.sent_request_body(kwargs) for name, kwargs, _ in probe.seen if name == "pre"]
    assert [(body.get("stream"), body.get("stream_options")) for body in bodies] == [
        (None, None), (True, {"include_usage": True}), (True, None)]


def test_provider_names_and_routes_are_litellms(release):
    assert {"groq", "deepseek"} <= compat.openai_compatible_providers()
    assert compat.llm_provider("openai/gpt-4o-mini", None, None) == ("gpt-4o-mini", "openai")
    assert compat.llm_provider("gpt-4o-mini", "openai", None) == ("gpt-4o-mini", "openai")
    assert compat.llm_provider("groq/llama3-8b-8192", None, None) == ("llama3-8b-8192", "groq")
    from litellm.constants import LITELLM_PROXY_ADMIN_NAME

    assert compat.PROXY_ADMIN == LITELLM_PROXY_ADMIN_NAME


def test_the_proxys_router_lists_a_groups_deployments(release):
    """The proxy keeps its Router in ``proxy_server.llm_router`` (the module is not importable
    without the proxy extra, so its source is read); a Router lists a group's deployments."""
    source = Path(find_spec("litellm.proxy").submodule_search_locations[0], "proxy_server.py")
    assert "\nllm_router: Router | None = None\n" in source.read_text()
    router = litellm.Router(model_list=[
        {"model_name": "mini", "litellm_params": {"model": "openai/gpt-4o-mini"}},
        {"model_name": "mini", "litellm_params": {"model": "azure/mini-eu"}},
        {"model_name": "big", "litellm_params": {"model": "openai/gpt-4o"}}])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the listing is not deprecated
        assert compat.deployment_models(router, "mini") == ["openai/gpt-4o-mini", "azure/mini-eu"]
    assert compat.deployment_models(router, "none") == []
    assert callable(getattr(router, "registry", None)) is (version_tuple(release) >= (1, 109))
    assert compat.proxy_deployment_models("mini") == []  # no proxy running here


# -- the stream wrapper -----------------------------------------------------------------------


def test_a_stream_is_the_wrapper_the_watch_patches(release, provider):
    cls = compat.stream_wrapper_class()
    assert cls is not None
    # aclose() is on every supported release; close() came with 1.108: before, a sync stream
    # closed early is recorded when it is collected (tally.flush() collects), not at once
    closes = (callable(getattr(cls, "close", None)), callable(getattr(cls, "aclose", None)))
    assert closes == (version_tuple(release) >= (1, 108), True)
    probe = _Probe()
    litellm.callbacks = [probe]
    stream = litellm.completion(**_chat(provider, stream=True, litellm_call_id="s-1"))
    assert isinstance(stream, cls)
    details, chunks, start_time = compat.stream_call(stream)
    assert details["litellm_call_id"] == "s-1" and isinstance(start_time, datetime)
    assert chunks == []
    next(stream)
    assert len(chunks) == 1  # the wrapper's own list, appended to as chunks are returned
    del stream, details, chunks
    gc.collect()
    time.sleep(0.3)
    assert probe.names() == ["pre"]  # a stream left unread is never logged by LiteLLM


# -- the logging thread pool and the async queue -----------------------------------------------


def test_sync_hooks_run_on_the_logging_pool_it_reports_busy(release, provider):
    probe = _Probe(sleep_s=0.5)
    litellm.callbacks = [probe]
    assert compat.logging_threads_busy() is False
    litellm.completion(**_chat(provider))
    assert _wait_for(lambda: "success" in probe.names())
    [thread] = [thread for name, _, thread in probe.seen if name == "success"]
    assert thread.startswith(compat.LOGGING_THREAD_PREFIX)
    assert compat.logging_threads_busy() is True
    assert probe.done.wait(5)
    assert _wait_for(lambda: compat.logging_threads_busy() is False)


def test_async_hooks_wait_in_the_worker_queue_until_flushed(release, provider):
    probe = _Probe()
    litellm.callbacks = [probe]
    worker = compat.logging_worker()
    assert worker is not None
    asyncio.run(litellm.acompletion(**_chat(provider)))
    assert probe.names() == ["deployment", "pre"] and compat.worker_pending(worker) >= 1
    drain_logging_worker(5)
    assert probe.names() == ["deployment", "pre", "async_success"]
    assert not compat.worker_pending(worker)


def test_the_deployment_hook_raising_stops_an_async_call(release, provider):
    class Refuse(CustomLogger):
        async def async_pre_call_deployment_hook(self, kwargs, call_type):
            raise RuntimeError("refused")

    litellm.callbacks = [Refuse()]
    with pytest.raises(RuntimeError, match="refused"):
        asyncio.run(litellm.acompletion(**_chat(provider)))
    assert provider.requests == 0


# -- files of the litellm package read without importing it (outside the integration) ---------


def test_the_price_map_and_tokenizer_files_are_where_llmtally_reads_them(release):
    """``_pricing/price_map.py`` reads LiteLLM's bundled price map and ``_events/tokens.py``
    its tiktoken files (``litellm_core_utils/tokenizers``), both found without importing it."""
    from llmtally._pricing.price_map import installed_litellm

    version, path = installed_litellm()
    assert version == release and Path(path).is_file()
    base = Path(find_spec("litellm").submodule_search_locations[0])
    assert len([p for p in (base / "litellm_core_utils" / "tokenizers").iterdir() if p.is_file()]) >= 2


def test_every_accessor_tolerates_another_shape(release):
    """What a changed LiteLLM would hand over: None / empty, never an exception."""
    for odd in (None, object(), 5, "x", {"model_call_details": {}}):
        assert compat.call_details(odd) is None and compat.stream_call(odd) is None
        assert compat.provider_response_model(odd) is None and compat.worker_loop(odd) is None
        assert compat.worker_pending(odd) is None
    for odd in ({}, {"standard_logging_object": 5}, {"standard_logging_object": {"metadata": []}},
                {"additional_args": {"complete_input_dict": "body"}}):
        assert compat.logged_metadata(odd) == {} and compat.sent_request_body(odd) == {}
        assert compat.logging_obj_of(odd) is None
    assert not compat.is_registered(object())
