"""No prompt, response or API key is stored or logged: a canary key and a canary prompt go
through every kind of LiteLLM call (sync, async, streamed, embedding, failing, budget-checked)
by ``api_key=``, extra headers and metadata, to the fake provider; then the SQLite file (with
its -wal/-shm), the spill file, the rejected file, every PostgreSQL table of the ledger and
llmtally's log records (DEBUG) are searched for them. llmtally offers no option to store
prompt or response text (there is no ``store_content``).
"""

from __future__ import annotations

import asyncio
import logging
import stat

import pytest
from conftest import CLOSED_PORT_URL, pg_admin, require_postgres

from llmtally import Budget, Tally
from llmtally.testing import FakeProvider

litellm = pytest.importorskip("litellm")

CANARY_KEY = "sk-canary-7f3a91c2e4b84d0c"
CANARY_PROMPT = "canary-prompt-lapis-lazuli-9931"
CANARY_REPLY = "canary-reply-obsidian-4417"
WEBHOOK_TOKEN = "hooktoken-5522"
CANARIES = (CANARY_KEY, CANARY_PROMPT, CANARY_REPLY, WEBHOOK_TOKEN)
FAKE_PROVIDER = {"reply": CANARY_REPLY}


def _every_kind_of_call(tally: Tally, provider: FakeProvider) -> int:
    """One call of each kind, all carrying the canaries; returns how many calls were made."""
    litellm.callbacks = [tally.litellm()]
    secret = {"api_key": CANARY_KEY, "extra_headers": {
        "Authorization": f"Bearer {CANARY_KEY}", "X-Api-Key": CANARY_KEY,
        "X-Prompt": CANARY_PROMPT}}
    meta = {"project": "privacy", "secret": CANARY_KEY, "prompt_copy": CANARY_PROMPT,
            "headers": {"authorization": CANARY_KEY}}
    chat = {"model": "openai/gpt-4o-mini", "api_base": provider.openai_base, "max_tokens": 50,
            "messages": [{"role": "system", "content": CANARY_PROMPT},
                         {"role": "user", "content": f"{CANARY_PROMPT} {CANARY_KEY}"}],
            "metadata": meta, **secret}
    guarded = tally.guard(litellm.completion)
    guarded(**chat)
    for _ in guarded(**chat, stream=True, stream_options={"include_usage": True}):
        pass

    async def async_calls() -> None:
        await litellm.acompletion(**chat)
        async for _ in await litellm.acompletion(**chat, stream=True):  # no usage: counted offline
            pass
        await litellm.aembedding(model="openai/text-embedding-3-small", api_base=provider.openai_base,
                                 input=[CANARY_PROMPT], metadata=meta, **secret)
        # As the README says: LiteLLM logs async calls in tasks on this loop, cancelled when
        # asyncio.run ends it; aflush() first, or a loaded machine loses the last calls.
        await tally.aflush(20)

    asyncio.run(async_calls())
    provider.fail_next(1, status=400, body={"error": {  # an error that echoes the request
        "message": f"bad request {CANARY_PROMPT} with key {CANARY_KEY}", "type": "invalid"}})
    with pytest.raises(litellm.BadRequestError):
        litellm.completion(**chat, max_retries=0)
    for _ in litellm.completion(**chat, stream=True):  # left halfway: recorded as abandoned
        break
    assert tally.flush(20)
    return 7


def _tally(url: str, tmp_path, **kwargs) -> Tally:
    return Tally(url, price_map="bundled", spill_path=tmp_path / "spill.jsonl",
                 budgets=[Budget(usd=10, per="day", warn_at=(0.0000001,))],
                 alerts=["log", f"http://user:{WEBHOOK_TOKEN}@127.0.0.1:1/hooks/{WEBHOOK_TOKEN}"
                                f"?token={WEBHOOK_TOKEN}"], **kwargs)


def _assert_no_canary(where: str, data: bytes) -> None:
    for canary in CANARIES:
        assert canary.encode() not in data, f"{canary} found in {where}"


def _assert_logs_clean(caplog, expect_some: bool = True) -> None:
    ours = [r for r in caplog.records if r.name.startswith("llmtally")]
    assert ours or not expect_some  # something was logged (alerts, the outage, ...)
    for record in ours:
        text = record.getMessage() + (caplog.text if record.exc_info else "")
        _assert_no_canary(f"the log record {record.getMessage()[:80]!r}", text.encode())


def test_sqlite_file_spill_file_and_logs_hold_no_key_or_prompt(tmp_path, provider, caplog):
    require_postgres()  # the outage phase points at PostgreSQL on a closed port
    caplog.set_level(logging.DEBUG, logger="llmtally")
    # Phase 1: the ledger is unreachable, events go to the spill file.
    down = _tally(CLOSED_PORT_URL, tmp_path)
    calls = _every_kind_of_call(down, provider)
    # The writer probing the ledger may hold the backlog in a claimed copy
    # (spill.jsonl.replaying.<pid>.<id>): events are in one file or the other.
    spill_files = sorted(tmp_path.glob("spill.jsonl*"))
    spilled = b"".join(path.read_bytes() for path in spill_files)
    assert spilled.count(b'"source":"litellm"') >= calls
    _assert_no_canary("the spill file", spilled)
    assert {stat.S_IMODE(path.stat().st_mode) for path in spill_files} == {0o600}
    down.close()
    # Phase 2: a SQLite ledger, which also replays the spill file.
    up = _tally(f"sqlite:///{tmp_path / 'ledger.db'}", tmp_path)
    _every_kind_of_call(up, provider)
    assert up._guard.drain_alerts(30)
    up.close()
    prompts_sent = [entry for entry in provider.request_log
                    if CANARY_PROMPT in str(entry["body"])]
    assert len(prompts_sent) >= 2 * calls  # the canaries really were sent
    files = [p for p in tmp_path.iterdir() if p.is_file()]
    assert {p.name for p in files} >= {"ledger.db"}
    for path in files:
        _assert_no_canary(path.name, path.read_bytes())
        if path.name.startswith(("ledger.db", "spill.jsonl")):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    _assert_logs_clean(caplog)


def test_postgres_tables_hold_no_key_or_prompt(pg_url, tmp_path, provider, caplog):
    caplog.set_level(logging.DEBUG, logger="llmtally")
    tally = _tally(pg_url, tmp_path)
    _every_kind_of_call(tally, provider)
    assert tally._guard.drain_alerts(30)
    tally.close()
    schema = pg_url.rsplit("search_path%3D", 1)[1]
    with pg_admin() as conn:
        tables = [row[0] for row in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,))]
        assert "llmtally_events" in tables
        dumped = []
        for table in tables:
            rows = conn.execute(f'SELECT t::text FROM "{schema}"."{table}" t').fetchall()
            dumped += [row[0] for row in rows]
    assert sum('"privacy"' in text or ",privacy," in text for text in dumped) >= 7
    _assert_no_canary("the PostgreSQL tables", "\n".join(dumped).encode())
    _assert_logs_clean(caplog, expect_some=False)
