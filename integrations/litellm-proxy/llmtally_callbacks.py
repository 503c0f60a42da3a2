"""llmtally for the LiteLLM proxy: ``callbacks: llmtally_callbacks.proxy_handler`` in config.yaml.

The proxy imports this module once per worker process at start. ``Tally.from_config()`` reads
``$LLMTALLY_CONFIG`` / ``./llmtally.toml`` and the ``LLMTALLY_*`` environment variables (e.g.
``LLMTALLY_DATABASE_URL=postgresql+psycopg://...`` for a ledger shared by several workers or
hosts; the default is ``./llmtally.db`` in the proxy's working directory).

Each request is recorded once, with the provider/model of the deployment that served it and
the proxy's caller in user / project / tags / metadata (see README.md beside this file).
Budgets from ``llmtally.toml`` are checked before each request is routed: a request over a
limit gets HTTP 429 with the budget's message and never reaches the provider.
"""

from llmtally import Tally

tally = Tally.from_config()
proxy_handler = tally.litellm()
