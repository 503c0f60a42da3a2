"""`llmtally.toml` and `LLMTALLY_*` variables → keyword arguments for `Tally`.

Precedence: keyword arguments > environment > file. Every bad value is a `ConfigError`
that names where it came from, the key, the value and what is allowed.

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

import difflib
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ._budgets.budget import Budget
from ._errors import ConfigError
from ._pricing.price import Price

__all__ = ["load_settings", "check_tally_arguments", "DEFAULT_CONFIG_FILE", "ENV_VARIABLES"]

DEFAULT_CONFIG_FILE = "llmtally.toml"
_TOP_LEVEL = ("database_url", "currency", "price_map", "spill_path", "rates", "scope", "prices",
              "budgets", "timezone", "fail_closed", "alerts", "durability", "unpriced")
_BUDGET_KEYS = ("usd", "tokens", "requests", "per", "scope", "each", "warn_at", "action", "name")
_SCOPE_KEYS = ("project", "user", "session", "tags", "request_id", "metadata")
_PRICE_KEYS = ("input", "output", "cache_read", "cache_write", "reasoning", "per", "currency")
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
    "LLMTALLY_PROJECT": "scope.project",
    "LLMTALLY_USER": "scope.user",
    "LLMTALLY_TAGS": "scope.tags",
}


def load_settings(path: str | os.PathLike[str] | None = None,
                  environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read the config file and environment; return validated keyword arguments for ``Tally``."""
    environ = os.environ if environ is None else environ
    file_path = _config_path(path, environ)
    settings = _read_file(file_path) if file_path else {}
    origin = str(file_path) if file_path else "settings"
    _apply_environment(settings, environ)
    return _validated(settings, origin)


def _config_path(path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Path | None:
    if path is not None:
        return Path(path)
    if environ.get("LLMTALLY_CONFIG"):
        return Path(environ["LLMTALLY_CONFIG"])
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist (set LLMTALLY_CONFIG or pass a path "
                          "to Tally.from_config)") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _apply_environment(settings: dict[str, Any], environ: Mapping[str, str]) -> None:
    for variable, key in ENV_VARIABLES.items():
        value = environ.get(variable)
        if value is None or value == "":
            continue
        if key == "rates":
            settings["rates"] = _parse_rates(variable, value)
        elif key.startswith("scope."):
            scope = settings.setdefault("scope", {})
            if not isinstance(scope, dict):
                scope = settings["scope"] = {}
            name = key.split(".", 1)[1]
            scope[name] = [t.strip() for t in value.split(",") if t.strip()] if name == "tags" else value
        else:
            settings[key] = value


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


def _unknown(origin: str, where: str, key: str, allowed: tuple[str, ...]) -> ConfigError:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{origin}: unknown key {where}{key!r}{hint}; allowed: {', '.join(allowed)}")


def _validated(settings: Mapping[str, Any], origin: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if key not in _TOP_LEVEL:
            raise _unknown(origin, "", key, _TOP_LEVEL)
        if key == "budgets":
            out["budgets"] = _validated_budgets(origin, value)
        elif key == "alerts":
            if not isinstance(value, list) or not all(
                    v == "log" or (isinstance(v, str) and v.startswith(("http://", "https://")))
                    for v in value):
                raise ConfigError(f"{origin}: alerts must be a list of \"log\" and webhook URLs "
                                  "(https://...)")
            out["alerts"] = value
        elif key == "fail_closed":
            out["fail_closed"] = _boolean(origin, key, value)
        elif key == "durability":
            out["durability"] = _durability(origin, value)
        elif key == "unpriced":
            choice = value.strip().lower() if isinstance(value, str) else value
            if choice not in ("allow", "block"):
                raise ConfigError(f"{origin}: unpriced = {value!r} is not allowed; use \"allow\" "
                                  "(calls to a model with no price pass usd budgets, warned) or "
                                  "\"block\"")
            out["unpriced"] = choice
        elif key in ("database_url", "currency", "price_map", "spill_path", "timezone"):
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{origin}: {key} = {value!r} must be a non-empty string")
            out[key] = value.strip().upper() if key == "currency" else value.strip()
        elif key == "rates":
            out["rates"] = _validated_rates(origin, value)
        elif key == "scope":
            out["scope"] = _validated_scope(origin, value)
        elif key == "prices":
            out["prices"] = _validated_prices(origin, value)
    return out


def _boolean(origin: str, key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "0", "false", "no"):
        return value.strip().lower() in ("1", "true", "yes")
    raise ConfigError(f"{origin}: {key} = {value!r} must be true or false")


def _durability(origin: str, value: Any) -> str:
    choice = value.strip().lower() if isinstance(value, str) else value
    if choice not in ("batched", "sync"):
        raise ConfigError(f"{origin}: durability = {value!r} is not allowed; use \"batched\" "
                          "(the default: events are written in background batches) or \"sync\" "
                          "(each record waits until its event is committed)")
    return choice


def _validated_budgets(origin: str, budgets: Any) -> list[Budget]:
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
                raise _unknown(origin, f"budgets[{number}].", key, _BUDGET_KEYS)
        values = dict(entry)
        if "warn_at" in values and isinstance(values["warn_at"], list):
            values["warn_at"] = tuple(values["warn_at"])
        try:
            out.append(Budget(**values))
        except ConfigError as exc:
            raise ConfigError(f"{origin}: budgets[{number}]: {exc}") from None
    return out


def _validated_rates(origin: str, rates: Any) -> dict[str, float]:
    if not isinstance(rates, Mapping):
        raise ConfigError(f"{origin}: rates must be a table such as [rates] CNY = 0.1389")
    out: dict[str, float] = {}
    for code, rate in rates.items():
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) \
                or rate <= 0:
            raise ConfigError(f"{origin}: rates.{code} = {rate!r} must be a positive number "
                              f"(how many units of the ledger currency one {code} is worth)")
        out[str(code).upper()] = float(rate)
    return out


def _validated_scope(origin: str, scope: Any) -> dict[str, Any]:
    if not isinstance(scope, Mapping):
        raise ConfigError(f"{origin}: scope must be a table such as [scope] project = \"search\"")
    for key, value in scope.items():
        if key not in _SCOPE_KEYS:
            raise _unknown(origin, "scope.", key, _SCOPE_KEYS)
        if key == "tags":
            if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
                raise ConfigError(f"{origin}: scope.tags = {value!r} must be a list of strings")
        elif key == "metadata":
            if not isinstance(value, Mapping):
                raise ConfigError(f"{origin}: scope.metadata must be a table")
        elif not isinstance(value, str):
            raise ConfigError(f"{origin}: scope.{key} = {value!r} must be a string")
    return dict(scope)


def _validated_prices(origin: str, prices: Any) -> dict[str, Price]:
    if not isinstance(prices, Mapping):
        raise ConfigError(f"{origin}: prices must be tables such as [prices.\"my-model\"] input = 0.5")
    out: dict[str, Price] = {}
    for model, entry in prices.items():
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{origin}: prices.{model!r} must be a table of input, output, "
                              "cache_read, cache_write, reasoning, per, currency")
        for key in entry:
            if key not in _PRICE_KEYS:
                raise _unknown(origin, f"prices.{model!r}.", key, _PRICE_KEYS)
        if "input" not in entry:
            per = entry.get("per", "1M")
            raise ConfigError(f"{origin}: prices.{model!r} needs at least input = <price per {per} tokens>")
        try:
            out[model] = Price(**entry)
        except ConfigError as exc:
            raise ConfigError(f"{origin}: prices.{model!r}: {exc}") from None
    return out


# -- Tally(...) keyword arguments ------------------------------------------------------------
# As strict as the file: a bool is a bool (``fail_closed="false"`` is refused, not truthy), a
# number is a number (never a bool or a numeric string), a text setting a string. Values are
# only checked here; Tally still builds its own objects from them.


def check_tally_arguments(arguments: Mapping[str, Any]) -> None:
    """Raise a ConfigError naming the first ``Tally(...)`` argument of the wrong type or range."""
    for name, value in arguments.items():
        check = _ARGUMENT_CHECKS.get(name)
        if check is not None and value is not None:
            problem = check(value)
            if problem:
                raise ConfigError(f"Tally({name}={_short(value)}): {problem}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(example: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return None
        return f"must be a whole number > 0, e.g. {example}"
    return check


def _positive_seconds(example: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if _is_number(value) and math.isfinite(value) and value > 0:
            return None
        return f"must be a number of seconds > 0 (int or float), e.g. {example}"
    return check


def _text(example: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, str) and value.strip():
            return None
        return f"must be a non-empty string, e.g. {example}"
    return check


def _text_or_path(example: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, os.PathLike) or (isinstance(value, str) and value.strip()):
            return None
        return f"must be a path (str or pathlib.Path), e.g. {example}"
    return check


def _check_bool(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    return f"must be True or False (a bool, not {type(value).__name__})"


def _check_prices(value: Any) -> str | None:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        return "must be a dict of model name -> llmtally.Price or dict, e.g. " \
               "{\"my-model\": {\"input\": 0.5, \"output\": 1.5}}"
    for model, entry in value.items():
        if not isinstance(entry, (Price, Mapping)):
            return f"prices[{model!r}] must be a llmtally.Price or a dict of prices, not " \
                   f"{type(entry).__name__}"
        if isinstance(entry, Mapping):
            for key, number in entry.items():
                if key not in ("per", "currency") and not _is_number(number):
                    return f"prices[{model!r}][{key!r}] = {number!r} must be a number"
    return None


def _check_rates(value: Any) -> str | None:
    if not isinstance(value, Mapping):
        return "must be a dict of currency code -> rate, e.g. {\"CNY\": 0.1389}"
    for code, rate in value.items():
        if not isinstance(code, str) or not _is_number(rate) or not math.isfinite(rate) or rate <= 0:
            return f"rates[{code!r}] = {rate!r} must be a number > 0 (how many units of the " \
                   "ledger currency one unit of it is worth)"
    return None


def _check_scope(value: Any) -> str | None:
    if not isinstance(value, Mapping):
        return "must be a dict such as {\"project\": \"search\", \"tags\": [\"prod\"]}"
    unknown = sorted(str(key) for key in value if key not in _SCOPE_KEYS)
    if unknown:
        return f"scope has unknown keys {unknown}; allowed: {', '.join(_SCOPE_KEYS)}"
    for key, item in value.items():
        if item is None:
            continue
        if key == "tags":
            if not isinstance(item, (str, list, tuple)) or not all(
                    isinstance(t, str) for t in ([item] if isinstance(item, str) else item)):
                return f"scope['tags'] = {_short(item)} must be a list of strings"
        elif key == "metadata":
            if not isinstance(item, Mapping):
                return f"scope['metadata'] must be a dict, not {type(item).__name__}"
        elif not isinstance(item, str):
            return f"scope[{key!r}] = {_short(item)} must be a string"
    return None


def _check_budgets(value: Any) -> str | None:
    if isinstance(value, (str, bytes, Mapping, Budget)) or not isinstance(value, (list, tuple)):
        return "must be a list of llmtally.Budget, e.g. [Budget(usd=50, per=\"month\")]"
    for budget in value:
        if not isinstance(budget, Budget):
            return f"{_short(budget)} is not a llmtally.Budget"
    return None


def _check_alerts(value: Any) -> str | None:
    targets = [value] if isinstance(value, str) else value
    if not isinstance(targets, (list, tuple)):
        return "must be a list of \"log\", webhook URLs (https://...) and callables"
    for target in targets:
        if not (target == "log" or callable(target) or (
                isinstance(target, str) and target.startswith(("http://", "https://")))):
            return f"{_short(target)} is not allowed; use \"log\", a webhook URL (https://...) " \
                   "or a callable taking the alert as a dict"
    return None


def _check_durability(value: Any) -> str | None:
    if value in ("batched", "sync"):
        return None
    return "use \"batched\" (the default: background batches) or \"sync\" (record() waits " \
           "for the commit)"


def _check_clock(value: Any) -> str | None:
    return None if callable(value) else "must be a callable returning an aware datetime"


_ARGUMENT_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "database_url": _text("'llmtally.db' or 'postgresql+psycopg://user@host/db'"),
    "prices": _check_prices,
    "currency": _text("'USD'"),
    "rates": _check_rates,
    "price_map": _text_or_path("'auto', 'bundled', 'litellm' or 'prices.json'"),
    "scope": _check_scope,
    "spill_path": _text_or_path("'/var/lib/app/llmtally.spill.jsonl'"),
    "batch_size": _positive_int("500"),
    "flush_interval_s": _positive_seconds("0.2"),
    "max_queue": _positive_int("100_000"),
    "budgets": _check_budgets,
    "timezone": _text("'Europe/Berlin'"),
    "fail_closed": _check_bool,
    "durability": _check_durability,
    "alerts": _check_alerts,
    "reservation_ttl_s": _positive_seconds("900"),
    "max_output_estimate": _positive_int("4096"),
    "unpriced": lambda value: None if value in ("allow", "block") else
    "use \"allow\" (the default: calls to a model with no price pass usd budgets, with a "
    "warning) or \"block\"",
    "clock": _check_clock,
}
