"""The commands of `llmtally` (``cli.py`` is the group), one module per concern."""
