#!/usr/bin/env bash
# The LiteLLM contract tests (tests/test_litellm_compat.py) against each supported minor release:
# one venv per release under .contract/ (git-ignored, reused), llmtally from src/ on PYTHONPATH.
#
#   scripts/litellm_contract.sh               # every minor in MINORS below
#   scripts/litellm_contract.sh 1.108 1.110   # only these
#
# Keep MINORS equal to the releases SUPPORTED in src/llmtally/integrations/litellm_compat.py
# (pyproject's litellm extra). Packages come from the configured index (pip's own settings).
# Not part of .ci/run: it installs a LiteLLM per release (~1 minute and ~300 MB each).
set -euo pipefail

MINORS=(1.106 1.108 1.109 1.110)
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
cd "$REPO"
[ "$#" -gt 0 ] && MINORS=("$@")

# llmtally's own dependencies, read from pyproject.toml
mapfile -t DEPS < <("$PYTHON" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')

failed=()
for minor in "${MINORS[@]}"; do
    venv=".contract/litellm-$minor"
    if [ ! -x "$venv/bin/python" ]; then
        echo "== building $venv"
        "$PYTHON" -m venv "$venv"
        "$venv/bin/pip" install -q "litellm==$minor.*" "${DEPS[@]}" "pytest>=8" "pytest-timeout>=2.3"
    fi
    echo "== litellm $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))')"
    if ! env PYTHONPATH="$REPO/src" CI=true LITELLM_LOCAL_MODEL_COST_MAP=True \
            "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_litellm_compat.py; then
        failed+=("$minor")
    fi
done
if [ "${#failed[@]}" -gt 0 ]; then
    echo "contract tests failed on litellm ${failed[*]}"
    exit 1
fi
echo "contract tests passed on litellm ${MINORS[*]}"
