"""The ASGI application: the dashboard at ``/``, the JSON API under ``/api/v1/`` (schema at
``/api/v1/openapi.json``), Prometheus at ``/metrics``, and the stylesheet.

Only GET is served, and nothing it runs writes to the ledger. Errors a caller can cause (a bad
date, an unknown filter, a cursor that is not ours) are a 400 with one line; anything else is a
500 with no detail (the traceback goes to the server's log only).
"""

from __future__ import annotations

import logging
from importlib.resources import files
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from .._errors import ConfigError
from . import api, security
from .cache import DEFAULT_CACHE_S, ResponseCache
from .dashboard import render_dashboard
from .metrics import DEFAULT_REFRESH_S as DEFAULT_METRICS_REFRESH_S
from .metrics import DEFAULT_TOP, MetricsSnapshot, registry_for
from .source import LedgerView

if TYPE_CHECKING:
    from .._tally import Tally

__all__ = ["create_app", "DEFAULT_REFRESH_S"]

DEFAULT_REFRESH_S = 30
_LOG = logging.getLogger("llmtally.serve")
_MAX_ERROR = 300  # characters of a 400's message
_MAX_PARAM = 600  # characters of a dashboard query parameter (a cursor is the longest)


def create_app(tally: Tally, *, token: str | None = None, refresh_seconds: int = DEFAULT_REFRESH_S,
               metrics_top: int = DEFAULT_TOP, cache_seconds: float = DEFAULT_CACHE_S,
               metrics_refresh_seconds: float = DEFAULT_METRICS_REFRESH_S) -> FastAPI:
    """The application over ``tally``'s ledger. With ``token``, every request must carry it
    (see :mod:`.security`); the same answer is shared for ``cache_seconds`` (see
    :mod:`.cache`; 0 turns that off); ``/metrics`` is made again every
    ``metrics_refresh_seconds`` (see :class:`.metrics.MetricsSnapshot`; 0: at each scrape)."""
    if token is not None and len(token) < 16:
        raise ConfigError("the serve token must be at least 16 characters (e.g. from "
                          "`python -c 'import secrets; print(secrets.token_urlsafe())'`)")
    if not 1 <= refresh_seconds <= 86400:
        raise ConfigError(f"refresh_seconds={refresh_seconds}: use 1 to 86400")
    if not 0 <= metrics_refresh_seconds <= 3600:
        raise ConfigError(f"metrics_refresh_seconds={metrics_refresh_seconds}: use 0 (each "
                          "scrape reads the ledger) to 3600")
    if not 0 <= cache_seconds <= 3600:
        raise ConfigError(f"cache_seconds={cache_seconds}: use 0 (off) to 3600")
    app = FastAPI(title="llmtally", version=_version(), docs_url=None, redoc_url=None,
                  openapi_url="/api/v1/openapi.json")
    view = LedgerView(tally)
    app.state.view = view
    metrics_text = MetricsSnapshot(registry_for(view, metrics_top), metrics_refresh_seconds,
                                   alive=lambda: not tally.closed)
    stylesheet = files("llmtally").joinpath("templates/report.css").read_text(encoding="utf-8")
    # the last added runs first: the token check, then the shared answers
    app.middleware("http")(ResponseCache(cache_seconds))
    app.middleware("http")(security.guard(token))
    app.include_router(api.router)

    @app.exception_handler(ConfigError)
    @app.exception_handler(ValueError)
    @app.exception_handler(OverflowError)
    async def bad_request(request: Request, exc: Exception) -> JSONResponse:
        message = str(exc) if isinstance(exc, ConfigError) else "a value in the request is out of range"
        return JSONResponse({"error": message[:_MAX_ERROR]}, status_code=400)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        _LOG.error("llmtally serve: %s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": "internal error (see the server's log)"}, status_code=500,
                            headers=security.SECURITY_HEADERS)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard(request: Request) -> HTMLResponse:
        params = dict(request.query_params)
        if any(len(value) > _MAX_PARAM for value in params.values()):
            raise ConfigError(f"a query parameter is longer than {_MAX_PARAM} characters")
        page = render_dashboard(view, params, root=request.scope.get("root_path", "").rstrip("/"),
                                refresh_seconds=refresh_seconds)
        return HTMLResponse(page)

    @app.get("/static/report.css", include_in_schema=False)
    def css() -> Response:
        return Response(stylesheet, media_type="text/css; charset=utf-8",
                        headers={"Cache-Control": "max-age=300"})

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics_text.text(), media_type=CONTENT_TYPE_LATEST)

    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llmtally")
    except PackageNotFoundError:
        return "0"

