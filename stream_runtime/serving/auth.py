"""Access control: a server that listens beyond loopback needs a shared token, checked before any work is done.

Where a client puts the token (docs/protocol.md, "Access"):

- ``/ws``: the query parameter ``?token=`` (what a browser's ``new WebSocket(url)`` can send) or an
  ``Authorization: Bearer`` header. Not the cookie: a cookie rides along on websockets that other pages on the same
  host open, so it would not show that the client knows the token.
- every HTTP route but ``/health`` (the app, ``/recordings/``, ``/metrics``): ``?token=``, ``Authorization: Bearer``,
  or the cookie that a request with a valid ``?token=`` sets (``HttpOnly``, ``SameSite=Strict``), so that the page's
  own requests carry it.

Tokens are compared in constant time (``hmac.compare_digest``). A refused websocket gets HTTP 401 in the handshake
(403 where the server cannot send a response body), before the connection is accepted.

Example::

    token, generated = resolve_token("0.0.0.0", "auto")    # a random token; refuses a non-loopback host without one
    app = build_app(engine, token=token)                    # wraps the app in TokenAuth
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import secrets

from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection
from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocket

TOKEN_ENV = "STREAM_RUNTIME_TOKEN"
"""Environment variable the CLI reads the token from when ``--token`` is not given."""
TOKEN_QUERY = "token"
TOKEN_COOKIE = "stream_runtime_token"
MIN_TOKEN_CHARS = 16
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~-]+")
"""URL-safe characters only: the token travels in query strings, headers and a cookie without escaping."""
GENERATED_TOKEN_BYTES = 24
"""Entropy of ``--token auto`` (32 URL-safe characters)."""
OPEN_PATHS = frozenset({"/health"})
"""Routes answered without a token: a load balancer's liveness probe has none."""


def is_loopback(host: str) -> bool:
    """True for hosts only this machine can reach: ``localhost``, 127.0.0.0/8, ``::1``. "" and ``0.0.0.0`` are every
    interface; any other name may resolve to anything, so it counts as not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_token(token: str) -> str:
    """``token`` if it is long enough and URL-safe; a ValueError saying how to fix it otherwise."""
    if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS or not TOKEN_PATTERN.fullmatch(token):
        shown = f"{len(token)} characters" if isinstance(token, str) else type(token).__name__
        raise ValueError(
            f"the token must be at least {MIN_TOKEN_CHARS} characters of A-Z a-z 0-9 . _ ~ - (got {shown}); "
            "pass --token auto for a random one"
        )
    return token


def resolve_token(host: str, token: str | None) -> tuple[str | None, bool]:
    """(token to require, whether it was generated here) for a server listening on ``host``.

    ``token`` "auto" makes a random one. Without a token a loopback server is open (None) and any other host is
    refused with a ValueError.
    """
    if token == "auto":
        return secrets.token_urlsafe(GENERATED_TOKEN_BYTES), True
    if token is None or token == "":
        if not is_loopback(host):
            raise ValueError(
                f"refusing to listen on {host!r} without a token: anyone who can reach it could use the GPU. "
                f"Pass --token auto (a random token, printed), --token YOUR_TOKEN, or set {TOKEN_ENV}; "
                "or listen on 127.0.0.1 only"
            )
        return None, False
    return check_token(token), False


def tokens_equal(given: str | None, token: str) -> bool:
    """Constant-time comparison (in the length of ``token``); any string is safe to pass, None is no token."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), token.encode("utf-8"))


def _bearer(conn: HTTPConnection) -> str | None:
    scheme, _, value = conn.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


class TokenAuth:
    """ASGI middleware: requests without the token get 401 (websockets: refused before they are accepted)."""

    def __init__(self, app, token: str, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        self.app = app
        self.token = check_token(token)
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        from_query = tokens_equal(conn.query_params.get(TOKEN_QUERY), self.token)
        ok = from_query or tokens_equal(_bearer(conn), self.token)
        if scope["type"] == "http":
            from_cookie = tokens_equal(conn.cookies.get(TOKEN_COOKIE), self.token)
            if ok or from_cookie:
                # A valid ?token= on a page load: the cookie lets the page's own requests through.
                sender = self._with_cookie(scope, send) if from_query and not from_cookie else send
                await self.app(scope, receive, sender)
                return
        elif ok:
            await self.app(scope, receive, send)
            return
        await self._refuse(scope, receive, send)

    def _with_cookie(self, scope, send):
        secure = "; Secure" if scope.get("scheme") in ("https", "wss") else ""
        cookie = f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict{secure}"

        async def send_with_cookie(message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("set-cookie", cookie)
            await send(message)

        return send_with_cookie

    async def _refuse(self, scope, receive, send) -> None:
        message = (
            "401 Unauthorized: this server needs its token. Open the app as /?token=TOKEN (the server printed it at "
            "start), or send 'Authorization: Bearer TOKEN'; websocket clients add ?token=TOKEN to the /ws URL."
        )
        response = PlainTextResponse(message, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        if scope["type"] == "http":
            await response(scope, receive, send)
            return
        websocket = WebSocket(scope, receive, send)
        if "websocket.http.response" in scope.get("extensions", {}):
            await websocket.send_denial_response(response)
        else:
            await websocket.close(code=1008, reason="a token is required")
