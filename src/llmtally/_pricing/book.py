"""The price engine: one place that turns (model, provider, token counts) into money.

Prices come from a snapshot of LiteLLM's price map bundled with llmtally (or the installed
litellm's own map when that is newer, or a JSON file the user names), plus user overrides.
Nothing here touches the network, and litellm is never imported: its map is read as a file.

Token convention (the ledger's; OpenAI / LiteLLM / LangChain report usage this way):

- ``input_tokens`` is the WHOLE prompt and INCLUDES ``cache_read_tokens`` and
  ``cache_write_tokens``;
- ``output_tokens`` INCLUDES ``reasoning_tokens``.

Anthropic's raw API reports cache tokens *beside* ``input_tokens``; callers normalise first.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from llmtally._errors import ConfigError

from .._events.usage import Usage
from .._i18n import N_
from .model_price import ModelPrice
from .names import canonical_provider, ledger_names
from .price import DEFAULT_CURRENCY, PER_DIVISOR, Price, PricedCost, check_currency
from .price_map import (
    CACHE_LIMIT,
    NO_LITELLM,
    PRICE_MAP_CHOICES,
    PriceMap,
    entry_price,
    installed_litellm,
    load_map,
)

__all__ = ["PriceBook", "Resolution"]


# --------------------------------------------------------------------------- user prices


@dataclass(frozen=True, slots=True)
class Resolution:
    """What :meth:`PriceBook.resolve` found for a (model, provider) pair.

    ``model`` and ``provider`` are the names the ledger stores (the route taken off the model,
    the provider canonical); ``price`` the prices that apply (None: unpriced), whose
    ``model_key`` and ``source`` say which entry matched; ``how`` says in words how the
    provider was found (given, a route leading the model name, or the bare name's entry): an
    English message whose ``{route}`` is ``route`` (:meth:`explained` fills it in a language).
    """

    model: str
    provider: str | None
    price: ModelPrice | None
    how: str
    route: str | None = None

    def explained(self, gettext: Callable[[str], str]) -> str:
        """``how`` through ``gettext`` (a language's catalog), its route filled in."""
        return gettext(self.how).format(route=repr(self.route))


# --------------------------------------------------------------------------- the price map


# --------------------------------------------------------------------------- the book


def _override_price(key: str, price: Price, provider: str | None, currency: str, factor: float) -> ModelPrice:
    per_token = factor / PER_DIVISOR[price.per]

    def conv(value: float | None) -> float | None:
        return None if value is None else value * per_token

    return ModelPrice(
        model_key=key,
        source=f"override:{key}",
        currency=currency,
        provider=provider,
        mode=None,
        input=conv(price.input),
        output=conv(price.output),
        cache_read=conv(price.cache_read),
        cache_write=conv(price.cache_write),
        reasoning=conv(price.reasoning),
    )


def _candidates(model: str, provider: str | None) -> list[str]:
    """Keys to try, most specific first.

    ``provider/model``, the model as given, then the model with its leading ``<segment>/``
    stripped one at a time (``bedrock/us-east-1/anthropic.claude-x`` -> ``us-east-1/...`` ->
    ``anthropic.claude-x``), each again behind ``provider/`` first. Nothing else: no guessing.
    """
    names = [model]
    rest = model
    while "/" in rest:
        rest = rest.split("/", 1)[1]
        if rest:
            names.append(rest)
    out: list[str] = []
    for name in names:
        if provider and not name.startswith(provider + "/"):
            out.append(f"{provider}/{name}")
        out.append(name)
    return out


def _keys_to_try(model: str, provider: str | None) -> list[str]:
    """Override and map keys for ``model`` via ``provider``, most specific first: under the
    provider's name as given (lower-cased), then under its canonical name."""
    name = model.strip().lower()
    raw = str(provider).strip().lower() if provider else None
    canonical = canonical_provider(provider)
    canonical = canonical.lower() if canonical else None
    tries = _candidates(name, raw) if raw and raw != canonical else []
    return list(dict.fromkeys(tries + _candidates(name, canonical)))


class PriceBook:
    """Prices LLM calls in one currency from LiteLLM's price map plus user overrides.

    >>> book = PriceBook({"my-llama": Price(input=0.2, output=0.6)})
    >>> priced = book.cost(model="gpt-4o-mini", input_tokens=120, cache_read_tokens=100, output_tokens=30)
    >>> round(priced.cost, 12), priced.source
    (2.85e-05, 'litellm-map:2026-11-25')

    ``currency`` is the ledger's: every cost comes back in it. ``rates`` says how many units
    of ``currency`` one unit of another currency is worth (``{"USD": 7.2}`` for a CNY book);
    the map is in USD, so a non-USD book needs a USD rate, and every override currency other
    than ``currency`` needs one too. ``price_map`` is ``"auto"`` (the bundled snapshot, or the
    installed litellm's map when that litellm is newer), ``"bundled"``, ``"litellm"``, or a
    path to a JSON file in LiteLLM's format. The map is read on first use, once.

    Token counts follow the ledger's convention: ``input_tokens`` includes the cache read and
    write tokens, ``output_tokens`` includes the reasoning tokens.
    """

    def __init__(
        self,
        overrides: Mapping[str, Price] | None = None,
        *,
        currency: str = DEFAULT_CURRENCY,
        rates: Mapping[str, float] | None = None,
        price_map: str = "auto",
    ) -> None:
        self.currency = check_currency("currency", currency)
        self._rates = self._check_rates(rates)
        self._overrides = self._check_overrides(overrides)
        self._usd_factor = self._factor("USD", "the price map is in USD")
        self._override_factors = {
            price.currency: self._factor(price.currency, f"override {key!r} is priced in {price.currency}")
            for key, price in self._overrides.values()
        }
        self._price_map = self._check_price_map(price_map)
        self._map: PriceMap | None = None
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str | None], Resolution] = {}

    def __repr__(self) -> str:
        return (
            f"PriceBook(currency={self.currency!r}, price_map={self._price_map!r}, "
            f"overrides={len(self._overrides)})"
        )

    # ---- construction checks

    def _check_rates(self, rates: Mapping[str, float] | None) -> dict[str, float]:
        checked = {self.currency: 1.0}
        for code, rate in (rates or {}).items():
            code = check_currency("rates", code)
            if (
                isinstance(rate, bool)
                or not isinstance(rate, (int, float))
                or not math.isfinite(rate)
                or rate <= 0
            ):
                raise ConfigError(
                    f"rates[{code!r}]: {rate!r} is not allowed; "
                    f"give how many {self.currency} one {code} is worth, a number > 0"
                )
            if code != self.currency:
                checked[code] = float(rate)
        return checked

    @staticmethod
    def _check_overrides(overrides: Mapping[str, Price] | None) -> dict[str, tuple[str, Price]]:
        """Lower-cased key -> (key as the user wrote it, price)."""
        checked: dict[str, tuple[str, Price]] = {}
        for key, price in (overrides or {}).items():
            if not isinstance(key, str) or not key.strip():
                raise ConfigError(
                    f"overrides: key {key!r} is not a model name; use 'model' or 'provider/model'"
                )
            if isinstance(price, Mapping):  # e.g. a table from llmtally.toml
                try:
                    price = Price(**price)
                except TypeError as exc:
                    raise ConfigError(
                        f"overrides[{key!r}]: {exc}; allowed keys are the fields of llmtally.Price"
                    ) from None
            if not isinstance(price, Price):
                raise ConfigError(f"overrides[{key!r}]: {price!r} is not a llmtally.Price")
            name = key.strip().lower()
            checked[name] = (key.strip(), price)
            head, sep, tail = name.partition("/")
            if sep and canonical_provider(head) != head:  # "google/x" also answers as "gemini/x"
                checked.setdefault(f"{canonical_provider(head)}/{tail}", (key.strip(), price))
        return checked

    def _factor(self, code: str, why: str) -> float:
        if code in self._rates:
            return self._rates[code]
        raise ConfigError(
            f"rates: no rate for {code} ({why}, the book is in {self.currency}); "
            f"pass rates={{{code!r}: <{self.currency} per 1 {code}>}}"
        )

    @staticmethod
    def _check_price_map(price_map: str) -> str:
        if not isinstance(price_map, (str, os.PathLike)):
            raise ConfigError(
                f"price_map: {price_map!r} is not allowed; use 'auto', 'bundled', 'litellm' or a file path"
            )
        price_map = os.fspath(price_map)
        if price_map in PRICE_MAP_CHOICES:
            if price_map == "litellm" and installed_litellm() is None:
                raise ConfigError(NO_LITELLM)
            return price_map
        if not os.path.isfile(price_map):
            raise ConfigError(
                f"price_map: {price_map!r} is neither 'auto', 'bundled', 'litellm' nor an existing JSON file"
            )
        return os.path.abspath(price_map)

    # ---- the map

    def _loaded(self) -> PriceMap:
        loaded = self._map
        if loaded is None:
            with self._lock:
                if self._map is None:
                    self._map = load_map(self._price_map)
                loaded = self._map
        return loaded

    @property
    def map_source(self) -> str:
        """What prices come from, e.g. ``"litellm-map:2026-11-25"`` (loads the map)."""
        return self._loaded().source

    def known_models(self) -> int:
        """How many models the active price map prices (overrides not counted)."""
        return len(self._loaded().entries)

    # ---- lookups

    def resolve(self, model: str, provider: str | None = None) -> Resolution:
        """How ``model`` served by ``provider`` is named in the ledger and which price applies.

        The provider is ``provider`` if given, else the model's leading route if that is a
        provider the price map knows (``"deepseek/deepseek-chat"``), else the provider of the
        map entry a bare name matched; it is stored under its canonical name
        (:func:`canonical_provider`) and its route is taken off the model name, so every path
        stores ``("deepseek", "deepseek-chat")`` alike.

        Prices: overrides first (key ``"provider/model"`` or ``"model"``), then the map, keys
        compared case-insensitively and never guessed: a leading ``<segment>/`` may be
        stripped, nothing else. When the provider (given or routed) is one the map knows, an
        entry of another provider is never used (``anthropic/gpt-4o-mini`` is unpriced); a
        provider the map does not know (a gateway) accepts the model's own entry. A bare name
        prefers its provider's own key (``deepseek/deepseek-chat`` over ``deepseek-chat``), as
        LiteLLM does.
        """
        cache_key = (model, provider)
        found = self._cache.get(cache_key)
        if found is None:
            found = self._resolve(model, provider)
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            self._cache[cache_key] = found
        return found

    def lookup(self, model: str, provider: str | None = None) -> ModelPrice | None:
        """The prices that apply to ``model`` served by ``provider``, or None if unknown (see
        :meth:`resolve`)."""
        return self.resolve(model, provider).price

    def _resolve(self, model: str, provider: str | None) -> Resolution:
        if not isinstance(model, str) or not model.strip():
            return Resolution(model if isinstance(model, str) else "", canonical_provider(provider),
                              None, N_("no model name"))
        name = model.strip()
        routes = self._loaded().routes
        if canonical_provider(provider) is not None:
            routed, canonical = ledger_names(name, provider)
            name = routed if routed != name else model  # the caller's text unless a route came off
            how = N_("given as provider")
            route = str(provider)
        else:
            head, sep, tail = name.partition("/")
            if sep and tail and head.lower() in routes:
                canonical, name, route = canonical_provider(head), tail, head
                how = N_("the route {route} leading the model name")
            else:
                canonical, route, how, name = None, None, N_("none given"), model
        price = self._resolve_override(model, route) or self._resolve_map(model, route)
        if price is not None and canonical is None and price.provider:
            # A bare name: its entry says the provider, whose own key LiteLLM tries first.
            canonical = canonical_provider(price.provider)
            how = N_("from the entry the bare name matched")
            if not price.source.startswith("override:"):
                price = self._resolve_map(model, price.provider) or price
        return Resolution(name, canonical, price, how, route)

    def _resolve_override(self, model: str, provider: str | None) -> ModelPrice | None:
        if not self._overrides:
            return None
        canonical = canonical_provider(provider)
        for key in _keys_to_try(model, provider):
            found = self._overrides.get(key)
            if found is not None:
                written, price = found
                return _override_price(
                    written, price, canonical, self.currency, self._override_factors[price.currency]
                )
        return None

    def _resolve_map(self, model: str, provider: str | None) -> ModelPrice | None:
        canonical = canonical_provider(provider)
        price_map = self._loaded()
        # a provider the map knows prices only its own entries; names LiteLLM does not know keep
        # their case when stored, so the map's "Acme" and a call's "acme" are compared folded
        guard = canonical.lower() if canonical and canonical.lower() in price_map.families else None
        for key in _keys_to_try(model, provider):
            entry = price_map.entries.get(key)
            if entry is None:
                continue
            provider_name = entry.get("litellm_provider")
            if guard and (not isinstance(provider_name, str)
                          or (canonical_provider(provider_name) or "").lower() != guard):
                continue
            return entry_price(price_map.keys[key], entry, price_map.source, self.currency, self._usd_factor)
        return None

    def cost(
        self,
        model: str,
        provider: str | None = None,
        usage: Usage | None = None,
        at: datetime | None = None,
        *,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
    ) -> PricedCost:
        """What one call cost, in the book's currency; ``status="unpriced"`` and ``cost=None`` if unknown.

        ``usage`` holds the call's tokens (the keyword counts are a shorthand for
        ``Usage(input_tokens=..., ...)`` when no ``usage`` is given): ``input_tokens`` is the
        whole prompt, cache read and write tokens included; ``output_tokens`` includes
        ``reasoning_tokens``. The cost is
        ``uncached_input * input + cache_read * cache_read_price + cache_write * cache_write_price
        + (output - reasoning) * output + reasoning * reasoning_price``, with the prices of the
        tier or ``above_<N>k`` level the prompt size selects. Missing cache prices are the
        input price and a missing reasoning price is the output price. ``at`` is when the call
        was made (default now); it matters only for models with off-peak rates.

        ``provider`` and ``model`` of the result are the names to store (see :meth:`resolve`).
        """
        if usage is None:
            usage = Usage(input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
                          reasoning_tokens)
        found = self.resolve(model, provider)
        price = found.price
        if price is None:
            return PricedCost(None, self.currency, "unpriced", None, None, found.provider, found.model)
        amount = price.cost(*usage, at)
        if amount is None:
            return PricedCost(None, self.currency, "unpriced", None, price.model_key, found.provider,
                              found.model)
        return PricedCost(amount, self.currency, "priced", price.source, price.model_key, found.provider,
                          found.model)

    def max_output_tokens(self, model: str, provider: str | None = None) -> int | None:
        """The model's output-token limit from the price map, or None if unknown."""
        price = self.lookup(model, provider)
        if price is None:
            return None
        if price.max_output_tokens is None and price.source.startswith("override:"):
            # An override says nothing about limits; the map may still know them.
            mapped = self._resolve_map(model, provider)
            return mapped.max_output_tokens if mapped else None
        return price.max_output_tokens
