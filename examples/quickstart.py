"""Record a few LLM calls by hand and with @tally.track, then print where the money went.

    python examples/quickstart.py          # writes ./llmtally.db; then: llmtally summary --since 7d

No API key and no network: the "SDK" below returns an OpenAI-shaped response, as
client.chat.completions.create(...) would.
"""

from __future__ import annotations

from llmtally import Tally

tally = Tally()  # ./llmtally.db, or $LLMTALLY_DATABASE_URL

with tally.scope(project="etl", user="bob", tags=["nightly"]):
    tally.record(provider="openai", model="gpt-4o-mini", input_tokens=1200, output_tokens=300,
                 cache_read_tokens=1000, latency_ms=850)
    tally.record(provider="anthropic", model="claude-sonnet-4-5", input_tokens=5200,
                 cache_write_tokens=4000, output_tokens=420, latency_ms=2300)
    tally.record(model="dashscope/qwen-plus", input_tokens=3000, output_tokens=800, latency_ms=1400)


@tally.track(model="deepseek/deepseek-chat", project="search", user="alice")
def ask(question: str) -> dict:
    """Stands in for client.chat.completions.create(model="deepseek-chat", ...)."""
    return {"model": "deepseek-chat", "choices": [{"message": {"content": "42"}}],
            "usage": {"prompt_tokens": 900, "completion_tokens": 120,
                      "prompt_tokens_details": {"cached_tokens": 512}}}


ask("What is the answer?")
tally.record(provider="acme", model="acme-llm-2", input_tokens=700, output_tokens=90)  # no price known

tally.flush()
print(f"Recorded 5 calls in {tally.database_url}\n")
for row in tally.summary(since="7d", by="model"):
    cost = "unpriced" if row.unpriced_calls == row.calls else f"${row.cost:.6f}"
    print(f"  {row.key:28} {row.calls:3} calls  {row.input_tokens + row.output_tokens:7,} tokens  {cost}")
print("\nNext: llmtally summary --since 7d --by project   ·   llmtally unpriced")
tally.close()
