"""A loopback fake LLM provider for tests: OpenAI and Anthropic wire formats over real HTTP.

Real clients (the ``openai`` / ``anthropic`` SDKs, LiteLLM, LangChain) talk to it through their
normal ``base_url`` / ``api_base``, so tests exercise the same HTTP path that users hit::

    from llmtally.testing import FakeProvider, FakeUsage

    with FakeProvider(usage=FakeUsage(prompt_tokens=120, cached_tokens=100)) as fp:
        litellm.completion(model="openai/gpt-4o-mini", api_base=fp.openai_base,
                           api_key="sk-test", messages=[{"role": "user", "content": "hi"}])
        assert fp.requests == 1

Stdlib only. Run ``python -m llmtally.testing --port 8999`` to serve one by hand.
"""

from __future__ import annotations

import argparse
import threading
from dataclasses import asdict

from ._provider import FakeProvider
from ._script import FakeToolCall, FakeUsage

__all__ = ["FakeProvider", "FakeUsage", "FakeToolCall"]


def main(argv: list[str] | None = None) -> None:
    """``python -m llmtally.testing [--host H] [--port P]``: serve until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m llmtally.testing", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8999)
    parser.add_argument("--reply", default="Hello from the fake provider.")
    args = parser.parse_args(argv)
    with FakeProvider(host=args.host, port=args.port, reply=args.reply) as fp:
        print(f"Fake LLM provider on {fp.url}\n  OpenAI base:    {fp.openai_base}\n"
              f"  Anthropic base: {fp.anthropic_base}\n  usage: {asdict(fp.usage)}\n"
              "Ctrl-C to stop.", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
