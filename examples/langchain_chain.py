"""A LangChain chain and a tool-calling agent recorded by llmtally, with a budget that stops a call.

    python examples/langchain_chain.py     # writes ./llmtally-langchain.db; then:
    llmtally summary --db llmtally-langchain.db --since 1d --by user

No API key and no network: ChatOpenAI talks HTTP to llmtally's loopback fake provider, which
answers in OpenAI's format with fixed usage (120 prompt tokens of which 100 cached, 30 output).
Point ``base_url`` at the real API and the same code records real calls.
"""

from __future__ import annotations

from langchain_core.messages import HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import chain
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from llmtally import Budget, BudgetExceeded, Tally
from llmtally.testing import FakeProvider, FakeToolCall, FakeUsage


@tool
def order_status(order_id: str) -> str:
    """The delivery status of an order."""
    return f"Order {order_id} left the warehouse yesterday."


def main() -> None:
    tally = Tally("llmtally-langchain.db", budgets=[Budget(usd=0.0001, per="day", each="user")])
    handler = tally.langchain()  # the same handler each time; pass it in the run config
    usage = FakeUsage(prompt_tokens=120, completion_tokens=30, cached_tokens=100)
    with FakeProvider(usage=usage, resolved_model="gpt-4o-mini-2024-07-18") as fake:
        model = ChatOpenAI(model="gpt-4o-mini", base_url=fake.openai_base, api_key="sk-fake",
                           max_tokens=100)

        # 1. A chain with two model calls: both recorded, grouped under the chain's run id.
        summarize = ChatPromptTemplate.from_messages([("user", "Summarize: {text}")]) | model
        shorten = ChatPromptTemplate.from_messages([("user", "Shorter: {text}")]) | model
        pipeline = summarize | StrOutputParser() | (lambda text: {"text": text}) | shorten
        with tally.scope(project="support"):
            pipeline.invoke({"text": "The parcel arrived late and damaged."},
                            config={"callbacks": [handler], "tags": ["summaries"],
                                    "metadata": {"llmtally_user": "alice"}})

        # 2. A tool-calling agent loop: the model calls are recorded, the tool runs are not.
        fake.queue_replies([FakeToolCall("order_status", {"order_id": "1234"})],
                           "Your order left the warehouse yesterday.")
        agent_model = model.bind_tools([order_status])

        @chain
        def agent(question: str) -> str:
            messages = [HumanMessage(question)]
            while (answer := agent_model.invoke(messages)).tool_calls:
                messages += [answer, *(order_status.invoke(call) for call in answer.tool_calls)]
            return str(answer.content)

        print("agent:", agent.invoke("Where is order 1234?", config={
            "callbacks": [handler], "metadata": {"llmtally_user": "bob"}}))

        # 3. Alice's budget ($0.0001 a day) is used up: the next call never leaves the process.
        before = fake.requests
        try:
            model.invoke("One more?", config={"callbacks": [handler],
                                              "metadata": {"llmtally_user": "alice"}})
        except BudgetExceeded as exc:
            print(f"blocked before sending ({fake.requests - before} requests sent): {exc}")

    tally.flush()
    print(f"\nLedger: {tally.database_url}")
    for row in tally.summary(since="1d", by="user"):
        print(f"  {row.key or '-':8} {row.calls} calls  {row.input_tokens:5} in  "
              f"{row.output_tokens:4} out  ${row.cost:.6f}")
    tally.close()


if __name__ == "__main__":
    main()
