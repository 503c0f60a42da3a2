"""A price as configured (:class:`Price`) and a priced call (:class:`PricedCost`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from llmtally._errors import ConfigError

__all__ = ["CURRENCIES", "DEFAULT_CURRENCY", "Price", "PricedCost"]

DEFAULT_CURRENCY = "USD"


PER_DIVISOR = {"1M": 1_000_000.0, "1K": 1_000.0, "token": 1.0}


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


def _check_amount(owner: str, name: str, value: Any, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{owner}.{name}: {value!r} is not a number; give a price as an int or float >= 0")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{owner}.{name}: {value!r} is not allowed; a price must be a finite number >= 0")


def check_currency(where: str, code: Any) -> str:
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
        if self.per not in PER_DIVISOR:
            raise ConfigError(
                f"Price.per: {self.per!r} is not allowed; use one of {', '.join(map(repr, PER_DIVISOR))}"
            )
        object.__setattr__(self, "currency", check_currency("Price.currency", self.currency))


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
