"""The integrations a Tally builds and owns, one of each: LiteLLM's logger and guard,
LangChain's callback handler and embeddings wrapper. Each is imported when first asked for,
so ``import llmtally`` never imports LiteLLM or LangChain."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

if TYPE_CHECKING:
    from ._recorder import Recorder
    from .integrations.langchain import LangChainHandler
    from .integrations.litellm import LiteLLMLogger

__all__ = ["Adapters"]

F = TypeVar("F", bound=Callable[..., Any])


class Adapters:
    """The part of :class:`~llmtally.Tally` that hands out its integrations."""

    _litellm_logger: LiteLLMLogger | None
    _langchain_handler: LangChainHandler | None
    _integration_lock: threading.Lock
    _before_flush: list[Callable[[float | None], None]]

    def _init_adapters(self) -> None:
        # the integrations this Tally built (one each), made under the lock
        self._litellm_logger = None
        self._langchain_handler = None
        self._integration_lock = threading.Lock()

    def _as_recorder(self) -> Recorder:
        """This object as the integrations see it (a Tally implements every Recorder member:
        tests/test_architecture.py checks it)."""
        return cast("Recorder", self)

    def litellm(self) -> Any:
        """The LiteLLM callback that records every call: ``litellm.callbacks = [tally.litellm()]``.

        Returns the same ``CustomLogger`` each time. SDK calls (``completion``,
        ``acompletion``, streams, embeddings) and ``litellm.Router`` calls become events with
        ``source="litellm"``; :meth:`flush` also runs the async logging LiteLLM defers.
        """
        if self._litellm_logger is not None:
            return self._litellm_logger
        try:
            import litellm  # noqa: F401  (imported already, the integration module would not fail)

            from .integrations.litellm import LiteLLMLogger
            from .integrations.litellm_drain import drain_logging_worker
        except ImportError as exc:
            raise ImportError('tally.litellm() needs LiteLLM: pip install "llmtally[litellm]"') from exc
        with self._integration_lock:
            if self._litellm_logger is None:
                self._litellm_logger = LiteLLMLogger(self._as_recorder())
                self._before_flush.append(drain_logging_worker)
        return self._litellm_logger

    @property
    def litellm_attached(self) -> bool:
        """Whether :meth:`litellm` has made this Tally's LiteLLM logger."""
        return self._litellm_logger is not None

    def guard(self, fn: F) -> F:
        """Budgets for a LiteLLM call that has no hook able to stop it: ``litellm.completion``
        (streamed or not), ``litellm.embedding``, ``Router.completion`` (sync calls).

        >>> litellm.callbacks = [tally.litellm()]
        >>> completion = tally.guard(litellm.completion)
        >>> completion(model="openai/gpt-4o-mini", messages=msgs, max_tokens=500)

        Each call gets a ``litellm_call_id`` (a uuid, unless one was passed); its estimate is
        reserved like :meth:`reserve` (``BudgetExceeded`` is raised before ``fn`` runs, and a
        ``blocked`` event recorded); then ``fn(..., litellm_call_id=...)`` runs, and the
        success or failure hook of ``tally.litellm()`` (which must be registered) settles the
        hold to the call's real cost — for a stream, when it ends or is closed. If ``fn``
        raises before LiteLLM logged the call, the hold is released. Works on sync and async
        functions; without budgets it only passes the call through. Async SDK calls and
        ``Router`` async calls need no guard: ``tally.litellm()`` blocks them itself.

        With ``durability="sync"`` a guarded call that is not streamed also returns only once
        its event is durable (LiteLLM records calls on its own logging thread or event-loop
        task, just after the call returned to you, so an unguarded call killed in that instant
        can be missing).
        """
        from .integrations.litellm_guard import guard

        return guard(self.litellm(), fn)  # type: ignore[no-any-return]

    def langchain(self) -> Any:
        """The LangChain callback handler that records every model call:
        ``chain.invoke(x, config={"callbacks": [tally.langchain()]})``.

        Returns the same handler each time. Each chat or text-completion model call of a
        chain, agent or bare model (``invoke``, ``ainvoke``, ``batch``, ``stream``,
        ``astream``, ``astream_events``) becomes one event with ``source="langchain"``; with
        budgets, a call that would go over raises :class:`BudgetExceeded` before it is sent.
        ``metadata={"llmtally_project": ..., "llmtally_user": ..., "llmtally_session": ...}``
        and ``tags`` in the run config attribute the calls.
        """
        if self._langchain_handler is not None:
            return self._langchain_handler
        try:
            from .integrations.langchain import LangChainHandler
        except ImportError as exc:
            raise ImportError('tally.langchain() needs LangChain: pip install "llmtally[langchain]"') from exc
        with self._integration_lock:
            if self._langchain_handler is None:
                self._langchain_handler = LangChainHandler(self._as_recorder())
        return self._langchain_handler

    def wrap_embeddings(self, embeddings: Any, *, model: str | None = None,
                        provider: str | None = None) -> Any:
        """LangChain ``Embeddings`` that record each call (LangChain reports none for them).

        >>> emb = tally.wrap_embeddings(OpenAIEmbeddings(model="text-embedding-3-small"))
        >>> vectors = emb.embed_documents(texts)      # one event, call_type="embedding"

        ``embed_documents``, ``embed_query``, ``aembed_documents`` and ``aembed_query`` are
        recorded with their input tokens counted offline (``estimated``), checked against the
        budgets first; ``model`` and ``provider`` default to what the object names.
        """
        try:
            from .integrations.langchain_embeddings import wrap_embeddings
        except ImportError as exc:
            raise ImportError('tally.wrap_embeddings() needs LangChain: '
                              'pip install "llmtally[langchain]"') from exc
        return wrap_embeddings(self._as_recorder(), embeddings, model=model, provider=provider)

    def _integration_holds(self) -> bool:
        """Whether the LiteLLM logger holds budgets for calls not recorded yet."""
        return self._litellm_logger is not None and self._litellm_logger.holds_calls()
