"""What the fake provider's server and its routes share of the wire formats: error bodies,
server-sent events, a reply cut into stream chunks."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["SseEvent", "error_body", "split_reply"]

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}

SseEvent = tuple[str, Any, bool]  # SSE (event name or "", data, is a content chunk)


def error_body(path: str, status: int, message: str) -> dict[str, Any]:
    """An OpenAI- or Anthropic-style error JSON, by path."""
    kind = _ERROR_TYPES.get(status, "api_error")
    if path.startswith("/v1/messages"):
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": kind, "param": None, "code": kind}}


def split_reply(reply: str) -> list[str]:
    """Word-sized pieces that concatenate back to exactly ``reply`` (at least one piece)."""
    return [p for p in re.split(r"(?<=\s)(?=\S)", reply) if p] or [""]
