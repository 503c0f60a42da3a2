"""``llmtally serve``: a live dashboard, a JSON API and Prometheus metrics over the ledger.

An ASGI application (FastAPI, the ``serve`` extra) that only reads: the dashboard is the
report's page for a chosen period and filters, the API returns the same figures as
:meth:`~llmtally.Tally.summary` and the report, and ``/metrics`` sums the hourly rollups, so
every process writing the ledger is counted once. Built by :func:`app.create_app`.
"""
