"""A record of a file to import, checked field by field and made a ledger row (or refused, saying why)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from .._events.event import CALL_TYPES, SOURCES, STATUSES, TOKEN_FIELDS, short_repr
from .._events.usage import MAX_TOKEN_COUNT
from .._storage.tables import EVENT_COLUMNS, MAX_ID, MAX_TEXT
from .transfer import COST_STATUSES, MAX_METADATA_DEPTH


class Invalid(Exception):
    """This line is not a valid event; the message says why."""


COLUMN_SET = frozenset(EVENT_COLUMNS)


def validated_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """One decoded line (JSON types) as a ledger row, or :class:`Invalid` saying why not.

    Missing or null values take the column's default; unknown keys are ignored; ``source``
    is kept when it is one llmtally writes, else ``"import"``.
    """
    cost = _amount(record, "cost")
    row = {
        "id": _text(record, "id", MAX_ID, required=True),
        "ts": _timestamp(record.get("ts")),
        "source": _source(record.get("source")),
        "provider": _text(record, "provider", MAX_TEXT),
        "model": _text(record, "model", MAX_TEXT, required=True),
        "resolved_model": _text(record, "resolved_model", MAX_TEXT),
        "call_type": _choice(record, "call_type", CALL_TYPES, "chat"),
        "streamed": _flag(record, "streamed"),
        "status": _choice(record, "status", STATUSES, "ok"),
        "error_type": _text(record, "error_type", MAX_TEXT),
        **{name: _count(record, name) for name in TOKEN_FIELDS},
        "cost": cost,
        "currency": _currency(record.get("currency")),
        "cost_status": _choice(record, "cost_status", COST_STATUSES,
                               "unpriced" if cost is None else "priced"),
        "price_source": _text(record, "price_source", MAX_TEXT),
        "latency_ms": _amount(record, "latency_ms"),
        "ttft_ms": _amount(record, "ttft_ms"),
        "project": _text(record, "project", MAX_TEXT),
        "user": _text(record, "user", MAX_TEXT),
        "session": _text(record, "session", MAX_ID),
        "tags": _tags(record.get("tags")),
        "request_id": _text(record, "request_id", MAX_ID),
        "metadata": _metadata(record.get("metadata")),
    }
    _check_whole(row)
    return row


def _source(value: Any) -> str:
    return value if isinstance(value, str) and value in SOURCES else "import"


def _check_whole(row: Mapping[str, Any]) -> None:
    if row["input_tokens"] < row["cache_read_tokens"] + row["cache_write_tokens"]:
        raise Invalid("input_tokens is less than cache_read_tokens + cache_write_tokens "
                       "(input includes the cached parts)")
    if row["output_tokens"] < row["reasoning_tokens"]:
        raise Invalid("output_tokens is less than reasoning_tokens (output includes reasoning)")
    if (row["cost"] is None) != (row["cost_status"] == "unpriced"):
        raise Invalid(f"cost {row['cost']!r} does not fit cost_status {row['cost_status']!r} "
                       "(only unpriced events have no cost)")


def short(value: Any) -> str:
    """A value as an import error shows it (40 characters at most)."""
    return short_repr(value, 40)


def _check_string(text: str, name: str) -> None:
    if text.isascii() and "\x00" not in text:
        return
    if "\x00" in text:
        raise Invalid(f"{name} contains a NUL character (PostgreSQL cannot store it)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid(f"{name} is not valid UTF-8 (a lone surrogate)") from None


def _text(record: Mapping[str, Any], name: str, limit: int, *, required: bool = False) -> str | None:
    value = record.get(name)
    if type(value) is str and 0 < len(value) <= limit and value.isascii() and "\x00" not in value:
        return value  # the usual case, checked at once
    if value is None or value == "":
        if required:
            raise Invalid(f"{name} is missing")
        return None
    if not isinstance(value, str):
        raise Invalid(f"{name}: {short(value)} is not text")
    if len(value) > limit:
        raise Invalid(f"{name} is {len(value):,} characters long (at most {limit})")
    _check_string(value, name)
    return value


def _timestamp(value: Any) -> datetime:
    if value is None or value == "":
        raise Invalid("ts is missing")
    if not isinstance(value, str) or len(value) > 40:
        raise Invalid(f"ts: {short(value)} is not an ISO 8601 time")
    try:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is not None:
            moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    except (ValueError, OverflowError):
        raise Invalid(f"ts: {short(value)} is not an ISO 8601 time") from None
    return moment


def _choice(record: Mapping[str, Any], name: str, allowed: frozenset[str], default: str) -> str:
    value = record.get(name)
    if value is None or value == "":
        return default
    if not isinstance(value, str) or value not in allowed:
        raise Invalid(f"{name}: {short(value)} is not one of {', '.join(sorted(allowed))}")
    return value


def _flag(record: Mapping[str, Any], name: str) -> bool:
    value = record.get(name)
    if value is None:
        return False
    if value is True or value is False:
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    raise Invalid(f"{name}: {short(value)} is not true or false")


def _count(record: Mapping[str, Any], name: str) -> int:
    value = record.get(name)
    if value is None:
        return 0
    if type(value) is not int or not 0 <= value <= MAX_TOKEN_COUNT:
        raise Invalid(f"{name}: {short(value)} is not a token count (0 to 10^12)")
    return value


def _amount(record: Mapping[str, Any], name: str) -> float | None:
    value = record.get(name)
    if value is None:
        return None
    if type(value) not in (int, float):
        raise Invalid(f"{name}: {short(value)} is not a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not (math.isfinite(number) and number >= 0):
        raise Invalid(f"{name}: {short(value)} is not a finite number >= 0")
    return number


_CURRENCY = re.compile(r"[A-Z]{3}")


def _currency(value: Any) -> str:
    if value is None or value == "":
        return "USD"
    if not isinstance(value, str) or not _CURRENCY.fullmatch(value):
        raise Invalid(f"currency: {short(value)} is not a 3-letter ISO 4217 code")
    return value


def _tags(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise Invalid(f"tags: {short(value)} is not a list")
    for tag in value:
        if not isinstance(tag, str) or not tag:
            raise Invalid(f"tags: {short(tag)} is not a tag (non-empty text)")
        if len(tag) > MAX_TEXT:
            raise Invalid(f"a tag is {len(tag):,} characters long (at most {MAX_TEXT})")
        _check_string(tag, "a tag")
    return value


def _metadata(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Invalid(f"metadata: {short(value)} is not a JSON object")
    _check_json(value, 1)
    return value


def _check_json(value: Any, depth: int) -> None:
    if depth > MAX_METADATA_DEPTH:
        raise Invalid(f"metadata is nested more than {MAX_METADATA_DEPTH} levels deep")
    if isinstance(value, str):
        _check_string(value, "metadata")
    elif isinstance(value, float) and not math.isfinite(value):
        # 1e999 parses as inf, which JSON cannot hold: PostgreSQL would refuse the whole import
        raise Invalid("metadata holds a number too large for JSON")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_string(key, "metadata")
            _check_json(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_json(item, depth + 1)
