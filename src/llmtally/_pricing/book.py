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

import functools
import math
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from llmtally._errors import ConfigError

__all__ = [
    "CURRENCIES",
    "DEFAULT_CURRENCY",
    "ModelPrice",
    "Price",
    "PriceBook",
    "PricedCost",
    "Resolution",
    "OffPeak",
    "PRICE_MAP_CHOICES",
    "canonical_provider",
    "ledger_names",
    "split_route",
    "slim_entry",
    "slim_price_map",
]

DEFAULT_CURRENCY = "USD"
PRICE_MAP_CHOICES = ("auto", "bundled", "litellm")
LITELLM_MAP_FILE = "model_prices_and_context_window_backup.json"

_NO_LITELLM = "price_map: 'litellm' needs litellm installed; pip install 'llmtally[litellm]', or use 'auto'"
_PER_DIVISOR = {"1M": 1_000_000.0, "1K": 1_000.0, "token": 1.0}

# ISO 4217 codes in use (2026), plus BGN and ANG, retired in 2025/2026 but still found in
# older books. XTS (testing) and XXX (no currency) are left out on purpose.
CURRENCIES = frozenset(
    """
    AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BOV BRL BSD
    BTN BWP BYN BZD CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUP CVE CZK DJF DKK DOP DZD
    EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD
    IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL
    MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN
    PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN
    SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD USN UYI UYU UYW UZS VED VES
    VND VUV WST XAF XAG XAU XBA XBB XBC XBD XCD XCG XDR XOF XPD XPF XPT XSU XUA YER ZAR ZMW
    ZWG
    """.split()
)

# Provider names people and frameworks use (LangChain's ls_provider, SDK names, vendors)
# mapped to LiteLLM's provider names, which are what the price map's keys are prefixed with.
_PROVIDER_ALIASES = {
    "google": "gemini",
    "google_genai": "gemini",
    "google-genai": "gemini",
    "google_ai": "gemini",
    "google_ai_studio": "gemini",
    "googleai": "gemini",
    "google_vertexai": "vertex_ai",
    "google-vertexai": "vertex_ai",
    "google_vertex_ai": "vertex_ai",
    "google_anthropic_vertex": "vertex_ai",
    "vertexai": "vertex_ai",
    "vertex": "vertex_ai",
    "vertex_ai_beta": "vertex_ai",
    "aws": "bedrock",
    "amazon": "bedrock",
    "amazon_bedrock": "bedrock",
    "aws_bedrock": "bedrock",
    "bedrock_converse": "bedrock",
    "azure_openai": "azure",
    "azure-openai": "azure",
    "azureopenai": "azure",
    "alibaba": "dashscope",
    "alibaba_cloud": "dashscope",
    "aliyun": "dashscope",
    "qwen": "dashscope",
    "tongyi": "dashscope",
    "kimi": "moonshot",
    "moonshotai": "moonshot",
    "moonshot_ai": "moonshot",
    "mistralai": "mistral",
    "mistral_ai": "mistral",
    "together": "together_ai",
    "togetherai": "together_ai",
    "fireworks": "fireworks_ai",
    "fireworksai": "fireworks_ai",
    "ibm": "watsonx",
    "ibm_watsonx": "watsonx",
    "zhipuai": "zai",
    "zhipu": "zai",
    "z_ai": "zai",
    "x-ai": "xai",
    "x_ai": "xai",
    "nvidia": "nvidia_nim",
    "nvidia_ai_endpoints": "nvidia_nim",
    "voyageai": "voyage",
    "doubao": "volcengine",
    "workers_ai": "cloudflare",
    "cloudflare_workers_ai": "cloudflare",
}

# LiteLLM provider names that price the same family of endpoints as another name.
_FAMILY_ALIASES = {
    "bedrock_converse": "bedrock",
    "bedrock_mantle": "bedrock",
    "azure_text": "azure",
    "cohere_chat": "cohere",
    "ai21_chat": "ai21",
    "ollama_chat": "ollama",
    "watsonx_text": "watsonx",
    "sagemaker_chat": "sagemaker",
    "anthropic_text": "anthropic",
}

_PRICE_FIELDS = (
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "cache_creation_input_token_cost",
    "output_cost_per_reasoning_token",
)
_INFO_FIELDS = ("max_input_tokens", "max_output_tokens")
_ABOVE_KEY = re.compile(r"^(" + "|".join(_PRICE_FIELDS) + r")_above_(\d+(?:\.\d+)?)(k?)_tokens$")

# Fireworks bills cached prompt tokens of serverless models at 50 % of the input price unless
# the model says otherwise (docs.fireworks.ai, "Is prompt caching billed differently for
# serverless models?"); the map carries no cache price for them. LiteLLM applies the same rule.
_FIREWORKS_CACHE_READ_RATIO = 0.5
_WEEKDAY_NAMES = {
    "mon": 1, "monday": 1, "tue": 2, "tues": 2, "tuesday": 2, "wed": 3, "wednesday": 3,
    "thu": 4, "thur": 4, "thurs": 4, "thursday": 4, "fri": 5, "friday": 5,
    "sat": 6, "saturday": 6, "sun": 7, "sunday": 7,
}
_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")

# Token counts beyond this are clamped (so int -> float never overflows); no call is that big.
_MAX_TOKENS = 2**53
_CACHE_LIMIT = 8192


_ENDPOINT_FAMILY = re.compile(r"^([a-z0-9_]+)-[a-z0-9_-]*models$")  # vertex_ai-language-models


def canonical_provider(provider: str | None) -> str | None:
    """The one name llmtally stores and scopes budgets by for ``provider``; None stays None.

    LiteLLM's routing name of the vendor, lower-cased: SDK and framework names map to it
    (``"google_genai"`` -> ``"gemini"``), and so do the price map's per-endpoint variants
    (``"bedrock_converse"`` -> ``"bedrock"``, ``"vertex_ai-language-models"`` -> ``"vertex_ai"``,
    ``"text-completion-openai"`` -> ``"openai"``). Names LiteLLM does not know are kept as
    given, case included.
    """
    if provider is None:
        return None
    name = str(provider).strip().lower()
    if not name:
        return None
    folded = _PROVIDER_ALIASES.get(name, name).removeprefix("text-completion-")
    family = _ENDPOINT_FAMILY.match(folded)
    if family:
        folded = family.group(1)
    folded = _PROVIDER_ALIASES.get(folded, folded)
    folded = _FAMILY_ALIASES.get(folded, folded)
    if folded == name and name not in _litellm_routes():
        return str(provider)  # a provider LiteLLM does not know (your gateway) keeps its spelling
    return folded


def ledger_names(model: str, provider: str | None) -> tuple[str, str | None]:
    """``(model, provider)`` as the ledger stores them, for a call whose provider is known.

    The provider becomes its canonical name and its own route comes off the model name:
    ``("deepseek/deepseek-chat", "deepseek")`` and ``("deepseek-chat", "deepseek")`` are both
    ``("deepseek-chat", "deepseek")``. Another route stays (``"anthropic/claude-x"`` via
    ``"openrouter"`` is OpenRouter's name for it). Needs no price map.
    """
    canonical = canonical_provider(provider)
    if canonical is not None and "/" in model:
        head, _, tail = model.partition("/")
        head = head.strip().lower()
        if tail and (head in (str(provider).strip().lower(), canonical)
                     or (head in _litellm_routes() and canonical_provider(head) == canonical)):
            return tail, canonical
    return model, canonical


def split_route(model: str) -> tuple[str, str | None]:
    """``(model, provider)`` for a name that may lead with a provider route LiteLLM routes by
    (``"deepseek/deepseek-chat"`` -> ``("deepseek-chat", "deepseek")``); else ``(model, None)``.
    Needs no price map (budget scopes and migrations use it)."""
    head, sep, tail = model.partition("/")
    if sep and tail and head.strip().lower() in _litellm_routes():
        return tail, canonical_provider(head)
    return model, None


# --------------------------------------------------------------------------- user prices


def _check_amount(owner: str, name: str, value: Any, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{owner}.{name}: {value!r} is not a number; give a price as an int or float >= 0")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{owner}.{name}: {value!r} is not allowed; a price must be a finite number >= 0")


def _check_currency(where: str, code: Any) -> str:
    if not isinstance(code, str) or code.strip().upper() not in CURRENCIES:
        raise ConfigError(
            f"{where}: {code!r} is not an ISO 4217 currency code; use a code such as 'USD', 'EUR' or 'CNY'"
        )
    return code.strip().upper()


@dataclass(frozen=True, kw_only=True, slots=True)
class Price:
    """A price override for one model: what ``per`` tokens cost, in ``currency``.

    ``Price(input=0.8, output=2.0, per="1M", currency="CNY")`` prices a model at 0.8 CNY per
    million prompt tokens and 2 CNY per million completion tokens. Unset cache prices cost
    the same as ``input``; an unset ``reasoning`` price costs the same as ``output``.
    """

    input: float
    output: float = 0.0
    cache_read: float | None = None
    cache_write: float | None = None
    reasoning: float | None = None
    per: str = "1M"
    currency: str = DEFAULT_CURRENCY

    def __post_init__(self) -> None:
        _check_amount("Price", "input", self.input)
        _check_amount("Price", "output", self.output)
        for name in ("cache_read", "cache_write", "reasoning"):
            _check_amount("Price", name, getattr(self, name), optional=True)
        if self.per not in _PER_DIVISOR:
            raise ConfigError(
                f"Price.per: {self.per!r} is not allowed; use one of {', '.join(map(repr, _PER_DIVISOR))}"
            )
        object.__setattr__(self, "currency", _check_currency("Price.currency", self.currency))


@dataclass(frozen=True, slots=True)
class PricedCost:
    """The cost of one call, or why there is none.

    ``cost`` is in ``currency`` (the PriceBook's); it is None, never 0, when ``status`` is
    ``"unpriced"``. ``source`` names what priced it (``"litellm-map:2026-11-25"``,
    ``"override:<key>"``), ``model_key`` the price-map or override key that matched.
    ``provider`` and ``model`` are the call's names as the ledger stores them: the canonical
    provider and the model without its provider route.
    """

    cost: float | None
    currency: str
    status: str
    source: str | None
    model_key: str | None
    provider: str | None
    model: str | None = None


@dataclass(frozen=True, slots=True)
class Resolution:
    """What :meth:`PriceBook.resolve` found for a (model, provider) pair.

    ``model`` and ``provider`` are the names the ledger stores (the route taken off the model,
    the provider canonical); ``price`` the prices that apply (None: unpriced), whose
    ``model_key`` and ``source`` say which entry matched; ``how`` says in words how the
    provider was found (given, a route leading the model name, or the bare name's entry).
    """

    model: str
    provider: str | None
    price: ModelPrice | None
    how: str


def _weekday(value: Any) -> int | None:
    """ISO weekday 1-7 from 1-7 or a name (``"mon"``, ``"Sunday"``); None if neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 1 <= value <= 7 else None
    if isinstance(value, str):
        return _WEEKDAY_NAMES.get(value.strip().lower())
    return None


def _window(text: str) -> tuple[int, int] | None:
    """``"16:30-00:30"`` as (start, end) minutes of the day; None if malformed."""
    found = _WINDOW.match(text)
    if not found:
        return None
    h1, m1, h2, m2 = map(int, found.groups())
    if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
        return None
    return h1 * 60 + m1, h2 * 60 + m2


def _in_windows(minute: int, windows: tuple[tuple[int, int], ...]) -> bool:
    """Start inclusive, end exclusive; a window may wrap past midnight; start == end is all day."""
    for start, end in windows:
        if start < end:
            if start <= minute < end:
                return True
        elif minute >= start or minute < end:
            return True
    return False


@dataclass(frozen=True, slots=True)
class OffPeak:
    """Rates that replace a model's standard ones inside UTC time windows (LiteLLM's ``off_peak_pricing``).

    ``every_day`` windows apply daily; each of ``rules`` applies on its ISO weekdays (None:
    every day), read on the calendar of ``weekday_timezone`` (default UTC). ``rates`` are per
    token in the book's currency; None keeps the standard rate.
    """

    rates: tuple[float | None, float | None, float | None, float | None, float | None]
    every_day: tuple[tuple[int, int], ...] = ()
    rules: tuple[tuple[frozenset[int] | None, tuple[tuple[int, int], ...]], ...] = ()
    weekday_timezone: str | None = None

    def applies(self, at: datetime) -> bool:
        """Whether ``at`` (aware, or naive UTC) falls in an off-peak window."""
        try:
            utc = at.astimezone(timezone.utc) if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)
            minute = utc.hour * 60 + utc.minute
            if _in_windows(minute, self.every_day):
                return True
            if not self.rules:
                return False
            weekday = utc.astimezone(_calendar(self.weekday_timezone)).isoweekday()
        except (OverflowError, ValueError):  # a moment at the edge of datetime's range
            return False
        return any(
            (days is None or weekday in days) and _in_windows(minute, windows)
            for days, windows in self.rules
        )


@functools.lru_cache(maxsize=64)
def _calendar(name: str | None) -> Any:
    """The zone whose calendar says the weekday (LiteLLM's ``weekday_timezone``); UTC if unknown."""
    if name and name.strip():
        try:
            from zoneinfo import ZoneInfo

            return ZoneInfo(name.strip())
        except (ValueError, KeyError, OSError):
            pass
    return timezone.utc


def _windows_of(value: Any) -> tuple[tuple[int, int], ...]:
    return tuple(map(_window, _slim_windows(value)))  # type: ignore[arg-type]


def _default_cache_read(rates: list[float | None], ratio: float | None) -> None:
    """A provider's rule for a missing cache-read price (Fireworks: half the input price)."""
    if rates[2] is None and rates[0] is not None and ratio is not None:
        rates[2] = rates[0] * ratio


def _off_peak_of(block: Any, factor: float, cache_read_ratio: float | None) -> OffPeak | None:
    if not isinstance(block, Mapping):
        return None
    rates = list(_rates_of(block, factor))
    _default_cache_read(rates, cache_read_ratio)
    rules = []
    for rule in block.get("windows") or ():
        if not isinstance(rule, Mapping):
            continue
        days = rule.get("weekdays")
        weekdays = None if days is None else frozenset(d for d in map(_weekday, days) if d is not None)
        windows = _windows_of(rule.get("hours_utc"))
        if windows:
            rules.append((weekdays, windows))
    every_day = _windows_of(block.get("hours_utc"))
    if not every_day and not rules:
        return None
    zone = block.get("weekday_timezone")
    return OffPeak(tuple(rates), every_day, tuple(rules), zone if isinstance(zone, str) else None)  # type: ignore[arg-type]


# Per-token rates for one price level: (input, output, cache_read, cache_write, reasoning).
# None means "not set at this level" (or, for input/output, no price at all).
_Rates = tuple[float | None, float | None, float | None, float | None, float | None]


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Per-token prices of one model, already converted to the PriceBook's currency.

    ``above`` holds ``(threshold_tokens, rates)`` levels (LiteLLM's ``*_above_<N>k_tokens``),
    ``tiers`` holds ``(low, high, rates)`` ranges (LiteLLM's ``tiered_pricing``); either picks
    the rates from the prompt's ``input_tokens``. ``off_peak`` replaces them in its windows.
    """

    model_key: str
    source: str
    currency: str
    provider: str | None
    mode: str | None
    input: float | None
    output: float | None
    cache_read: float | None = None
    cache_write: float | None = None
    reasoning: float | None = None
    above: tuple[tuple[float, _Rates], ...] = ()
    tiers: tuple[tuple[float, float, _Rates], ...] = ()
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    off_peak: OffPeak | None = None
    _flat: _Rates = field(init=False, repr=False, compare=False)
    _flat_up_to: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        inp, out = self.input, self.output
        flat = (
            inp,
            out,
            inp if self.cache_read is None else self.cache_read,
            inp if self.cache_write is None else self.cache_write,
            out if self.reasoning is None else self.reasoning,
        )
        object.__setattr__(self, "_flat", flat)
        # Below this prompt size the flat rates apply as they are: the hot path skips rates().
        object.__setattr__(
            self, "_flat_up_to", -1.0 if self.tiers else self.above[0][0] if self.above else math.inf
        )

    def rates(self, input_tokens: int) -> _Rates:
        """The five per-token rates that apply to a prompt of ``input_tokens`` tokens.

        Unset cache rates fall back to the input rate and an unset reasoning rate to the
        output rate; a side with no price at all stays None.
        """
        if input_tokens <= self._flat_up_to:
            return self._flat
        inp, out, cache_read, cache_write, reasoning = (
            self.input,
            self.output,
            self.cache_read,
            self.cache_write,
            self.reasoning,
        )
        if self.tiers:
            tier = _select_tier(self.tiers, input_tokens)
            # A tier is all-or-nothing (LiteLLM's rule): rates it leaves out fall back to
            # the tier's own input/output rate, except a missing output rate which keeps
            # the model's flat one.
            inp = tier[0]
            out = tier[1] if tier[1] is not None else out
            cache_read, cache_write, reasoning = tier[2], tier[3], tier[4]
        else:
            for threshold, level in self.above:  # ascending: the highest one exceeded wins
                if input_tokens <= threshold:
                    break
                inp = level[0] if level[0] is not None else inp
                out = level[1] if level[1] is not None else out
                cache_read = level[2] if level[2] is not None else cache_read
                cache_write = level[3] if level[3] is not None else cache_write
                reasoning = level[4] if level[4] is not None else reasoning
        return (
            inp,
            out,
            inp if cache_read is None else cache_read,
            inp if cache_write is None else cache_write,
            out if reasoning is None else reasoning,
        )

    def cost(
        self,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
        at: datetime | None = None,
    ) -> float | None:
        """The call's cost; None when tokens were used on a side this entry has no price for.

        ``input_tokens`` includes the cache tokens and ``output_tokens`` includes the
        reasoning tokens. Negative counts count as 0; if the cache tokens exceed
        ``input_tokens`` (or reasoning exceeds output) the uncached part is 0, never negative.
        ``at`` is when the call was made (aware, or naive UTC; default now): it matters only
        for a model with off-peak rates.
        """
        inp_n, out_n, read_n, write_n, reason_n = (
            input_tokens,
            output_tokens,
            cache_read_tokens,
            cache_write_tokens,
            reasoning_tokens,
        )
        try:  # fast path: plain ints; OR-ing them is >= 0 and < 2**53 only if each one is
            usual = 0 <= (inp_n | out_n | read_n | write_n | reason_n) < _MAX_TOKENS
        except TypeError:  # None, floats, strings
            usual = False
        if not usual:
            inp_n, out_n, read_n, write_n, reason_n = map(
                _count, (input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens)
            )
        inp, out, read, write, reason = self._flat if inp_n <= self._flat_up_to else self.rates(inp_n)
        if self.off_peak is not None and self.off_peak.applies(at or datetime.now(timezone.utc)):
            inp, out, read, write, reason = self._off_peak_rates((inp, out, read, write, reason))
        total = 0.0
        if inp is not None:
            uncached = inp_n - read_n - write_n
            total += (uncached if uncached > 0 else 0) * inp + read_n * read + write_n * write  # type: ignore[operator]
        elif inp_n or read_n or write_n:
            return None
        if out is not None:
            plain = out_n - reason_n
            total += (plain if plain > 0 else 0) * out + reason_n * reason  # type: ignore[operator]
        elif out_n or reason_n:
            return None
        return total


    def _off_peak_rates(self, standard: _Rates) -> _Rates:
        """LiteLLM's rule: an off-peak rate replaces the standard one; a rate the block leaves
        out keeps the model's own dedicated rate, or follows the off-peak input (cache) or
        output (reasoning) rate when the model has none."""
        peak = self.off_peak.rates  # type: ignore[union-attr]
        inp = standard[0] if peak[0] is None else peak[0]
        out = standard[1] if peak[1] is None else peak[1]
        return (
            inp,
            out,
            peak[2] if peak[2] is not None else standard[2] if self.cache_read is not None else inp,
            peak[3] if peak[3] is not None else standard[3] if self.cache_write is not None else inp,
            peak[4] if peak[4] is not None else standard[4] if self.reasoning is not None else out,
        )


def _count(value: Any) -> int:
    """A token count as a non-negative int; junk (None, NaN, strings) and negatives count as 0."""
    try:
        n = int(value or 0)
    except (TypeError, ValueError, OverflowError):
        return 0
    return min(n, _MAX_TOKENS) if n > 0 else 0


def _select_tier(tiers: tuple[tuple[float, float, _Rates], ...], input_tokens: int) -> _Rates:
    """LiteLLM's rule: the tier with ``low < input_tokens <= high``; else the first or the last one."""
    for low, high, rates in tiers:
        if low < input_tokens <= high:
            return rates
    return tiers[0][2] if input_tokens <= tiers[0][0] else tiers[-1][2]


# --------------------------------------------------------------------------- the price map


def _number(value: Any) -> float | None:
    """A price from the map as a float, or None if it is not a finite number >= 0."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return None
    return value


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
        low, high = _number(bounds[0]), _number(bounds[1])
        if low is None or high is None:
            continue
        slim: dict[str, Any] = {"range": [_compact(low), _compact(high)]}
        for name in _PRICE_FIELDS:
            price = _number(tier.get(name))
            if price is not None:
                slim[name] = price
        if "input_cost_per_token" in slim:  # tiers priced per query/second are not ours
            out.append(slim)
    return out


def _slim_windows(value: Any) -> list[str]:
    windows = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [window for window in windows if isinstance(window, str) and _window(window)]


def _slim_off_peak(block: Any) -> dict[str, Any] | None:
    """LiteLLM's ``off_peak_pricing``: rates that replace the standard ones inside time windows."""
    if not isinstance(block, dict):
        return None
    slim: dict[str, Any] = {}
    for name in _PRICE_FIELDS:
        price = _number(block.get(name))
        if price is not None:
            slim[name] = price
    hours = _slim_windows(block.get("hours_utc"))
    if hours:
        slim["hours_utc"] = hours
    rules = []
    for rule in block.get("windows") or () if isinstance(block.get("windows"), list) else ():
        if not isinstance(rule, dict):
            continue
        rule_hours = _slim_windows(rule.get("hours_utc"))
        days = rule.get("weekdays")
        if not rule_hours or (days is not None and not isinstance(days, list)):
            continue
        kept: dict[str, Any] = {"hours_utc": rule_hours}
        if days is not None:
            kept["weekdays"] = [day for day in days if _weekday(day) is not None]
        rules.append(kept)
    if rules:
        slim["windows"] = rules
    if isinstance(block.get("weekday_timezone"), str):
        slim["weekday_timezone"] = block["weekday_timezone"]
    if not any(name in slim for name in _PRICE_FIELDS) or not ("hours_utc" in slim or "windows" in slim):
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
        if name in _PRICE_FIELDS or _ABOVE_KEY.match(name):
            price = _number(value)
            if price is not None:
                slim[name] = price
        elif name in _INFO_FIELDS:
            size = _number(value)
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
class _PriceMap:
    entries: dict[str, dict[str, Any]]  # lower-cased key -> slim entry
    keys: dict[str, str]  # lower-cased key -> key as spelled in the map
    source: str
    families: frozenset[str]  # canonical provider names of the entries
    routes: frozenset[str]  # what may lead a model name as its provider: raw and canonical names


def _build_map(models: Mapping[str, Any], source: str, *, slimmed: bool = False) -> _PriceMap:
    slim = models if slimmed else slim_price_map(models)
    entries = {key.lower(): entry for key, entry in slim.items()}
    keys = {key.lower(): key for key in slim}
    raw = {
        entry["litellm_provider"].lower()
        for entry in slim.values()
        if isinstance(entry.get("litellm_provider"), str)
    }
    families = frozenset(filter(None, map(canonical_provider, raw)))
    return _PriceMap(entries, keys, source, families, frozenset(raw) | families | _litellm_routes())


@functools.lru_cache(maxsize=1)
def _litellm_routes() -> frozenset[str]:
    """LiteLLM's provider names (``litellm.provider_list``, saved by scripts/update_prices.py):
    ``openrouter/...`` routes a name even though the map has no OpenRouter entry."""
    import json
    from importlib.resources import files

    data = json.loads((files("llmtally") / "data" / "providers.json").read_text(encoding="utf-8"))
    return frozenset(data["providers"])


def _bundled_path() -> Any:
    from importlib.resources import files

    return files("llmtally") / "data" / "prices.json"


def _installed_litellm() -> tuple[str, str] | None:
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


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:4]:
        digits = re.match(r"\d*", part).group()  # type: ignore[union-attr]
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


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
        return data["models"]
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


def _load_bundled() -> _PriceMap:
    import json

    data = json.loads(_bundled_path().read_text(encoding="utf-8"))
    # Written by scripts/update_prices.py through slim_price_map(): no need to slim it again.
    return _build_map(data["models"], f"litellm-map:{data['version']}", slimmed=True)


def _load_litellm(installed: tuple[str, str]) -> _PriceMap:
    version, path = installed
    models = _models_of(_read_json(path, "price_map='litellm'"), path)
    return _build_map(models, f"litellm-map:{version}")


def _load_map(choice: str) -> _PriceMap:
    if choice == "bundled":
        return _load_bundled()
    if choice == "litellm":
        installed = _installed_litellm()
        if installed is None:
            raise ConfigError(_NO_LITELLM)
        return _load_litellm(installed)
    if choice == "auto":
        installed = _installed_litellm()
        if installed and _version_tuple(installed[0]) > _version_tuple(_bundled_litellm_version()):
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


# --------------------------------------------------------------------------- the book


def _rates_of(entry: Mapping[str, Any], factor: float) -> _Rates:
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


def _entry_price(key: str, entry: Mapping[str, Any], source: str, currency: str, factor: float) -> ModelPrice:
    """A map entry (prices in USD per token) as a ModelPrice in the book's currency."""
    levels: dict[float, list[float | None]] = {}
    for name, value in entry.items():
        found = _ABOVE_KEY.match(name)
        if found:
            threshold = float(found.group(2)) * (1000 if found.group(3) else 1)
            level = levels.setdefault(threshold, [None] * 5)
            level[_PRICE_FIELDS.index(found.group(1))] = value * factor
    tiers = tuple(
        (float(tier["range"][0]), float(tier["range"][1]), _rates_of(tier, factor))
        for tier in sorted(entry.get("tiered_pricing", ()), key=lambda tier: tier["range"][0])
    )
    provider = entry.get("litellm_provider")
    base = list(_rates_of(entry, factor))
    if entry.get("mode") == "embedding" and base[1] is None:
        base[1] = 0.0  # an embedding has no output: tokens reported there cost nothing
    cache_read_ratio = (
        _FIREWORKS_CACHE_READ_RATIO
        if isinstance(provider, str) and canonical_provider(provider) == "fireworks_ai"
        else None
    )
    _default_cache_read(base, cache_read_ratio)
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


def _override_price(key: str, price: Price, provider: str | None, currency: str, factor: float) -> ModelPrice:
    per_token = factor / _PER_DIVISOR[price.per]

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
        self.currency = _check_currency("currency", currency)
        self._rates = self._check_rates(rates)
        self._overrides = self._check_overrides(overrides)
        self._usd_factor = self._factor("USD", "the price map is in USD")
        self._override_factors = {
            price.currency: self._factor(price.currency, f"override {key!r} is priced in {price.currency}")
            for key, price in self._overrides.values()
        }
        self._price_map = self._check_price_map(price_map)
        self._map: _PriceMap | None = None
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
            code = _check_currency("rates", code)
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
            if price_map == "litellm" and _installed_litellm() is None:
                raise ConfigError(_NO_LITELLM)
            return price_map
        if not os.path.isfile(price_map):
            raise ConfigError(
                f"price_map: {price_map!r} is neither 'auto', 'bundled', 'litellm' nor an existing JSON file"
            )
        return os.path.abspath(price_map)

    # ---- the map

    def _loaded(self) -> _PriceMap:
        loaded = self._map
        if loaded is None:
            with self._lock:
                if self._map is None:
                    self._map = _load_map(self._price_map)
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
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[cache_key] = found
        return found

    def lookup(self, model: str, provider: str | None = None) -> ModelPrice | None:
        """The prices that apply to ``model`` served by ``provider``, or None if unknown (see :meth:`resolve`)."""
        return self.resolve(model, provider).price

    def _resolve(self, model: str, provider: str | None) -> Resolution:
        if not isinstance(model, str) or not model.strip():
            return Resolution(model if isinstance(model, str) else "", canonical_provider(provider),
                              None, "no model name")
        name = model.strip()
        routes = self._loaded().routes
        if canonical_provider(provider) is not None:
            routed, canonical = ledger_names(name, provider)
            name = routed if routed != name else model  # the caller's text unless a route came off
            how = "given as provider"
            route = str(provider)
        else:
            head, sep, tail = name.partition("/")
            if sep and tail and head.lower() in routes:
                canonical, name, route = canonical_provider(head), tail, head
                how = f"the route {head!r} leading the model name"
            else:
                canonical, route, how, name = None, None, "none given", model
        price = self._resolve_override(model, route) or self._resolve_map(model, route)
        if price is not None and canonical is None and price.provider:
            # A bare name: its entry says the provider, whose own key LiteLLM tries first.
            canonical = canonical_provider(price.provider)
            how = "from the entry the bare name matched"
            if not price.source.startswith("override:"):
                price = self._resolve_map(model, price.provider) or price
        return Resolution(name, canonical, price, how)

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
        guard = canonical if canonical in price_map.families else None
        for key in _keys_to_try(model, provider):
            entry = price_map.entries.get(key)
            if entry is None:
                continue
            provider_name = entry.get("litellm_provider")
            if guard and (not isinstance(provider_name, str) or canonical_provider(provider_name) != guard):
                continue
            return _entry_price(price_map.keys[key], entry, price_map.source, self.currency, self._usd_factor)
        return None

    def cost(
        self,
        *,
        model: str,
        provider: str | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
        at: datetime | None = None,
    ) -> PricedCost:
        """What one call cost, in the book's currency; ``status="unpriced"`` and ``cost=None`` if unknown.

        ``input_tokens`` is the whole prompt, cache read and write tokens included;
        ``output_tokens`` includes ``reasoning_tokens``. The cost is
        ``uncached_input * input + cache_read * cache_read_price + cache_write * cache_write_price
        + (output - reasoning) * output + reasoning * reasoning_price``, with the prices of the
        tier or ``above_<N>k`` level the prompt size selects. Missing cache prices are the
        input price and a missing reasoning price is the output price. ``at`` is when the call
        was made (default now); it matters only for models with off-peak rates.

        ``provider`` and ``model`` of the result are the names to store (see :meth:`resolve`).
        """
        found = self.resolve(model, provider)
        price = found.price
        if price is None:
            return PricedCost(None, self.currency, "unpriced", None, None, found.provider, found.model)
        amount = price.cost(
            input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens, at
        )
        if amount is None:
            return PricedCost(None, self.currency, "unpriced", None, price.model_key, found.provider, found.model)
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
