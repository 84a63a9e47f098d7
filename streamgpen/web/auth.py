"""Who may use a server: a token beyond loopback, a loopback Host header without one.

``TokenGuard`` is pure ASGI middleware around a whole app, so it sees every request, whatever
its path, method or scope type (a websocket handshake too), before any route does. With a token
a request must carry it: ``Authorization: Bearer ...``, the cookie the page sets when it is
loaded with the token (``token_cookie``), or ``?token=...``; anything else is 401. Without a
token (loopback only) the Host header must name a loopback address, which defeats DNS rebinding;
anything else is 403.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
from urllib.parse import parse_qs, urlsplit

from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streamgpen.web.responses import error_response

TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~-]{1,256}")
# A refused websocket handshake: "policy violation" (the server answers the handshake with 403).
WEBSOCKET_POLICY_VIOLATION = 1008


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def access_token(host: str, token: str | None) -> tuple[str | None, bool]:
    """The token a server bound to ``host`` requires, and whether it was made up here: the one
    given, else (beyond loopback, where one is required) a fresh random one; on loopback without
    one, none. ``ValueError`` for a token of characters a URL or header would mangle."""
    if token and not TOKEN_PATTERN.fullmatch(token):
        raise ValueError("the token may only hold letters, digits and . _ ~ - (at most 256)")
    if token:
        return token, False
    if is_loopback(host):
        return None, False
    return secrets.token_urlsafe(16), True


def host_header_is_loopback(host_header: str) -> bool:
    """Whether a request's ``Host`` header names a loopback address."""
    try:
        hostname = urlsplit(f"//{host_header}").hostname
    except ValueError:
        return False
    return hostname is not None and is_loopback(hostname)


def cookie_name(port: int) -> str:
    """The token cookie's name; cookies ignore the port, naming by port keeps servers apart."""
    return f"streamgpen_token_{port}"


def token_cookie(token: str, name: str) -> str:
    """The ``Set-Cookie`` value a page is served with, so its own requests carry the token."""
    return f"{name}={token}; Path=/; HttpOnly; SameSite=Strict"


def offered_tokens(scope: Scope, cookie: str) -> list[str]:
    """Every token a request carries: query, bearer header, the cookie named ``cookie``."""
    offered = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [])
    headers = Headers(scope=scope)
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        offered.append(credentials.strip())
    value = cookie_parser(headers.get("cookie", "")).get(cookie)
    if value is not None:
        offered.append(value)
    return offered


def token_matches(offered: list[str], token: str) -> bool:
    """Whether any offered token is ``token``, compared in constant time."""
    expected = token.encode()
    return any(hmac.compare_digest(item.encode(), expected) for item in offered)


class TokenGuard:
    """ASGI middleware: every HTTP request and websocket handshake proves it may come in.

    ``token=None`` (a loopback server): the Host header must be loopback, else 403. A token: the
    request must offer it (bearer, the ``cookie_name`` cookie, ``?token=``), else 401 with
    ``WWW-Authenticate: Bearer``; one that offers it by ``?token=`` gets the cookie. Errors are
    JSON, ``{"error": ...}``. Other scopes (lifespan) pass through.
    """

    def __init__(self, app: ASGIApp, *, token: str | None, cookie_name: str):
        if token is not None and not TOKEN_PATTERN.fullmatch(token):
            raise ValueError("the token may only hold letters, digits and . _ ~ - (at most 256)")
        self.app = app
        self.token = token
        self.cookie_name = cookie_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is None:
            if scope["type"] == "http" and self._token_in_query(scope):
                send = self._setting_cookie(send)
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": WEBSOCKET_POLICY_VIOLATION})
        else:
            status, message, headers = refusal
            await error_response(status, message, headers)(scope, receive, send)

    def _token_in_query(self, scope: Scope) -> bool:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        return self.token is not None and token_matches(query.get("token", []), self.token)

    def _setting_cookie(self, send: Send) -> Send:
        """A page opened with ``?token=`` (the printed URL: the preview, ``/docs``) gets the
        cookie, so the requests the page makes itself (its streams, ``/openapi.json``) carry it."""
        cookie = token_cookie(self.token, self.cookie_name).encode("latin-1")

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"set-cookie", cookie)]
                message = {**message, "headers": headers}
            await send(message)

        return send_with_cookie

    def _refusal(self, scope: Scope) -> tuple[int, str, dict[str, str] | None] | None:
        """None when ``scope`` may come in, else ``(status, message, headers)``."""
        if self.token is None:
            if host_header_is_loopback(Headers(scope=scope).get("host", "")):
                return None
            return 403, "use a loopback address in the URL", None
        if token_matches(offered_tokens(scope, self.cookie_name), self.token):
            return None
        return 401, "missing or wrong token", {"WWW-Authenticate": "Bearer"}
