"""Budgets: definitions, the counters and holds in the ledger, alerts."""
