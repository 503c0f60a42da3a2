"""The package is held to ``mypy --strict`` (pyproject.toml [tool.mypy]) in the suite, so CI
fails on a type regression."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_strict_finds_nothing():
    done = subprocess.run([sys.executable, "-m", "mypy", "--strict", "src/llmtally"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    if "No module named mypy" in done.stderr:
        pytest.fail('mypy is missing: pip install "mypy>=2.4,<2.5" (or pip install -e ".[dev]")')
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
