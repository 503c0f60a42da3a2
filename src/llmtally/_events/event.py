"""One LLM call as a typed value, and the one function that turns it into a ledger row.

Every path that records a call builds a :class:`CallEvent`: :meth:`Tally.record`, ``@track``,
the LiteLLM and LangChain adapters, the sample generator. :func:`event_row` cleans it (odd
values are recorded as well as they can be, with a note in ``metadata["llmtally_warnings"]``),
prices it and fills the attribution in force; the writer stores the row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, NamedTuple

from . import scope as _scope
from .metadata import clean_metadata
from .usage import MAX_TOKEN_COUNT, TOKEN_FIELDS, Usage, coerce_count

if TYPE_CHECKING:
    from .._pricing.book import PriceBook

__all__ = ["CallEvent", "event_row", "STATUSES", "CALL_TYPES", "SOURCES", "TOKEN_FIELDS",
           "NO_USAGE", "as_utc_naive", "clean_id", "short_repr"]

STATUSES = frozenset({"ok", "error", "blocked"})
CALL_TYPES = frozenset({"chat", "completion", "embedding", "image", "audio", "rerank",
                        "moderation", "responses", "other"})
SOURCES = frozenset({"litellm", "langchain", "manual", "import"})
NO_USAGE = Usage()
_new_tuple = tuple.__new__  # a NamedTuple without its keyword binding (the hot path)


class CallEvent(NamedTuple):
    """One LLM call as an adapter saw it: what was called, what it used, how it ended, when,
    and for whom. Immutable; values are kept as given and cleaned when recorded
    (``event._replace(ts=...)`` makes a changed copy).

    Token counts follow the ledger's convention: ``usage.input_tokens`` includes cache reads
    and writes, ``usage.output_tokens`` includes reasoning. ``estimated`` marks counts not
    reported by the provider; ``cache_hit`` a call answered from a cache (cost 0). ``id`` and
    ``ts`` default to a new id and the recording moment. Attribution left ``None`` takes the
    scope in force when the event is recorded.
    """

    model: str
    provider: str | None = None
    usage: Usage = NO_USAGE
    # outcome
    status: str = "ok"
    error_type: str | None = None
    call_type: str = "chat"
    streamed: bool = False
    resolved_model: str | None = None
    estimated: bool = False
    cache_hit: bool = False
    # timing
    ts: datetime | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    # identity and attribution
    id: str | None = None
    source: str = "manual"
    project: str | None = None
    user: str | None = None
    session: str | None = None
    tags: Iterable[str] | None = None
    request_id: str | None = None
    metadata: Mapping[str, Any] | None = None


def event_row(event: CallEvent, event_id: str, now: datetime, scope: _scope.Attribution,
              prices: PriceBook) -> dict[str, Any]:
    """The ledger row for ``event``: cleaned, priced in ``prices``' currency at the event's
    time, attributed (``scope`` fills what the event leaves unset). Never raises for an odd
    value; each one costs only itself, noted in ``metadata["llmtally_warnings"]``."""
    notes: list[str] = []
    # one unpacking instead of twenty attribute reads: this runs on the caller's thread
    (model, provider, tokens, status, error_type, call_type, streamed, resolved_model,
     estimated, cache_hit, ts, latency_ms, ttft_ms, _id, source, project, user, session, tags,
     request_id, metadata) = event
    try:
        input_tokens, output_tokens, cache_read, cache_write, reasoning = tokens
    except (TypeError, ValueError):  # not five counts: the call is still recorded, as 0 tokens
        notes.append(f"usage={short_repr(tokens)} is not a Usage; recorded as 0 tokens")
        tokens = NO_USAGE
        input_tokens, output_tokens, cache_read, cache_write, reasoning = tokens
    # plain ints in range, unrolled (no generator): this runs on the caller's thread
    if not (type(input_tokens) is int and type(output_tokens) is int and type(cache_read) is int
            and type(cache_write) is int and type(reasoning) is int
            and 0 <= min(tokens) and max(tokens) <= MAX_TOKEN_COUNT):
        input_tokens, output_tokens, cache_read, cache_write, reasoning = (
            _token_count(value, name, notes) for value, name in zip(tokens, TOKEN_FIELDS))
    # Parts never exceed their whole (input includes cache; output includes reasoning).
    input_tokens = max(input_tokens, cache_read + cache_write)
    output_tokens = max(output_tokens, reasoning)
    model_name = _clean_text(model, notes, "model") or "unknown"
    provider_name = _clean_text(provider, notes, "provider")
    if status not in STATUSES:
        status = _one_of(status, STATUSES, "status", "ok", notes)
    when = as_utc_naive(now if ts is None else ts)
    priced = prices.cost(model_name, provider_name, _new_tuple(
        Usage, (input_tokens, output_tokens, cache_read, cache_write, reasoning)), when)
    if status == "blocked":
        cost, cost_status, price_source = 0.0, "priced", None
    elif cache_hit:  # served from a cache: nothing was paid for these tokens
        cost, cost_status, price_source = 0.0, "priced", "cache-hit"
    elif priced.cost is None:
        cost, cost_status, price_source = None, "unpriced", None
    else:
        cost, price_source = priced.cost, priced.source
        cost_status = "estimated" if estimated else "priced"
    row = {
        "id": event_id,
        "ts": when,
        "source": source if source in SOURCES else _one_of(source, SOURCES, "source",
                                                             "manual", notes),
        # One name per provider and per model, whichever path recorded the call.
        "provider": priced.provider,
        "model": priced.model or model_name,
        "resolved_model": None if resolved_model is None else _clean_text(
            resolved_model, notes, "resolved_model"),
        "call_type": call_type if call_type in CALL_TYPES else _one_of(
            call_type, CALL_TYPES, "call_type", "other", notes),
        "streamed": bool(streamed),
        "status": status,
        "error_type": None if error_type is None else _clean_text(error_type, notes, "error_type"),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_read_tokens": cache_read,
        "cache_write_tokens": cache_write,
        "reasoning_tokens": reasoning,
        "cost": cost,
        "currency": prices.currency,
        "cost_status": cost_status,
        "price_source": price_source,
        "latency_ms": None if latency_ms is None else _milliseconds(latency_ms, "latency_ms", notes),
        "ttft_ms": None if ttft_ms is None else _milliseconds(ttft_ms, "ttft_ms", notes),
        # most calls leave these unset: no call for them (this runs on the caller's thread)
        "project": (None if project is None else _clean_text(project, notes, "project"))
        or scope.project,
        "user": (None if user is None else _clean_text(user, notes, "user")) or scope.user,
        "session": (None if session is None else clean_id(session)) or scope.session,
        "tags": _row_tags(scope.tags, tags, notes),
        "request_id": (None if request_id is None else clean_id(request_id)) or scope.request_id,
        "metadata": None,
    }
    meta = dict(scope.metadata) if scope.metadata else {}
    if metadata:
        if isinstance(metadata, Mapping):
            try:
                meta.update(metadata)
            except Exception as exc:  # a Mapping that cannot be read costs its metadata only
                notes.append(f"metadata could not be read ({type(exc).__name__}); ignored")
        else:
            notes.append(f"metadata={short_repr(metadata)} is not a mapping; ignored")
    if meta:
        meta = clean_metadata(meta, notes)  # cycles, depth, odd types: never to the writer
    if cache_hit:
        meta["cache_hit"] = True
    if notes:
        meta["llmtally_warnings"] = notes
    # Empty tags and metadata as () and None: a row holding no list or dict is one the
    # garbage collector stops visiting, which counts while thousands wait in the writer's queue
    row["metadata"] = meta or None
    return row


def _row_tags(outer: tuple[str, ...], given: Any, notes: list[str]) -> list[str] | tuple[()]:
    """The scope's tags merged with the call's, as a list; ``()`` when there are none (see
    the row's metadata: a row of plain values is one the garbage collector stops visiting)."""
    merged = _scope.merge_tags(outer, _tag_tuple(given, notes)) if given else outer
    return list(merged) if merged else ()


def as_utc_naive(value: Any) -> datetime:
    """``value`` (a datetime; naive means UTC) as a naive UTC datetime, as the ledger stores."""
    if type(value) is datetime and value.tzinfo is timezone.utc:
        return value.replace(tzinfo=None)
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        naive: datetime = value  # the assignment above makes it Any again for mypy
        return naive
    raise TypeError(f"ts must be a datetime, not {type(value).__name__}")


def clean_id(value: Any) -> str | None:
    """An id as text safe for any database (at most 128 characters), or None."""
    return _clean_text(value, [], "id", limit=128)


def _token_count(value: Any, name: str, notes: list[str]) -> int:
    count = coerce_count(value)
    if count is None:
        if value is not None:
            notes.append(f"{name}={short_repr(value)} is not a token count; recorded as 0")
        return 0
    return count


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages; never raises."""
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__ must not cost the event (or the message)
        text = f"<unprintable {type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _clean_text(value: Any, notes: list[str], name: str, limit: int = 256) -> str | None:
    """Text safe for any database: no NUL, valid UTF-8, at most ``limit`` characters."""
    if value is None:
        return None
    if type(value) is str and len(value) <= limit and value.isascii() and "\x00" not in value:
        return value or None
    text = value if isinstance(value, str) else str(value)
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    if "\x00" in text:
        text = text.replace("\x00", "")
    if len(text) > limit:
        notes.append(f"{name} was {len(text)} characters; cut to {limit}")
        text = text[:limit]
    return text or None


def _one_of(value: Any, allowed: frozenset[str], name: str, fallback: str, notes: list[str]) -> str:
    if value in allowed:
        return value  # type: ignore[no-any-return]
    notes.append(f"{name}={short_repr(value)} is not one of {sorted(allowed)}; recorded as {fallback!r}")
    return fallback


def _milliseconds(value: Any, name: str, notes: list[str]) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if not (number >= 0 and number != float("inf")):
        notes.append(f"{name}={short_repr(value)} is not a duration; left empty")
        return None
    return number


def _tag_tuple(tags: Any, notes: list[str]) -> tuple[str, ...]:
    if isinstance(tags, str):
        tags = [tags]
    try:
        cleaned = [_clean_text(tag, notes, "tag") for tag in tags]
    except TypeError:
        notes.append(f"tags={short_repr(tags)} is not a list of strings; ignored")
        return ()
    return tuple(dict.fromkeys(tag for tag in cleaned if tag))
