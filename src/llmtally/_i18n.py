"""The languages llmtally's human text is in: English (the source), Chinese and Korean.

Message catalogs the standard way: ``locale/<language>/LC_MESSAGES/llmtally.po`` (edited by
translators; ``pybabel extract`` / ``update`` keep them in step with the code, see
docs/alerts.md) compiled to ``llmtally.mo`` (``pybabel compile``; a test checks each ``.mo``
equals a fresh compile of its ``.po``). Another language is one more ``.po`` file and its
``.mo``, and its code in :data:`LANGUAGES`."""

from __future__ import annotations

import functools
import gettext
from collections.abc import Callable
from pathlib import Path

from ._errors import ConfigError

__all__ = ["LANGUAGES", "translator", "check_language", "LOCALE_DIR", "DOMAIN", "N_"]

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
def translator(language: str = "en") -> Callable[[str], str]:
    """``gettext`` for ``language`` (English text for a message not translated)."""
    if language == "en":
        return lambda message: message
    found = gettext.translation(DOMAIN, LOCALE_DIR, languages=[language], fallback=True)
    return found.gettext
