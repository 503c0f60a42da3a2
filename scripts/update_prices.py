"""Regenerate llmtally's bundled price snapshot from LiteLLM's price map.

    python scripts/update_prices.py                      # the installed litellm's map
    python scripts/update_prices.py path/to/model_prices_and_context_window_backup.json

Writes src/llmtally/data/prices.json: {"version": <today>, "litellm_version": ..., "models": {...}},
each model slimmed to what token pricing needs (see llmtally._pricing.price_map.slim_entry). Reads files
only: it never fetches anything and never imports litellm.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import sys
from pathlib import Path

from llmtally._pricing.price_map import LITELLM_MAP_FILE, slim_price_map

SNAPSHOT = Path(__file__).resolve().parent.parent / "src" / "llmtally" / "data" / "prices.json"


def installed_litellm_map() -> Path:
    """The installed litellm's bundled price map, found without importing litellm."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("litellm is not installed: pip install litellm, or pass the price-map file as an argument")
    return Path(next(iter(spec.submodule_search_locations))) / LITELLM_MAP_FILE


def write_providers(path: Path, version: str) -> None:
    """The provider names LiteLLM routes by (``litellm.provider_list``): a model name led by
    one of them carries its provider, even when the map has no entry of that provider."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    names = sorted({str(getattr(p, "value", p)).lower() for p in litellm.provider_list})
    path.write_text(json.dumps({"litellm_version": version, "providers": names}, indent=0) + "\n",
                    encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "source", nargs="?", type=Path, help="LiteLLM price-map JSON (default: the installed litellm's)"
    )
    parser.add_argument(
        "--litellm-version", help="litellm version the file comes from (default: the installed one)"
    )
    parser.add_argument(
        "--date", default=datetime.date.today().isoformat(), help="snapshot version (default: today)"
    )
    parser.add_argument("-o", "--output", type=Path, default=SNAPSHOT)
    args = parser.parse_args(argv)

    source = args.source or installed_litellm_map()
    version = args.litellm_version or importlib.metadata.version("litellm")
    raw = json.loads(source.read_text(encoding="utf-8"))
    models = slim_price_map(raw)
    snapshot = {"litellm_version": version, "models": models, "version": args.date}

    write_providers(args.output.parent / "providers.json", version)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(json.dumps(snapshot, sort_keys=True, separators=(",", ":")) + "\n", encoding="utf-8")
    os.replace(tmp, args.output)
    print(
        f"{args.output}: {len(models)} of {len(raw)} entries from litellm {version}, "
        f"{args.output.stat().st_size:,} bytes"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
