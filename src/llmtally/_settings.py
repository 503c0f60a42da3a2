"""One settings model for ``Tally(...)``, ``Tally.from_config``, the CLI and the proxy kit.

Each key's rule is written once, here, as a validator of :class:`Settings`; the file and
environment reader (``_config.py``) only turns TOML tables and ``LLMTALLY_*`` strings into
Python values and hands them to the same model. So a key is refused the same way, with the
same words, wherever it was set; only the prefix says where:

    llmtally.toml: rates['CNY'] = -1 must be a number > 0 (...)
    LLMTALLY_DURABILITY: durability = 'eventually' is not allowed; use "batched" (...)
    Tally(rates={'CNY': -1}): rates['CNY'] = -1 must be a number > 0 (...)

The model is strict: a bool is a bool (``fail_closed="false"`` is refused, not truthy), a
number is a number (never a bool or a numeric string), a text setting a string.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from ._budgets.budget import DEFAULT_MAX_OUTPUT_ESTIMATE, DEFAULT_RESERVATION_TTL_S, Budget, zone
from ._errors import ConfigError
from ._events.event import short_repr as short
from ._events.scope import SCOPE_KEYS
from ._events.usage import MAX_TOKEN_COUNT
from ._notify.courier import is_webhook
from ._pricing.price import CURRENCIES, Price, check_currency

__all__ = ["Settings", "PRICE_KEYS", "unknown_key"]

PRICE_KEYS = ("input", "output", "cache_read", "cache_write", "reasoning", "per", "currency")


class Problem(ValueError):
    """A refused value: ``where`` (``"rates['CNY']"``) held ``value``; ``text`` says why and
    what to give instead. ``detail()`` is the message after the prefix naming the source."""

    def __init__(self, where: str, value: Any, text: str, *, show_value: bool = True) -> None:
        super().__init__(text)
        self.where, self.value, self.text, self.show_value = where, value, text, show_value

    def detail(self, key: str, *, named: bool) -> str:
        """``named``: the prefix already shows ``key`` and its value (``Tally(key=...)``)."""
        if not self.show_value:  # the text names its own subject
            return self.text if self.text.startswith("unknown key") else f"{self.where}: {self.text}"
        if named and self.where == key:
            return self.text
        return f"{self.where} = {short(self.value)} {self.text}"


def unknown_key(key: object, where: str, allowed: Sequence[str]) -> str:
    """"unknown key 'x' in where (did you mean 'y'?); allowed: ..."."""
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    place = f" in {where}" if where else ""
    return f"unknown key {short(key)}{place}{hint}; allowed: {', '.join(allowed)}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- the rules, one per key -------------------------------------------------------------------

def _text(key: str, example: str, *, paths: str = "") -> Callable[[Any], Any]:
    """A non-empty string, stripped; with ``paths`` (what to call it) a path, kept exactly as
    given (a file name may end in a space), as a str or an ``os.PathLike``."""
    def check(value: Any) -> Any:
        if paths and isinstance(value, os.PathLike):
            value = os.fspath(value)
        if isinstance(value, str) and value.strip():
            return value if paths else value.strip()
        raise Problem(key, value, f"must be {paths or 'a non-empty string'}, e.g. {example}")
    return check


def _positive_int(key: str, example: str, most: int) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value is None or (isinstance(value, int) and not isinstance(value, bool)
                             and 0 < value <= most):
            return value
        raise Problem(key, value, f"must be a whole number > 0 and at most {most:,}, e.g. {example}")
    return check


def _finite(value: Any) -> bool:
    """A number that is not NaN or infinite (and not an int too large for a float)."""
    try:
        return _is_number(value) and math.isfinite(value)
    except OverflowError:
        return False


def _positive_seconds(key: str, example: str, most: float) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value is None or (_finite(value) and 0 < value <= most):
            return value
        raise Problem(key, value, f"must be a number of seconds > 0 and at most {most:,.0f} "
                      f"(int or float), e.g. {example}")
    return check


def _choice(key: str, choices: dict[str, str]) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        choice = value.strip().lower() if isinstance(value, str) else value
        if isinstance(choice, str) and choice in choices:
            return choice
        uses = " or ".join(f"\"{name}\" ({meaning})" for name, meaning in choices.items())
        raise Problem(key, value, f"is not allowed; use {uses}")
    return check


def _currency(value: Any) -> Any:
    text = _text("currency", "'USD'")(value)
    try:
        return check_currency("currency", text)
    except ConfigError:
        raise Problem("currency", value, "is not an ISO 4217 currency code; use a code such as "
                      "'USD', 'EUR' or 'CNY'") from None


def _timezone(value: Any) -> Any:
    if value is None:
        return None
    name = _text("timezone", "'Europe/Berlin'")(value)
    try:
        zone(name)
    except ConfigError:
        raise Problem("timezone", value, "is not a known time zone; use an IANA name such as "
                      "'UTC', 'Europe/Berlin' or 'Asia/Shanghai'") from None
    return name


def _boolean(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    hint = " (in llmtally.toml, write it without quotes)" if isinstance(value, str) else ""
    raise Problem("fail_closed", value,
                  f"must be true or false (a bool, not {type(value).__name__}){hint}")


def _rates(value: Any) -> Any:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise Problem("rates", value, "must be a table of currency code -> rate, e.g. "
                      "{\"CNY\": 0.1389}")
    out: dict[str, float] = {}
    for code, rate in value.items():
        if not isinstance(code, str) or code.strip().upper() not in CURRENCIES:
            raise Problem(f"rates[{code!r}]", rate, "is not under an ISO 4217 currency code; use "
                          "a code such as 'USD', 'EUR' or 'CNY'")
        if not _finite(rate) or rate <= 0:
            raise Problem(f"rates[{code!r}]", rate, "must be a number > 0 (how many units of the "
                          f"ledger currency one {code.strip().upper()} is worth)")
        out[code.strip().upper()] = float(rate)
    return out


def _scope(value: Any) -> Any:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise Problem("scope", value, "must be a table such as {\"project\": \"search\", "
                      "\"tags\": [\"prod\"]}")
    for key, item in value.items():
        if key not in SCOPE_KEYS:
            raise Problem("scope", value, unknown_key(key, "scope", SCOPE_KEYS), show_value=False)
        if item is None:
            continue
        if key == "tags":
            tags = [item] if isinstance(item, str) else item
            if not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) for t in tags):
                raise Problem("scope['tags']", item, "must be a list of strings")
        elif key == "metadata":
            if not isinstance(item, Mapping):
                raise Problem("scope['metadata']", item, "must be a table (a dict)")
        elif not isinstance(item, str):
            raise Problem(f"scope[{key!r}]", item, "must be a string")
    return dict(value)


def _prices(value: Any) -> Any:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise Problem("prices", value, "must be a table of model name -> prices, e.g. "
                      "{\"my-model\": {\"input\": 0.5, \"output\": 1.5}}")
    out: dict[str, Price] = {}
    for model, entry in value.items():
        where = f"prices[{model!r}]"
        if isinstance(entry, Price):
            out[model] = entry
            continue
        if not isinstance(entry, Mapping):
            raise Problem(where, entry, "must be a llmtally.Price or a table of input, output, "
                          "cache_read, cache_write, reasoning, per, currency")
        for key, number in entry.items():
            if key not in PRICE_KEYS:
                raise Problem(where, entry, unknown_key(key, where, PRICE_KEYS), show_value=False)
            if key not in ("per", "currency") and not _is_number(number):
                raise Problem(f"{where}[{key!r}]", number, "must be a number")
        if "input" not in entry:
            per = entry.get("per", "1M")
            raise Problem(where, entry, f"needs at least input = <price per {per} tokens>")
        try:
            out[model] = Price(**entry)
        except ConfigError as exc:
            raise Problem(where, entry, str(exc), show_value=False) from None
    return out


def _budgets(value: Any) -> Any:
    if isinstance(value, (str, bytes, Mapping, Budget)) or not isinstance(value, (list, tuple)):
        raise Problem("budgets", value, "must be a list of llmtally.Budget, e.g. "
                      "[Budget(usd=50, per=\"month\")]")
    for number, budget in enumerate(value):
        if not isinstance(budget, Budget):
            raise Problem(f"budgets[{number}]", budget, "is not a llmtally.Budget")
    return tuple(value)


def _alerts(value: Any) -> Any:
    from ._notify.sinks import Sink, sink_of

    targets = (value,) if isinstance(value, (str, Sink)) else value
    if not isinstance(targets, (list, tuple)):
        raise Problem("alerts", None, "must be a list of \"log\", webhook URLs (https://...), "
                      "sink tables ({type = \"slack\", url = ...}) and callables", show_value=False)
    checked: list[Any] = []
    for number, target in enumerate(targets):
        if target == "log" or callable(target) or is_webhook(target):
            checked.append(target)
            continue
        if not isinstance(target, (Mapping, Sink)):
            # a mistyped URL may hold a secret (a webhook's token): not shown
            secret = isinstance(target, str) and (len(target) > 24 or any(c in target for c in "/:@?"))
            raise Problem(f"alerts[{number}]", target if not secret else None,
                          ("(a URL-like value, not shown) " if secret else "")
                          + "is not allowed; use \"log\", a webhook URL (https://...), a sink "
                          "table or a callable taking the alert as a dict", show_value=not secret)
        try:
            checked.append(sink_of(target, f"alerts[{number}]"))
        except ConfigError as exc:
            # the sink's own message (never its values: a sink table may hold a secret)
            raise Problem(f"alerts[{number}]", None, "sink " + str(exc).partition(": ")[2],
                          show_value=False) from None
    return tuple(checked)


def _alert_rules(value: Any) -> Any:
    from ._alerts.rules import AlertRule

    if isinstance(value, (str, bytes, Mapping, AlertRule)) or not isinstance(value, (list, tuple)):
        raise Problem("alert_rules", value, "must be a list of llmtally.AlertRule, e.g. "
                      "[AlertRule(\"error_rate\", threshold=0.2, window=\"15m\")]")
    for number, rule in enumerate(value):
        if not isinstance(rule, AlertRule):
            raise Problem(f"alert_rules[{number}]", rule, "is not a llmtally.AlertRule")
    return tuple(value)


def _language(value: Any) -> Any:
    from ._i18n import LANGUAGES, check_language

    if isinstance(value, str):
        try:
            return check_language(value)
        except ConfigError:
            pass
    raise Problem("language", value, f"is not one llmtally speaks; use {', '.join(LANGUAGES)}")


def _clock(value: Any) -> Any:
    if value is None or callable(value):
        return value
    raise Problem("clock", value, "must be a callable returning an aware datetime")


_DURABILITY = {"batched": "the default: events are written in background batches",
               "sync": "each record waits until its event is committed"}
_UNPRICED = {"allow": "the default: calls to a model with no price pass usd budgets, warned",
             "block": "they raise BudgetExceeded"}


class Settings(BaseModel):
    """Every setting of a :class:`~llmtally.Tally`, validated once (see the module's doc).

    ``Settings.of(arguments)`` validates ``Tally(...)``'s keyword arguments;
    ``_config.load_settings`` builds one from ``llmtally.toml`` and ``LLMTALLY_*``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True,
                              arbitrary_types_allowed=True)

    database_url: Annotated[str | None, BeforeValidator(
        lambda v: v if v is None else _text(
            "database_url", "'llmtally.db' or 'postgresql+psycopg://user@host/db'",
            paths="a non-empty string or a pathlib.Path")(v)
    )] = None
    prices: Annotated[dict[str, Price], BeforeValidator(_prices)] = {}
    currency: Annotated[str, BeforeValidator(_currency)] = "USD"
    rates: Annotated[dict[str, float], BeforeValidator(_rates)] = {}
    price_map: Annotated[str, BeforeValidator(
        _text("price_map", "'auto', 'bundled', 'litellm' or 'prices.json'",
        paths="a path (str or pathlib.Path)"))] = "auto"
    scope: Annotated[dict[str, Any], BeforeValidator(_scope)] = {}
    spill_path: Annotated[str | None, BeforeValidator(
        lambda v: v if v is None else _text(
            "spill_path", "'/var/lib/app/llmtally.spill.jsonl'",
            paths="a path (str or pathlib.Path)")(v))] = None
    batch_size: Annotated[int | None, BeforeValidator(_positive_int("batch_size", "500", 1_000_000))] = None
    flush_interval_s: Annotated[float | int | None, BeforeValidator(
        _positive_seconds("flush_interval_s", "0.2", 3600))] = None
    max_queue: Annotated[int | None, BeforeValidator(
        _positive_int("max_queue", "100_000", 100_000_000))] = None
    budgets: Annotated[tuple[Budget, ...], BeforeValidator(_budgets)] = ()
    timezone: Annotated[str | None, BeforeValidator(_timezone)] = None
    fail_closed: Annotated[bool, BeforeValidator(_boolean)] = False
    durability: Annotated[str, BeforeValidator(_choice("durability", _DURABILITY))] = "batched"
    alerts: Annotated[tuple[Any, ...], BeforeValidator(_alerts)] = ("log",)
    alert_rules: Annotated[tuple[Any, ...], BeforeValidator(_alert_rules)] = ()
    alert_interval_s: Annotated[float | int, BeforeValidator(
        _positive_seconds("alert_interval_s", "60", 86400))] = 60
    language: Annotated[str, BeforeValidator(_language)] = "en"
    dashboard_url: Annotated[str | None, BeforeValidator(
        lambda v: v if v is None else _text("dashboard_url", "'https://llm.example.com/'")(v)
    )] = None
    reservation_ttl_s: Annotated[float | int, BeforeValidator(
        _positive_seconds("reservation_ttl_s", "900", 365 * 86400))] = DEFAULT_RESERVATION_TTL_S
    max_output_estimate: Annotated[int, BeforeValidator(
        _positive_int("max_output_estimate", "4096", MAX_TOKEN_COUNT))] = DEFAULT_MAX_OUTPUT_ESTIMATE
    unpriced: Annotated[str, BeforeValidator(_choice("unpriced", _UNPRICED))] = "allow"
    clock: Annotated[Callable[[], datetime] | None, BeforeValidator(_clock)] = None

    @classmethod
    def of(cls, arguments: Mapping[str, Any]) -> Settings:
        """``Tally(...)``'s keyword arguments, validated; None means "the default"."""
        given = {key: value for key, value in arguments.items() if value is not None}
        def prefix(key: str) -> str:
            # an alert target may hold a secret (a sink's URL or signing key): never echoed
            shown = "…" if key == "alerts" else short(arguments[key])
            return f"Tally({key}={shown}): "

        return cls.validated(given, prefix)

    @classmethod
    def validated(cls, values: Mapping[str, Any], prefix: Callable[[str], str]) -> Settings:
        """``values`` as Settings, or a ConfigError: ``prefix(key)`` says where the key came
        from (a file, a variable, an argument), then where in it and what to give instead."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError(_first_problem(exc, values, prefix)) from None

    def given(self) -> dict[str, Any]:
        """The settings that were set (not left at their defaults), as keyword arguments."""
        return {key: getattr(self, key) for key in self.model_fields_set}


def _first_problem(exc: ValidationError, values: Mapping[str, Any],
                   prefix: Callable[[str], str]) -> str:
    error = exc.errors()[0]
    key = str(error["loc"][0]) if error["loc"] else ""
    head = prefix(key)
    if error["type"] == "extra_forbidden":
        return head + unknown_key(key, "", list(Settings.model_fields))
    problem = error.get("ctx", {}).get("error")
    if isinstance(problem, Problem):
        return head + problem.detail(key, named=head.startswith("Tally("))
    return f"{head}{key} = {short(values.get(key))} {error['msg']}"
