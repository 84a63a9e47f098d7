"""Live preview in a browser: original and enhanced video side by side, with figures and controls.

``PreviewServer`` is a small stdlib HTTP server on its own daemon threads. The pipeline calls
``publish()`` once per frame; that only stores references to the newest frames, so a slow or
stalled viewer can never hold the pipeline back. Each viewer's handler thread waits for a frame
newer than the last one it sent, JPEG-encodes it (once per frame and pane, shared by all viewers)
and writes it as one part of an MJPEG stream; a viewer that falls behind skips to the newest frame.

Endpoints (anything else is 404; nothing is ever served from disk)::

    GET  /                      the page (embedded below)
    GET  /stream/original.mjpg  multipart/x-mixed-replace; boundary=frame (each part is
    GET  /stream/enhanced.mjpg  followed at once by the next delimiter, so browsers show it now)
    GET  /stats                 JSON: fps_in, fps_out, latency_ms_p50, latency_ms_p95, faces,
                                dropped, model, device (null until the pipeline passes them),
                                whatever else the pipeline passes, viewers (open streams),
                                published (frames published so far); NaN/inf become null
    GET  /controls              JSON: enhance, blend, overlay
    POST /controls              JSON object with any of those keys; 400 on bad input
    other methods               405

Security: a server bound to anything but loopback requires a token (one is generated if none is
given; ``url`` carries it). Every request, whatever its path or method, is accepted only with
``?token=...``, an ``Authorization: Bearer`` header, or the cookie the page sets when it is loaded
with the token; otherwise 401. The page also passes the token from its own URL on to the streams
and the JSON calls. Without a token (loopback only) the Host header must name a loopback address,
which defeats DNS rebinding. No response may be framed or embedded by another site.

Example::

    with PreviewServer(*parse_bind("8765")) as server:
        print(server.url)
        for original, enhanced in frames:
            server.publish(original, enhanced, {"fps_out": 24.8})
            if server.controls.overlay:
                ...
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import math
import re
import secrets
import socket
import threading
from collections.abc import Mapping
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
PANES = ("original", "enhanced")
BOUNDARY = "frame"
STATS_KEYS = (
    "fps_in",
    "fps_out",
    "latency_ms_p50",
    "latency_ms_p95",
    "faces",
    "dropped",
    "model",
    "device",
)
# A viewer whose socket accepts nothing for this long is cut off, so a stalled browser does not
# pin a thread forever.
WRITE_TIMEOUT_S = 30.0
MAX_BODY_BYTES = 4096
# Open MJPEG streams at most (two per browser tab); more get 503 rather than another thread each.
MAX_STREAMS = 32
# Send buffer of a stream's socket (Linux doubles it). Whatever a slow viewer's buffers hold is
# what it sees late; left to autotuning that is up to 4 MiB, seconds of video. This much still
# carries a 960-wide stream at full rate over a LAN, and ~20 fps at 100 ms round trip.
STREAM_SNDBUF = 128 * 1024
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~-]{1,256}")
# How long stop() waits for handler threads to notice their sockets were shut down.
STOP_GRACE_S = 2.0


def parse_bind(spec: str) -> tuple[str, int]:
    """``[HOST:]PORT`` -> ``(host, port)``; the host defaults to 127.0.0.1, IPv6 as ``[::1]:PORT``.

    Raises ``ValueError`` on a malformed spec, an empty host or a port outside 0..65535.
    """
    spec = spec.strip()
    host, sep, port_text = spec.rpartition(":")
    if not sep:
        host = DEFAULT_HOST
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        _require_ipv6(host, spec)
    elif ":" in host:
        raise ValueError(f"bad bind address {spec!r}: write an IPv6 host in brackets, [::1]:PORT")
    if not host:
        raise ValueError(f"bad bind address {spec!r}: empty host (use 0.0.0.0 for all interfaces)")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"bad bind address {spec!r}: the port must be a number in 0..65535")
    return host, int(port_text)


def _require_ipv6(host: str, spec: str) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"bad bind address {spec!r}: {host!r} is not an IPv6 address") from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Controls:
    """Thread-safe viewer controls the pipeline reads each frame: enhance, blend, overlay."""

    def __init__(self, enhance: bool = True, blend: float = 1.0, overlay: bool = False):
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {}
        self.update({"enhance": enhance, "blend": blend, "overlay": overlay})

    @property
    def enhance(self) -> bool:
        """Whether the enhanced pane shows enhanced frames (off: the originals)."""
        with self._lock:
            return self._values["enhance"]

    @property
    def blend(self) -> float:
        """How much of the enhanced face to paste over the original, 0..1."""
        with self._lock:
            return self._values["blend"]

    @property
    def overlay(self) -> bool:
        """Whether to draw face boxes and landmarks."""
        with self._lock:
            return self._values["overlay"]

    def snapshot(self) -> dict[str, Any]:
        """All controls at once, consistent with each other."""
        with self._lock:
            return dict(self._values)

    def update(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Set any of the controls; all or nothing. Returns the new snapshot.

        Raises ``ValueError`` for an unknown key, a non-bool ``enhance``/``overlay`` or a
        ``blend`` that is not a number in 0..1.
        """
        if not isinstance(values, Mapping):
            raise ValueError("controls must be a JSON object")
        checked = {key: _check_control(key, value) for key, value in values.items()}
        with self._lock:
            self._values.update(checked)
            return dict(self._values)


def _check_control(key: str, value: Any) -> Any:
    if key in ("enhance", "overlay"):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false")
        return value
    if key == "blend":
        # bool is an int subclass; true/false as a blend is a client bug, not 1.0/0.0.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("blend must be a number")
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError("blend must be between 0 and 1")
        return float(value)
    raise ValueError(f"unknown control {key!r}")


class _Frames:
    """The newest published frames and their lazily encoded JPEGs."""

    def __init__(self, jpeg_quality: int, max_width: int):
        self._jpeg_quality = jpeg_quality
        self._max_width = max_width
        self.changed = threading.Condition()
        self.seq = 0
        self.stopping = False
        self._raw: dict[str, np.ndarray] = {}
        self._stats: dict[str, Any] = {}
        self._encode_locks = {pane: threading.Lock() for pane in PANES}
        self._jpegs: dict[str, tuple[int, bytes]] = {}

    def publish(self, original: np.ndarray, enhanced: np.ndarray, stats: Mapping | None) -> None:
        stats = dict(stats or {})
        with self.changed:
            self._raw = {"original": original, "enhanced": enhanced}
            self._stats = stats
            self.seq += 1
            self.changed.notify_all()

    def stats(self) -> tuple[int, dict[str, Any]]:
        with self.changed:
            return self.seq, dict(self._stats)

    def wait_newer(self, seq: int) -> bool:
        """Block until a frame newer than ``seq`` exists; False when the server is stopping."""
        with self.changed:
            self.changed.wait_for(lambda: self.stopping or self.seq > seq)
            return not self.stopping

    def set_stopping(self, stopping: bool) -> None:
        with self.changed:
            self.stopping = stopping
            self.changed.notify_all()

    def jpeg(self, pane: str) -> tuple[int, bytes]:
        """``(seq, jpeg)`` of the newest frame of ``pane``, encoded at most once per frame."""
        with self._encode_locks[pane]:
            with self.changed:
                seq, rgb = self.seq, self._raw[pane]
            cached = self._jpegs.get(pane)
            if cached is None or cached[0] != seq:
                cached = (seq, self._encode(rgb))
                self._jpegs[pane] = cached
            return cached

    def _encode(self, rgb: np.ndarray) -> bytes:
        height, width = rgb.shape[:2]
        if width > self._max_width:
            size = (self._max_width, max(1, round(height * self._max_width / width)))
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        # The pipeline may publish views (a permuted tensor's numpy, a flipped array).
        bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, self._jpeg_quality])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        return buf.tobytes()


class PreviewServer:
    """The preview HTTP server; ``start()``/``stop()`` or use it as a context manager."""

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        token: str | None = None,
        jpeg_quality: int = 80,
        max_width: int = 960,
    ):
        if not 1 <= jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be in 1..100")
        if max_width < 1:
            raise ValueError("max_width must be positive")
        if token and not TOKEN_PATTERN.fullmatch(token):
            raise ValueError("the token may only hold letters, digits and . _ ~ - (at most 256)")
        self.host = host
        self.port = port
        #: True when no token was given for a non-loopback address and one was made up: show it.
        self.token_generated = not token and not is_loopback(host)
        if self.token_generated:
            token = secrets.token_urlsafe(16)
        self.token: str | None = token or None
        self.controls = Controls()
        self._frames = _Frames(jpeg_quality, max_width)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The page's address (with ``?token=...`` when a token is set); port known after start."""
        host = socket.gethostname() if self.host in ("0.0.0.0", "::") else self.host
        if ":" in host:
            host = f"[{host}]"
        query = f"?token={self.token}" if self.token else ""
        return f"http://{host}:{self.port}/{query}"

    @property
    def viewers(self) -> int:
        """How many MJPEG streams are open now."""
        return self._httpd.streams if self._httpd else 0

    def start(self) -> PreviewServer:
        """Bind and serve on a daemon thread; raises ``OSError`` if the address is taken."""
        if self._httpd is not None:
            raise RuntimeError("the preview server is already running")
        self._httpd = _HTTPServer((self.host, self.port), self)
        self._frames.set_stopping(False)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="preview-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every open connection, streams included."""
        if self._httpd is None:
            return
        self._frames.set_stopping(True)
        self._httpd.shutdown()
        self._httpd.close_connections(STOP_GRACE_S)
        self._httpd.server_close()
        self._thread.join()
        self._httpd = None

    def publish(
        self, original_rgb: np.ndarray, enhanced_rgb: np.ndarray, stats: Mapping | None = None
    ) -> None:
        """Offer the newest frame pair (HxWx3 uint8 RGB) and figures; never waits for viewers.

        Cheap whether or not anyone watches: it stores references and wakes the viewers' threads,
        which encode on their own time. The arrays are kept by reference until the next call: do
        not modify them afterwards. ``stats`` holds the ``/stats`` figures (``STATS_KEYS``).
        """
        for image in (original_rgb, enhanced_rgb):
            if (
                not isinstance(image, np.ndarray)
                or image.ndim != 3
                or image.shape[2] != 3
                or image.dtype != np.uint8
            ):
                shape, dtype = getattr(image, "shape", "?"), getattr(image, "dtype", type(image))
                raise ValueError(f"expected an HxWx3 uint8 image, got {shape} {dtype}")
        self._frames.publish(original_rgb, enhanced_rgb, stats)

    def stats(self) -> dict[str, Any]:
        """What ``/stats`` returns."""
        seq, latest = self._frames.stats()
        return (
            {key: None for key in STATS_KEYS}
            | latest
            | {
                "viewers": self.viewers,
                "published": seq,
            }
        )

    def __enter__(self) -> PreviewServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _HTTPServer(ThreadingHTTPServer):
    """Tracks open connections so ``stop()`` can cut streams blocked on a stalled viewer."""

    daemon_threads = True
    # stop() cuts every connection and waits STOP_GRACE_S; never block on a thread beyond that.
    block_on_close = False

    def __init__(self, address: tuple[str, int], preview: PreviewServer):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.preview = preview
        self.streams = 0
        self._connections: set[socket.socket] = set()
        self._idle = threading.Condition()
        super().__init__(address, _Handler)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        # Registered here, on the accept loop, so stop() sees it even before its thread runs.
        with self._idle:
            self._connections.add(request)
        super().process_request(request, client_address)

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._idle:
                self._connections.discard(request)
                self._idle.notify_all()

    def stream_opened(self) -> bool:
        """Count one more stream; False (and nothing counted) when MAX_STREAMS are open."""
        with self._idle:
            if self.streams >= MAX_STREAMS:
                return False
            self.streams += 1
            return True

    def stream_closed(self) -> None:
        with self._idle:
            self.streams -= 1

    def close_connections(self, grace_s: float) -> None:
        with self._idle:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
            self._idle.wait_for(lambda: not self._connections, timeout=grace_s)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Viewers disconnecting mid-write is routine; stay quiet about it."""


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    timeout = WRITE_TIMEOUT_S
    server_version = "streamgpen-preview"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request stderr log."""

    def do_GET(self) -> None:
        if not self._admitted():
            return
        path = _split_target(self.path)[0]
        if path == "/":
            self._send(200, PAGE_HTML.encode(), "text/html; charset=utf-8", self._cookie_headers())
        elif path in STREAM_PATHS:
            self._stream(STREAM_PATHS[path])
        elif path == "/stats":
            self._send_json(200, self.server.preview.stats())
        elif path == "/controls":
            self._send_json(200, self.server.preview.controls.snapshot())
        else:
            self._send_json(404, {"error": "not found"})

    def do_POST(self) -> None:
        if not self._admitted():
            return
        if _split_target(self.path)[0] != "/controls":
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
        try:
            values = json.loads(self.rfile.read(int(length)))
            snapshot = self.server.preview.controls.update(values)
        except RecursionError:
            self._send_json(400, {"error": "the JSON is nested too deeply"})
            return
        except ValueError as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            self._send_json(400, {"error": str(error)})
            return
        self._send_json(200, snapshot)

    def _refuse_method(self) -> None:
        if self._admitted():
            self._send_json(405, {"error": "method not allowed"}, {"Allow": "GET, POST"})

    do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse_method

    def _admitted(self) -> bool:
        token = self.server.preview.token
        if token is None:
            if _host_header_is_loopback(self.headers.get("Host", "")):
                return True
            self._send_json(403, {"error": "use a loopback address in the URL"})
            return False
        if any(
            hmac.compare_digest(offered.encode(), token.encode()) for offered in self._offered()
        ):
            return True
        self._send_json(401, {"error": "missing or wrong token"}, {"WWW-Authenticate": "Bearer"})
        return False

    def _offered(self) -> list[str]:
        """Every token the request carries: query, bearer header, cookie."""
        offered = parse_qs(_split_target(self.path)[1]).get("token", [])
        scheme, _, credentials = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            offered.append(credentials.strip())
        with contextlib.suppress(CookieError):
            morsel = SimpleCookie(self.headers.get("Cookie", "")).get(self._cookie_name())
            if morsel is not None:
                offered.append(morsel.value)
        return offered

    def _cookie_name(self) -> str:
        # Cookies ignore the port; naming by port keeps two servers on one host apart.
        return f"streamgpen_token_{self.server.preview.port}"

    def _cookie_headers(self) -> dict[str, str]:
        token = self.server.preview.token
        if token is None:
            return {}
        cookie = f"{self._cookie_name()}={token}; Path=/; HttpOnly; SameSite=Strict"
        return {"Set-Cookie": cookie}

    def _stream(self, pane: str) -> None:
        if not self.server.stream_opened():
            self._send_json(503, {"error": f"at most {MAX_STREAMS} streams at once"})
            return
        try:
            with contextlib.suppress(OSError):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF)
            self.send_response(200)
            self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
            self._common_headers()
            self.end_headers()
            # Each part is closed by the next delimiter right away: browsers show a part only
            # once they see the delimiter after it, which would otherwise come a frame late.
            self.wfile.write(f"--{BOUNDARY}\r\n".encode())
            frames = self.server.preview._frames
            sent = 0
            # Wait for a frame newer than the last one sent, then send the newest: a viewer
            # that was slow to take the last one skips whatever came in between.
            while frames.wait_newer(sent):
                sent, jpeg = frames.jpeg(pane)
                self._write_part(sent, jpeg)
        except OSError:
            pass  # the viewer left, stalled past the timeout, or stop() cut the socket
        finally:
            self.server.stream_closed()

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


STREAM_PATHS = {f"/stream/{pane}.mjpg": pane for pane in PANES}


def _split_target(target: str) -> tuple[str, str]:
    """``(path, query)`` of a request target, taken literally: ``//x/y`` is the path ``//x/y``.

    Anything but an origin-form target (``/...``) gets the path ``""``, which matches nothing.
    """
    if not target.startswith("/"):
        return "", ""
    path, _, query = target.partition("#")[0].partition("?")
    return path, query


def _host_header_is_loopback(host_header: str) -> bool:
    try:
        hostname = urlsplit(f"//{host_header}").hostname
    except ValueError:
        return False
    return hostname is not None and is_loopback(hostname)


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


PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>streamgpen preview</title>
<style>
  :root { color-scheme: dark; }
  body { margin: 0; font: 14px/1.4 system-ui, sans-serif; background: #111; color: #ddd; }
  header { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: center;
           padding: .6em 1em; background: #1c1c1c; border-bottom: 1px solid #333; }
  header h1 { font-size: 1em; margin: 0; color: #fff; }
  label { display: inline-flex; gap: .4em; align-items: center; }
  main { display: flex; gap: 8px; padding: 8px; }
  figure { flex: 1 1 0; margin: 0; min-width: 0; }
  figcaption { padding: .2em 0; color: #aaa; }
  figure img { display: block; width: 100%; background: #000; min-height: 120px; }
  #stats { display: flex; flex-wrap: wrap; gap: .3em 1.5em; padding: .4em 1em;
           font-variant-numeric: tabular-nums; }
  #stats b { color: #fff; font-weight: 600; }
  #status { color: #e66; }
</style>
</head>
<body>
<header>
  <h1>streamgpen preview</h1>
  <label><input type="checkbox" id="enhance"> enhance</label>
  <label>blend <input type="range" id="blend" min="0" max="1" step="0.05">
    <output id="blend-value"></output></label>
  <label><input type="checkbox" id="overlay"> overlay</label>
  <span id="status"></span>
</header>
<section id="stats"></section>
<main>
  <figure><figcaption>Original</figcaption>
    <img id="original" alt="original video" data-src="stream/original.mjpg"></figure>
  <figure><figcaption>Enhanced</figcaption>
    <img id="enhanced" alt="enhanced video" data-src="stream/enhanced.mjpg"></figure>
</main>
<script>
"use strict";
const FIELDS = [
  ["fps in", "fps_in", 1], ["fps out", "fps_out", 1],
  ["latency p50", "latency_ms_p50", 0, " ms"], ["p95", "latency_ms_p95", 0, " ms"],
  ["faces", "faces"], ["dropped", "dropped"], ["model", "model"], ["device", "device"],
  ["streams", "viewers"],
];
const $ = (id) => document.getElementById(id);
// The token this page was opened with (if any) goes on to every request it makes; the cookie
// set with the page does the same, this covers browsers that refuse the cookie.
const TOKEN = new URLSearchParams(location.search).get("token");
const AUTH = TOKEN ? {"Authorization": "Bearer " + TOKEN} : {};

function withToken(path, extra) {
  const params = new URLSearchParams(extra || {});
  if (TOKEN) params.set("token", TOKEN);
  const query = params.toString();
  return query ? path + "?" + query : path;
}

function show(value, digits, unit) {
  if (value === null || value === undefined) return "–";
  const text = typeof value === "number" && digits !== undefined ? value.toFixed(digits) : value;
  return String(text) + (unit || "");
}

function renderStats(stats) {
  const panel = $("stats");
  panel.replaceChildren(...FIELDS.map(([label, key, digits, unit]) => {
    const item = document.createElement("span");
    const value = document.createElement("b");
    value.textContent = show(stats[key], digits, unit);
    item.append(label + " ", value);
    return item;
  }));
}

async function pollStats() {
  try {
    const response = await fetch("stats", {cache: "no-store", headers: AUTH});
    if (!response.ok) throw new Error("HTTP " + response.status);
    renderStats(await response.json());
    $("status").textContent = "";
  } catch (error) {
    $("status").textContent = "disconnected";
  }
}

function renderControls(controls) {
  $("enhance").checked = controls.enhance;
  $("overlay").checked = controls.overlay;
  $("blend").value = controls.blend;
  $("blend-value").textContent = Number(controls.blend).toFixed(2);
}

async function sendControls(values) {
  const response = await fetch("controls", {
    method: "POST", headers: {...AUTH, "Content-Type": "application/json"},
    body: JSON.stringify(values),
  });
  if (response.ok) renderControls(await response.json());
}

async function loadControls() {
  const response = await fetch("controls", {cache: "no-store", headers: AUTH});
  if (response.ok) renderControls(await response.json());
}

function startStream(img) {
  // A stream ends when the server restarts or drops a stalled viewer: reconnect.
  img.onerror = () => setTimeout(() => { img.src = withToken(img.dataset.src, {t: Date.now()}); },
                                  1000);
  img.src = withToken(img.dataset.src);
}

$("enhance").addEventListener("change", (e) => sendControls({enhance: e.target.checked}));
$("overlay").addEventListener("change", (e) => sendControls({overlay: e.target.checked}));
$("blend").addEventListener("input", (e) => {
  $("blend-value").textContent = Number(e.target.value).toFixed(2);
});
$("blend").addEventListener("change", (e) => sendControls({blend: Number(e.target.value)}));
startStream($("original"));
startStream($("enhanced"));
loadControls();
pollStats();
setInterval(pollStats, 500);
</script>
</body>
</html>
"""
