"""LiteLLM's price map: the bundled snapshot or the installed litellm's, loaded, slimmed and turned
into model prices."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmtally._errors import ConfigError
from llmtally._versions import version_tuple

from .model_price import (
    ABOVE_KEY,
    FIREWORKS_CACHE_READ_RATIO,
    PRICE_FIELDS,
    ModelPrice,
    Rates,
    default_cache_read,
    number,
)
from .names import canonical_provider, litellm_routes
from .offpeak import OffPeak, slim_windows, weekday, windows_of

__all__ = ["PRICE_MAP_CHOICES", "slim_entry", "slim_price_map"]

PRICE_MAP_CHOICES = ("auto", "bundled", "litellm")


LITELLM_MAP_FILE = "model_prices_and_context_window_backup.json"


NO_LITELLM = "price_map: 'litellm' needs litellm installed; pip install 'llmtally[litellm]', or use 'auto'"


_INFO_FIELDS = ("max_input_tokens", "max_output_tokens")


CACHE_LIMIT = 8192


def _off_peak_of(block: Any, factor: float, cache_read_ratio: float | None) -> OffPeak | None:
    if not isinstance(block, Mapping):
        return None
    rates = list(_rates_of(block, factor))
    default_cache_read(rates, cache_read_ratio)
    rules = []
    for rule in block.get("windows") or ():
        if not isinstance(rule, Mapping):
            continue
        days = rule.get("weekdays")
        weekdays = None if days is None else frozenset(d for d in map(weekday, days) if d is not None)
        windows = windows_of(rule.get("hours_utc"))
        if windows:
            rules.append((weekdays, windows))
    every_day = windows_of(block.get("hours_utc"))
    if not every_day and not rules:
        return None
    zone = block.get("weekday_timezone")
    return OffPeak(tuple(rates), every_day, tuple(rules), zone if isinstance(zone, str) else None)  # type: ignore[arg-type]


def _compact(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def _slim_tiers(tiers: Any) -> list[dict[str, Any]]:
    out = []
    for tier in tiers if isinstance(tiers, list) else ():
        if not isinstance(tier, dict):
            continue
        bounds = tier.get("range")
        if not (isinstance(bounds, (list, tuple)) and len(bounds) == 2):
            continue
        low, high = number(bounds[0]), number(bounds[1])
        if low is None or high is None:
            continue
        slim: dict[str, Any] = {"range": [_compact(low), _compact(high)]}
        for name in PRICE_FIELDS:
            price = number(tier.get(name))
            if price is not None:
                slim[name] = price
        if "input_cost_per_token" in slim:  # tiers priced per query/second are not ours
            out.append(slim)
    return out


def _slim_off_peak(block: Any) -> dict[str, Any] | None:
    """LiteLLM's ``off_peak_pricing``: rates that replace the standard ones inside time windows."""
    if not isinstance(block, dict):
        return None
    slim: dict[str, Any] = {}
    for name in PRICE_FIELDS:
        price = number(block.get(name))
        if price is not None:
            slim[name] = price
    hours = slim_windows(block.get("hours_utc"))
    if hours:
        slim["hours_utc"] = hours
    rules = []
    for rule in block.get("windows") or () if isinstance(block.get("windows"), list) else ():
        if not isinstance(rule, dict):
            continue
        rule_hours = slim_windows(rule.get("hours_utc"))
        days = rule.get("weekdays")
        if not rule_hours or (days is not None and not isinstance(days, list)):
            continue
        kept: dict[str, Any] = {"hours_utc": rule_hours}
        if days is not None:
            kept["weekdays"] = [day for day in days if weekday(day) is not None]
        rules.append(kept)
    if rules:
        slim["windows"] = rules
    if isinstance(block.get("weekday_timezone"), str):
        slim["weekday_timezone"] = block["weekday_timezone"]
    if not any(name in slim for name in PRICE_FIELDS) or not ("hours_utc" in slim or "windows" in slim):
        return None
    return slim


def slim_entry(entry: Any) -> dict[str, Any] | None:
    """Keep only what token pricing needs from one LiteLLM price-map entry; None if it has no per-token price.

    Kept: ``litellm_provider``, ``mode``, ``max_input_tokens``, ``max_output_tokens``, the five
    per-token prices, their ``*_above_<N>k_tokens`` levels, ``tiered_pricing`` and
    ``off_peak_pricing`` (DeepSeek's discount hours). Service-tier
    variants (``_priority``, ``_batches``, ``_flex`` ...) are dropped: usage does not say which
    tier served a call, and the standard price is the one users are billed by default.
    """
    if not isinstance(entry, dict):
        return None
    slim: dict[str, Any] = {}
    for name, value in entry.items():
        if name in PRICE_FIELDS or ABOVE_KEY.match(name):
            price = number(value)
            if price is not None:
                slim[name] = price
        elif name in _INFO_FIELDS:
            size = number(value)
            if size is not None:
                slim[name] = int(size)
        elif name in ("litellm_provider", "mode") and isinstance(value, str):
            slim[name] = value
        elif name == "tiered_pricing":
            tiers = _slim_tiers(value)
            if tiers:
                slim[name] = tiers
        elif name == "off_peak_pricing":
            off_peak = _slim_off_peak(value)
            if off_peak:
                slim[name] = off_peak
    if not any(name in slim for name in ("input_cost_per_token", "output_cost_per_token", "tiered_pricing")):
        return None
    return slim


def slim_price_map(raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Slim a LiteLLM price map (``{model: entry}``); an entry with ``alias_of`` gets its target's prices."""
    slim: dict[str, dict[str, Any]] = {}
    for key, entry in raw.items():
        if key == "sample_spec":
            continue
        entry_slim = slim_entry(entry)
        if entry_slim is not None:
            slim[key] = entry_slim
    for key, entry in raw.items():
        if key in slim or not isinstance(entry, dict):
            continue
        target, hops = entry.get("alias_of"), 0
        while isinstance(target, str) and target not in slim and hops < 5:
            target_entry = raw.get(target)
            target = target_entry.get("alias_of") if isinstance(target_entry, dict) else None
            hops += 1
        if isinstance(target, str) and target in slim:
            slim[key] = dict(slim[target])
    return slim


@dataclass(frozen=True, slots=True)
class PriceMap:
    entries: dict[str, dict[str, Any]]  # lower-cased key -> slim entry
    keys: dict[str, str]  # lower-cased key -> key as spelled in the map
    source: str
    families: frozenset[str]  # canonical provider names of the entries
    routes: frozenset[str]  # what may lead a model name as its provider: raw and canonical names


def _build_map(models: Mapping[str, Any], source: str, *, slimmed: bool = False) -> PriceMap:
    slim = models if slimmed else slim_price_map(models)
    entries = {key.lower(): entry for key, entry in slim.items()}
    keys = {key.lower(): key for key in slim}
    raw = {
        entry["litellm_provider"].lower()
        for entry in slim.values()
        if isinstance(entry.get("litellm_provider"), str)
    }
    families = frozenset(filter(None, map(canonical_provider, raw)))
    return PriceMap(entries, keys, source, families, frozenset(raw) | families | litellm_routes())


def _bundled_path() -> Any:
    from importlib.resources import files

    return files("llmtally") / "data" / "prices.json"


def installed_litellm() -> tuple[str, str] | None:
    """(version, path of its price map) of the installed litellm, found without importing it."""
    import importlib.metadata
    import importlib.util

    try:
        spec = importlib.util.find_spec("litellm")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), LITELLM_MAP_FILE)
    if not os.path.isfile(path):
        return None
    try:
        version = importlib.metadata.version("litellm")
    except importlib.metadata.PackageNotFoundError:
        return None
    return version, path


def _read_json(path: str, what: str) -> Any:
    import json

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(
            f"{what}: file {path!r} not found; give an existing JSON price map, or 'auto'"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(
            f"{what}: {path!r} is not a readable JSON price map ({exc}); fix the file, or use 'auto'"
        ) from None


def _models_of(data: Any, path: str) -> Mapping[str, Any]:
    """The ``{model: entry}`` part of a full LiteLLM map or of a slim snapshot like llmtally's."""
    if isinstance(data, dict) and isinstance(data.get("models"), dict):
        models: Mapping[str, Any] = data["models"]
        return models
    if isinstance(data, dict):
        return data
    raise ConfigError(
        f"price_map: {path!r} holds no JSON object of models; expected LiteLLM's price-map format"
    )


def _bundled_litellm_version() -> str:
    """The litellm version the bundled snapshot was made from, read from the file's head.

    The snapshot is written with sorted keys, so ``litellm_version`` comes first and the
    whole file need not be parsed just to compare versions.
    """
    with _bundled_path().open("r", encoding="utf-8") as f:
        head = f.read(200)
    found = re.search(r'"litellm_version"\s*:\s*"([^"]*)"', head)
    return found.group(1) if found else ""


def _load_bundled() -> PriceMap:
    import json

    data = json.loads(_bundled_path().read_text(encoding="utf-8"))
    # Written by scripts/update_prices.py through slim_price_map(): no need to slim it again.
    return _build_map(data["models"], f"litellm-map:{data['version']}", slimmed=True)


def _load_litellm(installed: tuple[str, str]) -> PriceMap:
    version, path = installed
    models = _models_of(_read_json(path, "price_map='litellm'"), path)
    return _build_map(models, f"litellm-map:{version}")


def load_map(choice: str) -> PriceMap:
    if choice == "bundled":
        return _load_bundled()
    if choice == "litellm":
        installed = installed_litellm()
        if installed is None:
            raise ConfigError(NO_LITELLM)
        return _load_litellm(installed)
    if choice == "auto":
        installed = installed_litellm()
        if installed and version_tuple(installed[0]) > version_tuple(_bundled_litellm_version()):
            try:
                return _load_litellm(installed)
            except ConfigError:
                import logging

                logging.getLogger("llmtally").warning(
                    "litellm %s's price map at %s is unreadable; using llmtally's bundled snapshot",
                    *installed,
                )
        return _load_bundled()
    models = _models_of(_read_json(choice, "price_map"), choice)
    return _build_map(models, f"file:{choice}")


def _rates_of(entry: Mapping[str, Any], factor: float) -> Rates:
    def conv(name: str) -> float | None:
        value = entry.get(name)
        return None if value is None else value * factor

    return (
        conv("input_cost_per_token"),
        conv("output_cost_per_token"),
        conv("cache_read_input_token_cost"),
        conv("cache_creation_input_token_cost"),
        conv("output_cost_per_reasoning_token"),
    )


def entry_price(key: str, entry: Mapping[str, Any], source: str, currency: str, factor: float) -> ModelPrice:
    """A map entry (prices in USD per token) as a ModelPrice in the book's currency."""
    levels: dict[float, list[float | None]] = {}
    for name, value in entry.items():
        found = ABOVE_KEY.match(name)
        if found:
            threshold = float(found.group(2)) * (1000 if found.group(3) else 1)
            level = levels.setdefault(threshold, [None] * 5)
            level[PRICE_FIELDS.index(found.group(1))] = value * factor
    tiers = tuple(
        (float(tier["range"][0]), float(tier["range"][1]), _rates_of(tier, factor))
        for tier in sorted(entry.get("tiered_pricing", ()), key=lambda tier: tier["range"][0])
    )
    provider = entry.get("litellm_provider")
    base = list(_rates_of(entry, factor))
    if entry.get("mode") == "embedding" and base[1] is None:
        base[1] = 0.0  # an embedding has no output: tokens reported there cost nothing
    cache_read_ratio = (
        FIREWORKS_CACHE_READ_RATIO
        if isinstance(provider, str) and canonical_provider(provider) == "fireworks_ai"
        else None
    )
    default_cache_read(base, cache_read_ratio)
    return ModelPrice(
        model_key=key,
        source=source,
        currency=currency,
        provider=provider,
        mode=entry.get("mode"),
        input=base[0],
        output=base[1],
        cache_read=base[2],
        cache_write=base[3],
        reasoning=base[4],
        above=tuple((threshold, tuple(level)) for threshold, level in sorted(levels.items())),  # type: ignore[misc]
        tiers=tiers,
        max_input_tokens=entry.get("max_input_tokens"),
        max_output_tokens=entry.get("max_output_tokens"),
        off_peak=_off_peak_of(entry.get("off_peak_pricing"), factor, cache_read_ratio),
    )
