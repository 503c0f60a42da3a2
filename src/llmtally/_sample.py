"""A plausible, deterministic history of LLM calls: for the demo, the report tests and the benchmarks.

:func:`sample_calls` yields :class:`~llmtally.CallEvent` values spread over a time range the way a
team's traffic is (busy weekday office hours, quiet nights and weekends, a little growth):
several projects and users, models of several providers priced from the real price map, one
model with no price (``internal/acme-llm-7b``), errors with the exception types LiteLLM raises,
prompt-cache reads and writes, LiteLLM cache hits, streams with a time to first token (some
without usage, so ``estimated``), and a few calls blocked by a budget. The same ``seed`` and
range give the same calls, with the same ids (so loading them twice adds nothing).

Two ways into a ledger:

- :func:`record_history` sends each call through :meth:`Tally.record` — the real code path
  (pricing, attribution, the background writer); what ``llmtally demo`` uses.
- :func:`bulk_load` turns the calls into rows with the function ``record()`` uses (priced by a
  :class:`PriceBook`, no attribution in force) and writes them with :meth:`Store.insert_many`
  — fast enough for a million events.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from typing import TYPE_CHECKING, Any

from ._events.event import CallEvent, event_row
from ._events.scope import EMPTY
from ._events.usage import Usage

if TYPE_CHECKING:
    from ._pricing.book import PriceBook
    from ._storage.store import Store
    from ._tally import Tally

__all__ = ["sample_calls", "sample_rows", "record_history", "bulk_load",
           "UNPRICED_MODEL", "DEFAULT_SEED"]

DEFAULT_SEED = 47
UNPRICED_MODEL = ("internal", "acme-llm-7b")
"""The sample's one model with no known price: a self-hosted model behind a gateway."""


@dataclass(frozen=True, slots=True)
class _Model:
    provider: str
    model: str
    call_type: str
    input_tokens: int      # typical prompt
    output_tokens: int     # typical completion
    ms_per_output_token: float
    base_latency_ms: float
    stream_share: float
    error_rate: float
    error_types: tuple[str, ...]
    cache_read_share: float = 0.0     # calls with a prompt-cache read
    cache_write_share: float = 0.0
    cache_hit_share: float = 0.0      # answered from LiteLLM's cache
    reasoning_share: float = 0.0      # of output tokens


_RATE_LIMIT = "litellm.RateLimitError"
_TIMEOUT = "litellm.Timeout"
_MODELS: dict[str, _Model] = {m.model: m for m in (
    _Model("openai", "gpt-4o-mini", "chat", 1800, 350, 9.0, 280, 0.5, 0.012,
           (_RATE_LIMIT, _TIMEOUT), cache_read_share=0.25, cache_hit_share=0.04),
    _Model("openai", "gpt-4o", "chat", 3200, 600, 14.0, 420, 0.5, 0.015,
           (_RATE_LIMIT, _TIMEOUT, "litellm.InternalServerError"), cache_read_share=0.3,
           cache_hit_share=0.02),
    _Model("openai", "text-embedding-3-small", "embedding", 900, 0, 0.0, 120, 0.0, 0.004,
           (_RATE_LIMIT,)),
    _Model("anthropic", "claude-sonnet-4-5", "chat", 6000, 800, 16.0, 650, 0.6, 0.02,
           ("litellm.InternalServerError", _RATE_LIMIT), cache_read_share=0.65,
           cache_write_share=0.12),
    _Model("anthropic", "claude-haiku-4-5", "chat", 2500, 300, 7.0, 330, 0.4, 0.015,
           ("litellm.InternalServerError", _RATE_LIMIT), cache_read_share=0.4,
           cache_write_share=0.1),
    _Model("gemini", "gemini-2.5-flash", "chat", 4000, 500, 6.0, 380, 0.5, 0.02,
           ("litellm.ServiceUnavailableError", _RATE_LIMIT), reasoning_share=0.3),
    _Model("deepseek", "deepseek-chat", "chat", 2200, 450, 22.0, 900, 0.3, 0.045,
           (_RATE_LIMIT, _TIMEOUT, "litellm.APIConnectionError"), cache_read_share=0.3),
    _Model(UNPRICED_MODEL[0], UNPRICED_MODEL[1], "chat", 1500, 250, 30.0, 500, 0.2, 0.06,
           ("litellm.APIConnectionError", _TIMEOUT)),
)}


@dataclass(frozen=True, slots=True)
class _Project:
    name: str
    weight: float
    users: tuple[str, ...]
    models: tuple[tuple[str, float], ...]
    tags: tuple[str, ...]
    features: tuple[str, ...] = ()


_PROJECTS = (
    _Project("search", 0.38, ("alice", "bob", "carol"),
             (("gpt-4o-mini", 0.55), ("text-embedding-3-small", 0.3), ("claude-haiku-4-5", 0.15)),
             ("prod",), ("autocomplete", "answer")),
    _Project("support-bot", 0.27, ("svc-support", "dave"),
             (("claude-sonnet-4-5", 0.5), ("gpt-4o-mini", 0.5)), ("prod", "support"),
             ("triage", "reply-draft")),
    _Project("etl", 0.2, ("svc-etl",),
             (("deepseek-chat", 0.45), ("gemini-2.5-flash", 0.35), (UNPRICED_MODEL[1], 0.2)),
             ("batch", "nightly")),
    _Project("research", 0.15, ("erin", "frank", "grace"),
             (("claude-sonnet-4-5", 0.4), ("gpt-4o", 0.35), ("gemini-2.5-flash", 0.25)),
             ("experiment",)),
)
_BLOCKED_SHARE = 0.003
_ESTIMATED_STREAM_SHARE = 0.1     # streams asked without include_usage
_HOUR_WEIGHT = (0.15, 0.1, 0.08, 0.08, 0.1, 0.15, 0.3, 0.55, 0.85, 1.0, 1.0, 0.95,
                0.8, 0.9, 1.0, 1.0, 0.95, 0.8, 0.6, 0.45, 0.35, 0.3, 0.25, 0.2)
_WEEKDAY_WEIGHT = (1.0, 1.05, 1.0, 1.0, 0.9, 0.35, 0.3)
_GROWTH = 0.35                    # the last hour of the range is this much busier than the first


def sample_calls(start: datetime, end: datetime, *, count: int, seed: int = DEFAULT_SEED,
                 tz: tzinfo = timezone.utc) -> Iterator[CallEvent]:
    """``count`` calls between ``start`` and ``end`` (datetimes; naive means UTC), in time order.

    Traffic follows office hours and weekdays in ``tz`` and grows a little over the range. The
    same arguments always give the same calls.
    """
    begin, finish = _aware_utc(start), _aware_utc(end)
    if finish <= begin or count <= 0:
        return
    rng = random.Random(seed)
    prefix = hashlib.blake2b(f"{seed}|{begin.isoformat()}|{finish.isoformat()}|{count}".encode(),
                             digest_size=10).hexdigest()
    hours = _hour_slots(begin, finish, tz)
    total_weight = sum(weight for _slot, _seconds, weight in hours)
    index = 0
    carried = 0.0
    last = len(hours) - 1
    for position, (slot, seconds, weight) in enumerate(hours):
        wanted = count * weight / total_weight + carried
        here = min(int(wanted), count - index)
        carried = wanted - here
        if position == last:
            here = count - index   # whatever rounding left over
        offsets = sorted(rng.random() * seconds for _ in range(here))
        for offset in offsets:
            ts = slot + timedelta(seconds=offset)
            yield _one_call(rng, f"{prefix}{index:012x}", ts, tz)
            index += 1


def record_history(tally: Tally, start: datetime, end: datetime, *, count: int,
                   seed: int = DEFAULT_SEED) -> int:
    """Record ``count`` sample calls through :meth:`Tally.record` (the real path) and flush.

    Days and hours follow the Tally's time zone. Returns how many calls were recorded.
    """
    recorded = 0
    for call in sample_calls(start, end, count=count, seed=seed, tz=tally.tz):
        tally.record_event(call)
        recorded += 1
    tally.flush()
    return recorded


def sample_rows(calls: Iterable[CallEvent], prices: PriceBook) -> Iterator[dict[str, Any]]:
    """Ledger rows for ``calls`` (the dicts :meth:`Store.insert_many` takes), made by the
    function :meth:`Tally.record` uses, priced by ``prices``, with no attribution in force."""
    for call in calls:
        yield event_row(call, event_id=call.id, now=call.ts, scope=EMPTY,  # type: ignore[arg-type]
                        prices=prices)


def bulk_load(store: Store, prices: PriceBook, start: datetime, end: datetime, *, count: int,
              seed: int = DEFAULT_SEED, tz: tzinfo = timezone.utc, batch_size: int = 5000) -> int:
    """Write ``count`` sample calls straight into ``store`` in batches (for benchmarks: no
    background writer, no per-call attribution). Returns the rows inserted (ids already in
    the ledger are skipped). Memory stays at one batch."""
    inserted = 0
    batch: list[dict[str, Any]] = []
    for row in sample_rows(sample_calls(start, end, count=count, seed=seed, tz=tz), prices):
        batch.append(row)
        if len(batch) >= batch_size:
            inserted += store.insert_many(batch)
            batch = []
    if batch:
        inserted += store.insert_many(batch)
    return inserted


# -- generation ----------------------------------------------------------------------------


def _aware_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _hour_slots(begin: datetime, finish: datetime,
                tz: tzinfo) -> list[tuple[datetime, float, float]]:
    """(slot start, its length in seconds, its traffic weight) for each hour of the range."""
    span = (finish - begin).total_seconds()
    slots = []
    slot = begin
    while slot < finish:
        following = min(slot + timedelta(hours=1), finish)
        seconds = (following - slot).total_seconds()
        local = slot.astimezone(tz)
        progress = (slot - begin).total_seconds() / span
        weight = (_HOUR_WEIGHT[local.hour] * _WEEKDAY_WEIGHT[local.weekday()]
                  * (1.0 + _GROWTH * progress) * seconds / 3600.0)
        slots.append((slot, seconds, weight))
        slot = following
    return slots


def _pick(rng: random.Random, choices: Sequence[tuple[Any, float]]) -> Any:
    point = rng.random() * sum(weight for _item, weight in choices)
    for item, weight in choices:
        point -= weight
        if point < 0:
            return item
    return choices[-1][0]


def _tokens(rng: random.Random, typical: int) -> int:
    if typical <= 0:
        return 0
    return max(1, int(typical * rng.lognormvariate(0.0, 0.6)))


def _one_call(rng: random.Random, call_id: str, ts: datetime, tz: tzinfo) -> CallEvent:
    project = _pick(rng, [(p, p.weight) for p in _PROJECTS])
    model = _MODELS[_pick(rng, project.models)]
    user = rng.choice(project.users)
    local = ts.astimezone(tz)
    session = f"{user}-{local:%m%d}-{local.hour // 3}"
    metadata: dict[str, Any] = {}
    if project.features:
        metadata["feature"] = rng.choice(project.features)
    common: dict[str, Any] = dict(
        id=call_id, ts=ts, provider=model.provider, model=model.model,
        call_type=model.call_type, project=project.name, user=user, session=session,
        tags=project.tags, metadata=metadata)
    if rng.random() < _BLOCKED_SHARE:
        metadata["budget"] = "usd 2/day each user"
        return CallEvent(**common, status="blocked", error_type="llmtally.BudgetExceeded")
    streamed = rng.random() < model.stream_share
    if rng.random() < model.error_rate:
        latency = model.base_latency_ms * rng.uniform(0.5, 3.0)
        if rng.random() < 0.3:   # a timeout takes its time
            latency = rng.uniform(20_000, 60_000)
        return CallEvent(**common, status="error", error_type=rng.choice(model.error_types),
                          streamed=streamed, latency_ms=round(latency, 1))
    input_tokens = _tokens(rng, model.input_tokens)
    output_tokens = _tokens(rng, model.output_tokens)
    cache_read = cache_write = reasoning = 0
    if rng.random() < model.cache_read_share and input_tokens >= 1024:
        cache_read = int(input_tokens * rng.uniform(0.5, 0.9)) // 128 * 128
    if rng.random() < model.cache_write_share:
        cache_write = int((input_tokens - cache_read) * rng.uniform(0.1, 0.3))
    if model.reasoning_share and output_tokens:
        reasoning = int(output_tokens * model.reasoning_share * rng.uniform(0.5, 1.5))
        output_tokens = max(output_tokens, reasoning)
    cache_hit = rng.random() < model.cache_hit_share
    ttft = None
    if cache_hit:
        latency = rng.uniform(2.0, 15.0)
    else:
        ttft = model.base_latency_ms * rng.uniform(0.6, 1.8) * (1 + input_tokens / 40_000)
        latency = ttft + output_tokens * model.ms_per_output_token * rng.uniform(0.7, 1.4)
    estimated = streamed and not cache_hit and rng.random() < _ESTIMATED_STREAM_SHARE
    return CallEvent(
        **common, usage=Usage(input_tokens, output_tokens, cache_read, cache_write, reasoning),
        latency_ms=round(latency, 1),
        ttft_ms=round(ttft, 1) if streamed and ttft is not None else None,
        streamed=streamed, estimated=estimated, cache_hit=cache_hit)
