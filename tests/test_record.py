"""tally.record() and tally.scope(): attribution, and bad input recorded as well as possible."""

from __future__ import annotations

import asyncio
import contextvars
import json
import math
import threading

import pytest
from conftest import ledger_rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmtally import ConfigError, Tally


def _json(value):
    return json.loads(value) if isinstance(value, str) else value


def test_scopes_nest_inner_wins_and_tags_merge(make_tally):
    tally = make_tally(scope={"project": "default-project", "tags": ["prod"]})
    with tally.scope(project="etl", user="bob", tags=["nightly"], metadata={"a": 1}):
        with tally.scope(user="carol", tags=["retry", "nightly"], metadata={"b": 2}):
            inner = tally.record(model="gpt-4o-mini", input_tokens=1)
        outer = tally.record(model="gpt-4o-mini", input_tokens=1, tags=["explicit"])
    outside = tally.record(model="gpt-4o-mini", input_tokens=1, user="dave")
    rows = {r["id"]: r for r in ledger_rows(tally)}
    assert (rows[inner]["project"], rows[inner]["user"]) == ("etl", "carol")
    assert _json(rows[inner]["tags"]) == ["prod", "nightly", "retry"]
    assert _json(rows[inner]["metadata"]) == {"a": 1, "b": 2}
    assert (rows[outer]["project"], rows[outer]["user"]) == ("etl", "bob")
    assert _json(rows[outer]["tags"]) == ["prod", "nightly", "explicit"]
    assert (rows[outside]["project"], rows[outside]["user"]) == ("default-project", "dave")
    assert _json(rows[outside]["tags"]) == ["prod"]


def test_scope_follows_asyncio_tasks_and_copied_thread_contexts(make_tally):
    tally = make_tally()
    ids: dict[str, str] = {}

    async def call(name: str) -> None:
        await asyncio.sleep(0.01)
        ids[name] = tally.record(model="gpt-4o-mini", input_tokens=1)

    async def main() -> None:
        with tally.scope(user="alice"):
            first = asyncio.create_task(call("task-alice"))
        with tally.scope(user="bob"):
            second = asyncio.create_task(call("task-bob"))
            await asyncio.to_thread(lambda: ids.setdefault(
                "to_thread-bob", tally.record(model="gpt-4o-mini", input_tokens=1)))
        await asyncio.gather(first, second)

    asyncio.run(main())
    with tally.scope(user="erin"):
        context = contextvars.copy_context()
        copied = threading.Thread(target=context.run, args=(lambda: ids.setdefault(
            "copied-erin", tally.record(model="gpt-4o-mini", input_tokens=1)),))
        plain = threading.Thread(target=lambda: ids.setdefault(
            "plain-none", tally.record(model="gpt-4o-mini", input_tokens=1)))
        copied.start(), plain.start()
        copied.join(), plain.join()
    users = {r["id"]: r["user"] for r in ledger_rows(tally)}
    assert {name: users[event_id] for name, event_id in ids.items()} == {
        "task-alice": "alice", "task-bob": "bob", "to_thread-bob": "bob",
        "copied-erin": "erin", "plain-none": None,
    }


def test_bad_token_counts_are_recorded_as_well_as_possible(make_tally):
    tally = make_tally()
    event_id = tally.record(model="gpt-4o-mini", provider="openai", input_tokens=-5,
                            output_tokens=2.5, cache_read_tokens="12", reasoning_tokens=None,
                            cache_write_tokens=float("nan"))
    [row] = ledger_rows(tally)
    assert row["id"] == event_id
    assert (row["input_tokens"], row["output_tokens"], row["cache_read_tokens"],
            row["cache_write_tokens"], row["reasoning_tokens"]) == (12, 0, 12, 0, 0)
    warnings = _json(row["metadata"])["llmtally_warnings"]
    assert any("input_tokens=-5" in w for w in warnings)
    assert any("output_tokens=2.5" in w for w in warnings)
    assert any("cache_write_tokens=nan" in w for w in warnings)
    assert row["cost"] == pytest.approx(12 * 0.075e-6, abs=1e-15)


def test_hostile_names_are_stored_verbatim_or_bounded(ledger_url, make_tally):
    tally = make_tally(ledger_url)
    injection = "gpt'; DROP TABLE llmtally_events; --<script>alert(1)</script>"
    long_model = "m" * 10_000
    a = tally.record(model=injection, provider="openai", user='"><img src=x onerror=alert(1)>')
    b = tally.record(model=long_model, project="p\x00q", tags=["ok", "\udcff-surrogate"])
    rows = {r["id"]: r for r in ledger_rows(tally)}
    assert rows[a]["model"] == injection
    assert rows[a]["user"] == '"><img src=x onerror=alert(1)>'
    assert rows[a]["cost_status"] == "unpriced"
    assert rows[b]["model"] == "m" * 256
    assert rows[b]["project"] == "pq"
    assert _json(rows[b]["tags"]) == ["ok", "?-surrogate"]
    assert "model was 10000 characters; cut to 256" in _json(rows[b]["metadata"])["llmtally_warnings"]


def test_odd_values_never_raise_into_the_caller(make_tally):
    tally = make_tally()
    ids = [
        tally.record(model=None),  # type: ignore[arg-type]
        tally.record(model=12345, provider=object()),  # type: ignore[arg-type]
        tally.record(model="gpt-4o-mini", status="weird", call_type="banana", source="?"),
        tally.record(model="gpt-4o-mini", latency_ms="fast", ttft_ms=-1),
        tally.record(model="gpt-4o-mini", metadata=["not", "a", "dict"]),  # type: ignore[arg-type]
        tally.record(model="gpt-4o-mini", metadata={"obj": object(), "nan": math.nan}),
        tally.record(model="gpt-4o-mini", tags=42),  # type: ignore[arg-type]
        tally.record(model="gpt-4o-mini", ts="yesterday"),  # type: ignore[arg-type]
    ]
    rows = {r["id"]: r for r in ledger_rows(tally)}
    # every call but the unusable timestamp is recorded; none raised
    assert set(ids[:-1]) <= set(rows)
    assert rows[ids[0]]["model"] == "unknown"
    assert rows[ids[1]]["model"] == "12345"
    assert (rows[ids[2]]["status"], rows[ids[2]]["call_type"], rows[ids[2]]["source"]) == \
        ("ok", "other", "manual")
    assert rows[ids[3]]["latency_ms"] is None and rows[ids[3]]["ttft_ms"] is None
    meta = _json(rows[ids[5]]["metadata"])
    assert meta["nan"] is None and meta["obj"].startswith("<object object")


def test_bad_configuration_is_refused_at_construction(tmp_path):
    with pytest.raises(ConfigError, match="currency"):
        Tally(f"sqlite:///{tmp_path / 'a.db'}", currency="XYZ")
    with pytest.raises(ConfigError, match="batch_size"):
        Tally(f"sqlite:///{tmp_path / 'a.db'}", batch_size=0)
    with pytest.raises(ConfigError, match="unknown key 'team' in scope"):
        Tally(f"sqlite:///{tmp_path / 'a.db'}", scope={"team": "x"})
    with pytest.raises(ConfigError, match="input"):
        Tally(f"sqlite:///{tmp_path / 'a.db'}", prices={"m": {"input": -1}})


token_values = st.one_of(st.none(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                         st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=2))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.tuples(*[token_values] * 5), model=st.text(max_size=300))
def test_any_usage_values_record_without_raising(make_tally, values, model):
    tally = _shared_tally(make_tally)
    written = tally._writer.written
    tally.record(model=model, input_tokens=values[0], output_tokens=values[1],
                 cache_read_tokens=values[2], cache_write_tokens=values[3],
                 reasoning_tokens=values[4])
    assert tally.flush(10)
    assert tally._writer.written == written + 1 and tally._writer.rejected == 0


_TALLIES: dict[int, Tally] = {}


def _shared_tally(make_tally) -> Tally:
    """One Tally for all examples of a property test (hypothesis reuses the fixture)."""
    key = id(make_tally)
    if key not in _TALLIES:
        _TALLIES.clear()
        _TALLIES[key] = make_tally()
    return _TALLIES[key]


def test_a_cache_hit_keeps_its_tokens_and_costs_nothing(make_tally):
    tally = make_tally()
    tally.record(model="gpt-4o-mini", provider="openai", input_tokens=500, output_tokens=50,
                 cache_hit=True)
    [row] = ledger_rows(tally)
    assert (row["input_tokens"], row["output_tokens"], row["cost"]) == (500, 50, 0.0)
    assert (row["cost_status"], row["price_source"]) == ("priced", "cache-hit")
    assert _json(row["metadata"])["cache_hit"] is True


def test_flush_runs_the_integrations_drains_first(make_tally):
    tally = make_tally()
    drained = []

    def drain(timeout):
        drained.append(timeout)
        tally.record(model="gpt-4o-mini", input_tokens=1)  # an event held by an integration

    def broken(timeout):
        raise RuntimeError("an integration's drain failed")

    tally._before_flush.extend([broken, drain])
    assert tally.flush(5)
    assert drained == [5]
    assert len(ledger_rows(tally)) == 2  # _rows flushes again: the drain ran twice, never raised


def test_a_call_event_reaches_the_ledger_field_by_field(make_tally):
    """Every field of CallEvent lands in its own column, through record_event() and through
    record_later() (the writer thread), and record() makes the same row from its arguments."""
    from datetime import datetime, timezone

    from llmtally import CallEvent
    from llmtally._events.usage import Usage

    tally = make_tally(prices={"acme/model-x": {"input": 1.0, "output": 2.0, "cache_read": 0.5,
                                                 "cache_write": 1.5, "reasoning": 2.0}})
    fields = dict(
        model="model-x", provider="acme", usage=Usage(1_000_000, 400_000, 200_000, 100_000, 50_000),
        status="error", error_type="openai.APITimeoutError", call_type="completion",
        streamed=True, resolved_model="model-x-2026", estimated=True, cache_hit=False,
        ts=datetime(2026, 11, 20, 8, 30, tzinfo=timezone.utc), latency_ms=1234.5, ttft_ms=321.0,
        source="litellm", project="proj", user="ann", session="sess-1", tags=("a", "b"),
        request_id="req-9", metadata={"k": "v"})
    assert set(fields) | {"id"} == set(CallEvent._fields)
    assert tally.record_event(CallEvent(**fields, id="direct")) == "direct"
    assert tally.record_later(lambda: CallEvent(**fields, id="later"))
    tally.record(id="kwargs", **{name: value for name, value in fields.items() if name != "usage"},
                 **fields["usage"]._asdict())
    rows = {row["id"]: row for row in ledger_rows(tally)}
    assert sorted(rows) == ["direct", "kwargs", "later"]
    for row in rows.values():
        assert {name: row[name] for name in (
            "provider", "model", "status", "error_type", "call_type", "resolved_model",
            "source", "project", "user", "session", "request_id", "cost_status", "input_tokens",
            "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens",
            "latency_ms", "ttft_ms")} == {
            "provider": "acme", "model": "model-x", "status": "error",
            "error_type": "openai.APITimeoutError", "call_type": "completion",
            "resolved_model": "model-x-2026", "source": "litellm", "project": "proj",
            "user": "ann", "session": "sess-1", "request_id": "req-9",
            "cost_status": "estimated", "input_tokens": 1_000_000, "output_tokens": 400_000,
            "cache_read_tokens": 200_000, "cache_write_tokens": 100_000,
            "reasoning_tokens": 50_000, "latency_ms": 1234.5, "ttft_ms": 321.0}
        assert bool(row["streamed"]) is True
        assert str(row["ts"]).startswith("2026-11-20 08:30:00")
        assert json.loads(row["tags"]) == ["a", "b"] and json.loads(row["metadata"]) == {"k": "v"}
        # 0.7 M plain input at $1, 0.2 M cache reads at $0.5, 0.1 M cache writes at $1.5,
        # 0.35 M plain output at $2, 0.05 M reasoning at $2 (per million tokens)
        assert row["cost"] == pytest.approx(0.7 + 0.1 + 0.15 + 0.7 + 0.1, abs=1e-9)


def test_the_values_handed_back_are_the_types_llmtally_types_names(make_tally):
    from llmtally import Budget
    from llmtally.types import Attribution, CounterState, PricedCost, Reservation, SummaryRow

    tally = make_tally(budgets=[Budget(tokens=1_000, per="day")])
    held = tally.reserve(model="gpt-4o-mini", input_tokens=10, max_tokens=10)
    assert type(held) is Reservation
    tally.record(model="gpt-4o-mini", provider="openai", input_tokens=10, output_tokens=5,
                 reservation=held)
    with tally.scope(project="p") as scope:
        assert type(scope) is Attribution
    [row] = tally.summary(since="1d")
    assert type(row) is SummaryRow and (row.calls, row.input_tokens) == (1, 10)
    [state] = tally.budget_states()
    assert type(state) is CounterState and state.spent == 15
    assert type(tally.prices.cost(model="gpt-4o-mini", input_tokens=1)) is PricedCost


def test_an_id_with_nothing_left_once_cleaned_gets_a_new_one_and_the_event_is_kept(make_tally):
    """``id=""`` or an id of NULs cleans to nothing, which no database stores as a key: the
    event gets a new id (returned) instead of being rejected."""
    from llmtally import CallEvent

    tally = make_tally()
    returned = [tally.record(model="gpt-4o-mini", input_tokens=1, id=""),
                tally.record(model="gpt-4o-mini", input_tokens=2, id="\x00\x00"),
                tally.record_event(CallEvent(model="gpt-4o-mini", id=""))]
    assert tally.record_later(lambda: CallEvent(model="gpt-4o-mini", id="\x00"))
    rows = ledger_rows(tally)
    assert len(rows) == 4 and all(isinstance(event_id, str) and len(event_id) == 32
                                  for event_id in returned)
    assert set(returned) < {row["id"] for row in rows} and tally._writer.rejected == 0


def test_a_tally_made_inside_another_tallys_scope_does_not_inherit_it(tmp_path):
    """A Tally's default scope is its own ``scope=`` argument only: made inside a ``scope()``
    block it must not keep that block's attribution after the block ends."""
    outer = Tally(f"sqlite:///{tmp_path / 'outer.db'}", price_map="bundled")
    with outer.scope(project="outer-block", user="ann"):
        inner = Tally(f"sqlite:///{tmp_path / 'inner.db'}", price_map="bundled",
                      scope={"tags": ["svc"]})
        plain = Tally(f"sqlite:///{tmp_path / 'plain.db'}", price_map="bundled")
    inner.record(model="gpt-4o-mini", input_tokens=1)
    plain.record(model="gpt-4o-mini", input_tokens=1)
    [row] = ledger_rows(inner)
    assert (row["project"], row["user"], json.loads(row["tags"])) == (None, None, ["svc"])
    [row] = ledger_rows(plain)
    assert (row["project"], row["user"], json.loads(row["tags"])) == (None, None, [])
    for tally in (outer, inner, plain):
        tally.close()


def test_the_price_book_prices_a_usage_as_it_prices_the_same_counts():
    from datetime import datetime, timezone

    from llmtally import Usage
    from llmtally._pricing.book import PriceBook

    book = PriceBook(price_map="bundled")
    at = datetime(2026, 12, 1, 12, tzinfo=timezone.utc)
    usage = Usage(input_tokens=1200, output_tokens=300, cache_read_tokens=1000, reasoning_tokens=100)
    by_usage = book.cost("gpt-4o-mini", "openai", usage, at)
    by_counts = book.cost(model="gpt-4o-mini", provider="openai", input_tokens=1200,
                          output_tokens=300, cache_read_tokens=1000, reasoning_tokens=100, at=at)
    assert by_usage == by_counts
    # gpt-4o-mini: $0.15 / 1M input, $0.075 cached, $0.60 output
    assert by_usage.cost == pytest.approx(200 * 0.15e-6 + 1000 * 0.075e-6 + 300 * 0.6e-6, abs=1e-12)


def test_record_event_never_raises_and_records_an_odd_usage_as_zero_tokens(tally, caplog):
    from llmtally import CallEvent

    assert tally.record_event(None)  # not an event: logged, an id returned, nothing recorded
    odd = [CallEvent(model="gpt-4o-mini", usage=usage, id=f"odd-{n}")  # type: ignore[arg-type]
           for n, usage in enumerate(((1, 2, 3, 4), None, 7, {"input_tokens": 5}))]
    assert [tally.record_event(event) for event in odd] == [f"odd-{n}" for n in range(4)]
    rows = {row["id"]: row for row in ledger_rows(tally)}
    assert set(rows) == {f"odd-{n}" for n in range(4)}
    for row in rows.values():
        assert (row["input_tokens"], row["output_tokens"], row["cost"]) == (0, 0, 0.0)
        assert "is not a Usage; recorded as 0 tokens" in row["metadata"]
    assert "could not record a call" in caplog.text


def test_a_queued_call_without_tags_or_metadata_is_not_followed_by_the_garbage_collector(
        make_tally):
    """Thousands of rows wait in the writer's queue when calls outrun the ledger: rows that
    hold a list or dict keep the collector walking them all (it cost record() a third more in
    benchmarks/ingest.py). With tags or metadata the row holds them, as it must."""
    import gc

    from llmtally._events.event import CallEvent, event_row
    from llmtally._events.scope import EMPTY

    tally = make_tally()
    plain = event_row(CallEvent(model="gpt-4o-mini", usage=(10, 5, 0, 0, 0)), event_id="a",
                      now=tally.now(), scope=EMPTY, prices=tally.prices)
    tagged = event_row(CallEvent(model="gpt-4o-mini", usage=(10, 5, 0, 0, 0), tags=["x"],
                                 metadata={"k": "v"}), event_id="b", now=tally.now(),
                       scope=EMPTY, prices=tally.prices)
    gc.collect()
    assert not gc.is_tracked(plain)
    assert (plain["tags"], plain["metadata"]) == ((), None)
    assert (tagged["tags"], tagged["metadata"]) == (["x"], {"k": "v"})
    tally.record(model="gpt-4o-mini", input_tokens=10, output_tokens=5)
    [stored] = ledger_rows(tally)
    assert (stored["tags"], stored["metadata"]) == ("[]", "{}")  # stored as before
