"""The documentation holds together: the MkDocs site builds with --strict (every page in the nav,
every internal link and anchor resolving, the API page generated from the docstrings), it fetches
nothing, the README stays a short front door whose links resolve, and the paths the pages name
exist."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_readme import quick_start_commands

import llmtally

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README_MAX_LINES = 250


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site_dir = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's notice, not a problem
    if importlib.util.find_spec("mkdocs") is None:
        pytest.fail('mkdocs is missing: pip install -e ".[dev]" installs what the docs need')
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    return site_dir


def test_every_page_is_built(site):
    pages = sorted(path.relative_to(DOCS).with_suffix("") for path in DOCS.rglob("*.md"))
    assert pages
    for page in pages:
        built = site / ("index.html" if page.name == "index" else page / "index.html")
        assert built.is_file(), f"docs/{page}.md was not built"


def test_the_site_fetches_nothing(site):
    external = re.compile(
        r"""<(?:script|img|iframe)\b[^>]*\bsrc=["']?(?:https?:)?//"""
        r"""|<link\b[^>]*\bhref=["']?(?:https?:)?//"""
        r"""|@import\s+url\(["']?(?:https?:)?//"""
        r"""|fonts\.googleapis|fonts\.gstatic""", re.I)
    checked = 0
    for path in site.rglob("*"):
        if path.suffix in (".html", ".css", ".js"):
            found = external.search(path.read_text(errors="replace"))
            assert found is None, f"{path.relative_to(site)} fetches {found.group(0)!r}"
            checked += 1
    assert checked > 20


def test_the_api_page_documents_every_public_name(site):
    api = (DOCS / "api.md").read_text()
    public = [name for name in llmtally.__all__ if not name.startswith("__")]
    for name in public:
        assert f"::: llmtally.{name}\n" in api, f"docs/api.md does not document llmtally.{name}"
    built = (site / "api" / "index.html").read_text()
    for name in public + ["testing.FakeProvider"]:
        assert f'id="llmtally.{name}"' in built, f"llmtally.{name} is missing from the API page"
    assert "llmtally._" not in api  # private module paths move; the public names stay


def test_the_readme_is_a_short_front_door():
    readme = (ROOT / "README.md").read_text()
    lines = readme.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    assert "litellm.callbacks = [tally.litellm()]" in readme
    assert 'config={"callbacks": [handler]}' in readme
    assert "Budget(" in readme and "BudgetExceeded" in readme
    assert "llmtally report --week last" in readme
    assert len(quick_start_commands(readme)) == 2
    # the one-liners come before the long parts: within the first 50 lines
    first = next(i for i, line in enumerate(lines) if "litellm.callbacks = [tally.litellm()]" in line)
    assert first < 50, f"the LiteLLM one-liner is on line {first + 1}"


def test_the_docs_quick_start_is_the_readmes():
    readme = (ROOT / "README.md").read_text()
    getting_started = (DOCS / "getting-started.md").read_text()
    assert quick_start_commands(getting_started) == quick_start_commands(readme)


def test_the_readme_links_resolve():
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [target for target in targets if "://" not in target]
    assert any(target.startswith("docs/") for target in local)
    for target in local:
        assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"
    linked = {Path(target).name for target in local if target.startswith("docs/")}
    unlinked = {path.name for path in DOCS.glob("*.md")} - linked - {"changelog.md"}  # CHANGELOG.md
    assert not unlinked, f"README.md links to no page {sorted(unlinked)}"


def test_paths_named_in_the_docs_exist():
    named = re.compile(r"`((?:benchmarks|examples|scripts|tests|integrations|src)/[\w./-]*[\w/])`"
                       r"|python ((?:benchmarks|examples|scripts)/[\w./-]+\.py)")
    pages = [*DOCS.glob("*.md"), ROOT / "README.md", ROOT / "CHANGELOG.md"]
    seen = 0
    for page in pages:
        for match in named.finditer(page.read_text()):
            path = match.group(1) or match.group(2)
            assert (ROOT / path).exists(), f"{page.name} names {path}, which does not exist"
            seen += 1
    assert seen > 20


def test_the_kept_library_files():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")
    assert (ROOT / "src" / "llmtally" / "py.typed").is_file()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog and "## [0.1.0]" in changelog
