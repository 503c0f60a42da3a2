"""Shared fixtures. Environment set here, before any test imports litellm or tiktoken.

Ledger tests run against a real SQLite file and the real PostgreSQL named by
``LLMTALLY_TEST_POSTGRES_URL`` (default: the local server on 127.0.0.1:5432). Each PostgreSQL
test gets its own schema (via ``search_path``), dropped afterwards. Under ``CI=true`` an
unreachable PostgreSQL fails the tests instead of skipping them.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from _ci_guard import AllowedSkip
from _ci_guard import install as install_ci_guard

# LiteLLM fetches its price map from the internet at import unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# Never let a developer's own ledger settings leak into tests.
for _name in list(os.environ):
    if _name.startswith("LLMTALLY_") and not _name.startswith("LLMTALLY_TEST_"):
        del os.environ[_name]

PG_URL = os.environ.get(
    "LLMTALLY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CLOSED_PORT_URL = "postgresql+psycopg://postgres@127.0.0.1:1/test"  # nothing listens on port 1
MSGS = [{"role": "user", "content": "Say hello to the ledger, please."}]

# Under CI=true every skip fails the run except these (tests/_ci_guard.py): each entry names the
# tests (fnmatch on the node id), the skip message (regex) and why CI may skip them. A CI=true
# run of the whole suite skips nothing, so there are none.
ALLOWED_SKIPS: list[AllowedSkip] = []


def pytest_configure(config: pytest.Config) -> None:
    install_ci_guard(config, ALLOWED_SKIPS, enforce_skips=IN_CI)


def _postgres_problem() -> str | None:
    try:
        import psycopg
    except ImportError as exc:
        return f"psycopg is not installed ({exc})"
    try:
        with psycopg.connect(PG_URL.replace("+psycopg", ""), connect_timeout=3):
            return None
    except Exception as exc:
        return f"PostgreSQL at {PG_URL} is not reachable: {exc}"


_PG_PROBLEM: str | None | bool = False  # False: not probed yet


def require_postgres() -> None:
    """Skip (locally) or fail (under CI=true) when the test PostgreSQL is not there."""
    global _PG_PROBLEM
    if _PG_PROBLEM is False:
        _PG_PROBLEM = _postgres_problem()
    if _PG_PROBLEM:
        if IN_CI:
            pytest.fail(f"CI=true and {_PG_PROBLEM}")
        pytest.skip(str(_PG_PROBLEM))


def pg_admin():
    """A psycopg connection (autocommit) to the test PostgreSQL, outside any test schema."""
    import psycopg

    return psycopg.connect(PG_URL.replace("+psycopg", ""), autocommit=True)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose tables land in a fresh schema of their own."""
    require_postgres()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with pg_admin() as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with pg_admin() as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on a real SQLite file and on the real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def make_tally(tmp_path: Path) -> Iterator:
    """Build Tallies that are closed after the test (spill files under tmp_path)."""
    from llmtally import Tally

    made: list[Tally] = []

    def make(url: str | None = None, **kwargs):
        kwargs.setdefault("spill_path", tmp_path / f"spill-{len(made)}.jsonl")
        kwargs.setdefault("price_map", "bundled")
        tally = Tally(url or f"sqlite:///{tmp_path / 'ledger.db'}", **kwargs)
        made.append(tally)
        return tally

    yield make
    for tally in made:
        tally.close()


def fetch_events(url: str) -> list[dict]:
    """Every stored event, read back with plain SQL (not through llmtally's own queries)."""
    from sqlalchemy import create_engine, text

    from llmtally._storage.store import normalize_url

    engine = create_engine(normalize_url(url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT * FROM llmtally_events ORDER BY ts, id")).mappings()
            return [dict(row) for row in rows]
    finally:
        engine.dispose()


def unmute_logs() -> None:
    """Forget which faults were logged: they are logged once a minute per kind, process-wide."""
    from llmtally import _log

    _log._last_said.clear()
    _log._suppressed.clear()


@pytest.fixture(autouse=True)
def _fresh_log_rate_limits():
    """Each test starts unmuted."""
    unmute_logs()
    yield


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@pytest.fixture(scope="session", autouse=True)
def _collect_litellm_leftovers():
    """LiteLLM leaves its logging worker task on event loops that asyncio.run has closed; let
    the collector meet it inside the session, not in the middle of pytest's closing lines."""
    yield
    import gc

    gc.collect()


# -- the loopback fake provider and a Tally, as each test module configures them ---------------
#
# A module sets, when it needs them: ``FAKE_PROVIDER`` / ``FAKE_ANTHROPIC`` (FakeProvider keyword
# arguments: usage, reply, resolved_model), ``TALLY`` (make_tally keyword arguments),
# ``REGISTER_LITELLM = True`` (the ``tally`` fixture registers its LiteLLM logger) and, to put
# ``tally`` on another ledger, a ``tally_url`` fixture (e.g. returning ``ledger_url``).


def _module_settings(request: pytest.FixtureRequest, name: str) -> dict:
    """The test module's keyword arguments ``name``, each value a shallow copy of its own (a
    FakeUsage or list a test changes stays that test's)."""
    return {key: copy.copy(value) for key, value in getattr(request.module, name, {}).items()}


@pytest.fixture
def provider(request: pytest.FixtureRequest) -> Iterator:
    """The loopback fake provider (:class:`llmtally.testing.FakeProvider`) for one test."""
    from llmtally.testing import FakeProvider

    with FakeProvider(**_module_settings(request, "FAKE_PROVIDER")) as fp:
        yield fp


@pytest.fixture
def anthropic_provider(request: pytest.FixtureRequest) -> Iterator:
    """A second fake provider for Anthropic-route calls (``FAKE_ANTHROPIC``)."""
    from llmtally.testing import FakeProvider

    with FakeProvider(**_module_settings(request, "FAKE_ANTHROPIC")) as fp:
        yield fp


@pytest.fixture
def tally_url() -> str | None:
    """The ledger of the ``tally`` fixture: None is make_tally's SQLite file."""
    return None


@pytest.fixture
def tally(request: pytest.FixtureRequest, make_tally, tally_url: str | None):
    """A Tally for one test, closed afterwards (see the notes above)."""
    tally = make_tally(tally_url, **_module_settings(request, "TALLY"))
    if getattr(request.module, "REGISTER_LITELLM", False):
        import litellm

        litellm.callbacks = [tally.litellm()]
    return tally


def ledger_rows(tally) -> list[dict]:
    """Flush ``tally`` (which must succeed) and return every event of its ledger."""
    assert tally.flush(10)
    return fetch_events(tally.store.url)


def assert_two_through_third_blocked(tally, provider, call) -> list[dict]:
    """With a usd 0.02/day budget and $0.01 calls: two calls go through, the third is blocked
    without a request, and the budget's spend is the ledger's cost of the two. Returns the
    ledger's rows."""
    from llmtally import BudgetExceeded

    call()
    call()
    assert provider.requests == 2
    with pytest.raises(BudgetExceeded, match="usd 0.02/day") as caught:
        call()
    assert caught.value.limit == pytest.approx(0.02) and caught.value.used == pytest.approx(0.02)
    assert provider.requests == 2  # nothing was sent
    rows = ledger_rows(tally)
    blocked = [row for row in rows if row["status"] == "blocked"]
    through = [row for row in rows if row["status"] != "blocked"]
    assert len(blocked) == 1 and blocked[0]["cost"] == 0
    assert blocked[0]["error_type"] == "llmtally.BudgetExceeded"
    assert [row["status"] for row in through] == ["ok", "ok"]
    assert all(row["cost"] == pytest.approx(0.01, abs=1e-12) for row in through)
    [state] = tally.budget_states()
    assert state.spent == pytest.approx(sum(row["cost"] for row in through), abs=1e-12)
    assert state.reserved == 0
    return rows


@pytest.fixture(autouse=True)
def _reset_litellm():
    """Unregister every LiteLLM logger after each test (when a test imported LiteLLM)."""
    yield
    if "litellm" in sys.modules:
        reset_litellm_callbacks()


def reset_litellm_callbacks() -> None:
    """Unregister every logger from LiteLLM's global lists, so tests don't leak into each other."""
    import litellm

    litellm.callbacks = []
    litellm.success_callback = []
    litellm.failure_callback = []
    litellm._async_success_callback = []
    litellm._async_failure_callback = []
    litellm.input_callback = []
    manager = getattr(litellm, "logging_callback_manager", None)
    if manager is not None:
        manager._reset_all_callbacks()


def call_id_of(row: dict) -> str:
    """The LiteLLM call id a LiteLLM event was made for (kept in its metadata; the event id is
    llmtally's own), else the event id."""
    meta = row.get("metadata")
    if isinstance(meta, str):
        meta = json.loads(meta) if meta else {}
    return (meta or {}).get("litellm_call_id") or row["id"]


def one_event_insert(dialect: str) -> str:
    """One event's ``INSERT`` in the driver's parameter style, with no rollups: what an old
    version wrote, or another process racing the writer."""
    from llmtally._storage.tables import EVENT_COLUMNS, INSERT_EVENTS, SKIP_STORED_IDS

    mark = "?" if dialect == "sqlite" else "%s"
    return f"{INSERT_EVENTS} VALUES ({', '.join([mark] * len(EVENT_COLUMNS))}) {SKIP_STORED_IDS}"


def rollup_calls(url: str) -> int:
    """The calls the hourly rollups count, over all hours and groups."""
    from sqlalchemy import create_engine, text

    from llmtally._storage.store import normalize_url

    engine = create_engine(normalize_url(url))
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT COALESCE(SUM(calls), 0) FROM llmtally_rollups"))
                       .scalar())
    finally:
        engine.dispose()


def rollups_mismatch(url: str) -> list[str]:
    """How the hourly rollups differ from a GROUP BY over the events, written here in plain
    SQL (not through llmtally's fold), and how the latency sketches' counts differ from the
    events' (the bucket of each duration from sketch.bucket_of). Empty when they agree."""
    import math
    from datetime import datetime

    from sqlalchemy import create_engine, text

    from llmtally._storage.sketch import bucket_of
    from llmtally._storage.store import normalize_url

    dims = ('provider, model, project, "user", status, error_type, currency, cost_status, '
            "source, call_type")
    engine = create_engine(normalize_url(url))
    sqlite = engine.dialect.name == "sqlite"
    hour = "strftime('%Y-%m-%d %H:00:00', ts)" if sqlite else "date_trunc('hour', ts)"
    true = "1" if sqlite else "true"
    streamed = f"streamed = {true}"

    def when(value):
        return datetime.fromisoformat(value) if isinstance(value, str) else value

    try:
        with engine.connect() as conn:
            events = conn.execute(text(f"""
                SELECT {hour} AS hour, {dims}, COALESCE(price_source, '') = 'cache-hit',
                       COUNT(*), SUM(CASE WHEN {streamed} THEN 1 ELSE 0 END),
                       SUM(input_tokens), SUM(output_tokens), SUM(cache_read_tokens),
                       SUM(cache_write_tokens), SUM(reasoning_tokens), COALESCE(SUM(cost), 0),
                       SUM(CASE WHEN cache_read_tokens > 0 THEN 1 ELSE 0 END),
                       SUM(CASE WHEN cache_read_tokens > 0 THEN input_tokens ELSE 0 END),
                       COUNT(latency_ms), COALESCE(SUM(latency_ms), 0),
                       SUM(CASE WHEN {streamed} AND ttft_ms IS NOT NULL THEN 1 ELSE 0 END),
                       COALESCE(SUM(CASE WHEN {streamed} THEN ttft_ms END), 0),
                       MAX(cost), MIN(ts), MAX(ts)
                FROM llmtally_events GROUP BY {hour}, {dims},
                         COALESCE(price_source, '') = 'cache-hit'""")).all()
            rollups = conn.execute(text(f"""
                SELECT hour, {dims}, cache_hit, calls, streamed_calls, input_tokens,
                       output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens,
                       cost, cached_calls, cached_input_tokens, latency_calls, latency_ms_sum,
                       ttft_calls, ttft_ms_sum, max_cost, first_ts, last_ts
                FROM llmtally_rollups""")).all()
            durations = conn.execute(text(f"""
                SELECT {hour}, provider, model, project, latency_ms,
                       CASE WHEN {streamed} THEN ttft_ms END
                FROM llmtally_events WHERE status = 'ok'""")).all()
            cells = conn.execute(text(
                "SELECT hour, provider, model, project, metric, bucket, calls "
                "FROM llmtally_rollup_sketches")).all()
    finally:
        engine.dispose()

    def keyed(rows):
        out = {}
        for row in rows:
            key = (when(row[0]), *row[1:11], bool(row[11]))
            values = list(row[12:])
            values[-2:] = [when(values[-2]), when(values[-1])]
            out[key] = values
        return out

    want, have = keyed(events), keyed(rollups)
    problems = [f"{key}: events only" for key in want.keys() - have.keys()]
    problems += [f"{key}: rollups only" for key in have.keys() - want.keys()]
    for key in want.keys() & have.keys():
        for index, (a, b) in enumerate(zip(want[key], have[key])):
            same = (a is None and b is None) if a is None or b is None else (
                math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
                if isinstance(a, float | int) and not isinstance(a, bool) else a == b)
            if not same:
                problems.append(f"{key}: value {index}: events {a!r}, rollups {b!r}")
    sketch: dict = {}
    for moment, provider, model, project, latency, ttft in durations:
        for metric, value in ((0, latency), (1, ttft)):
            if value is not None:
                place = (when(moment), provider, model, project, metric, bucket_of(value))
                sketch[place] = sketch.get(place, 0) + 1
    stored = {(when(c[0]), *c[1:6]): int(c[6]) for c in cells}
    if stored != sketch:
        problems.append(f"sketch cells differ: {sorted(set(stored.items()) ^ set(sketch.items()), key=repr)[:5]}")
    return problems


class Clock:
    """A settable clock for ``Tally(clock=...)``: ``clock.now = ...`` moves it."""

    def __init__(self, now) -> None:
        self.now = now

    def __call__(self):
        return self.now
