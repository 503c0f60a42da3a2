"""The languages llmtally's human text is in: English (the source), Chinese and Korean.

Message catalogs the standard way: ``locale/<language>/LC_MESSAGES/llmtally.po`` (edited by
translators; ``python scripts/i18n.py`` extracts the messages marked in the code and the
templates with Babel, updates each ``.po`` and compiles it to ``llmtally.mo``; a test checks
each ``.mo`` equals a fresh compile of its ``.po``; see docs/languages.md). Another language
is one more ``.po`` file and its ``.mo``, and its code in :data:`LANGUAGES`."""

from __future__ import annotations

import functools
import gettext
import unicodedata
from collections.abc import Callable
from datetime import date
from pathlib import Path

from ._errors import ConfigError

__all__ = ["LANGUAGES", "translator", "catalog", "check_language", "strftime", "display_width",
           "pad", "LOCALE_DIR", "DOMAIN", "N_"]

LANGUAGES = {"en": "English", "zh": "中文 (简体)", "ko": "한국어"}
LOCALE_DIR = Path(__file__).parent / "locale"
DOMAIN = "llmtally"


def N_(message: str) -> str:  # noqa: N802 - gettext's name
    """Marks ``message`` for the catalogs (``pybabel extract``) where it is written; it is
    translated where it is shown."""
    return message


def check_language(value: str) -> str:
    code = value.strip().lower().replace("_", "-")
    code = {"zh-cn": "zh", "zh-hans": "zh", "ko-kr": "ko", "en-us": "en", "en-gb": "en"}.get(code, code)
    if code not in LANGUAGES:
        raise ConfigError(f"language={value!r}: use one of {', '.join(LANGUAGES)}")
    return code


@functools.lru_cache(maxsize=None)
def catalog(language: str = "en") -> gettext.NullTranslations:
    """The message catalog of ``language`` (English, the source text, when it has none)."""
    if language == "en":
        return gettext.NullTranslations()
    return gettext.translation(DOMAIN, LOCALE_DIR, languages=[language], fallback=True)


def translator(language: str = "en") -> Callable[[str], str]:
    """``gettext`` for ``language`` (English text for a message not translated)."""
    return catalog(language).gettext


# Words stored in the ledger or computed, shown translated (``_(word)`` where shown): call
# statuses, provider states (_reporting/health.py), budget levels (_budgets/states.py) and
# alert severities.
WORDS = (N_("ok"), N_("error"), N_("blocked"), N_("degraded"), N_("down"), N_("idle"),
         N_("normal"), N_("warning"), N_("critical"), N_("exceeded"))

# Day and month names for %a and %b, translated like any message: strftime's own names follow
# the C library's locale, which a library must not change (it is process-wide).
WEEKDAYS = (N_("Mon"), N_("Tue"), N_("Wed"), N_("Thu"), N_("Fri"), N_("Sat"), N_("Sun"))
MONTHS = (N_("Jan"), N_("Feb"), N_("Mar"), N_("Apr"), N_("May"), N_("Jun"), N_("Jul"),
          N_("Aug"), N_("Sep"), N_("Oct"), N_("Nov"), N_("Dec"))


def strftime(moment: date, pattern: str, language: str = "en") -> str:
    """``moment`` formatted by ``pattern`` as translated into ``language`` (a catalog gives
    each pattern its own order, e.g. ``"%a %d %b"`` becomes ``"%b%d日 %a"`` in Chinese), with
    ``%a`` and ``%b`` in that language and ``%-d`` the day without a leading zero (as C's
    strftime has it on some platforms only). ``pattern`` must be marked with :func:`N_` where
    it is written."""
    _ = translator(language)
    text = _(pattern).replace("%-d", str(moment.day))
    if "%a" in text:
        text = text.replace("%a", _(WEEKDAYS[moment.weekday()]).replace("%", "%%"))
    if "%b" in text:
        text = text.replace("%b", _(MONTHS[moment.month - 1]).replace("%", "%%"))
    return moment.strftime(text)


def display_width(text: str) -> int:
    """Columns ``text`` takes in a terminal: two for a wide character (Chinese, Korean,
    Japanese, full-width forms), none for a combining mark, one for the rest."""
    width = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


def pad(text: str, width: int, *, right: bool = False) -> str:
    """``text`` padded with spaces to ``width`` columns (on the left when ``right``)."""
    fill = " " * max(0, width - display_width(text))
    return fill + text if right else text + fill
