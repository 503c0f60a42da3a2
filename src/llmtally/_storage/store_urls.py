"""What users type as ``database_url``, made into the URL the store opens."""

from __future__ import annotations

from pathlib import Path

from .._errors import ConfigError

__all__ = ["normalize_url", "DEFAULT_DATABASE_URL"]

DEFAULT_DATABASE_URL = "sqlite:///llmtally.db"


def normalize_url(url: str) -> str:
    """Accept what users type: a file path, ``sqlite:///...``, ``postgres://`` or ``postgresql://``."""
    url = url.strip()
    if not url:
        raise ConfigError("database_url is empty: give a path such as 'llmtally.db' or a URL such "
                          "as 'postgresql+psycopg://user@host/db'")
    if "://" not in url:
        return "sqlite:///" + str(Path(url).expanduser().absolute())
    scheme, rest = url.split("://", 1)
    if scheme in ("postgres", "postgresql"):
        return "postgresql+psycopg://" + rest
    if scheme == "sqlite" and rest.startswith("/") and rest[1:] not in ("", ":memory:"):
        path, query = (rest[1:].split("?", 1) + [""])[:2]
        # Absolute, so a later chdir cannot move the ledger (or its spill file).
        absolute = str(Path(path).expanduser().absolute())
        return f"sqlite:///{absolute}" + (f"?{query}" if query else "")
    return url
