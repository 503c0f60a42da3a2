"""What an alert says, for every sink: a title, a few lines, and the same as data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["AlertMessage"]


@dataclass(frozen=True, slots=True)
class AlertMessage:
    """One alert: what, where, how bad, since when (in ``title`` and ``lines``); ``data`` is
    what a JSON webhook or a callable receives."""

    severity: str               # warning or critical
    title: str                  # one line
    lines: tuple[str, ...]      # a few short lines
    data: dict[str, Any] = field(default_factory=dict)
    link: str | None = None     # the dashboard or report, when configured

    @property
    def text(self) -> str:
        return "\n".join((self.title, *self.lines, *((self.link,) if self.link else ())))
