"""``llmtally serve``: the dashboard, JSON API and metrics over the ledger, under uvicorn."""

from __future__ import annotations

import ipaddress
import os
from typing import Any

import click

from .._i18n import translator
from .._terminal import CommandError, echo
from .ledger import ledger_options

__all__ = ["serve"]

DEFAULT_PORT = 8777


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Any address but loopback needs --token-env.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(1, 65535))
@click.option("--token-env", metavar="NAME", default=None,
              help="Environment variable holding the access token (at least 16 characters).")
@click.option("--refresh", default=30, show_default=True, type=click.IntRange(1, 86400),
              help="Seconds between the dashboard's refreshes.")
@click.option("--cache", "cache_seconds", default=5.0, show_default=True,
              type=click.FloatRange(0, 3600),
              help="Seconds the same answer is shared between requests (0: always fresh).")
@ledger_options
def serve(tally: Any, host: str, port: int, token_env: str | None, refresh: int,
          cache_seconds: float) -> None:
    """A live dashboard, a JSON API (/api/v1/) and Prometheus metrics (/metrics) over the
    ledger. Read-only. Needs the serve extra: pip install "llmtally[serve]".

    \b
    Example:
      llmtally serve                                   # http://127.0.0.1:8777
      LLMTALLY_SERVE_TOKEN=... llmtally serve --host 0.0.0.0 --token-env LLMTALLY_SERVE_TOKEN
    """
    token = None
    if token_env is not None:
        token = os.environ.get(token_env)
        if not token:
            raise CommandError(f"--token-env {token_env}: that environment variable is not set "
                               "or empty; set it to a secret of at least 16 characters")
    if token is None and not _is_loopback(host):
        raise CommandError(f"--host {host} would let anyone who can reach it read the ledger: "
                           "give --token-env NAME (a variable holding a secret), or bind 127.0.0.1")
    try:
        import uvicorn

        from .._serve.app import create_app
    except ImportError:
        raise CommandError('llmtally serve needs the serve extra: pip install "llmtally[serve]"') \
            from None
    app = create_app(tally, token=token, refresh_seconds=refresh, cache_seconds=cache_seconds)
    shown = f"[{host}]" if ":" in host else host
    _ = translator(tally.language)
    pattern = (_("llmtally serve: {url} over {ledger} (token required)  (Ctrl-C to stop)")
               if token else _("llmtally serve: {url} over {ledger}  (Ctrl-C to stop)"))
    echo(pattern.format(url=f"http://{shown}:{port}/", ledger=tally.database_url))
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False,
                proxy_headers=False)
