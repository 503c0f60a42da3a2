"""Hostile and malformed input: provider responses of any shape, and attribution full of SQL,
HTML, control characters, 100 KB strings and invalid UTF-8 — nothing raises into the caller,
every event is stored (none rejected), and stored text is bounded and valid, on SQLite and
PostgreSQL. Random ``llmtally.toml`` files: a valid configuration or one clear ConfigError.

Bounds (README, "The data"): model, provider, user, project, tags, error type and resolved
model 256 characters; ids, session and request id 128; each metadata string 1,024 and the
whole metadata 64 KiB of JSON; NUL characters dropped, lone surrogates replaced by "?".
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from conftest import fetch_events
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llmtally._events.usage import MAX_TOKEN_COUNT, extract_usage

pytest.importorskip("litellm")
from llmtally.integrations.litellm_events import litellm_event

_numbers = (st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats()
            | st.just(math.nan) | st.just(-math.inf) | st.decimals(allow_nan=True)
            | st.text(max_size=8) | st.sampled_from(["12", " 7 ", "1e3", "-3", "٣", "9" * 30]))
_junk = st.recursive(_numbers | st.binary(max_size=8),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details",
               "completion_tokens_details", "cache_read_input_tokens",
               "cache_creation_input_tokens", "input_tokens", "output_tokens",
               "input_tokens_details", "output_tokens_details", "prompt_token_count",
               "candidates_token_count", "thoughts_token_count", "cached_content_token_count")
_details = st.fixed_dictionaries({}, optional={k: _numbers for k in (
    "cached_tokens", "cache_creation_tokens", "reasoning_tokens", "cache_read", "reasoning")})
_usage_dict = st.fixed_dictionaries({}, optional={
    key: (_details | _junk) if key.endswith("details") else (_numbers | _junk) for key in _USAGE_KEYS})
_usage = _usage_dict | _usage_dict.map(lambda d: SimpleNamespace(**d)) | _junk
_response = (st.fixed_dictionaries({}, optional={"usage": _usage, "usage_metadata": _usage,
                                                 "model": _junk, "choices": _junk})
             | st.builds(SimpleNamespace, usage=_usage, model=_junk) | _junk)


@settings(max_examples=400, deadline=None)
@given(response=_response)
def test_extract_usage_never_raises_and_keeps_counts_sane(response):
    usage = extract_usage(response)
    if usage is None:
        return
    counts = (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens,
              usage.cache_write_tokens, usage.reasoning_tokens)
    assert all(type(count) is int and 0 <= count <= 3 * MAX_TOKEN_COUNT for count in counts)
    assert usage.input_tokens >= usage.cache_read_tokens + usage.cache_write_tokens
    assert usage.output_tokens >= usage.reasoning_tokens


_text = st.text(st.characters(codec=None), max_size=30) | st.sampled_from([
    "x'; DROP TABLE llmtally_events; --", "<script>alert(1)</script>", "\x00", "a\x00b",
    "\udcff", "\ud800x", "\x1b[31m\u202e", "é" * 300, "9" * 100_000])
_metadata = st.dictionaries(_text, _text | _junk, max_size=4)
_kwargs = st.fixed_dictionaries({"litellm_call_id": st.uuids().map(str)}, optional={
    "model": _text | _junk, "custom_llm_provider": _text | _junk, "call_type": _text | _junk,
    "stream": _junk, "user": _text | _junk, "cache_hit": _junk,
    "litellm_params": st.fixed_dictionaries({}, optional={
        "metadata": st.fixed_dictionaries({}, optional={
            "project": _text | _junk, "user": _text | _junk, "session_id": _text | _junk,
            "tags": st.lists(_text, max_size=3) | _junk, "request_id": _text | _junk,
            "model_group": _text | _junk}) | _metadata | _junk})})

_TALLIES: dict[int, object] = {}


def _shared(make_tally):
    """One Tally for every example of a property test (hypothesis reuses the fixture)."""
    if id(make_tally) not in _TALLIES:
        _TALLIES.clear()
        _TALLIES[id(make_tally)] = make_tally()
    return _TALLIES[id(make_tally)]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kwargs=_kwargs, response=_response, failed=st.booleans())
def test_any_litellm_call_shape_becomes_one_stored_event(make_tally, kwargs, response, failed):
    tally = _shared(make_tally)
    written = tally._writer.written
    event = litellm_event(kwargs, response, None, None, failed=failed)
    event_id = tally.record_event(event)
    assert tally.flush(10)
    assert (tally._writer.written, tally._writer.rejected) == (written + 1, 0)
    assert event_id == kwargs["litellm_call_id"]


HOSTILE = {
    "sql": "gpt'; DROP TABLE llmtally_events; --",
    "html": '"><img src=x onerror=alert(1)><script>alert(1)</script>',
    "control": "a\x01b\x1b[31mc\u202ed\r\ne\tf",
    "nul": "be\x00fore\x00",
    "surrogate": "bad\udcffutf8\ud800",
    "huge": "é" * 100_000,
}


def _stored_text_is_sane(value, limit: int) -> None:
    assert isinstance(value, str) and len(value) <= limit and "\x00" not in value
    value.encode("utf-8")  # valid UTF-8 (raises on a lone surrogate)


def _walk_strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _walk_strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _walk_strings(item)


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_attribution_is_stored_bounded_and_valid(ledger_url, make_tally, kind):
    tally = make_tally(ledger_url)
    text = HOSTILE[kind]
    direct = tally.record(id=f"id-{kind}-{text}"[:5000], model=text, provider=text, user=text,
                          project=text, session=text, request_id=text, tags=[text, "ok"],
                          error_type=text, resolved_model=text, status="error",
                          metadata={text: text, "nested": [{"deep": text}], "n": math.nan})
    via_litellm = tally.record_event(litellm_event(
        {"litellm_call_id": f"call-{kind}", "model": text, "custom_llm_provider": text,
         "user": text, "litellm_params": {"metadata": {"project": text, "tags": [text],
                                                        "session_id": text, "request_id": text,
                                                        "anything": text}}},
        {"usage": {"prompt_tokens": 3, "completion_tokens": 2}, "model": text}, None, None,
        failed=False))
    assert tally.flush(20)
    assert tally._writer.rejected == 0
    rows = {row["id"]: row for row in fetch_events(ledger_url)}
    assert set(rows) == {direct, via_litellm}
    for row in rows.values():
        for column in ("model", "provider", "user", "project", "resolved_model"):
            if row[column] is not None:
                _stored_text_is_sane(row[column], 256)
        for column in ("id", "session", "request_id"):
            if row[column] is not None:
                _stored_text_is_sane(row[column], 128)
        tags = json.loads(row["tags"]) if isinstance(row["tags"], str) else row["tags"]
        for tag in tags:
            _stored_text_is_sane(tag, 256)
        meta = json.loads(row["metadata"]) if isinstance(row["metadata"], str) else row["metadata"]
        for value in _walk_strings(meta):
            _stored_text_is_sane(value, 1024)
        assert len(json.dumps(meta)) <= 70_000
    if kind in ("sql", "html", "control"):  # short valid text is kept exactly as given
        assert rows[direct]["model"] == text and rows[direct]["user"] == text
        assert rows[via_litellm]["project"] == text
    if kind == "huge":
        notes = json.dumps(json.loads(rows[direct]["metadata"]) if isinstance(
            rows[direct]["metadata"], str) else rows[direct]["metadata"])
        assert "cut to 256" in notes and "cut to 1024" in notes
    assert len(fetch_events(ledger_url)) == 2  # the SQL did nothing but get stored


def test_oversized_metadata_is_dropped_with_a_note(make_tally):
    tally = make_tally()
    event_id = tally.record(model="gpt-4o-mini", metadata={f"k{i}": "v" * 1000 for i in range(100)})
    assert tally.flush(10)
    [row] = fetch_events(tally.store.url)
    meta = json.loads(row["metadata"])
    assert row["id"] == event_id and set(meta) == {"llmtally_metadata_dropped", "llmtally_warnings"}
    assert "limit 65536" in meta["llmtally_warnings"][-1]


# -- config fuzz: any llmtally.toml is a valid configuration or one clear ConfigError ---------

def _toml_key(key: str) -> str:
    return key if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key) \
        else json.dumps(key)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string (a lone surrogate makes it invalid TOML)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"


_config_scalar = (st.text(max_size=12) | st.integers(-10**6, 10**20) | st.floats() | st.booleans()
                  | st.sampled_from(["USD", "EUR", "XYZ", "auto", "bundled", "Europe/Berlin",
                                     "Mars/Olympus", "sync", "batched", "month", "day", "user",
                                     "log", "https://hooks.example/x", "1M", "token"]))
_config_value = st.recursive(_config_scalar, lambda inner: st.lists(inner, max_size=3)
                             | st.dictionaries(st.sampled_from(
                                 ["usd", "tokens", "requests", "per", "each", "scope", "warn_at",
                                  "action", "name", "input", "output", "per", "currency",
                                  "project", "user", "tags", "CNY", "x"]) | st.text(max_size=5),
                                 inner, max_size=4), max_leaves=10)
_TOP = ["database_url", "currency", "price_map", "spill_path", "rates", "scope", "prices",
        "budgets", "timezone", "fail_closed", "alerts", "durability"]
_config_doc = st.dictionaries(st.sampled_from(_TOP) | st.text(max_size=8), _config_value, max_size=5)
_amount = st.integers(-5, 10**6) | st.floats(-1, 1e6) | _config_scalar
_plausible_doc = st.fixed_dictionaries({}, optional={  # mostly right, sometimes subtly wrong
    "currency": st.sampled_from(["USD", "EUR", "cny", "XYZ", ""]),
    "price_map": st.sampled_from(["auto", "bundled", "litellm", "missing.json"]),
    "timezone": st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Mars/Olympus"]),
    "fail_closed": st.booleans() | st.sampled_from(["yes", "no", "maybe"]),
    "durability": st.sampled_from(["batched", "sync", "SYNC", "fast"]),
    "alerts": st.lists(st.sampled_from(["log", "https://hooks.example/x?token=1", "ftp://x"]),
                       max_size=2),
    "rates": st.dictionaries(st.sampled_from(["CNY", "EUR", "usd"]), _amount, max_size=2),
    "scope": st.fixed_dictionaries({}, optional={
        "project": st.text(max_size=8), "user": st.text(max_size=8) | st.integers(),
        "tags": st.lists(st.text(max_size=5), max_size=3) | st.text(max_size=5),
        "team": st.text(max_size=3)}),
    "budgets": st.lists(st.fixed_dictionaries(
        {"per": st.sampled_from(["minute", "hour", "day", "week", "month", "total", "year"])},
        optional={"usd": _amount, "tokens": _amount, "requests": _amount,
                  "each": st.sampled_from(["user", "project", "model", "colour"]),
                  "warn_at": st.lists(st.floats(-1, 2), max_size=3),
                  "action": st.sampled_from(["block", "warn", "explode"]),
                  "scope": st.dictionaries(st.sampled_from(["project", "tag", "planet"]),
                                           st.text(max_size=4), max_size=2)}), max_size=3),
    "prices": st.dictionaries(st.sampled_from(["my-model", "openai/gpt-4o-mini", "m"]),
                              st.fixed_dictionaries({}, optional={
                                  "input": _amount, "output": _amount,
                                  "per": st.sampled_from(["1M", "1K", "token", "2M"]),
                                  "currency": st.sampled_from(["USD", "CNY", "XYZ"])}),
                              max_size=2),
})


@settings(max_examples=200, deadline=None)
@given(doc=(_plausible_doc | _plausible_doc | _config_doc).map(
    lambda d: "\n".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in d.items()))
    | st.text(max_size=200) | st.binary(max_size=100).map(lambda b: b.decode("latin-1")))
def test_any_config_file_is_a_valid_config_or_one_clear_error(doc):
    import tempfile
    from pathlib import Path

    from llmtally import Tally
    from llmtally._config import load_settings
    from llmtally._errors import ConfigError

    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "llmtally.toml"
        path.write_text(doc, encoding="utf-8", errors="surrogateescape")
        try:
            settings_ = load_settings(path, environ={})
        except ConfigError as exc:
            assert str(exc).startswith(f"{path}") or "config file" in str(exc)
            event("refused by load_settings")
            return
        # Valid as a file: a Tally is made from it, or its constructor names the bad value.
        settings_.update(database_url=f"sqlite:///{workdir}/ledger.db",
                         spill_path=f"{workdir}/spill.jsonl")
        try:
            Tally(**settings_).close()
            event("a Tally was made")
        except ConfigError as exc:
            assert str(exc)
            event("refused by Tally")
