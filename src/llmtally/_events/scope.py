"""Attribution: which project, user, session and tags a call belongs to.

``Tally.scope(...)`` sets an :class:`Attribution` in a ``ContextVar``, so it follows the code
that runs inside it: nested scopes (the inner value wins, tags and metadata merge), asyncio
tasks (each task starts with a copy of its creator's context) and threads started with a
copied context (``contextvars.copy_context().run`` or ``asyncio.to_thread``). A plain
``threading.Thread`` starts with an empty context, as Python defines it.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["Attribution", "current", "attribution", "attributed", "merge_tags", "EMPTY", "SCOPE_KEYS"]

# the keys of scope(), Tally(scope=...) and llmtally.toml's [scope]
SCOPE_KEYS = ("project", "user", "session", "tags", "request_id", "metadata")


@dataclass(frozen=True, slots=True)
class Attribution:
    """Who a call is for. ``None`` means "not set here" (an outer scope's value shows through)."""

    project: str | None = None
    user: str | None = None
    session: str | None = None
    tags: tuple[str, ...] = ()
    request_id: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def merged(self, inner: Attribution) -> Attribution:
        """This scope with ``inner`` on top: inner scalars win, tags and metadata merge."""
        return Attribution(
            project=inner.project if inner.project is not None else self.project,
            user=inner.user if inner.user is not None else self.user,
            session=inner.session if inner.session is not None else self.session,
            tags=merge_tags(self.tags, inner.tags),
            request_id=inner.request_id if inner.request_id is not None else self.request_id,
            metadata=MappingProxyType({**self.metadata, **inner.metadata})
            if inner.metadata else self.metadata,
        )


EMPTY = Attribution()
_current: contextvars.ContextVar[Attribution] = contextvars.ContextVar("llmtally_scope", default=EMPTY)


def current() -> Attribution:
    """The attribution in force here."""
    return _current.get()


def attribution(
    *,
    project: str | None = None,
    user: str | None = None,
    session: str | None = None,
    tags: Iterable[str] | str | None = None,
    request_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Attribution:
    """These values as an Attribution, on its own (no scope in force is merged in);
    ``EMPTY`` itself when none is set, so callers can skip merging it."""
    made = Attribution(
        project=_text_or_none(project),
        user=_text_or_none(user),
        session=_text_or_none(session),
        tags=_as_tags(tags),
        request_id=_text_or_none(request_id),
        metadata=MappingProxyType(dict(metadata)) if metadata else MappingProxyType({}),
    )
    return EMPTY if made == EMPTY else made


@contextmanager
def attributed(
    *,
    project: str | None = None,
    user: str | None = None,
    session: str | None = None,
    tags: Iterable[str] | str | None = None,
    request_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Iterator[Attribution]:
    """Attribute every call inside the ``with`` block; yields the merged attribution."""
    inner = attribution(project=project, user=user, session=session, tags=tags,
                        request_id=request_id, metadata=metadata)
    merged = _current.get().merged(inner)
    token = _current.set(merged)
    try:
        yield merged
    finally:
        _current.reset(token)


def merge_tags(outer: tuple[str, ...], inner: tuple[str, ...]) -> tuple[str, ...]:
    if not inner:
        return outer
    if not outer:
        return inner
    return outer + tuple(tag for tag in inner if tag not in outer)


def _as_tags(tags: Iterable[str] | str | None) -> tuple[str, ...]:
    if tags is None:
        return ()
    if isinstance(tags, str):
        tags = [tags]
    seen: dict[str, None] = {}
    for tag in tags:
        if tag is not None and str(tag):
            seen.setdefault(str(tag), None)
    return tuple(seen)


def _text_or_none(value: object) -> str | None:
    return None if value is None else str(value)
