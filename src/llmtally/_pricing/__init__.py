"""Prices: the price map, overrides, provider and model names, the cost of a call."""
