"""The README's commands are the ones that work: the test command is CI's, the quick start runs.

tests/test_docs.py checks the rest of the README (its length, its links) and the docs site."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def quick_start_commands(readme: str) -> list[str]:
    """The commands of the README's "Quick start" section (its first bash block)."""
    section = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in _bash_blocks(section)[0].splitlines()
            if line and not line.startswith("#")]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    quick_start = quick_start_commands(readme)
    assert len(quick_start) == 2, "the quick start is exactly two commands"
    demo_command, test_command = quick_start
    assert demo_command.startswith("python3 -m venv .venv && ")
    assert demo_command.endswith(" && .venv/bin/llmtally demo")
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_the_quickstart_example_records_and_summarises(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Recorded 5 calls" in result.stdout
    assert "gpt-4o-mini" in result.stdout and "$0.000285" in result.stdout
    assert "acme-llm-2" in result.stdout and "unpriced" in result.stdout
    assert (tmp_path / "llmtally.db").exists()
    summary = subprocess.run([str(Path(sys.executable).parent / "llmtally"), "summary", "--json"],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert summary.returncode == 0, summary.stderr
    assert '"calls": 1' in summary.stdout and "claude-sonnet-4-5" in summary.stdout
