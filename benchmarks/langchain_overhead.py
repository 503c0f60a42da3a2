"""What `tally.langchain()` adds to a LangChain chat model call, next to LangChain's own
`UsageMetadataCallbackHandler` (which only sums tokens: no price, no ledger).

A fake chat model that reports usage and a model name (no network: the model's own per-call
cost is LangChain's), called bare, with `UsageMetadataCallbackHandler`, and with our handler
(recording into a SQLite ledger), in alternating rounds in the same run, sync `invoke` and
async `ainvoke`, with a one-word prompt and with a short conversation (a system prompt and
three turns, 1.3 KB). Prints per-call p50 of each, the time each handler adds, and the ratio
of the two added times (target: ours <= 2x theirs).

    python benchmarks/langchain_overhead.py [--calls 4800]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from langchain_core.callbacks import UsageMetadataCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from llmtally import Tally

ROUNDS = 6
SHORT = "hi"
CONVERSATION = [
    SystemMessage("You are a support assistant for an online shop. Answer briefly, cite the order "
                  "number, and never promise refunds you cannot give. " * 3),
    HumanMessage("My order 1234 arrived damaged: the box was crushed and the mug inside is broken. "
                 "What can I do? I would like a replacement rather than a refund if possible."),
    AIMessage("Sorry to hear that. For order 1234 I can arrange a replacement mug. Could you send a "
              "photo of the damage and confirm your delivery address?"),
    HumanMessage("Sure, the photo is attached and the address is the same as on the order. How long "
                 "will the replacement take to arrive, and do I need to send the broken one back?"),
]


class UsageChat(BaseChatModel):
    """Answers at once, with usage and a model name, as a provider's chat model would."""

    model_name: str = "gpt-4o-mini"

    @property
    def _llm_type(self) -> str:
        return "usage-chat"

    def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any) -> ChatResult:
        usage = {"input_tokens": 120, "output_tokens": 30, "total_tokens": 150,
                 "input_token_details": {"cache_read": 100}}
        message = AIMessage("Hello.", usage_metadata=usage,
                            response_metadata={"model_name": "gpt-4o-mini-2024-07-18"})
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _agenerate(self, messages: Any, stop: Any = None, run_manager: Any = None,
                         **kw: Any) -> ChatResult:
        return self._generate(messages)


def _time_sync(model: UsageChat, prompt: Any, config: dict[str, Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        model.invoke(prompt, config=config)
        out.append(time.perf_counter() - started)
    return out


async def _time_async(model: UsageChat, prompt: Any, config: dict[str, Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        await model.ainvoke(prompt, config=config)
        out.append(time.perf_counter() - started)
    return out


def _compare(name: str, timer: Any, prompt: Any, tally: Tally, calls: int) -> None:
    model = UsageChat()
    configs = {"bare": {}, "usage": {"callbacks": [UsageMetadataCallbackHandler()]},
               "ours": {"callbacks": [tally.langchain()]}}
    times: dict[str, list[float]] = {key: [] for key in configs}
    for key, config in configs.items():  # warm up every path
        timer(model, prompt, config, 200)
    per_round = max(1, calls // ROUNDS)
    for _ in range(ROUNDS):
        for key, config in configs.items():
            times[key] += timer(model, prompt, config, per_round)
            tally.flush(30)  # the ledger's writer works between rounds, not during the next one
    p50 = {key: statistics.median(values) * 1e6 for key, values in times.items()}
    theirs, ours = p50["usage"] - p50["bare"], p50["ours"] - p50["bare"]
    print(f"{name:<22} bare {p50['bare']:7.1f} µs   +UsageMetadataCallbackHandler {p50['usage']:7.1f} µs "
          f"({theirs:+6.1f})   +tally.langchain() {p50['ours']:7.1f} µs ({ours:+6.1f})   "
          f"added: ours/theirs {ours / theirs:4.2f}x (target <= 2x; {len(times['bare'])} calls each)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=4800)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tally = Tally(f"sqlite:///{Path(tmp) / 'bench.db'}", price_map="bundled",
                      spill_path=Path(tmp) / "spill.jsonl")
        print(f"langchain-core {version('langchain-core')}, Python {sys.version.split()[0]}")
        for label, prompt in (("one word", SHORT), ("conversation", CONVERSATION)):
            _compare(f"invoke, {label}", _time_sync, prompt, tally, args.calls)
            with asyncio.Runner() as runner:
                _compare(f"ainvoke, {label}", lambda m, p, c, n: runner.run(_time_async(m, p, c, n)),
                         prompt, tally, args.calls)
        recorded = sum(row.calls for row in tally.summary(since="1d"))
        print(f"events recorded: {recorded}")
        tally.close()


if __name__ == "__main__":
    main()
