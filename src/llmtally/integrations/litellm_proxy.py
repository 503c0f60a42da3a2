"""The LiteLLM proxy's side of budgets: a request's hold taken in ``async_pre_call_hook`` with
the caller the proxy authenticated, found again by the request's deployment hook through a
token of ours in its metadata."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from . import litellm_compat as compat
from .litellm_events import PROXY_ADMIN, mapping, text

__all__ = ["PROXY_TOKEN_KEY", "request_view", "put_token", "proxy_token", "is_auth_rejection"]

PROXY_TOKEN_KEY = "llmtally_hold"  # in a proxy request's metadata: its hold, taken before routing


def request_view(data: Mapping[str, Any], user_api_key_dict: Any) -> dict[str, Any]:
    """A proxy request as call kwargs for the hold's estimate: the caller's identity as the
    ``user_api_key_*`` metadata the proxy puts on the request's logging (so the hold is
    attributed like the event), and the model group's first deployment model (so the estimate
    is priced and ``model=`` budgets match what the event will record)."""
    caller = _caller_metadata(user_api_key_dict)
    meta = {**mapping(data.get("metadata")), **mapping(data.get("litellm_metadata")), **caller}
    return {**data, "metadata": meta, "model": _deployment_model(data.get("model"))}


def put_token(data: dict[str, Any]) -> str:
    """Put a new token of ours in the request's metadata and return it (a client-chosen value
    is overwritten): the request's deployment hook finds the hold by it."""
    token = uuid.uuid4().hex
    target = "litellm_metadata" if isinstance(data.get("litellm_metadata"), dict) \
        and not isinstance(data.get("metadata"), dict) else "metadata"
    if not isinstance(data.get(target), dict):
        data[target] = {}
    data[target][PROXY_TOKEN_KEY] = token
    return token


def proxy_token(kwargs: Mapping[str, Any]) -> str | None:
    """The token :func:`put_token` gave the request, wherever LiteLLM carried the metadata."""
    params = mapping(kwargs.get("litellm_params"))
    for meta in (kwargs.get("metadata"), kwargs.get("litellm_metadata"), params.get("metadata"),
                 params.get("litellm_metadata")):
        token = mapping(meta).get(PROXY_TOKEN_KEY)
        if isinstance(token, str):
            return token
    return None


def _deployment_model(model: Any) -> Any:
    if not isinstance(model, str):
        return model
    return next(iter(compat.proxy_deployment_models(model)), model)


def _caller_metadata(user_api_key_dict: Any) -> dict[str, str]:
    """The proxy caller's identity (a ``UserAPIKeyAuth``) as ``user_api_key_*`` metadata."""
    found: dict[str, str] = {}
    for _, field, attr in compat.PROXY_CALLER_FIELDS:
        value: Any = (user_api_key_dict.get(attr) if isinstance(user_api_key_dict, Mapping)
                      else getattr(user_api_key_dict, attr, None))
        if text(value) and not (attr == "user_id" and value == PROXY_ADMIN):
            found[field] = value
    return found


def is_auth_rejection(kwargs: Any) -> bool:
    """A LiteLLM proxy request refused by its key check (401/403 before any provider call)."""
    error = kwargs.get("exception") if isinstance(kwargs, Mapping) else None
    if type(error).__name__ not in ("HTTPException", "ProxyException"):
        return False
    code = getattr(error, "status_code", None) or getattr(error, "code", None)
    return str(code) in ("401", "403")
