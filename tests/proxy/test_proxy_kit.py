"""The LiteLLM proxy kit (integrations/litellm-proxy/): the real ``litellm`` proxy, started from
a venv of its own with ``litellm[proxy]``, in front of the loopback fake provider.

The venv is built once and cached (``$XDG_CACHE_HOME`` or ``~/.cache``, then
``llmtally-tests/proxy-<version>/``): ~1 minute and ~750 MB the first time. If it cannot be built
the tests are skipped, except under ``CI=true`` where they fail.

Virtual keys normally live in the proxy's PostgreSQL database (Prisma), which cannot run
offline; ``static_keys.py`` (beside this file) is a ``custom_auth`` that returns the same
``UserAPIKeyAuth`` fields (key alias, user, team) a database key carries.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import IN_CI, MSGS, fetch_events

from llmtally.testing import FakeProvider, FakeUsage

pytestmark = [pytest.mark.proxy, pytest.mark.slow, pytest.mark.timeout(900)]

PROXY_LITELLM = "1.106.12"  # the newest litellm[proxy] installable without the litellm-proxy package
REPO = Path(__file__).resolve().parents[2]
KIT = REPO / "integrations" / "litellm-proxy"
HERE = Path(__file__).resolve().parent
MASTER_KEY = "sk-master-test"
FLUSH_KEY = "sk-test-flush-the-ledger"  # static_keys.py: answered once the proxy's Tally flushed
BUDGET_TOML = """
[[budgets]]
usd = 0.10
per = "day"
each = "user"
"""
REPLY = "Hello from the fake provider."


def _venv_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "llmtally-tests" / f"proxy-{PROXY_LITELLM}"


def _run(cmd: list[str], timeout: float) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def _build_venv(venv: Path) -> Path:
    """The proxy venv's python: litellm[proxy] pinned, llmtally installed from this checkout
    (re-installed when the checkout or its pyproject.toml changed)."""
    python = venv / "bin" / "python"
    stamp = venv / ".llmtally-stamp"
    want = json.dumps({"litellm": PROXY_LITELLM, "repo": str(REPO),
                       "pyproject": hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()})
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time
        have = stamp.read_text() if stamp.exists() else None
        if have == want and python.exists():
            return python
        if have is None or json.loads(have).get("litellm") != PROXY_LITELLM or not python.exists():
            shutil.rmtree(venv, ignore_errors=True)
            base = getattr(sys, "_base_executable", None) or sys.executable
            _run([base, "-m", "venv", str(venv)], 300)
            _run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                  f"litellm[proxy]=={PROXY_LITELLM}", "-e", str(REPO)], 1800)
        else:  # litellm is there: only llmtally (path or dependencies) changed
            _run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                  "-e", str(REPO)], 600)
        stamp.write_text(want)
    return python


@pytest.fixture(scope="session")
def proxy_python() -> Path:
    try:
        return _build_venv(_venv_dir())
    except Exception as exc:  # no registry, no disk space, ...
        message = f"cannot build the litellm[proxy]=={PROXY_LITELLM} venv at {_venv_dir()}: {exc}"
        if IN_CI:
            pytest.fail(f"CI=true and {message}")
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status
    except Exception:
        return 0


class Proxy:
    def __init__(self, base: str, ledger: str, provider: FakeProvider, anthropic: FakeProvider):
        self.base, self.ledger, self.provider, self.anthropic = base, ledger, provider, anthropic

    def client(self, key: str):
        import openai

        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=key, max_retries=0)

    def flush(self) -> None:
        """Return once every call the proxy finished is in the ledger (its Tally flushed)."""
        request = urllib.request.Request(f"{self.base}/v1/models",
                                         headers={"Authorization": f"Bearer {FLUSH_KEY}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200

    def rows(self, ids: set[str], seconds: float = 20.0) -> list[dict]:
        """The ledger rows of these LiteLLM call ids, once all are there."""
        deadline = time.monotonic() + seconds
        while True:
            rows = [row for row in fetch_events(self.ledger) if _call_id(row) in ids]
            if len(rows) >= len(ids) or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)


def _call_id(row: dict) -> str:
    return json.loads(row["metadata"]).get("litellm_call_id", row["id"])


@pytest.fixture(scope="module")
def proxy(proxy_python, tmp_path_factory):
    yield from _proxy(proxy_python, tmp_path_factory.mktemp("proxy"))


@pytest.fixture(scope="module")
def budget_proxy(proxy_python, tmp_path_factory):
    # $0.10 a day for each user: ordinary calls (held at most ~$0.06, settled at ~$0.0001)
    # pass; one asking for 1,000,000 output tokens (~$0.60) is refused before it is sent.
    yield from _proxy(proxy_python, tmp_path_factory.mktemp("budget-proxy"), BUDGET_TOML)


def _proxy(proxy_python: Path, tmp: Path, llmtally_toml: str | None = None):
    ledger = f"sqlite:///{tmp / 'ledger.db'}"
    with FakeProvider(usage=FakeUsage(prompt_tokens=120, completion_tokens=30, cached_tokens=100),
                      resolved_model="gpt-4o-mini-2024-07-18", reply=REPLY) as fp, \
            FakeProvider(usage=FakeUsage(prompt_tokens=100, completion_tokens=50,
                                         cache_creation_tokens=2000, cache_read_tokens=3000)) as ap:
        config = yaml.safe_load((KIT / "config.yaml").read_text())
        config["model_list"] = [
            {"model_name": "gpt-4o-mini", "litellm_params": {
                "model": "openai/gpt-4o-mini", "api_base": fp.openai_base, "api_key": "sk-upstream"}},
            {"model_name": "claude-sonnet", "litellm_params": {
                "model": "anthropic/claude-sonnet-4-5", "api_base": ap.anthropic_base,
                "api_key": "sk-upstream"}},
        ]
        config.setdefault("general_settings", {})["custom_auth"] = "static_keys.user_api_key_auth"
        (tmp / "config.yaml").write_text(yaml.safe_dump(config))
        if llmtally_toml is not None:  # read by Tally.from_config() in the proxy's directory
            (tmp / "llmtally.toml").write_text(llmtally_toml)
        env = {name: value for name, value in os.environ.items()
               if not name.startswith(("LLMTALLY_", "LITELLM_", "DATABASE_URL", "PYTHON"))}
        env.update({
            "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": MASTER_KEY,
            "PROXY_TEST_FLUSH_KEY": FLUSH_KEY,
            "LLMTALLY_DATABASE_URL": ledger, "LLMTALLY_PRICE_MAP": "bundled",
            # the current checkout's code, the kit's callbacks module, the test's custom_auth
            "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(KIT), str(HERE)]),
            # anything that tries the internet fails at once instead of hanging
            "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
            "NO_PROXY": "127.0.0.1,localhost",
        })
        port = _free_port()
        log = open(tmp / "proxy.log", "w")
        process = subprocess.Popen(
            [str(proxy_python), "-m", "litellm.proxy.proxy_cli", "--config", str(tmp / "config.yaml"),
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while _get(f"{base}/health/liveliness") != 200:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(f"the proxy did not start:\n{(tmp / 'proxy.log').read_text()[-5000:]}")
                time.sleep(0.2)
            yield Proxy(base, ledger, fp, ap)
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


def _chat(proxy: Proxy, key: str, **kw):
    raw = proxy.client(key).chat.completions.with_raw_response.create(
        model=kw.pop("model", "gpt-4o-mini"), messages=MSGS, **kw)
    return raw.headers["x-litellm-call-id"], raw.parse()


def test_two_keys_are_attributed_to_their_users_and_teams(proxy, make_tally):
    before = proxy.provider.requests
    alice_id, alice = _chat(proxy, "sk-alice")
    bob_id, bob = _chat(proxy, "sk-bob", user="customer-42")
    assert alice.choices[0].message.content == REPLY == bob.choices[0].message.content
    assert proxy.provider.requests - before == 2
    rows = {_call_id(row): row for row in proxy.rows({alice_id, bob_id})}
    assert set(rows) == {alice_id, bob_id}
    prices = make_tally().prices
    for call_id, user, project, alias, team_id in (
            (alice_id, "alice", "search", "alice-laptop", "team-search"),
            (bob_id, "bob", "ads", "bob-batch", "team-ads")):
        row = rows[call_id]
        meta = json.loads(row["metadata"])
        assert (row["user"], row["project"], json.loads(row["tags"])) == (user, project, [f"key:{alias}"])
        assert (meta["key_alias"], meta["user_id"], meta["team_id"]) == (alias, user, team_id)
        assert (row["source"], row["provider"], row["model"], row["resolved_model"], row["status"],
                row["streamed"]) == ("litellm", "openai", "gpt-4o-mini", "gpt-4o-mini-2024-07-18",
                                     "ok", False)
        assert (row["input_tokens"], row["cache_read_tokens"], row["output_tokens"]) == (120, 100, 30)
        assert row["cost"] == pytest.approx(prices.cost(
            model="gpt-4o-mini", provider="openai", input_tokens=120, output_tokens=30,
            cache_read_tokens=100).cost, abs=1e-12)
        assert row["cost_status"] == "priced" and row["latency_ms"] > 0
        assert "sk-alice" not in json.dumps(row) and "sk-bob" not in json.dumps(row)
    assert json.loads(rows[bob_id]["metadata"])["end_user"] == "customer-42"


def test_each_request_is_recorded_once(proxy):
    ids = [_chat(proxy, "sk-alice")[0] for _ in range(3)]
    raw = proxy.client("sk-bob").chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MSGS, stream=True, stream_options={"include_usage": True})
    stream_id = raw.headers["x-litellm-call-id"]
    assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices) == REPLY
    assert len(set(ids + [stream_id])) == 4
    proxy.flush()  # every call the proxy finished is in the ledger: anything twice is there too
    rows = [row for row in fetch_events(proxy.ledger) if _call_id(row) in {*ids, stream_id}]
    assert sorted(_call_id(row) for row in rows) == sorted([*ids, stream_id])
    [streamed] = [row for row in rows if _call_id(row) == stream_id]
    assert (streamed["streamed"], streamed["user"], streamed["input_tokens"],
            streamed["output_tokens"], streamed["cost_status"]) == (True, "bob", 120, 30, "priced")
    assert not any(row["streamed"] for row in rows if row is not streamed)


@pytest.mark.filterwarnings("ignore:The model 'claude-sonnet-4-5' is deprecated")
def test_anthropic_deployment_is_recorded_with_its_provider_and_cache_tokens(proxy):
    call_id, _ = _chat(proxy, "sk-alice", model="claude-sonnet")
    [row] = proxy.rows({call_id})
    assert (row["provider"], row["model"], row["user"]) == ("anthropic", "claude-sonnet-4-5", "alice")
    assert (row["input_tokens"], row["cache_write_tokens"], row["cache_read_tokens"],
            row["output_tokens"]) == (5100, 2000, 3000, 50)
    assert json.loads(row["metadata"])["model_group"] == "claude-sonnet"


def test_a_client_chosen_call_id_cannot_hide_a_second_call(proxy):
    client = proxy.client("sk-alice")
    for _ in range(2):
        client.chat.completions.create(model="gpt-4o-mini", messages=MSGS,
                                       extra_headers={"x-litellm-call-id": "replayed-id"})
    rows = proxy.rows({"replayed-id"}, seconds=5)
    deadline = time.monotonic() + 10
    while len(rows) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
        rows = [row for row in fetch_events(proxy.ledger) if _call_id(row) == "replayed-id"]
    assert len(rows) == 2 and len({row["id"] for row in rows}) == 2


def test_an_unknown_key_is_refused_before_the_provider_and_not_recorded(proxy):
    import openai

    before, rows_before = proxy.provider.requests, len(fetch_events(proxy.ledger))
    with pytest.raises(openai.AuthenticationError):
        _chat(proxy, "sk-nobody")
    proxy.flush()
    assert proxy.provider.requests == before
    assert len(fetch_events(proxy.ledger)) == rows_before


def test_a_user_over_budget_gets_429_before_the_provider_and_a_blocked_row(budget_proxy):
    import openai

    before = budget_proxy.provider.requests
    with pytest.raises(openai.RateLimitError) as refused:
        # 20 choices of the model's whole output limit: about $0.20 against $0.10
        _chat(budget_proxy, "sk-bob", max_tokens=16_384, n=20)
    assert refused.value.status_code == 429
    assert "llmtally budget" in str(refused.value)
    assert "for user=bob would be exceeded" in str(refused.value)
    assert budget_proxy.provider.requests == before  # nothing went upstream
    deadline = time.monotonic() + 10
    while True:
        blocked = [row for row in fetch_events(budget_proxy.ledger) if row["status"] == "blocked"]
        if blocked or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    [row] = blocked
    assert not [row for row in fetch_events(budget_proxy.ledger) if row["status"] == "error"]
    assert (row["user"], row["project"], row["model"], row["provider"], row["cost"]) == \
        ("bob", "ads", "gpt-4o-mini", "openai", 0)
    assert "key:bob-batch" in json.loads(row["tags"])
    assert json.loads(row["metadata"])["budget"] == "usd 0.1/day each user"
    # the same user's ordinary call still goes through, and its hold is settled by its call id
    call_id, _ = _chat(budget_proxy, "sk-bob")
    assert budget_proxy.provider.requests == before + 1
    assert len(budget_proxy.rows({call_id})) == 1
    deadline = time.monotonic() + 10
    while _held(budget_proxy.ledger) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _held(budget_proxy.ledger) == 0


def _held(url: str) -> int:
    from sqlalchemy import create_engine, text

    from llmtally._storage.store import normalize_url

    engine = create_engine(normalize_url(url))
    try:
        with engine.connect() as conn:
            return conn.execute(text(
                "SELECT COALESCE(SUM(reserved), 0) FROM llmtally_budget_counters")).scalar()
    finally:
        engine.dispose()


def test_master_key_requests_belong_to_the_end_user_in_the_body(budget_proxy):
    """LiteLLM's placeholder user of the master key is no user: the request's ``user`` is, for
    the event and for an each="user" budget."""
    import openai

    ids = {_chat(budget_proxy, MASTER_KEY, user=name)[0] for name in ("carol", "dave")}
    rows = budget_proxy.rows(ids)
    assert sorted(row["user"] for row in rows) == ["carol", "dave"]
    before = budget_proxy.provider.requests
    with pytest.raises(openai.RateLimitError) as refused:
        _chat(budget_proxy, MASTER_KEY, user="carol", max_tokens=16_384, n=20)
    assert "for user=carol would be exceeded" in str(refused.value)
    assert budget_proxy.provider.requests == before
    # a virtual key's own user still wins over the body
    call_id, _ = _chat(budget_proxy, "sk-alice", user="mallory")
    [row] = budget_proxy.rows({call_id})
    assert row["user"] == "alice"


def test_concurrent_requests_sharing_a_call_id_are_each_held_and_charged(budget_proxy):
    from concurrent.futures import ThreadPoolExecutor

    from llmtally._budgets.counters import check_counters
    from llmtally._storage.store import Store

    client = budget_proxy.client("sk-alice")

    def call(_):
        return client.chat.completions.create(
            model="gpt-4o-mini", messages=MSGS, extra_headers={"x-litellm-call-id": "shared-id"})

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(call, range(3)))
    deadline = time.monotonic() + 10
    rows: list[dict] = []
    while len(rows) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
        rows = [row for row in fetch_events(budget_proxy.ledger) if _call_id(row) == "shared-id"]
    assert len(rows) == 3 and len({row["id"] for row in rows}) == 3
    while _held(budget_proxy.ledger) and time.monotonic() < deadline:
        time.sleep(0.1)
    store = Store(budget_proxy.ledger)
    try:
        assert check_counters(store) == []  # every counter equals the ledger's GROUP BY
    finally:
        store.close()
