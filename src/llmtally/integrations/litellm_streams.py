"""Streams a caller leaves unread or half read: recorded (prompt and the chunks consumed, counted
offline) when the stream is closed, collected or the process exits."""

from __future__ import annotations

import atexit
import functools
import gc
import queue
import threading
import time
import weakref
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from .._events.usage import response_model, response_text
from .._log import warn_limited
from . import litellm_compat as compat
from .litellm_events import EVENT_ID_KEY, call_key, litellm_event

if TYPE_CHECKING:
    from .._budgets.states import Reservation
    from .._recorder import Recorder
    from .litellm_events import CallStart


class WatchingLogger(Protocol):
    """What the stream watch asks of a LiteLLM logger (``LiteLLMLogger``)."""

    tally: Recorder

    def saw_start(self, call_id: str) -> bool: ...

    def take_start(self, call_id: str) -> tuple[CallStart | None, Reservation | None]: ...

# -- abandoned streams -----------------------------------------------------------------------
#
# LiteLLM logs a stream only when the caller reads it to the end. A stream left halfway (a
# ``break``, an exception in the caller's loop, a cancelled task) logs nothing, although the
# provider charged for the prompt and for what it sent. ``install_stream_watch()`` (run once by
# ``tally.litellm()``) wraps four methods of LiteLLM's ``CustomStreamWrapper``:
#
# - ``__init__`` notes, for a call one of our loggers saw starting, what the event needs (a
#   shallow copy of a few LiteLLM kwargs, the wrapper's own list of chunks returned so far) and
#   registers a ``weakref.finalize`` on the stream;
# - ``__next__`` / ``__anext__`` mark the stream finished when it ends or fails (LiteLLM then
#   logs it itself) and note when the first chunk came;
# - ``close`` / ``aclose``, called by the user (not by LiteLLM itself at the end of a stream),
#   and otherwise the finalizer when the stream object is released, hand a stream that did not
#   finish to a daemon thread that records it: ``streamed``, ``estimated``, prompt and consumed
#   chunks counted offline, ``metadata["stream_abandoned"] = True``.
#
# A stream is released by Python's cycle collector, not at once (LiteLLM's logging object and
# the stream refer to each other), so ``tally.flush()`` runs ``gc.collect()`` while watched
# streams are alive — on a thread of its own, never the caller's (see ``collect_garbage``).
#
# The finalizer only puts the stream on a ``queue.SimpleQueue`` (safe from finalizers and GC);
# nothing is kept per stream once it is released; every wrapped method passes through what
# LiteLLM returns or raises, and a fault of ours is logged, never raised.

_STATE_ATTR = "_llmtally_stream"
_recorder: threading.Thread | None = None
_collection: threading.Event | None = None  # set when the latest collection started has ended


_SNAPSHOT_KEYS = (EVENT_ID_KEY, "litellm_call_id", "model", "custom_llm_provider", "messages", "input",
                  "call_type", "litellm_params", "litellm_trace_id", "user", "stream_options",
                  "model_id")


LOGGERS: weakref.WeakSet[WatchingLogger] = weakref.WeakSet()


watched: weakref.WeakSet[Any] = weakref.WeakSet()  # streams alive and watched


_ABANDONED: queue.SimpleQueue[Any] = queue.SimpleQueue()


install_lock = threading.Lock()


_installed = False


class _StreamState:
    __slots__ = ("call_id", "kwargs", "start_time", "chunks", "first_chunk_at", "ended_at",
                 "finished", "in_next", "finalizer")

    def __init__(self, call_id: str, kwargs: dict[str, Any], start_time: Any, chunks: list[Any]) -> None:
        self.call_id, self.kwargs, self.start_time, self.chunks = call_id, kwargs, start_time, chunks
        self.first_chunk_at: datetime | None = None
        self.ended_at: datetime | None = None
        self.finished = False
        self.in_next = False
        self.finalizer: Any = None


def install_stream_watch() -> bool:
    """Wrap LiteLLM's ``CustomStreamWrapper`` once per process so that abandoned streams are
    recorded (see the notes above). Returns False if this LiteLLM's wrapper has another shape."""
    global _installed
    with install_lock:
        if _installed:
            return True
        cls: Any = compat.stream_wrapper_class()
        if cls is None:
            compat.warn_lost("CustomStreamWrapper", "streams left unread are not recorded "
                             "(streams read to the end still are)")
            return False
        original_init, original_next, original_anext = cls.__init__, cls.__next__, cls.__anext__

        @functools.wraps(original_init)
        def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            original_init(self, *args, **kwargs)
            _watch(self)

        @functools.wraps(original_next)
        def __next__(self):  # type: ignore[no-untyped-def]
            state = self.__dict__.get(_STATE_ATTR)
            if state is None:
                return original_next(self)
            state.in_next = True
            try:
                chunk = original_next(self)
            except Exception:  # the end (StopIteration) or a failure: LiteLLM logs both itself
                state.finished = True
                raise
            finally:
                state.in_next = False
            if state.first_chunk_at is None:
                state.first_chunk_at = datetime.now()
            return chunk

        @functools.wraps(original_anext)
        async def __anext__(self):  # type: ignore[no-untyped-def]
            state = self.__dict__.get(_STATE_ATTR)
            if state is None:
                return await original_anext(self)
            state.in_next = True
            try:
                chunk = await original_anext(self)
            except Exception:  # StopAsyncIteration or a failure; not CancelledError
                state.finished = True
                raise
            finally:
                state.in_next = False
            if state.first_chunk_at is None:
                state.first_chunk_at = datetime.now()
            return chunk

        # patching LiteLLM's class in place is the point here
        cls.__init__, cls.__next__, cls.__anext__ = (
            __init__, __next__, __anext__)
        atexit.register(_drain_at_exit)  # after the ledger's exit flush was registered: runs before it
        if callable(getattr(cls, "close", None)):
            original_close = cls.close

            @functools.wraps(original_close)
            def close(self):  # type: ignore[no-untyped-def]
                try:
                    return original_close(self)
                finally:
                    _closed_by_caller(self)

            cls.close = close
        if callable(getattr(cls, "aclose", None)):
            original_aclose = cls.aclose

            @functools.wraps(original_aclose)
            async def aclose(self):  # type: ignore[no-untyped-def]
                try:
                    return await original_aclose(self)
                finally:
                    _closed_by_caller(self)

            cls.aclose = aclose
        _installed = True
        return True


def _watch(stream: Any) -> None:
    """Register a new stream for a call one of our loggers saw starting."""
    try:
        loggers = list(LOGGERS)
        if not loggers:
            return
        found = compat.stream_call(stream)
        if found is None:
            return
        details, chunks, start_time = found
        call_id = call_key(details)
        if call_id is None or not any(lg.saw_start(call_id) for lg in loggers):
            return
        state = _StreamState(call_id, {key: details[key] for key in _SNAPSHOT_KEYS if key in details},
                             start_time, chunks)
        state.finalizer = weakref.finalize(stream, _stream_released, state)
        state.finalizer.atexit = True
        stream.__dict__[_STATE_ATTR] = state
        watched.add(stream)
        _ensure_recorder()
    except Exception as exc:
        warn_limited("litellm-stream", "llmtally: could not watch a LiteLLM stream (%s: %s)",
                     type(exc).__name__, exc, exc_info=True)


def state_of(stream: Any) -> _StreamState:
    state: _StreamState = stream.__dict__[_STATE_ATTR]
    return state


def _closed_by_caller(stream: Any) -> None:
    state = stream.__dict__.get(_STATE_ATTR) if hasattr(stream, "__dict__") else None
    if state is not None and not state.in_next and not state.finished and state.finalizer is not None:
        state.finalizer()  # runs _stream_released now, once


def _stream_released(state: _StreamState) -> None:
    """The stream was closed by its caller or released: queue it if it did not finish. Runs in
    finalizer context: only a ``SimpleQueue.put``, which is safe there."""
    if not state.finished:
        state.finished = True
        state.ended_at = datetime.now()
        _ABANDONED.put(state)


def _ensure_recorder() -> None:
    global _recorder
    if _recorder is None or not _recorder.is_alive():  # also after a fork
        with install_lock:
            if _recorder is None or not _recorder.is_alive():
                _recorder = threading.Thread(target=_record_abandoned_forever,
                                             name="llmtally-litellm-streams", daemon=True)
                _recorder.start()


def _record_abandoned_forever() -> None:
    while True:
        item = _ABANDONED.get()
        if isinstance(item, threading.Event):  # a flush waiting for what was queued before it
            item.set()
            continue
        try:
            _record_abandoned(item)
        except Exception as exc:
            warn_limited("litellm-stream", "llmtally: could not record an abandoned LiteLLM stream "
                         "(%s: %s)", type(exc).__name__, exc, exc_info=True)


def _record_abandoned(state: _StreamState) -> None:
    for logger_ in list(LOGGERS):
        start, held = logger_.take_start(state.call_id)
        if start is None:  # not this logger's call, or LiteLLM logged it after all
            continue
        chunks = list(state.chunks)
        text = "".join(response_text(chunk) for chunk in chunks)
        resolved = next((model for model in map(response_model, chunks) if model), None)
        kwargs = {**state.kwargs, "stream": True, "completion_start_time": state.first_chunk_at}
        event = litellm_event(kwargs, {"model": resolved, "choices": [{"message": {"content": text}}]},
                              state.start_time, state.ended_at, failed=False, call_start=start,
                              abandoned=True)
        logger_.tally.record_event(event, reservation=held)


def wait_for_abandoned_streams(deadline: float) -> None:
    """Return once the streams released so far are recorded (the recorder runs them in order)."""
    if _recorder is None:
        return
    _ensure_recorder()
    done = threading.Event()
    _ABANDONED.put(done)
    done.wait(max(0.0, deadline - time.monotonic()))


def collect_garbage(deadline: float) -> None:
    """``gc.collect()`` on a thread of our own; wait for it until ``deadline``.

    A collection runs the finalisers of every object it frees, not only ours: an abandoned
    OpenAI SDK stream closes its HTTP response there, which takes httpcore's connection-pool
    lock (a ``threading.Lock``, not re-entrant). Run on the caller's thread while that thread
    holds the lock (``flush()`` from a SIGTERM handler that interrupted a request does), it
    would wait for itself forever. On a thread of ours, the finaliser waits only until the
    caller releases the lock, and the caller waits at most until ``deadline``."""
    global _collection
    done = _collection = threading.Event()

    def collect() -> None:
        global _collection
        try:
            with _collect_lock:  # one collection at a time: a second gc.collect() returns at once
                gc.collect()
        finally:
            done.set()
            if _collection is done:
                _collection = None

    threading.Thread(target=collect, name="llmtally-collect", daemon=True).start()
    done.wait(max(0.0, deadline - time.monotonic()))


_collect_lock = threading.Lock()


def _drain_at_exit() -> None:
    wait_for_abandoned_streams(time.monotonic() + 2.0)


def wait_for_running_collection(deadline: float) -> None:
    """An earlier flush's collection, held up in a finaliser: let it end (until ``deadline``)."""
    running = _collection
    if running is not None:
        running.wait(max(0.0, deadline - time.monotonic()))
