"""Who may use the preview: a token beyond loopback, a loopback Host header without one.

A server bound to anything but loopback requires a token. Every request, whatever its path or
method, is accepted only with ``?token=...``, an ``Authorization: Bearer`` header, or the cookie
the page sets when it is loaded with the token. Without a token (loopback only) the Host header
must name a loopback address, which defeats DNS rebinding.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import re
from email.message import Message
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs, urlsplit

TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~-]{1,256}")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_header_is_loopback(host_header: str) -> bool:
    """Whether a request's ``Host`` header names a loopback address."""
    try:
        hostname = urlsplit(f"//{host_header}").hostname
    except ValueError:
        return False
    return hostname is not None and is_loopback(hostname)


def split_target(target: str) -> tuple[str, str]:
    """``(path, query)`` of a request target, taken literally: ``//x/y`` is the path ``//x/y``.

    Anything but an origin-form target (``/...``) gets the path ``""``, which matches nothing.
    """
    if not target.startswith("/"):
        return "", ""
    path, _, query = target.partition("#")[0].partition("?")
    return path, query


def cookie_name(port: int) -> str:
    """The token cookie's name; cookies ignore the port, naming by port keeps servers apart."""
    return f"streamgpen_token_{port}"


def cookie_header(token: str, port: int) -> str:
    """The ``Set-Cookie`` value the page is served with, so its own requests carry the token."""
    return f"{cookie_name(port)}={token}; Path=/; HttpOnly; SameSite=Strict"


def offered_tokens(target: str, headers: Message, port: int) -> list[str]:
    """Every token a request carries: query, bearer header, cookie."""
    offered = parse_qs(split_target(target)[1]).get("token", [])
    scheme, _, credentials = headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        offered.append(credentials.strip())
    with contextlib.suppress(CookieError):
        morsel = SimpleCookie(headers.get("Cookie", "")).get(cookie_name(port))
        if morsel is not None:
            offered.append(morsel.value)
    return offered


def token_matches(offered: list[str], token: str) -> bool:
    """Whether any offered token is ``token``, compared in constant time."""
    return any(hmac.compare_digest(item.encode(), token.encode()) for item in offered)
