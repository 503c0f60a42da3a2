"""Who may read, and what every response says about itself.

Without a token the server answers anyone who can reach it, so it binds to loopback only
(``llmtally serve`` refuses any other address without one). With a token, every request
carries it as ``Authorization: Bearer TOKEN``, or the browser's cookie, which a first visit
to ``/?token=TOKEN`` sets (and then redirects to drop the token from the address bar and
history). Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

__all__ = ["SECURITY_HEADERS", "COOKIE", "guard"]

COOKIE = "llmtally_token"
SECURITY_HEADERS = {
    # no script at all; styles only from our own stylesheet; images only inline (data:)
    "Content-Security-Policy": ("default-src 'none'; style-src 'self'; img-src 'self' data:; "
                                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Resource-Policy": "same-origin",
}

Handler = Callable[[Request], Awaitable[Response]]


def _matches(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def _bearer(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def guard(token: str | None) -> Callable[[Request, Handler], Awaitable[Response]]:
    """HTTP middleware: the token check (when there is a token) and the security headers."""

    async def middleware(request: Request, call_next: Handler) -> Response:
        if request.method not in ("GET", "HEAD"):
            response: Response = JSONResponse({"error": "read-only: only GET is served"},
                                              status_code=405, headers={"Allow": "GET, HEAD"})
        elif any("\x00" in k or "\x00" in v  # PostgreSQL text cannot hold it: was a 500
                 for k, v in request.query_params.multi_items()):
            response = JSONResponse({"error": "a query parameter holds a NUL character"},
                                    status_code=400)
        elif token is None or _matches(_bearer(request), token) \
                or _matches(request.cookies.get(COOKIE), token):
            response = await call_next(request)
        elif _matches(request.query_params.get("token"), token):
            rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            # one leading slash: "//host/x" (or "/\\host") would send the browser to that host
            target = "/" + request.url.path.lstrip("/\\") + (f"?{urlencode(rest)}" if rest else "")
            response = RedirectResponse(target, status_code=303)
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict",
                                secure=request.url.scheme == "https",
                                path=request.scope.get("root_path") or "/")
        else:
            response = JSONResponse(
                {"error": "a token is needed: send 'Authorization: Bearer TOKEN', or open "
                          "the dashboard once at /?token=TOKEN"},
                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    return middleware
