"""Who calls the API, and what a browser may make it do: tokens, dashboard sessions, cross-origin refusal, framing.

A program names itself with `Authorization: Bearer <token>`; a browser with the session cookie the dashboard's
sign-in set. Cookies ride along with any request a browser sends, whichever page made it, so a state-changing
request a browser marks as coming from another origin is refused before anything else: a page on another site,
and one on the same host but another port (same-site, so SameSite=Strict lets the cookie through), alike.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from typing import Literal

from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from producer import dashboard
from producer.client import Farm
from producer.schemas import problem
from shared.config import Settings
from shared.db.tokens import Caller, any_tokens, session_caller

OPEN_PATHS = ("/healthz", "/readyz", dashboard.LOGIN)
"""Probes answer without a token (a load balancer or orchestrator holds none), and so does the sign-in page."""
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
FRAMING = {"Content-Security-Policy": "frame-ancestors 'none'", "X-Frame-Options": "DENY"}
"""No page may show the dashboard in a frame, where a click meant for the framing page would press its buttons."""

Next = Callable[[Request], Awaitable[Response]]


def install(app: FastAPI, settings: Settings, listen_host: str) -> None:
    """The API's middleware, outermost last: the caller, then the cross-origin refusal, then the headers that
    every answer carries (refusals included)."""
    app.middleware("http")(Gate(settings.api_auth, _loopback(listen_host)).authenticate)
    app.middleware("http")(refuse_cross_origin)
    app.middleware("http")(no_framing)


class Gate:
    """Tokens are required per `ARCHFARM_API_AUTH`: `on` always, `off` never, `auto` beyond loopback, and on
    loopback too once any token has been created (from then on jobs have owners, and any local process would
    otherwise act as the operator)."""

    def __init__(self, mode: Literal["auto", "on", "off"], loopback: bool) -> None:
        self.required = mode == "on" or (mode == "auto" and not loopback)
        self.once_tokens = mode == "auto" and loopback

    def _required(self, farm: Farm) -> bool:
        if not self.required and self.once_tokens:
            with farm.sessions() as session:
                self.required = any_tokens(session)  # tokens are never deleted: once true, true for good
        return self.required

    async def authenticate(self, request: Request, call_next: Next) -> Response:
        """Every route but the probes and the static files: the caller is the token's (or the session's)
        holder, kept on `request.state.caller` for the ownership checks; a wrong or revoked token is always
        refused. On the probes a caller is only told apart (it sees more of `/readyz`)."""
        request.state.caller = None
        if request.url.path.startswith("/static/"):
            return await call_next(request)
        farm: Farm = request.app.state.farm
        token = _bearer(request)
        secret = request.cookies.get(dashboard.SESSION_COOKIE) if token is None else None
        request.state.caller = await run_in_threadpool(_caller, farm, token, secret)
        if request.url.path in OPEN_PATHS or request.state.caller is not None:
            return await call_next(request)
        if token is not None or await run_in_threadpool(self._required, farm):
            if dashboard.is_page(request):
                return dashboard.sign_in_redirect(request)
            message = "a valid API token is required (Authorization: Bearer ...)"
            return problem(401, message, {"WWW-Authenticate": "Bearer"})
        return await call_next(request)


def _caller(farm: Farm, token: str | None, secret: str | None) -> Caller | None:
    if token is not None:
        return farm.caller(token)
    if secret is None:
        return None
    with farm.sessions() as session:
        return session_caller(session, secret)


async def refuse_cross_origin(request: Request, call_next: Next) -> Response:
    """A state-changing request that a browser says comes from another origin is refused (403)."""
    if request.method not in SAFE_METHODS and cross_origin(request):
        message = "a request from another site or port is refused: use the dashboard's own pages"
        return dashboard.error_page(message, 403) if dashboard.is_page(request) else problem(403, message)
    return await call_next(request)


def cross_origin(request: Request) -> bool:
    """Whether a browser sent this request from another origin. Browsers say so in `Sec-Fetch-Site` (anything
    but `same-origin`, or `none` for what the user typed, is another origin); one too old to send it still
    sends `Origin` on a POST, compared with this server's own. A program sends neither: it holds a token, not
    a browser's ambient cookie, so there is nothing to forge."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site not in ("same-origin", "none")
    origin = request.headers.get("origin")
    return origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}"


async def no_framing(request: Request, call_next: Next) -> Response:
    response = await call_next(request)
    response.headers.update(FRAMING)
    return response


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
