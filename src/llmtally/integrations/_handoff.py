"""One event for a LangChain model call that LiteLLM makes (``ChatLiteLLM``, ``LiteLLMEmbeddings``,
or any model whose code calls ``litellm.completion``), when both ``tally.langchain()`` and
``tally.litellm()`` watch it.

The LangChain side *offers* each call it is running (``offer``, a ``ContextVar``, so only
code running inside that call sees it); the LiteLLM logger of the same Tally *claims* it when
LiteLLM starts the request (``claim``). A claimed call is recorded by LiteLLM alone — it
knows the real provider, the deployment's model, the model the provider answered and the cache
tokens — with the LangChain side's attribution (project, user, tags, run ids) merged in, and
the budget hold taken before the call moves with it (``take_hold``) to be settled by LiteLLM's
success or failure hook. The LangChain side then records nothing for that call.

Nothing here imports LiteLLM or LangChain: both integrations import this module.
"""

from __future__ import annotations

import contextvars
from typing import Any, Protocol

from .._events.scope import Attribution

__all__ = ["OfferedCall", "offer", "withdraw", "claim", "take_hold"]


class OfferedCall(Protocol):
    """What the LangChain side shares about a call in progress."""

    tally: Any
    hold: Any  # a Reservation, or None
    claimed: bool
    ended: bool

    def attribution(self) -> Attribution:
        """The call's attribution as LangChain gave it (metadata, tags, run ids)."""


_current: contextvars.ContextVar[OfferedCall | None] = contextvars.ContextVar(
    "llmtally_offered_call", default=None)


def offer(call: OfferedCall) -> contextvars.Token[OfferedCall | None]:
    """Make ``call`` visible to LiteLLM calls made from here on, in this context."""
    return _current.set(call)


def withdraw(call: OfferedCall, token: contextvars.Token[OfferedCall | None] | None) -> None:
    """The call ended: it can no longer be claimed. Restores the previous offer when ``call``
    is still the current one here (a call ending in another context, e.g. a stream closed by
    the garbage collector, leaves an ended offer behind, which nobody can claim)."""
    call.ended = True
    if token is None or _current.get() is not call:
        return
    try:
        _current.reset(token)
    except ValueError:  # the token belongs to another context
        _current.set(None)


def claim(tally: Any) -> OfferedCall | None:
    """The call offered here by the same Tally's LangChain side, now claimed; or None."""
    call = _current.get()
    if call is None or call.ended or call.tally is not tally:
        return None
    call.claimed = True
    return call


def take_hold(call: OfferedCall) -> Any:
    """The call's budget hold, handed over once (None afterwards)."""
    held, call.hold = call.hold, None
    return held
