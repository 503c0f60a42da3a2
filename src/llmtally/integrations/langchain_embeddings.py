"""LangChain Embeddings that record each call (LangChain reports none for them): see
:meth:`Tally.wrap_embeddings`."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from langchain_core.embeddings import Embeddings

from .._events import scope as _scope
from .._events.event import CallEvent
from .._events.usage import Usage
from . import _handoff
from .langchain import T, fault
from .langchain_events import PACKAGE_PROVIDERS, get, route, sdk_error_type, text

if TYPE_CHECKING:
    from .._budgets.states import Reservation
    from .._recorder import Recorder

__all__ = ["TalliedEmbeddings", "wrap_embeddings"]

class _EmbeddingCall:
    """An embeddings call in progress, offered to the LiteLLM logger like a model run."""

    __slots__ = ("tally", "hold", "claimed", "ended", "scope")

    def __init__(self, tally: Recorder, hold: Reservation | None, scope: _scope.Attribution) -> None:
        self.tally, self.hold, self.scope = tally, hold, scope
        self.claimed = self.ended = False

    def attribution(self) -> _scope.Attribution:
        return _scope.EMPTY


class TalliedEmbeddings(Embeddings):
    """LangChain ``Embeddings`` that record each call (see :meth:`Tally.wrap_embeddings`).

    ``embed_documents``, ``embed_query`` and their ``aembed_*`` twins become one event each
    (``call_type="embedding"``, ``source="langchain"``), with the input tokens counted offline
    (LangChain's embeddings return no usage: the event is ``estimated``), checked against the
    budgets first. Every other attribute is the wrapped object's.
    """

    def __init__(self, tally: Recorder, embeddings: Embeddings, *, model: str | None = None,
                 provider: str | None = None) -> None:
        self._tally = tally
        self._inner = embeddings
        found_provider, found_model = route(provider or _embeddings_provider(embeddings),
                                             model or _embeddings_model(embeddings))
        self._provider, self._model = found_provider, found_model or type(embeddings).__name__

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __repr__(self) -> str:
        return f"TalliedEmbeddings({self._inner!r})"

    @property
    def wrapped(self) -> Embeddings:
        """The embeddings object this one records."""
        return self._inner

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """``embed_documents`` of the wrapped object, recorded."""
        return self._call(texts, lambda: self._inner.embed_documents(texts))

    def embed_query(self, text: str) -> list[float]:
        """``embed_query`` of the wrapped object, recorded."""
        return self._call([text], lambda: self._inner.embed_query(text))

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """``aembed_documents`` of the wrapped object, recorded."""
        return await self._acall(texts, lambda: self._inner.aembed_documents(texts))

    async def aembed_query(self, text: str) -> list[float]:
        """``aembed_query`` of the wrapped object, recorded."""
        return await self._acall([text], lambda: self._inner.aembed_query(text))

    def _call(self, texts: Sequence[Any], fn: Callable[[], T]) -> T:
        call, tokens, offered = self._begin(texts)
        started = time.perf_counter()
        try:
            result = fn()
        except BaseException as exc:
            self._end(call, tokens, offered, started, exc)
            raise
        self._end(call, tokens, offered, started, None)
        return result

    async def _acall(self, texts: Sequence[Any], fn: Callable[[], Awaitable[T]]) -> T:
        call, tokens, offered = self._begin(texts)
        started = time.perf_counter()
        try:
            result = await fn()
        except BaseException as exc:
            self._end(call, tokens, offered, started, exc)
            raise
        self._end(call, tokens, offered, started, None)
        return result

    def _begin(self, texts: Sequence[Any]) -> tuple[_EmbeddingCall, int, Any]:
        """Count the input and hold it on the budgets (raises BudgetExceeded before the call)."""
        tokens = 0
        try:
            from .._events.tokens import count_text

            tokens = sum(count_text(text, self._model) for text in texts if isinstance(text, str))
        except Exception as exc:
            fault("embeddings", exc)
        hold = None
        if self._tally.budgets is not None:
            hold = self._tally.reserve(model=self._model, provider=self._provider,
                                       input_tokens=tokens, max_tokens=0, call_type="embedding")
        call = _EmbeddingCall(self._tally, hold, _scope.current())
        offered = None
        if self._tally.litellm_attached:
            offered = _handoff.offer(call)
        return call, tokens, offered

    def _end(self, call: _EmbeddingCall, tokens: int, offered: Any, started: float,
             error: BaseException | None) -> None:
        try:
            _handoff.withdraw(call, offered)
            if call.claimed:  # LiteLLM recorded it
                self._tally.release(_handoff.take_hold(call), sent=True)
                return
            scope = call.scope
            self._tally.record_event(CallEvent(
                model=self._model, provider=self._provider,
                usage=Usage(input_tokens=0 if error else tokens),
                latency_ms=(time.perf_counter() - started) * 1000.0,
                status="ok" if error is None else "error",
                error_type=sdk_error_type(error) if error is not None else None,
                call_type="embedding", estimated=error is None, source="langchain",
                project=scope.project, user=scope.user, session=scope.session, tags=scope.tags,
                request_id=scope.request_id, metadata=dict(scope.metadata) or None),
                reservation=call.hold)
        except Exception as exc:
            fault("embeddings", exc)


def _embeddings_model(embeddings: Any) -> str | None:
    for key in ("model", "model_name", "model_id", "deployment"):
        name = text(get(embeddings, key))
        if name:
            return name
    return None


def _embeddings_provider(embeddings: Any) -> str | None:
    module = type(embeddings).__module__.split(".", 1)[0]
    if type(embeddings).__name__.startswith("Azure"):
        return "azure"
    if module == "langchain_litellm":
        return "litellm"
    return PACKAGE_PROVIDERS.get(module)


def wrap_embeddings(tally: Recorder, embeddings: Any, *, model: str | None = None,
                    provider: str | None = None) -> TalliedEmbeddings:
    """See :meth:`Tally.wrap_embeddings`."""
    if isinstance(embeddings, TalliedEmbeddings):
        if embeddings._tally is tally:
            return embeddings
        embeddings = embeddings.wrapped
    if not isinstance(embeddings, Embeddings):
        raise TypeError(f"wrap_embeddings() takes LangChain Embeddings, not {type(embeddings).__name__}")
    return TalliedEmbeddings(tally, embeddings, model=model, provider=provider)
