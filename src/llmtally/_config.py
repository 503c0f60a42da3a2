"""`llmtally.toml` and `LLMTALLY_*` variables → :class:`~llmtally._settings.Settings`.

This module only reads: TOML tables become Python values (``[[budgets]]`` tables become
`Budget` objects), environment strings become numbers, booleans and lists. Every key is then
validated by the one settings model, so a bad value is refused with the same words as the
same value passed to ``Tally(...)``, prefixed by where it came from: the file's path or the
variable's name. Precedence: keyword arguments > environment > file.

```toml
database_url = "postgresql+psycopg://app@db/llm"   # or a path; default ./llmtally.db
currency = "USD"                                   # the ledger's currency
price_map = "auto"                                 # auto | bundled | litellm | path/to/map.json
spill_path = "/var/lib/app/llmtally.spill.jsonl"

[rates]                  # units of `currency` that one unit of each currency is worth
CNY = 0.1389

[scope]                  # default attribution of every event
project = "search"
tags = ["prod"]

[prices."moonshot/kimi-k2.5"]   # overrides win over the price map
input = 4.0
output = 16.0
per = "1M"               # 1M | 1K | token
currency = "CNY"

timezone = "Europe/Berlin"        # budget windows are calendar windows here
fail_closed = false
durability = "batched"            # batched | sync (record() waits for the commit)
unpriced = "allow"                # allow | block: a model with no price under a usd budget

[[budgets]]
usd = 50
per = "month"

[[budgets]]
usd = 2
per = "day"
each = "user"
warn_at = [0.5, 0.8]
```
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._budgets.budget import Budget
from ._errors import ConfigError
from ._settings import Settings, unknown_key

__all__ = ["load_settings", "read_settings", "DEFAULT_CONFIG_FILE", "ENV_VARIABLES"]

DEFAULT_CONFIG_FILE = "llmtally.toml"
_BUDGET_KEYS = ("usd", "tokens", "requests", "per", "scope", "each", "warn_at", "action", "name")
ENV_VARIABLES = {
    "LLMTALLY_DATABASE_URL": "database_url",
    "LLMTALLY_CURRENCY": "currency",
    "LLMTALLY_PRICE_MAP": "price_map",
    "LLMTALLY_SPILL_PATH": "spill_path",
    "LLMTALLY_TIMEZONE": "timezone",
    "LLMTALLY_FAIL_CLOSED": "fail_closed",
    "LLMTALLY_DURABILITY": "durability",
    "LLMTALLY_UNPRICED": "unpriced",
    "LLMTALLY_RATES": "rates",
    "LLMTALLY_LANGUAGE": "language",
    "LLMTALLY_PROJECT": "scope.project",
    "LLMTALLY_USER": "scope.user",
    "LLMTALLY_TAGS": "scope.tags",
}


def read_settings(path: str | os.PathLike[str] | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """The settings of the config file and the environment, validated.

    The file is ``path``, else ``$LLMTALLY_CONFIG``, else ``./llmtally.toml`` if present.
    """
    environ = os.environ if environ is None else environ
    file_path = _config_path(path, environ)
    origin = str(file_path) if file_path else "settings"
    values = _read_file(file_path, origin) if file_path else {}
    origins = dict.fromkeys(values, origin)
    _apply_environment(values, origins, environ)
    return Settings.validated(values, lambda key: f"{origins.get(key, origin)}: ")


def load_settings(path: str | os.PathLike[str] | None = None,
                  environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """:func:`read_settings` as keyword arguments for ``Tally``: only the keys that were set."""
    return read_settings(path, environ).given()


def _config_path(path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Path | None:
    if path is not None:
        return Path(path)
    if environ.get("LLMTALLY_CONFIG"):
        return Path(environ["LLMTALLY_CONFIG"])
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


def _read_file(path: Path, origin: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            values = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist (set LLMTALLY_CONFIG or pass a path "
                          "to Tally.from_config)") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    if "clock" in values:
        raise ConfigError(f"{origin}: clock cannot be set in a file: it is a Python callable, "
                          "for Tally(clock=...) in tests")
    if "budgets" in values:
        values["budgets"] = _budget_tables(origin, values["budgets"])
    if "alert_rules" in values:
        from ._alerts.rules import rules_from_config

        try:
            values["alert_rules"] = rules_from_config(values["alert_rules"])
        except ConfigError as exc:
            raise ConfigError(f"{origin}: {exc}") from None
    return values


def _budget_tables(origin: str, budgets: Any) -> Any:
    """``[[budgets]]`` tables as Budget objects (anything else is left to the model to refuse)."""
    if not isinstance(budgets, list):
        raise ConfigError(f"{origin}: budgets must be an array of tables: [[budgets]] usd = 50, "
                          "per = \"month\"")
    out: list[Budget] = []
    for number, entry in enumerate(budgets, start=1):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{origin}: budgets[{number}] must be a table such as "
                              "{ usd = 50, per = \"month\" }")
        for key in entry:
            if key not in _BUDGET_KEYS:
                raise ConfigError(f"{origin}: " + unknown_key(key, f"budgets[{number}]", _BUDGET_KEYS))
        values = dict(entry)
        if isinstance(values.get("warn_at"), list):
            values["warn_at"] = tuple(values["warn_at"])
        try:
            out.append(Budget(**values))
        except ConfigError as exc:
            raise ConfigError(f"{origin}: budgets[{number}]: {exc}") from None
    return out


def _apply_environment(values: dict[str, Any], origins: dict[str, str],
                       environ: Mapping[str, str]) -> None:
    for variable, key in ENV_VARIABLES.items():
        text = environ.get(variable)
        if text is None or text == "":
            continue
        if key.startswith("scope."):
            scope = values.get("scope")
            if not isinstance(scope, dict):
                scope = values["scope"] = {}
                origins["scope"] = variable
            name = key.split(".", 1)[1]
            scope[name] = [t.strip() for t in text.split(",") if t.strip()] if name == "tags" else text
            continue
        origins[key] = variable
        if key == "rates":
            values[key] = _parse_rates(variable, text)
        elif key == "fail_closed":
            values[key] = _parse_boolean(variable, text)
        else:
            values[key] = text


def _parse_boolean(variable: str, text: str) -> bool:
    word = text.strip().lower()
    if word in ("1", "true", "yes", "0", "false", "no"):
        return word in ("1", "true", "yes")
    raise ConfigError(f"{variable}={text!r} must be true or false (1/0, yes/no also work)")


def _parse_rates(variable: str, text: str) -> dict[str, float]:
    rates: dict[str, float] = {}
    for part in text.split(","):
        code, sep, number = part.partition("=")
        try:
            rates[code.strip().upper()] = float(number)
        except ValueError:
            raise ConfigError(f"{variable}={text!r}: each rate is CODE=NUMBER, comma-separated, "
                              "e.g. CNY=0.1389,EUR=1.08") from None
        if not sep:
            raise ConfigError(f"{variable}={text!r}: each rate is CODE=NUMBER, e.g. CNY=0.1389")
    return rates
