"""Rows as the writer hands them on: storable in any database, and what can be kept of a row
that cannot be stored (for the rejected file). Nothing a row holds can make these raise."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from .._events.metadata import clean_metadata, safe_str
from .spill import encode_event

__all__ = ["json_safe", "salvaged", "first_line", "MAX_METADATA_TEXT", "MAX_METADATA_JSON"]

MAX_METADATA_TEXT = 1024  # characters in one metadata string (key or value)
MAX_METADATA_JSON = 65_536  # characters of one event's metadata as JSON
_SURROGATE = re.compile(r"\\ud[89a-f][0-9a-f]{2}", re.IGNORECASE)


def _bounded_metadata(meta: Any) -> dict[str, Any]:
    notes: list[str] = []
    cleaned = _clean_tree(meta, notes)
    if not isinstance(cleaned, dict):
        cleaned = {"value": cleaned}
    size = len(json.dumps(cleaned))
    if size > MAX_METADATA_JSON:
        cleaned = {"llmtally_metadata_dropped": size}
        notes = [f"metadata was {size} characters of JSON; dropped (limit {MAX_METADATA_JSON})"]
    if notes:
        cleaned["llmtally_warnings"] = [*(cleaned.get("llmtally_warnings") or []), *notes][:20]
    return cleaned


def _clean_tree(value: Any, notes: list[str]) -> Any:
    if isinstance(value, str):
        return _clean_string(value, notes)
    if isinstance(value, list):
        return [_clean_tree(item, notes) for item in value]
    if isinstance(value, dict):
        return {_clean_string(key, notes): _clean_tree(item, notes) for key, item in value.items()}
    return value


def _clean_string(text: str, notes: list[str]) -> str:
    if "\x00" in text:
        text = text.replace("\x00", "")
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")  # a lone surrogate becomes "?"
    if len(text) > MAX_METADATA_TEXT:
        notes.append(f"a metadata text of {len(text)} characters was cut to {MAX_METADATA_TEXT}")
        text = text[:MAX_METADATA_TEXT]
    return text


def salvaged(row: Any, error: BaseException) -> dict[str, Any]:
    """What can be kept of a row that cannot be stored, as something that can always be
    written as a JSON line: the row as it would be stored if possible, else field by field
    (metadata cleaned as record() cleans it, other odd values as text). The error is noted."""
    note = f"rejected: {type(error).__name__}: {first_line(error)[:300]}"
    try:
        out = json_safe(row)
        encode_event(out)
    except Exception:
        out = {}
        for key, value in (row.items() if isinstance(row, Mapping) else [("id", None)]):
            key = key if isinstance(key, str) else safe_str(key)
            if key == "metadata" and isinstance(value, Mapping):
                notes: list[str] = []
                value = clean_metadata(value if isinstance(value, dict) else dict(value), notes)
                if notes:
                    value["llmtally_warnings"] = notes
            try:
                encode_event({key: value})
            except Exception:
                value = safe_str(value)
            out[key] = value
    meta = out.get("metadata")
    if meta is None:  # a row with none
        meta = out["metadata"] = {}
    if isinstance(meta, dict):
        warnings = meta.get("llmtally_warnings")
        meta["llmtally_warnings"] = [*(warnings if isinstance(warnings, list) else []), note]
    else:
        out["llmtally_rejected"] = note
    return out


def first_line(exc: BaseException) -> str:
    text = safe_str(exc).strip()
    return text.splitlines()[0] if text else ""


def json_safe(row: Mapping[str, Any]) -> dict[str, Any]:
    """Make metadata storable in any database: JSON types only, no NaN (PostgreSQL's JSON
    refuses it), no NUL character (PostgreSQL refuses it in text and JSON), no lone surrogate
    (invalid UTF-8: no driver can send it), every string at most ``MAX_METADATA_TEXT``
    characters and the whole at most ``MAX_METADATA_JSON``; a cut is noted in the metadata."""
    out = dict(row)
    meta = out.get("metadata")
    if meta:
        text = json.dumps(meta, default=str, allow_nan=True)  # ASCII: odd characters escaped
        if len(text) > MAX_METADATA_TEXT or "\\u0000" in text or _SURROGATE.search(text):
            out["metadata"] = _bounded_metadata(json.loads(text, parse_constant=lambda _: None))
        else:
            out["metadata"] = json.loads(text, parse_constant=lambda _: None)
    for key in ("cost", "latency_ms", "ttft_ms"):
        value = out.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = None
    return out
