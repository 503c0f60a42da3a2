"""A model's per-token rates from a price-map entry, with tiers above a context size, and the cost
of one call's usage."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .offpeak import OffPeak

__all__ = ["ModelPrice"]

PRICE_FIELDS = (
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "cache_creation_input_token_cost",
    "output_cost_per_reasoning_token",
)


ABOVE_KEY = re.compile(r"^(" + "|".join(PRICE_FIELDS) + r")_above_(\d+(?:\.\d+)?)(k?)_tokens$")


# Fireworks bills cached prompt tokens of serverless models at 50 % of the input price unless
# the model says otherwise (docs.fireworks.ai, "Is prompt caching billed differently for
# serverless models?"); the map carries no cache price for them. LiteLLM applies the same rule.
FIREWORKS_CACHE_READ_RATIO = 0.5


# Token counts beyond this are clamped (so int -> float never overflows); no call is that big.
_MAX_TOKENS = 2**53


def default_cache_read(rates: list[float | None], ratio: float | None) -> None:
    """A provider's rule for a missing cache-read price (Fireworks: half the input price)."""
    if rates[2] is None and rates[0] is not None and ratio is not None:
        rates[2] = rates[0] * ratio


# Per-token rates for one price level: (input, output, cache_read, cache_write, reasoning).
# None means "not set at this level" (or, for input/output, no price at all).
Rates = tuple[float | None, float | None, float | None, float | None, float | None]


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
    above: tuple[tuple[float, Rates], ...] = ()
    tiers: tuple[tuple[float, float, Rates], ...] = ()
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    off_peak: OffPeak | None = None
    _flat: Rates = field(init=False, repr=False, compare=False)
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

    def rates(self, input_tokens: int) -> Rates:
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


    def _off_peak_rates(self, standard: Rates) -> Rates:
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


def _select_tier(tiers: tuple[tuple[float, float, Rates], ...], input_tokens: int) -> Rates:
    """LiteLLM's rule: the tier with ``low < input_tokens <= high``; else the first or the last one."""
    for low, high, rates in tiers:
        if low < input_tokens <= high:
            return rates
    return tiers[0][2] if input_tokens <= tiers[0][0] else tiers[-1][2]


def number(value: Any) -> float | None:
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
