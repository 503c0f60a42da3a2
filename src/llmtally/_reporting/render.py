"""The report as a self-contained HTML file (Jinja2, autoescaped, no script, no URL), written atomically."""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import ConfigError
from .._i18n import N_, WORDS, catalog, strftime
from .._storage.files import create_beside
from .._storage.sketch import RELATIVE_ERROR
from .figures import Report, rate
from .numbers import cut, duration, number, percent
from .report import DEFAULT_REPORT_DIR, DEFAULT_TOP, ReportSource, build_report

if TYPE_CHECKING:
    from jinja2 import Environment

__all__ = ["ReportFile", "render_html", "write_report", "report_path", "price_key", "toml_key"]

@functools.lru_cache(maxsize=None)
def _environment(language: str = "en") -> Environment:
    """One environment per process and language: it caches the compiled templates (a page
    then costs the rendering, not the parsing: ~100 ms less a dashboard page), and its
    ``{% trans %}`` / ``_()`` text comes from that language's catalog (_i18n.py)."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=PackageLoader("llmtally", "templates"),
        autoescape=select_autoescape(("html", "j2"), default=True, default_for_string=True),
        undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        extensions=["jinja2.ext.i18n"],
    )
    # newstyle: Jinja2 fills a translation's %(name)s fields itself and escapes their values
    env.install_gettext_translations(catalog(language), newstyle=True)  # type: ignore[attr-defined]
    env.policies["ext.i18n.trimmed"] = True
    env.filters.update(number=number, percent=percent, duration=duration, cut=cut,
                       json_text=_json_text, css_number=_css_number, word=_word(language))
    return env


def _word(language: str) -> Callable[[Any], str]:
    """The ``word`` filter: a status, state or level read from the ledger, in the page's
    language when it is one of llmtally's words, else as it is. Never ``_()`` for data:
    Jinja2 marks what ``_()`` returns as safe HTML and formats it with ``%``."""
    gettext = catalog(language).gettext
    known = frozenset(WORDS)

    def word(value: Any) -> str:
        text = str(value)
        return gettext(text) if text in known else text

    return word


def _json_text(value: Any) -> str:
    """Metadata as compact JSON text (escaped by the template like any other text)."""
    return cut(json.dumps(value, ensure_ascii=False, sort_keys=True, default=str), 160)


def _css_number(value: float) -> str:
    """A number safe inside a style attribute: finite, plain digits."""
    number = float(value)
    if not math.isfinite(number):
        number = 0.0
    return f"{max(0.0, min(number, 100.0)):.2f}"


def render_html(report: Report, template_name: str = "report.html.j2", **extra: Any) -> str:
    """The report as one self-contained HTML document (or, with ``template_name``, a page
    built on it, such as the dashboard, given ``extra`` values)."""
    language = report.language
    template = _environment(language).get_template(template_name)
    return template.render(
        **extra, r=report, money=report.money, rate=rate, local=lambda m: f"{m:%Y-%m-%d %H:%M}",
        when=lambda naive: strftime(naive.replace(tzinfo=timezone.utc).astimezone(report.period.tz),
                                    N_("%a %d %b %H:%M"), language),
        price_key=price_key, toml_key=toml_key, percentile_error=RELATIVE_ERROR)


def price_key(provider: str | None, model: str) -> str:
    if provider and not model.startswith(provider + "/"):
        return f"{provider}/{model}"
    return model


def toml_key(key: str) -> str:
    return json.dumps(key, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class ReportFile:
    """A written report: where it is, and the figures it shows."""

    path: Path
    report: Report


def report_path(path: str | os.PathLike[str] | None, report: Report) -> Path:
    """The file to write: ``path`` itself, or ``llmtally-<period>.html`` inside it when it is
    a directory (an existing one, or a name ending with ``/``); default ``reports/``."""
    name = f"llmtally-{report.period.slug}"
    if report.project:
        name += "-" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", report.project).strip("._") or "project")
    name += ".html"
    if path is None:
        return Path(DEFAULT_REPORT_DIR) / name
    text = os.fspath(path)
    if not text:
        raise ConfigError("the report path is empty; give a file name or a directory")
    target = Path(text).expanduser()
    if text.endswith(("/", os.sep)) or target.is_dir():
        return target / name
    return target


def write_report(tally: ReportSource, path: str | os.PathLike[str] | None = None, *,
                 week: str | None = None, since: Any = None, until: Any = None,
                 project: str | None = None, top: int = DEFAULT_TOP) -> ReportFile:
    """Build, render and atomically write the report; see :meth:`Tally.report`."""
    report = build_report(tally, week=week, since=since, until=until, project=project, top=top)
    target = report_path(path, report)
    _write_atomically(target, render_html(report).encode("utf-8"))
    return ReportFile(path=target, report=report)


def _write_atomically(target: Path, content: bytes) -> None:
    """A temporary file beside ``target``, flushed to disk, then renamed over it: readers see
    the old file or the new one, never half of one."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = create_beside(target, ".tmp")
    except OSError as exc:
        raise ConfigError(f"cannot write the report to {target} ({exc.strerror or exc}); "
                          "choose a writable file or directory") from exc
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException as exc:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise ConfigError(f"cannot write the report to {target} ({exc.strerror or exc}); "
                              "choose a writable file or directory") from exc
        raise
