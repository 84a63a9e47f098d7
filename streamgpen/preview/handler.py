"""The preview's HTTP server and request handler (stdlib ``http.server``, a thread per connection).

Endpoints (anything else is 404; nothing is ever served from disk)::

    GET  /                      the page (package data: page.html)
    GET  /stream/original.mjpg  multipart/x-mixed-replace; boundary=frame (each part is
    GET  /stream/enhanced.mjpg  followed at once by the next delimiter, so browsers show it now)
    GET  /stats                 JSON, see ``PreviewServer.stats``; NaN/inf become null
    GET  /controls              JSON: enhance, blend, overlay
    POST /controls              JSON object with any of those keys; 400 on bad input
    other methods               405

Limits: at most ``MAX_CONNECTIONS`` connections (threads), each given ``REQUEST_DEADLINE_S`` to
send its whole request; at most ``MAX_STREAMS`` streams, a stream whose send is blocked for
``STREAM_SEND_TIMEOUT_S`` is cut, and one blocked for ``STREAM_EVICT_AFTER_S`` gives its slot
to a new viewer when all are taken (see ``slots``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import socket
import socketserver
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np

from streamgpen.preview.auth import (
    cookie_header,
    host_header_is_loopback,
    offered_tokens,
    split_target,
    token_matches,
)
from streamgpen.preview.frames import PANES
from streamgpen.preview.slots import Connections, Streams

if TYPE_CHECKING:
    from streamgpen.preview.server import PreviewServer

BOUNDARY = "frame"
MAX_BODY_BYTES = 4096
# Connections at once (each has a thread): the streams, plus room for the page, /stats polls and
# /controls posts of a few tabs. Beyond it a new connection displaces the one that has been
# reading its request the longest.
MAX_CONNECTIONS = 64
# The request line, headers and body must all arrive within this long (slowloris).
REQUEST_DEADLINE_S = 5.0
# Open MJPEG streams at most (two per browser tab); more get 503 rather than another thread each.
MAX_STREAMS = 32
# A stream whose one frame has not gone out in this long is cut (the page reconnects), so a
# stalled viewer does not pin a thread; the frame is ~40 KB, which needs only ~64 kbit/s.
STREAM_SEND_TIMEOUT_S = 5.0
# With every stream slot taken, a viewer whose send has been blocked this long gives way to a new
# one. A reading viewer takes a frame in milliseconds, even at 25 fps over a slow LAN.
STREAM_EVICT_AFTER_S = 1.0
# A response other than a stream (at most the page, ~6 KB) going to a client that does not read.
WRITE_TIMEOUT_S = 30.0
# Send buffer of a stream's socket (Linux doubles it). Whatever a slow viewer's buffers hold is
# what it sees late; left to autotuning that is up to 4 MiB, seconds of video. This much still
# carries a 960-wide stream at full rate over a LAN, and ~20 fps at 100 ms round trip.
STREAM_SNDBUF = 128 * 1024
STREAM_PATHS = {f"/stream/{pane}.mjpg": pane for pane in PANES}
# Sent, without waiting, to a connection beyond MAX_CONNECTIONS that displaced nobody.
_BUSY_BODY = b'{"error": "too many connections"}'
_BUSY = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


@functools.cache
def page_html() -> bytes:
    """The page, read once from the package data."""
    return resources.files("streamgpen.preview").joinpath("page.html").read_bytes()


class PreviewHTTPServer(ThreadingHTTPServer):
    """Bounded connections and streams; tracks them so ``stop()`` can cut stalled streams."""

    daemon_threads = True
    # stop() cuts every connection and waits a grace period; never block on a thread beyond it.
    block_on_close = False
    # Connections that arrive between bind() and start() (GPEN warming up) wait in the backlog.
    request_queue_size = 128

    def __init__(self, address: tuple, family: socket.AddressFamily, preview: PreviewServer):
        self.address_family = family
        self.preview = preview
        self.connections = Connections(limit=MAX_CONNECTIONS, read_deadline_s=REQUEST_DEADLINE_S)
        self.streams = Streams(limit=MAX_STREAMS, evict_after_s=STREAM_EVICT_AFTER_S)
        super().__init__(address, Handler, bind_and_activate=False)

    def server_bind(self) -> None:
        """Bind without ``HTTPServer``'s reverse DNS lookup of the address (it may hang)."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        # Admitted here, on the accept loop, before a thread exists: the cap bounds the threads,
        # and stop() sees the connection even before its thread runs.
        if not self.connections.admit(request):
            with contextlib.suppress(OSError):
                request.setblocking(False)
                request.send(_BUSY)  # a full buffer drops it: the accept loop never waits
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connections.closed(request)  # no thread started; the caller closes it
            raise

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.closed(request)

    def service_actions(self) -> None:
        """Run by the accept loop at least twice a second: enforce the request deadline."""
        super().service_actions()
        self.connections.reap()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Viewers disconnecting mid-write is routine; stay quiet about it."""


class Handler(BaseHTTPRequestHandler):
    """One request per connection (HTTP/1.0): the page, a stream, the figures or the controls."""

    server: PreviewHTTPServer
    # Per read while the request comes in; Connections.reap() enforces the total deadline.
    timeout = REQUEST_DEADLINE_S
    server_version = "streamgpen-preview"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request stderr log."""

    def parse_request(self) -> bool:
        # A connection cut while its head came in may leave a truncated request: drop it.
        return super().parse_request() and not self.server.connections.is_cut(self.connection)

    def do_GET(self) -> None:
        if not self._admitted():
            return
        path = split_target(self.path)[0]
        preview = self.server.preview
        if path == "/":
            self._send(200, page_html(), "text/html; charset=utf-8", self._cookie_headers())
        elif path in STREAM_PATHS:
            self._stream(STREAM_PATHS[path])
        elif path == "/stats":
            self._send_json(200, preview.stats())
        elif path == "/controls":
            self._send_json(200, preview.controls.as_dict())
        else:
            self._send_json(404, {"error": "not found"})

    def do_POST(self) -> None:
        if not self._admitted():
            return
        if split_target(self.path)[0] != "/controls":
            self._send_json(404, {"error": "not found"})
            return
        # Requiring JSON forces a CORS preflight (which we never grant) on cross-site posts.
        if self.headers.get_content_type() != "application/json":
            self._send_json(415, {"error": "send application/json"})
            return
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            self._send_json(413, {"error": f"send a body of at most {MAX_BODY_BYTES} bytes"})
            return
        body = self.rfile.read(int(length))
        try:
            controls = self.server.preview.update_controls(_parse_json(body))
        except RecursionError:
            self._send_json(400, {"error": "the JSON is nested too deeply"})
        except (ValueError, OverflowError) as error:
            # JSONDecodeError and UnicodeDecodeError are ValueErrors; so is every bad control.
            self._send_json(400, {"error": str(error) or "bad controls"})
        else:
            self._send_json(200, controls.as_dict())

    def _refuse_method(self) -> None:
        if self._admitted():
            self._send_json(405, {"error": "method not allowed"}, {"Allow": "GET, POST"})

    do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse_method

    def _admitted(self) -> bool:
        token = self.server.preview.token
        if token is None:
            if host_header_is_loopback(self.headers.get("Host", "")):
                return True
            self._send_json(403, {"error": "use a loopback address in the URL"})
            return False
        offered = offered_tokens(self.path, self.headers, self.server.preview.port)
        if token_matches(offered, token):
            return True
        self._send_json(401, {"error": "missing or wrong token"}, {"WWW-Authenticate": "Bearer"})
        return False

    def _cookie_headers(self) -> dict[str, str]:
        preview = self.server.preview
        if preview.token is None:
            return {}
        return {"Set-Cookie": cookie_header(preview.token, preview.port)}

    def _begin_response(self, send_timeout_s: float) -> None:
        """The request is in: leave the read deadline, give the response its own timeout."""
        if not self.server.connections.responding(self.connection):
            raise ConnectionAbortedError("cut while the request came in")
        self.connection.settimeout(send_timeout_s)

    def _stream(self, pane: str) -> None:
        streams = self.server.streams
        stream = streams.open(self.connection)
        if stream is None:
            self._send_json(503, {"error": f"at most {MAX_STREAMS} streams at once"})
            return
        try:
            self._begin_response(STREAM_SEND_TIMEOUT_S)
            with contextlib.suppress(OSError):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF)
            self.send_response(200)
            self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
            self._common_headers()
            self.end_headers()
            # Each part is closed by the next delimiter right away: browsers show a part only
            # once they see the delimiter after it, which would otherwise come a frame late.
            self.wfile.write(f"--{BOUNDARY}\r\n".encode())
            streams.sent(stream)
            frames = self.server.preview.frames
            sent = 0
            # Wait for a frame newer than the last one sent, then send the newest: a viewer
            # that was slow to take the last one skips whatever came in between.
            while frames.wait_newer(sent):
                sent, jpeg = frames.jpeg(pane)
                streams.sending(stream)
                self._write_part(sent, jpeg)
                streams.sent(stream)
        except OSError:
            pass  # the viewer left, stalled past the timeout, was evicted, or stop() cut it
        finally:
            streams.close(stream)

    def _write_part(self, seq: int, jpeg: bytes) -> None:
        head = f"Content-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\nX-Frame: {seq}\r\n\r\n"
        self.wfile.write(head.encode() + jpeg + f"\r\n--{BOUNDARY}\r\n".encode())

    def _send_json(
        self, status: int, payload: Any, headers: Mapping[str, str] | None = None
    ) -> None:
        body = json.dumps(_plain(payload), allow_nan=False).encode()
        self._send(status, body, "application/json", headers)

    def _send(
        self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None
    ) -> None:
        self._begin_response(WRITE_TIMEOUT_S)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self._common_headers()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _common_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        # Nothing here is for other sites: no framing (clickjacking the controls), no embedding
        # of the streams, no token in a Referer.
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Content-Security-Policy", "frame-ancestors 'none'")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Referrer-Policy", "no-referrer")


def _parse_json(body: bytes) -> Any:
    """Strict JSON: NaN and Infinity are not JSON; a huge number is left to the controls' check
    (``Controls.updated`` turns its overflow into a ValueError), never an uncaught error here."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not a JSON number")

    return json.loads(body, parse_constant=refuse)


def _plain(value: Any) -> Any:
    """``value`` as strict JSON data: numpy scalars and arrays unwrapped, NaN/inf as None,
    anything else unknown as its ``str``; the pipeline may pass such things in ``stats``."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int | bool):
        return value
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return str(value)
