"""Money, counts, percentages and durations as the report and the CLI show them."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

__all__ = ["format_money"]

_TEXT_CUT = 120


_SYMBOLS = {
    "USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥", "CNY": "¥", "INR": "₹", "KRW": "₩",
    "RUB": "₽", "TRY": "₺", "UAH": "₴", "ILS": "₪", "VND": "₫", "NGN": "₦", "PHP": "₱",
    "THB": "฿", "BRL": "R$", "CAD": "CA$", "AUD": "A$", "NZD": "NZ$", "HKD": "HK$",
    "SGD": "S$", "MXN": "MX$", "TWD": "NT$",
}


_NO_DECIMALS = frozenset({"JPY", "KRW", "VND", "CLP", "ISK", "UGX", "PYG", "XOF", "XAF"})


_MINUS = "\u2212"


def format_money(amount: float, currency: str, *, signed: bool = False) -> str:
    """``$1,234.56``, ``€0.0042``, ``¥1,235``; the ISO code where there is no common symbol
    (``1,234.56 CHF``). Amounts too small for the currency's decimals keep two significant
    digits rather than showing as 0."""
    decimals = 0 if currency in _NO_DECIMALS else 2
    value = abs(amount)
    if value and value < 0.5 * 10 ** -decimals:
        decimals = max(decimals, 1 - math.floor(math.log10(value)))
    text = f"{value:,.{decimals}f}"
    sign = _MINUS if amount < 0 and float(text.replace(",", "")) else "+" if signed else ""
    symbol = _SYMBOLS.get(currency)
    return f"{sign}{symbol}{text}" if symbol else f"{sign}{text} {currency}"


def number(value: float) -> str:
    return f"{value:,.0f}"


def percent(value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return "–"
    text = f"{abs(value):.1f}%"
    if value < 0 and text != "0.0%":
        return _MINUS + text
    return ("+" if signed else "") + text


def duration(ms: float | None) -> str:
    if ms is None:
        return "–"
    if ms < 1000:
        return f"{ms:.0f} ms"
    return f"{ms / 1000:.2f} s" if ms < 10_000 else f"{ms / 1000:.1f} s"


def cut(text: Any, limit: int = _TEXT_CUT) -> str:
    value = "" if text is None else str(text)
    return value if len(value) <= limit else value[:limit - 1] + "…"
