"""llmtally: a SQL ledger of LLM calls — tokens, cost, latency — with budgets and reports."""
