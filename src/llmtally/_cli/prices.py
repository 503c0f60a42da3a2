"""``llmtally prices MODEL``: the price llmtally uses for a model, and why."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from .._i18n import display_width, pad, translator
from .._terminal import CommandError, echo

__all__ = ["prices"]


@click.command()
@click.argument("model")
@click.option("--provider", default=None, help="Provider, if MODEL has no provider/ prefix.")
@click.option("--price-map", default=None, help="auto | bundled | litellm | path to a price JSON.")
@click.option("--config", "config_path", metavar="FILE", type=click.Path(dir_okay=False),
              help="llmtally.toml with price overrides.")
def prices(model: str, provider: str | None, price_map: str | None, config_path: str | None) -> None:
    """Show the price llmtally uses for MODEL (per million tokens).

    \b
    Example:
      llmtally prices gpt-4o-mini
      llmtally prices qwen-plus --provider dashscope
    """
    from .._config import read_settings
    from .._pricing.book import PriceBook

    settings = read_settings(config_path)
    book = PriceBook(settings.prices or None, currency=settings.currency,
                     rates=settings.rates or None, price_map=price_map or settings.price_map)
    found = book.resolve(model, provider)
    _ = translator(settings.language)
    stored = _("model {model}, provider {provider}").format(
        model=found.model, provider=found.provider or "-") + (
        f" ({found.explained(_)})" if found.provider else "")
    if found.price is None:
        raise CommandError(
            f"no price known for {model!r}" + (f" (provider {provider!r})" if provider else "")
            + f" in {book.map_source}{_other_providers_entry(book, found)}. Add one to llmtally.toml: "
            f"[prices.\"{model}\"] input = ..., output = ... (per 1M tokens)")
    echo(_describe_price(model, found.price, stored, _))


def _other_providers_entry(book: Any, found: Any) -> str:
    """Why a name the map knows is unpriced: its entry belongs to another provider."""
    if found.provider is None:
        return ""
    other = book.lookup(found.model)
    if other is None or other.provider is None:
        return ""
    return (f"; its entry {other.model_key!r} is {other.provider}'s, and a name is never priced "
            f"from another provider's entry (provider here: {found.provider})")


def _describe_price(model: str, price: Any, stored: str, _: Callable[[str], str]) -> str:
    def per_million(value: float | None) -> str:
        return "-" if value is None else f"{value * 1_000_000:.4f}"

    lines = [
        (_("model:"), model),
        (_("stored as:"), stored),
        (_("matched:"), _("{key}  (provider {provider}, mode {mode})").format(
            key=price.model_key, provider=price.provider or "-", mode=price.mode or "-")),
        (_("source:"), price.source),
        (_("currency:"), _("{currency} per 1M tokens").format(currency=price.currency)),
        (_("input:"), per_million(price.input)),
        (_("output:"), per_million(price.output)),
        (_("cache read:"), per_million(price.cache_read)),
        (_("cache write:"), per_million(price.cache_write)),
        (_("reasoning:"), per_million(price.reasoning)),
    ]
    if price.above or price.tiers:
        sizes = [above for above, _rates in price.above] or [low for low, _h, _r in price.tiers[1:]]
        lines.append((_("larger:"), _("other rates above {sizes} prompt tokens").format(
            sizes=", ".join(f"{int(size):,}" for size in sizes))))
    if price.off_peak is not None:
        peak = price.off_peak.rates
        lines.append((_("off-peak:"), _(
            "input {input}, output {output}, cache read {cache_read} in the provider's discount "
            "hours (each call is priced at its own time)").format(
            input=per_million(peak[0]), output=per_million(peak[1]),
            cache_read=per_million(peak[2]))))
    if getattr(price, "max_output_tokens", None):
        lines.append((_("max output:"), _("{count} tokens").format(count=price.max_output_tokens)))
    width = max(display_width(label) for label, _value in lines) + 1
    return "\n".join(pad(label, max(width, 14)) + value for label, value in lines)
