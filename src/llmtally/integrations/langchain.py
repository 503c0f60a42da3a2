"""LangChain: ``config={"callbacks": [tally.langchain()]}`` records every model call once.

How LangChain's view of a call maps onto a ledger event (checked on langchain-core 1.8,
langchain-openai 1.7, langchain-anthropic 1.7, langchain-litellm 0.11):

- Only model runs are events: ``on_chat_model_start`` (``call_type="chat"``) and
  ``on_llm_start`` (legacy text-completion ``LLM`` models, ``call_type="completion"``), each
  ended by ``on_llm_end`` or ``on_llm_error``. Chains, tools and retrievers are not counted;
  their start and end are followed only to know each model call's root run.
- ``id`` is the LangChain run id; ``source="langchain"``. ``metadata`` keeps
  ``langchain_parent_run_id`` (when there is a parent) and ``langchain_root_run_id`` (the
  outermost run seen; the call's own id for a bare model call), and ``request_id`` is the root
  run id unless one was given, so a report can group the calls of one chain or agent run.
- ``provider`` is LangChain's ``ls_provider`` metadata (else the model's integration package);
  ``model`` its ``ls_model_name`` (else the invocation parameters' model, else the model the
  response names, else the model's class name — which prices nothing, so the call is
  ``unpriced``, never dropped); ``resolved_model`` the response's ``model_name``. ``ChatLiteLLM``
  names its model ``openai/gpt-4o-mini`` with provider ``litellm``: it is stored as model
  ``gpt-4o-mini``, provider ``openai``, as the LiteLLM integration stores it.
- Tokens come from ``AIMessage.usage_metadata``, whose convention is the ledger's:
  ``input_tokens`` includes cache reads and writes (``input_token_details.cache_read`` /
  ``cache_creation``), ``output_tokens`` includes reasoning (``output_token_details.reasoning``);
  the parts go to ``cache_read_tokens``, ``cache_write_tokens`` and ``reasoning_tokens`` and the
  price engine prices each part once. Legacy ``LLM`` models report ``llm_output["token_usage"]``
  (OpenAI's shape). No usage at all (a ChatOpenAI stream without ``stream_usage=True``) → the
  prompt and the answer are counted offline and the event is ``estimated``.
- A stream left early (``break``, a closed or cancelled stream) arrives as ``on_llm_error``
  with ``GeneratorExit`` / ``CancelledError``: recorded like an abandoned LiteLLM stream
  (``ok``, ``estimated``, the prompt and the chunks received counted offline,
  ``metadata["stream_abandoned"]``). Any other error → ``status="error"`` with its type.
- Attribution: ``tally.scope(...)`` where the call starts, overridden per call by the run
  config's ``metadata={"llmtally_project": ..., "llmtally_user": ..., "llmtally_session": ...,
  "llmtally_request_id": ...}``; the run's ``tags`` (inherited from parent runs too) are added
  to the scope's, except LangChain's own bookkeeping tags (``seq:step:2``, ``map:key:x``,
  ``graph:step:3``, ``langsmith:*``). Other metadata and prompts are never stored.

Budgets: the handler runs inline (``run_inline=True``: no thread-pool hop under ``ainvoke``)
and with ``raise_error=True``, so ``BudgetExceeded`` raised in ``on_chat_model_start`` /
``on_llm_start`` stops ``invoke``/``ainvoke``/``batch``/``stream``/``astream`` before the
request is sent. Everything else that could go wrong in the handler is caught and logged.

LiteLLM underneath (``ChatLiteLLM``): when ``tally.litellm()`` is registered too, the call is
recorded once, by LiteLLM, with LangChain's attribution added (see ``_handoff``).
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler

from .._budgets.budget import BudgetExceeded
from .._budgets.offloop import reserve_off_loop
from .._events import scope as _scope
from .._log import warn_limited
from . import _handoff
from .langchain_events import (
    RunStart,
    class_provider,
    clean_tags,
    langchain_event,
    later_event,
    mapping,
    max_tokens,
    model_name,
    text,
)

if TYPE_CHECKING:
    from .._budgets.states import Reservation
    from .._recorder import Recorder

__all__ = ["LangChainHandler"]

T = TypeVar("T")

_MAX_RUNS = 100_000  # runs started and never ended (a callback LangChain never sent): oldest forgotten
_MAX_ENDED = 256  # recently ended run ids, so a start arriving after its end is ignored


def _async_dispatch_code() -> Any:
    """The code of LangChain's async callback dispatch (it awaits a handler method that is a
    coroutine function), or None if this langchain-core has another shape."""
    try:
        from langchain_core.callbacks import manager
    except ImportError:
        return None
    function = getattr(manager, "_ahandle_event_for_handler", None)
    return getattr(function, "__code__", None)


_ASYNC_DISPATCH = _async_dispatch_code()


class _StartHook:
    """A start callback that is sync for LangChain's sync callback manager (``invoke``,
    ``stream``: a ``BudgetExceeded`` raised there stops the call) and a coroutine function for
    its async manager (``ainvoke``, ``astream``: the hold is then taken on a worker thread, so
    the event loop never waits for the database). LangChain decides how to call a handler
    method when it looks it up, so the lookup answers by who is asking. An async handler under
    the sync manager would have its errors swallowed, hence not simply ``async def``."""

    def __init__(self, sync_name: str, async_name: str) -> None:
        self.sync_name, self.async_name = sync_name, async_name

    def __get__(self, handler: Any, owner: type | None = None) -> Any:
        if handler is None:
            return self
        if _ASYNC_DISPATCH is not None and handler.tally.budgets is not None and \
                sys._getframe(1).f_code is _ASYNC_DISPATCH:
            return getattr(handler, self.async_name)
        return getattr(handler, self.sync_name)


class LangChainHandler(BaseCallbackHandler):
    """A LangChain callback handler that records every model call in a :class:`~llmtally.Tally`.

    Get it with ``tally.langchain()`` (one per Tally) and pass it in a run's config
    (``chain.invoke(x, config={"callbacks": [handler]})``) or bind it to a model
    (``model.with_config(callbacks=[handler])``). It runs inline and never raises into the
    chain, except :class:`~llmtally.BudgetExceeded` when a budget stops a call before it is sent.
    """

    raise_error = True  # for BudgetExceeded only: every other fault is caught here
    run_inline = True  # no thread-pool hop under ainvoke

    def __init__(self, tally: Recorder) -> None:
        super().__init__()
        self.tally = tally
        # keyed by _key(run id)
        self._runs: dict[Any, RunStart] = {}
        self._roots: dict[Any, UUID] = {}  # chain / tool / retriever run -> its root run
        self._ended: OrderedDict[Any, None] = OrderedDict()
        self._lock = threading.Lock()  # only for trimming the tables; single dict ops are atomic

    def __repr__(self) -> str:
        return f"<llmtally LangChainHandler for {self.tally!r}>"

    # -- model runs -------------------------------------------------------------------------

    def _on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[Any]], *,
                             run_id: UUID, parent_run_id: UUID | None = None,
                             tags: list[str] | None = None, metadata: dict[str, Any] | None = None,
                             **kwargs: Any) -> None:
        """A chat model call starts: remember it; hold its estimate on the budgets."""
        prompt = messages[0] if isinstance(messages, (list, tuple)) and len(messages) == 1 else None
        self._start(serialized, prompt, "chat", run_id, parent_run_id, tags, metadata, kwargs)

    async def _aon_chat_model_start(self, serialized: dict[str, Any], messages: list[list[Any]],
                                    *, run_id: UUID, parent_run_id: UUID | None = None,
                                    tags: list[str] | None = None,
                                    metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        prompt = messages[0] if isinstance(messages, (list, tuple)) and len(messages) == 1 else None
        await self._astart(serialized, prompt, "chat", run_id, parent_run_id, tags, metadata, kwargs)

    def _on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID,
                      parent_run_id: UUID | None = None, tags: list[str] | None = None,
                      metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """A text-completion (legacy ``LLM``) call starts."""
        prompt = prompts[0] if isinstance(prompts, (list, tuple)) and len(prompts) == 1 else None
        self._start(serialized, prompt, "completion", run_id, parent_run_id, tags, metadata, kwargs)

    async def _aon_llm_start(self, serialized: dict[str, Any], prompts: list[str], *,
                             run_id: UUID, parent_run_id: UUID | None = None,
                             tags: list[str] | None = None,
                             metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        prompt = prompts[0] if isinstance(prompts, (list, tuple)) and len(prompts) == 1 else None
        await self._astart(serialized, prompt, "completion", run_id, parent_run_id, tags,
                           metadata, kwargs)

    on_chat_model_start = _StartHook("_on_chat_model_start", "_aon_chat_model_start")
    on_llm_start = _StartHook("_on_llm_start", "_aon_llm_start")

    def on_llm_new_token(self, token: str | list[str | dict[str, Any]], *, run_id: UUID,
                         **kwargs: Any) -> None:
        """A streamed chunk: the first one gives the time to first token."""
        try:
            run = self._runs.get(_key(run_id))
            if run is not None and run.first_token is None:
                run.first_token = time.perf_counter()
        except Exception as exc:
            fault("on_llm_new_token", exc)

    def on_llm_end(self, response: Any, *, run_id: UUID, parent_run_id: UUID | None = None,
                   tags: list[str] | None = None, **kwargs: Any) -> None:
        """The call ended: one event, and its budget hold settled to the real cost."""
        self._finish(response, run_id, parent_run_id, tags, None)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, parent_run_id: UUID | None = None,
                     tags: list[str] | None = None, **kwargs: Any) -> None:
        """The call failed (or its stream was left): an ``error`` event, its hold released."""
        self._finish(kwargs.get("response"), run_id, parent_run_id, tags, error)

    def _start(self, serialized: Any, prompt: Any, call_type: str, run_id: UUID,
               parent_run_id: UUID | None, tags: Any, metadata: Any, kwargs: Mapping[str, Any]) -> None:
        try:
            started = self._new_run(serialized, prompt, call_type, run_id, parent_run_id, tags,
                                    metadata, kwargs)
            if started is None:
                return
            run, meta, params = started
            if self.tally.budgets is not None:
                run.hold = self._reserve(run, meta, params)
            self._started(run)
        except BudgetExceeded:
            raise
        except Exception as exc:
            fault("on_llm_start", exc)

    async def _astart(self, serialized: Any, prompt: Any, call_type: str, run_id: UUID,
                      parent_run_id: UUID | None, tags: Any, metadata: Any,
                      kwargs: Mapping[str, Any]) -> None:
        """:meth:`_start` under LangChain's async callback manager: the hold is taken on a
        worker thread, so the event loop never waits for the database; the rest (the offer
        to LiteLLM is a context variable) stays in the caller's context."""
        try:
            started = self._new_run(serialized, prompt, call_type, run_id, parent_run_id, tags,
                                    metadata, kwargs)
            if started is None:
                return
            run, meta, params = started
            run.hold = await reserve_off_loop(self.tally, self._reserve, run, meta, params)
            self._started(run)
        except BudgetExceeded:
            raise
        except Exception as exc:
            fault("on_llm_start", exc)

    def _new_run(self, serialized: Any, prompt: Any, call_type: str, run_id: UUID,
                 parent_run_id: UUID | None, tags: Any, metadata: Any,
                 kwargs: Mapping[str, Any]) -> tuple[RunStart, Mapping[str, Any], Mapping[str, Any]] | None:
        key = _key(run_id)
        if key in self._ended or key in self._runs:
            return None  # a start after its own end (out of order), or a repeated start
        meta = metadata if type(metadata) is dict or isinstance(metadata, Mapping) else {}
        params = mapping(kwargs.get("invocation_params"))
        run = RunStart(
            self.tally, run_id, provider=text(meta.get("ls_provider")) or class_provider(serialized),
            model=model_name(meta, params), serialized=serialized,
            call_type=call_type, parent=parent_run_id,
            root=self._roots.get(_key(parent_run_id), parent_run_id) if parent_run_id else run_id,
            tags=tags, metadata=meta, name=kwargs.get("name"), prompt=prompt)
        return run, meta, params

    def _started(self, run: RunStart) -> None:
        if self.tally.litellm_attached:
            run.token = _handoff.offer(run)
        self._remember(self._runs, _key(run.run_id), run, _MAX_RUNS)

    def _reserve(self, run: RunStart, meta: Mapping[str, Any],
                 params: Mapping[str, Any]) -> Reservation | None:
        """Hold the call's estimate (raises BudgetExceeded: the call is not sent). A blocked
        call's event carries the run ids through a scope around the check."""
        with _scope.attributed(request_id=run.request_id or run.scope.request_id or str(run.root),
                               metadata=run.run_metadata()):
            return self.tally.reserve(
                model=run.model or run.class_name, provider=run.provider,
                input_tokens=run.count_prompt(), max_tokens=max_tokens(meta, params),
                call_type=run.call_type, project=run.project, user=run.user,
                session=run.session, tags=clean_tags(run.tags))

    def _finish(self, response: Any, run_id: Any, parent_run_id: Any, tags: Any,
                error: BaseException | None) -> None:
        try:
            key = _key(run_id)
            run = self._runs.pop(key, None)
            self._mark_ended(key)
            if run is not None:
                _handoff.withdraw(run, run.token)
                if run.claimed:  # LiteLLM recorded this call and settles its hold
                    self.tally.release(_handoff.take_hold(run), sent=True)
                    return
            if isinstance(error, BudgetExceeded):  # stopped by a budget: recorded as blocked
                if run is not None:
                    self.tally.release(run.hold)
                return
            if run is not None and run.hold is None and error is None and self.tally.record_later(
                    functools.partial(later_event, run, response, run_id, parent_run_id, tags,
                                      time.perf_counter(), self.tally.now())):
                return  # the usual case: the event is read and priced on the writer thread
            event = langchain_event(run, response, run_id=run_id, parent_run_id=parent_run_id,
                                    tags=tags, error=error)
            self.tally.record_event(event, reservation=run.hold if run is not None else None)
        except Exception as exc:
            fault("on_llm_end", exc)

    # -- the runs around model calls: followed only to know each call's root run ------------

    def on_chain_start(self, serialized: Any, inputs: Any, *, run_id: UUID,
                       parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        """Note the chain's root run."""
        self._enter(run_id, parent_run_id)

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the chain."""
        self._roots.pop(_key(run_id), None)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the chain."""
        self._roots.pop(_key(run_id), None)

    def on_tool_start(self, serialized: Any, input_str: Any, *, run_id: UUID,
                      parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        """Note the tool's root run (a tool may call a model)."""
        self._enter(run_id, parent_run_id)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the tool run."""
        self._roots.pop(_key(run_id), None)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the tool run."""
        self._roots.pop(_key(run_id), None)

    def on_retriever_start(self, serialized: Any, query: Any, *, run_id: UUID,
                           parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        """Note the retriever's root run (a retriever may call a model)."""
        self._enter(run_id, parent_run_id)

    def on_retriever_end(self, documents: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the retriever run."""
        self._roots.pop(_key(run_id), None)

    def on_retriever_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the retriever run."""
        self._roots.pop(_key(run_id), None)

    def _enter(self, run_id: Any, parent_run_id: Any) -> None:
        try:
            root = self._roots.get(_key(parent_run_id), parent_run_id) if parent_run_id else run_id
            self._remember(self._roots, _key(run_id), root, _MAX_RUNS)
        except Exception as exc:
            fault("on_chain_start", exc)

    def _mark_ended(self, key: Any) -> None:
        ended = self._ended
        ended[key] = None
        if len(ended) > _MAX_ENDED:
            try:
                ended.popitem(last=False)
            except KeyError:  # emptied meanwhile
                pass

    def _remember(self, table: dict[Any, Any], key: Any, value: Any, limit: int) -> None:
        table[key] = value
        if len(table) > limit:
            with self._lock:
                while len(table) > limit:
                    try:
                        del table[next(iter(table))]
                    except (KeyError, RuntimeError, StopIteration):  # changed meanwhile
                        break


def _key(run_id: Any) -> Any:
    """The tables' key for a run id: its integer (``UUID.__hash__`` runs in Python)."""
    return run_id.int if type(run_id) is UUID else run_id


def fault(hook: str, exc: BaseException) -> None:
    warn_limited("langchain-hook", "llmtally: LangChain %s handling failed (%s: %s)", hook,
                 type(exc).__name__, exc, exc_info=True)


# -- embeddings ------------------------------------------------------------------------------
