"""Caller-side cleaning of an event's metadata: whatever the caller passes becomes plain JSON.

Runs in ``record()`` before the event is queued, so no value can reach the writer thread that
it cannot serialise: cycles and nesting deeper than ``MAX_DEPTH`` are cut, anything that is
not a JSON type becomes its ``str()`` (or a placeholder when even that raises), and a
structure of more than ``MAX_NODES`` values is dropped. Each cut is noted. The common case, a
small flat dict of strings and numbers, is checked in one pass and returned as it is.
(Lengths, NUL characters and lone surrogates are the writer's business: ``json_safe`` in
``_storage/writer_rows.py``.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["clean_metadata", "safe_str", "MAX_DEPTH", "MAX_NODES"]

MAX_DEPTH = 32
"""Deepest nesting of dicts and lists kept in metadata; deeper values are replaced by a note."""
MAX_NODES = 32_768
"""Most values (at every level) kept in one event's metadata; more and it is all dropped (as
JSON they would pass the writer's 64 KiB limit anyway: each takes at least 2 characters)."""

_PLAIN = frozenset({str, int, float, bool, type(None)})


class _TooBig(Exception):
    pass


def clean_metadata(meta: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """``meta`` made of plain JSON types only (a new dict, unless it was plain already);
    what was changed is appended to ``notes``."""
    for key, value in meta.items():
        if type(key) is not str or type(value) not in _PLAIN:
            break
    else:
        return meta
    counter, noted = [0], len(notes)
    try:
        cleaned = _clean(meta, notes, depth=0, ancestors=set(), counter=counter)
    except _TooBig:
        del notes[noted:]  # notes about parts that are dropped anyway
        notes.append(f"metadata held more than {MAX_NODES} values; dropped")
        return {"llmtally_metadata_dropped": f"more than {MAX_NODES} values"}
    except Exception as exc:  # a container that cannot even be iterated
        notes.append(f"metadata could not be read ({safe_str(exc)}); dropped")
        return {}
    return cleaned if isinstance(cleaned, dict) else {"value": cleaned}


def _clean(value: Any, notes: list[str], *, depth: int, ancestors: set[int],
           counter: list[int]) -> Any:
    counter[0] += 1
    if counter[0] > MAX_NODES:
        raise _TooBig
    kind = type(value)
    if kind in _PLAIN:
        return value
    if isinstance(value, str):  # subclasses: their text, as json.dumps would store it
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__index__(value)
    if isinstance(value, float):
        return float.__float__(value)
    is_mapping = isinstance(value, Mapping)
    if not (is_mapping or isinstance(value, (list, tuple))):
        return _text_of(value, notes)
    if id(value) in ancestors:
        _note(notes, "metadata refers to itself; the loop was cut")
        return "<cycle>"
    if depth >= MAX_DEPTH:
        _note(notes, f"metadata nested deeper than {MAX_DEPTH} levels was cut")
        return f"<nested deeper than {MAX_DEPTH}>"
    ancestors.add(id(value))
    try:
        if is_mapping:
            return {(key if type(key) is str else _text_of(key, notes)):
                    _clean(item, notes, depth=depth + 1, ancestors=ancestors, counter=counter)
                    for key, item in value.items()}
        return [_clean(item, notes, depth=depth + 1, ancestors=ancestors, counter=counter)
                for item in value]
    except _TooBig:
        raise
    except Exception:  # a container whose iteration raises
        return _text_of(value, notes)
    finally:
        ancestors.discard(id(value))


def _note(notes: list[str], text: str) -> None:
    if text not in notes:  # one note per kind, however often it happened
        notes.append(text)


def safe_str(value: Any) -> str:
    """``str(value)``, else its ``repr()``, else a placeholder naming its type: never raises."""
    for convert in (str, repr):
        try:
            text = convert(value)
            if type(text) is str:
                return text
        except Exception:  # noqa: S112 - a hostile __str__ must not cost the event
            continue
    return f"<unprintable {type(value).__name__}>"


def _text_of(value: Any, notes: list[str]) -> str:
    text = safe_str(value)
    if text.startswith("<unprintable "):
        _note(notes, f"a metadata value of type {type(value).__name__} could not be turned "
              "into text")
    return text
