"""MkDocs hook: docstrings written with Sphinx roles (:meth:`flush`, :class:`Budget`) read as
plain code on the API page instead of showing the role's name."""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(meth|func|class|attr|mod|exc|data|obj):(<code>[^<]*</code>)")


def _plain(match: re.Match[str]) -> str:
    role, code = match.groups()
    if role in ("meth", "func"):
        return code.replace("</code>", "()</code>")
    return code


def on_page_content(html: str, **_: Any) -> str:
    return _ROLE.sub(_plain, html)
