"""Alerts beyond budgets: rules evaluated from the ledger (error rates, failed keys, rate
limits, slow models, spend spikes, models without a price), each provider's status, the alert
history kept in the ledger, and the chat tools alerts are sent to."""
