"""Live preview in a browser: original and enhanced video side by side, with figures and controls.

``PreviewServer`` is a small stdlib HTTP server on its own daemon threads. The pipeline calls
``publish()`` once per frame; that only stores references to the newest frames, so a slow or
stalled viewer can never hold the pipeline back. Each viewer's handler thread waits for a frame
newer than the last one it sent, JPEG-encodes it (once per frame and pane, shared by all viewers)
and writes it as one part of an MJPEG stream; a viewer that falls behind skips to the newest frame.
The endpoints and the limits on connections and streams are in ``handler``; who may use them is
in ``auth``: beyond loopback a token (generated if none is given; ``url`` carries it), on
loopback without one a loopback Host header. No response may be framed by another site.

The viewer's controls are a frozen ``Controls`` snapshot (the run's own at first): ``controls``
reads the current one, ``POST /controls`` replaces it.

Order of use: ``bind()`` first (it raises ``UserError`` for a port in use or a host that does not
resolve, so call it before anything slow such as warming up GPEN; connections that arrive before
``start()`` wait in the backlog), then ``start()`` (serves on daemon threads; binds if not yet
bound), ``publish()`` per frame, ``stop()`` at the end (also after a ``bind()`` alone). Example::

    server = PreviewServer(*parse_bind("8765"), controls=Controls(blend=0.3)).bind()
    ...  # warm up
    with server:  # start() ... stop()
        print(server.url)
        for original, enhanced in frames:
            server.publish(original, enhanced, {"fps_out": 24.8})
            if server.controls.overlay:
                ...
"""

from __future__ import annotations

import errno
import ipaddress
import secrets
import socket
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from streamgpen.errors import UserError
from streamgpen.pipeline.packet import Controls
from streamgpen.preview.auth import TOKEN_PATTERN, is_loopback
from streamgpen.preview.frames import Frames
from streamgpen.preview.handler import (
    MAX_BODY_BYTES,
    MAX_CONNECTIONS,
    MAX_STREAMS,
    PreviewHTTPServer,
)

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "MAX_BODY_BYTES",
    "MAX_CONNECTIONS",
    "MAX_STREAMS",
    "STATS_KEYS",
    "PreviewServer",
    "is_loopback",
    "parse_bind",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
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
# How long stop() waits for handler threads to notice their sockets were shut down.
STOP_GRACE_S = 2.0
_BIND_ERRORS = {
    errno.EADDRINUSE: "port in use",
    errno.EADDRNOTAVAIL: "not an address of this machine",
    errno.EACCES: "permission denied",
}


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


class PreviewServer:
    """The preview HTTP server: ``bind()``, ``start()``, ``stop()``, or a context manager."""

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        token: str | None = None,
        controls: Controls = Controls(),
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
        self.frames = Frames(jpeg_quality, max_width)
        self._controls = controls
        self._controls_lock = threading.Lock()
        self._httpd: PreviewHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def controls(self) -> Controls:
        """The viewer's current controls, a frozen snapshot (the run's own until changed)."""
        with self._controls_lock:
            return self._controls

    def update_controls(self, values: Mapping[str, Any]) -> Controls:
        """Apply ``values`` (all or nothing) and return the new snapshot; ``ValueError`` if bad."""
        with self._controls_lock:
            self._controls = self._controls.updated(values)
            return self._controls

    @property
    def url(self) -> str:
        """The page's address (with ``?token=...`` when a token is set); port known after bind."""
        host = socket.gethostname() if self.host in ("0.0.0.0", "::") else self.host
        if ":" in host:
            host = f"[{host}]"
        query = f"?token={self.token}" if self.token else ""
        return f"http://{host}:{self.port}/{query}"

    @property
    def viewers(self) -> int:
        """How many MJPEG streams are open now."""
        return len(self._httpd.streams) if self._httpd else 0

    @property
    def connections(self) -> int:
        """How many connections (each with a handler thread) are open now."""
        return len(self._httpd.connections) if self._httpd else 0

    def bind(self) -> PreviewServer:
        """Take the address now, before serving; idempotent.

        Raises ``UserError`` with one line (``--preview HOST:PORT: port in use``, ``... cannot
        resolve host ...``) when the address cannot be had.
        """
        if self._httpd is not None:
            return self
        family, address = self._resolve()
        httpd = PreviewHTTPServer(address, family, self)
        try:
            httpd.server_bind()
            httpd.server_activate()
        except OSError as error:
            httpd.server_close()
            reason = _BIND_ERRORS.get(error.errno, error.strerror or str(error))
            raise UserError(f"--preview {self._spec()}: {reason}") from None
        self._httpd = httpd
        self.port = httpd.server_address[1]
        return self

    def start(self) -> PreviewServer:
        """Serve on a daemon thread, binding first if ``bind()`` was not called (``UserError``)."""
        if self._thread is not None:
            raise RuntimeError("the preview server is already running")
        httpd = self.bind()._httpd
        self.frames.set_stopping(False)
        self._thread = threading.Thread(
            target=httpd.serve_forever, name="preview-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close every open connection, streams included, and the address."""
        if self._httpd is None:
            return
        self.frames.set_stopping(True)
        if self._thread is not None:
            self._httpd.shutdown()  # waits for serve_forever(), so only once it runs
            self._thread.join()
            self._thread = None
        self._httpd.connections.cut_all(STOP_GRACE_S)
        self._httpd.server_close()
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
        self.frames.publish(original_rgb, enhanced_rgb, stats)

    def stats(self) -> dict[str, Any]:
        """What ``/stats`` returns: ``STATS_KEYS`` (None until the pipeline passes them), whatever
        else it passes, ``viewers`` (open streams) and ``published`` (frames so far)."""
        seq, latest = self.frames.stats()
        return (
            {key: None for key in STATS_KEYS} | latest | {"viewers": self.viewers, "published": seq}
        )

    def __enter__(self) -> PreviewServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _resolve(self) -> tuple[socket.AddressFamily, tuple]:
        try:
            found = socket.getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except (OSError, UnicodeError, ValueError):  # gaierror; IDNA; a NUL in the name
            raise UserError(f"--preview {self._spec()}: cannot resolve host {self.host}") from None
        # IPv4 first where a name has both: "localhost" stays 127.0.0.1, what clients try first.
        family, _, _, _, address = min(found, key=lambda info: info[0] != socket.AF_INET)
        return family, address

    def _spec(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"
