"""``llmtally demo``: two weeks of plausible traffic, live calls through the real integrations,
a budget that blocks a call, and the report — in a SQLite file, offline, in a few seconds.

Every step uses the code paths an application uses: back-filled history goes through
:meth:`Tally.record`, the live calls through LiteLLM (``mock_response``: nothing leaves the
machine) with ``tally.litellm()`` and through a LangChain chat model with ``tally.langchain()``,
and the blocked call through :meth:`Tally.guard`. Parts whose extra is not installed are
skipped with a note.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._budgets.budget import Budget, BudgetExceeded
from ._errors import ConfigError
from ._i18n import translator

if TYPE_CHECKING:
    from langchain_core.runnables import RunnableConfig

__all__ = ["run_demo", "DemoResult", "DEMO_TAG"]

DEMO_TAG = "llmtally-demo"
HISTORY_DAYS = 14
HISTORY_CALLS = 4_000
LIVE_PROJECT = "demo-live"
BUDGET_PROJECT = "demo-budget"
LITELLM_MODELS = ("openai/gpt-4o-mini", "anthropic/claude-haiku-4-5",
                  "gemini/gemini-2.5-flash", "deepseek/deepseek-chat")
LANGCHAIN_MODEL = "claude-haiku-4-5"
QUESTION = [{"role": "user", "content": "Summarise our refund policy in one sentence."}]


@dataclass
class DemoResult:
    """What the demo did: the ledger, the report, and the figures it printed."""

    database: Path
    report: Path
    history_calls: int = 0
    live_calls: int = 0
    blocked: str | None = None
    skipped: list[str] = field(default_factory=list)
    headline: list[str] = field(default_factory=list)
    seconds: float = 0.0
    language: str = "en"  # of what it printed (the configured language)


def run_demo(database: str | os.PathLike[str], reports: str | os.PathLike[str],
             say: Callable[[str], None] = print, *, now: datetime | None = None,
             language: str = "en") -> DemoResult:
    """Run the demo into ``database`` (a fresh SQLite file) and write the report into
    ``reports``, saying what it does in ``language``."""
    started = time.perf_counter()
    path = Path(database).expanduser().absolute()
    _start_fresh(path)
    # LiteLLM must use its bundled price map (no fetch) however the demo was started.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    from ._tally import Tally

    now = now or datetime.now(timezone.utc)
    result = DemoResult(database=path, report=Path(reports))
    budgets = [Budget(usd=500, per="month", warn_at=(0.8,)),
               Budget(usd=5, per="day", each="user"),
               Budget(usd=0.0005, per="day", scope={"project": BUDGET_PROJECT})]
    with Tally(f"sqlite:///{path}", price_map="bundled", budgets=budgets, alerts=(),
               scope={"tags": [DEMO_TAG]}, language=language) as tally:
        from ._sample import record_history

        result.language = tally.language
        _ = translator(tally.language)
        say(_("Back-filling {days} days of traffic into {path} ...").format(
            days=HISTORY_DAYS, path=path))
        result.history_calls = record_history(
            tally, now - timedelta(days=HISTORY_DAYS), now - timedelta(minutes=5),
            count=HISTORY_CALLS)
        for name, step in (("LiteLLM", _litellm_calls), ("LangChain", _langchain_calls)):
            try:
                made = step(tally)
            except ImportError as exc:
                result.skipped.append(f"{name}: {exc}")
                say(_("Skipped the {name} calls ({reason}).").format(name=name, reason=exc))
                continue
            result.live_calls += made
            say(_("Made {count} {name} calls through tally.{method}() (mock responses).").format(
                count=made, name=name, method=name.lower()))
        result.blocked = _blocked_call(tally, say)
        tally.flush()
        # The last seven whole days, today included: the live and blocked calls are in it.
        today = now.astimezone(tally.tz).date()
        period: dict[str, Any] = {"since": (today - timedelta(days=6)).isoformat(),
                  "until": (today + timedelta(days=1)).isoformat()}
        from ._reporting.render import write_report

        written = write_report(tally, reports, **period)
    result.report = written.path
    result.headline = written.report.headline_lines()
    result.seconds = time.perf_counter() - started
    return result


def _start_fresh(path: Path) -> None:
    """Remove a previous demo ledger; refuse to touch a file that holds anything else."""
    if not path.exists():
        return
    try:
        with _sqlite(path) as conn:
            foreign = conn.execute(
                "SELECT count(*) FROM llmtally_events WHERE tags NOT LIKE ?",
                (f'%"{DEMO_TAG}"%',)).fetchone()[0]
    except sqlite3.Error:
        foreign = None
    if foreign != 0:
        raise ConfigError(f"{path} exists and is not a demo ledger; the demo starts from a fresh "
                          "file: give another one with --db")
    for suffix in ("", "-wal", "-shm", ".spill.jsonl"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


@contextmanager
def _sqlite(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        yield conn
    finally:
        conn.close()


def _litellm_calls(tally: Any) -> int:
    """A few chat calls per provider through LiteLLM with the tally's callback registered."""
    import litellm

    litellm.callbacks = [*[cb for cb in litellm.callbacks if cb is not tally.litellm()],
                         tally.litellm()]
    made = 0
    users = ("ana", "bo", "chen")
    with tally.scope(project=LIVE_PROJECT):
        for index, model in enumerate(LITELLM_MODELS * 3):
            with tally.scope(user=users[index % len(users)]):
                litellm.completion(model=model, messages=QUESTION, max_tokens=60,
                                   mock_response="Refunds are accepted within 30 days.")
            made += 1
    tally.flush()
    return made


def _langchain_calls(tally: Any) -> int:
    """A small chain (prompt | chat model) invoked and streamed with ``tally.langchain()``."""
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage
    from langchain_core.prompts import ChatPromptTemplate

    class DemoChatModel(GenericFakeChatModel):
        """A canned chat model that reports itself as Anthropic's Claude, with usage."""

        def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
            params = super()._get_ls_params(stop=stop, **kwargs)
            params["ls_provider"], params["ls_model_name"] = "anthropic", LANGCHAIN_MODEL
            return params

    def answer(text: str, prompt: int) -> AIMessage:
        return AIMessage(content=text, response_metadata={"model_name": LANGCHAIN_MODEL},
                         usage_metadata={"input_tokens": prompt, "output_tokens": 12,
                                         "total_tokens": prompt + 12})

    replies = iter([answer("Within 30 days, with the receipt.", 41 + n) for n in range(6)])
    chain = (ChatPromptTemplate.from_messages([("system", "You answer support questions."),
                                               ("user", "{question}")])
             | DemoChatModel(messages=replies))
    config: RunnableConfig = {"callbacks": [tally.langchain()],
              "metadata": {"llmtally_project": LIVE_PROJECT, "llmtally_user": "dee"}}
    questions = [{"question": f"What is the refund window for order {n}?"} for n in range(4)]
    chain.batch(questions, config=config)
    chain.invoke({"question": "And for gift cards?"}, config=config)
    chain.invoke({"question": "Do you refund shipping?"}, config=config)
    tally.flush()
    return len(questions) + 2


def _blocked_call(tally: Any, say: Callable[[str], None]) -> str | None:
    """A call over the demo budget: refused before anything is sent, recorded as blocked."""
    _ = translator(tally.language)
    try:
        import litellm
    except ImportError:
        held = None
        try:
            with tally.scope(project=BUDGET_PROJECT):
                held = tally.reserve(model="gpt-4o", input_tokens=1_000, max_tokens=1_000)
        except BudgetExceeded as exc:
            say(_("Blocked before sending: {reason}").format(reason=exc))
            return str(exc)
        tally.release(held)
        return None
    completion = tally.guard(litellm.completion)
    try:
        with tally.scope(project=BUDGET_PROJECT, user="ana"):
            completion(model="openai/gpt-4o", messages=QUESTION, max_tokens=1_000,
                       mock_response="(never sent)")
    except BudgetExceeded as exc:
        say(_("Blocked before sending: {reason}").format(reason=exc))
        return str(exc)
    return None
