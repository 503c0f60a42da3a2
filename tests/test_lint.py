"""The code is held to its lint rules (pyproject.toml [tool.ruff]) in the suite, so CI fails on a
regression: pyflakes' errors (an undefined name, an unused import), import order, bugbear's
likely bugs, pycodestyle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise",
                           "src", "tests", "benchmarks", "scripts"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "No module named ruff" not in done.stderr, 'ruff is missing: pip install -e ".[dev]"'
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
