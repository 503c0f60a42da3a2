"""`import llmtally` is light and offline: no litellm, langchain or SQLAlchemy, no sockets."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def _run(code: str) -> dict:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_loads_no_integration_or_database_module():
    loaded = _run("""
        import json, sys
        import llmtally
        heavy = ("litellm", "langchain", "langchain_core", "sqlalchemy", "sqlmodel", "psycopg",
                 "tiktoken", "openai", "pydantic", "fastapi", "starlette", "uvicorn",
                 "prometheus_client", "jinja2")
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
    """)
    assert loaded == []


def test_import_and_record_make_no_network_connection(tmp_path):
    # Any attempt to open a non-local socket fails loudly in the child.
    connections = _run(f"""
        import json, socket
        attempts = []
        real_connect = socket.socket.connect
        def guarded(self, address):
            attempts.append(repr(address))
            raise OSError("network disabled in this test")
        socket.socket.connect = guarded
        socket.create_connection = lambda *a, **k: guarded(None, a[0])
        import llmtally
        with llmtally.Tally({str(tmp_path / 'l.db')!r}) as tally:
            tally.record(model="gpt-4o-mini", input_tokens=10)
            tally.record(model="claude-sonnet-4-5", provider="anthropic", input_tokens=10)
            from llmtally._events.tokens import count_text
            count_text("some words to count", "gpt-4o-mini")
        print(json.dumps(attempts))
    """)
    assert connections == []
