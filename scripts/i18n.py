"""Keep the message catalogs in step with the code: ``python scripts/i18n.py`` extracts every
marked message (``_()``, ``gettext()``, ``N_()``, and ``{% trans %}`` / ``_()`` in the Jinja2
templates) from ``src/llmtally`` into each language's
``.po`` (new messages untranslated, removed ones dropped) and compiles each ``.po`` to its ``.mo``.
Babel's own ``pybabel extract`` skips packages whose names start with ``_``; this does not.
Translators edit ``src/llmtally/locale/<language>/LC_MESSAGES/llmtally.po``, then run this."""

from __future__ import annotations

import io
import sys
from datetime import datetime, timezone
from pathlib import Path

from babel.messages.catalog import Catalog
from babel.messages.extract import DEFAULT_KEYWORDS, extract_from_dir
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po, write_po

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src" / "llmtally"
LOCALE = SOURCE / "locale"
LANGUAGES = ("zh", "ko")


def template() -> Catalog:
    """Every marked message of the code, as a catalog."""
    keywords = {**DEFAULT_KEYWORDS, "N_": None}
    catalog = Catalog(project="llmtally", charset="utf-8")
    # the templates as the report renders them (_reporting/render.py): trimmed {% trans %}
    method_map = [("**.py", "python"), ("templates/**.j2", "jinja2.ext:babel_extract")]
    options_map = {"templates/**.j2": {"extensions": "jinja2.ext.i18n", "trimmed": "true",
                                       "trim_blocks": "true", "lstrip_blocks": "true"}}
    for filename, lineno, message, comments, context in extract_from_dir(
            str(SOURCE), method_map=method_map, options_map=options_map, keywords=keywords,
            directory_filter=lambda path: "__pycache__" not in path):
        catalog.add(message, None, [(f"{filename}", lineno)], auto_comments=comments,
                    context=context)
    return catalog


def compiled(po_path: Path) -> bytes:
    """The ``.mo`` bytes of a ``.po`` file."""
    with open(po_path, "rb") as handle:
        catalog = read_po(handle)
    buffer = io.BytesIO()
    write_mo(buffer, catalog, use_fuzzy=False)
    return buffer.getvalue()


def _steady_header(catalog: Catalog, language: str) -> None:
    """The same header on every run, so a catalog changes only when its messages do."""
    catalog.creation_date = catalog.revision_date = datetime(2026, 12, 1, tzinfo=timezone.utc)
    catalog.last_translator = "llmtally developers"
    catalog.language_team = "llmtally developers"
    catalog.msgid_bugs_address = ""
    catalog.copyright_holder = "llmtally developers"
    catalog.version = "0.1"
    catalog.fuzzy = False


def main() -> None:
    fresh = template()
    for language in LANGUAGES:
        folder = LOCALE / language / "LC_MESSAGES"
        folder.mkdir(parents=True, exist_ok=True)
        po_path = folder / "llmtally.po"
        if po_path.exists():
            with open(po_path, "rb") as handle:
                catalog = read_po(handle, locale=language)
            catalog.update(fresh, no_fuzzy_matching=True)
            catalog.obsolete.clear()
        else:
            catalog = Catalog(locale=language, project="llmtally", charset="utf-8")
            catalog.update(fresh, no_fuzzy_matching=True)
        _steady_header(catalog, language)
        with open(po_path, "wb") as handle:
            write_po(handle, catalog, omit_header=False, no_location=True, sort_output=True,
                     width=100)
        (folder / "llmtally.mo").write_bytes(compiled(po_path))
        missing = [m.id for m in catalog if m.id and not m.string]
        print(f"{language}: {len(catalog)} messages, {len(missing)} untranslated", file=sys.stderr)


if __name__ == "__main__":
    main()
