"""The part of :class:`~llmtally.Tally` that reads its ledger back: summaries, unpriced
models, the HTML report. Each flushes first, so the Tally's own events are included."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from .._storage.store import Store
    from .queries import SummaryRow, UnpricedRow
    from .report import ReportSource

__all__ = ["Reading"]

# how long a read waits for this process's own events to be written first
FLUSH_BEFORE_READING_S = 10.0


class Reading:
    """Summaries and reports over a Tally's store (mixed into :class:`~llmtally.Tally`)."""

    store: Store

    if TYPE_CHECKING:
        def flush(self, timeout: float | None = None) -> bool: ...

        def now(self) -> datetime: ...

    def summary(self, since: str | datetime | None = None, until: str | datetime | None = None,
                by: str = "model", **filters: str) -> list[SummaryRow]:
        """Calls, tokens and cost per ``by`` value (model, provider, project, user, session,
        source, status, call_type or day) between ``since`` and ``until`` ("7d", "24h",
        "2026-11-01", a datetime). Flushes first, so this Tally's own events are included."""
        from .queries import summarize

        self.flush(FLUSH_BEFORE_READING_S)
        now = self.now()
        with self.store.connect() as conn:
            return summarize(conn, since=since, until=until, by=by, now=now, filters=filters)

    def unpriced(self, since: str | datetime | None = None) -> list[UnpricedRow]:
        """Models seen with no known price: add them to ``prices`` to have them priced."""
        from .queries import unpriced_models

        self.flush(FLUSH_BEFORE_READING_S)
        with self.store.connect() as conn:
            return unpriced_models(conn, since=since, now=self.now())

    def report(self, path: str | os.PathLike[str] | None = None, *, week: str | None = None,
               since: str | datetime | None = None, until: str | datetime | None = None,
               project: str | None = None) -> Path:
        """Write the HTML usage report and return its path.

        ``week="last"`` (the default), ``"this"`` or an ISO week (``"2026-W47"``), in this
        Tally's time zone; or ``since``/``until`` ("7d", "2026-11-01", a datetime). ``path`` is
        a file, or a directory (existing, or ending with ``/``; default ``reports/``) to hold
        ``llmtally-2026-W47.html``. The file is self-contained (inline CSS and SVG, no script,
        no URL) and written atomically. Flushes first, so this Tally's own events are in it.

        >>> tally.report("reports/", week="last")
        PosixPath('reports/llmtally-2026-W47.html')
        """
        from .render import write_report

        return write_report(cast("ReportSource", self), path, week=week, since=since, until=until,
                            project=project).path
