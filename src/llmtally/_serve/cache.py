"""Answers shared for a few seconds: the same GET (path and query string) asked again within
``seconds`` gets the answer already made, and concurrent askers of one that is being made wait
for it instead of each making it. Twenty people with the dashboard open, or several Prometheus
servers scraping, then cost the ledger one query each ``seconds``; what they see is at most
that old. Only 200 answers are kept; the token check runs before (it is the outer middleware).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

__all__ = ["ResponseCache", "DEFAULT_CACHE_S"]

DEFAULT_CACHE_S = 5.0
_MAX_ENTRIES = 64  # a dashboard page is 100-300 kB
Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class _Entry:
    expires: float
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]


class ResponseCache:
    """The middleware (see the module's docs); ``seconds`` 0 turns it off."""

    def __init__(self, seconds: float = DEFAULT_CACHE_S, max_entries: int = _MAX_ENTRIES) -> None:
        self.seconds = seconds
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str, str], _Entry] = OrderedDict()
        self._making: dict[tuple[str, str, str], asyncio.Lock] = {}

    def _fresh(self, key: tuple[str, str, str]) -> Response | None:
        entry = self._entries.get(key)
        if entry is None or entry.expires <= time.monotonic():
            return None
        return Response(entry.body, status_code=entry.status, headers=dict(entry.headers))

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        if self.seconds <= 0 or request.method != "GET" or "/static/" in request.url.path:
            return await call_next(request)
        key = (str(request.scope.get("root_path", "")), request.url.path, request.url.query)
        found = self._fresh(key)
        if found is not None:
            return found
        lock = self._making.setdefault(key, asyncio.Lock())
        async with lock:
            found = self._fresh(key)
            if found is not None:
                return found
            try:
                response = await call_next(request)
            finally:  # those waiting hold the lock already; later askers find the entry
                self._making.pop(key, None)
            body = b"".join([chunk if isinstance(chunk, bytes) else chunk.encode()
                             async for chunk in response.body_iterator])  # type: ignore[attr-defined]
            headers = tuple((name, value) for name, value in response.headers.items()
                            if name.lower() != "content-length")
            if response.status_code == 200:
                self._entries[key] = _Entry(time.monotonic() + self.seconds,
                                            response.status_code, body, headers)
                self._entries.move_to_end(key)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
            return Response(body, status_code=response.status_code, headers=dict(headers))
