"""Strict JSON in and out, errors as ``{"error": ...}``, and the headers every response carries.

- ``json_response`` / ``StrictJSONResponse``: JSON a browser's ``JSON.parse`` accepts: numpy
  scalars and arrays unwrapped, NaN and infinities as null, anything unknown as its ``str``.
- ``HttpError`` raised by an endpoint, Starlette's ``HTTPException`` (404, 405...) and any other
  exception become ``{"error": message}`` through ``EXCEPTION_HANDLERS`` (pass it to Starlette or
  FastAPI as ``exception_handlers``).
- ``read_json``: a request's JSON body, refused unless it is ``application/json``, small, and
  strict JSON.
- ``SecurityHeaders``: ASGI middleware; nothing served is for other sites (no framing, no
  embedding, no sniffing, no Referer) or for caches.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import numpy as np
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# How long a request body may take to arrive once its head is in (a trickling POST holds no
# thread, but it holds its connection: cut it loose).
BODY_TIMEOUT_S = 5.0
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    # Nothing here is for other sites: no framing (clickjacking the controls), no embedding of
    # the streams, no token in a Referer.
    "x-frame-options": "DENY",
    "content-security-policy": "frame-ancestors 'none'",
    "cross-origin-resource-policy": "same-origin",
    "referrer-policy": "no-referrer",
}


def plain(value: Any) -> Any:
    """``value`` as strict JSON data: numpy scalars and arrays unwrapped, NaN/inf as None,
    anything else unknown as its ``str`` (a pipeline may pass such things in its figures)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int | bool):
        return value
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return str(value)


class StrictJSONResponse(JSONResponse):
    """A ``JSONResponse`` whose body is always strict JSON (see ``plain``)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(
            plain(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode()


def json_response(
    payload: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """``payload`` as a strict JSON response."""
    return StrictJSONResponse(payload, status_code=status, headers=headers)


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """``{"error": message}`` with ``status``."""
    return json_response({"error": message}, status, headers)


class HttpError(Exception):
    """Raised by an endpoint: answer ``status`` with ``{"error": message}`` and ``headers``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


async def http_error_handler(request: Request, exc: Exception) -> Response:
    """``HttpError`` and Starlette's ``HTTPException`` (404, 405 with ``Allow``...) as JSON."""
    if isinstance(exc, HttpError):
        return error_response(exc.status, exc.message, exc.headers)
    assert isinstance(exc, HTTPException)  # what EXCEPTION_HANDLERS sends here
    return error_response(exc.status_code, exc.detail, exc.headers)


async def server_error_handler(request: Request, exc: Exception) -> Response:
    """A bug: a 500 in the same JSON form (the server still logs the traceback)."""
    return error_response(500, "internal error")


EXCEPTION_HANDLERS = {
    HttpError: http_error_handler,
    HTTPException: http_error_handler,
    Exception: server_error_handler,
}


def busy(message: str, retry_after_s: int) -> HttpError:
    """503 with ``Retry-After``: the server is full now, not broken; come back in that long."""
    return HttpError(503, message, {"Retry-After": str(retry_after_s)})


def too_large(max_bytes: int) -> HttpError:
    """413, closing the connection: otherwise the server reads (and drops) the rest of the body
    to keep the connection, and a client sending 2 GB sends all of it (measured: 1.1 GB went out
    before the connection ended)."""
    message = f"send a body of at most {max_bytes} bytes"
    return HttpError(413, message, {"Connection": "close"})


def content_length(request: Request) -> int | None:
    """The declared body size, or None (chunked); a malformed header is a 400."""
    length = request.headers.get("content-length")
    if length is None:
        return None
    if not length.isdigit():
        raise HttpError(400, "bad Content-Length", {"Connection": "close"})
    return int(length)


def refuse_oversized(request: Request, max_bytes: int) -> None:
    """413 at once when the declared length is over ``max_bytes``, before a byte is read (400
    for a malformed one)."""
    length = content_length(request)
    if length is not None and length > max_bytes:
        raise too_large(max_bytes)


async def body_chunks(request: Request, *, max_bytes: int) -> AsyncIterator[bytes]:
    """The body as it arrives, refused (``HttpError``) past ``max_bytes`` (413), when no byte
    comes for ``BODY_TIMEOUT_S`` (408: a trickling client holds a connection), or when the client
    leaves (400)."""
    refuse_oversized(request, max_bytes)
    received = 0
    chunks = request.stream().__aiter__()
    while True:
        try:
            with anyio.fail_after(BODY_TIMEOUT_S):
                chunk = await chunks.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise HttpError(408, "the body came too slowly", {"Connection": "close"}) from None
        except ClientDisconnect:
            raise HttpError(400, "the body ended early") from None
        received += len(chunk)
        if received > max_bytes:
            raise too_large(max_bytes)
        yield chunk


async def read_json(request: Request, *, max_bytes: int = 4096) -> Any:
    """The request's body as strict JSON; ``HttpError`` otherwise.

    415 unless the type is ``application/json`` (which makes a cross-site ``fetch`` need a CORS
    preflight, never granted here), 413 above ``max_bytes`` (declared or counted while reading),
    408 when the whole body takes over ``BODY_TIMEOUT_S``, 400 for anything but strict JSON: NaN
    and Infinity are not JSON, nor is nesting deeper than the parser's recursion limit.
    """
    content_type = request.headers.get("content-type", "")
    if content_type.partition(";")[0].strip().lower() != "application/json":
        raise HttpError(415, "send application/json")
    body = bytearray()
    try:
        with anyio.fail_after(BODY_TIMEOUT_S):
            async for chunk in body_chunks(request, max_bytes=max_bytes):
                body += chunk
    except TimeoutError:
        raise HttpError(408, "the body came too slowly", {"Connection": "close"}) from None
    return parse_json(bytes(body))


def parse_json(body: bytes) -> Any:
    """Strict JSON, or ``HttpError(400)``; a huge number is left to whoever checks the value."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not a JSON number")

    try:
        return json.loads(body, parse_constant=refuse)
    except RecursionError:
        raise HttpError(400, "the JSON is nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise HttpError(400, f"bad JSON: {error}") from None


class SecurityHeaders:
    """ASGI middleware: ``SECURITY_HEADERS`` on every HTTP response, and ``Cache-Control:
    no-store`` unless the response sets its own."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("cache-control", "no-store")
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)
