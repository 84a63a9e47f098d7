"""One HTTP server for every web face of streamgpen: uvicorn on a socket bound up front.

``HttpServer`` takes its address in ``bind()`` (a port in use is a one-line ``UserError``
before anything slow happens; connections that arrive before serving wait in the backlog), then
serves an ASGI app with uvicorn, either on a daemon thread (``start()``, the live preview of
``enhance --preview``) or in the calling thread until ``stop()`` or SIGINT/SIGTERM
(``serve_forever()``, ``streamgpen serve``). Example::

    server = HttpServer(app, *parse_bind("8765")).bind()
    ...  # warm up
    with server:  # start() ... stop()
        print(server.url("/"))

Connections are asyncio transports, so a slow client pins no thread, but each still holds a
socket and buffers; uvicorn alone waits forever for a request head that never ends and for a
client that never reads. ``BoundedH11Protocol`` (uvicorn's h11 protocol, extended) adds those
bounds: a deadline for each request head, a cap on connections where the one waiting longest for
a head gives way to a new one (a flood of half-sent requests cannot lock a real one out), a cut
for a client that takes nothing for ``SEND_STALL_TIMEOUT_S``, and a cut of whatever is left
``STOP_GRACE_S`` after ``stop()``. An app can cut its own connection through the
``CUT_EXTENSION`` scope extension (a stalled MJPEG viewer giving up its slot).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import signal
import socket
import threading
import time
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import HANDLED_SIGNALS

from streamgpen.errors import UserError

DEFAULT_HOST = "127.0.0.1"
# Connections at once: a few browser tabs (two streams, /stats polls and /controls posts each)
# and API clients. Beyond it a new connection displaces the one waiting longest for a request
# head; when none waits, uvicorn answers the newcomer 503 (limit_concurrency, one above this).
MAX_CONNECTIONS = 64
# A request's head (line and headers) must be complete this long after the connection is ready
# for it (accepted, or the previous response sent): slowloris.
REQUEST_HEAD_TIMEOUT_S = 5.0
# An idle keep-alive connection is closed after this long (uvicorn's timeout_keep_alive). The
# page polls /stats every 0.5 s on one connection; an idle one gives its place back soon.
KEEP_ALIVE_S = 5
# The most a request head may hold (h11_max_incomplete_event_size; h11's default is 16 KiB):
# ours are a few hundred bytes with a token cookie; this bounds what a connection buffers.
MAX_HEAD_BYTES = 8 * 1024
# A client whose connection takes nothing for this long while data waits is cut. asyncio resumes
# writing below 16 KiB of its 64 KiB buffer: a client must take 48 KiB in 5 s (~80 kbit/s).
SEND_STALL_TIMEOUT_S = 5.0
# Send buffer of each connection (Linux doubles it). Whatever a slow viewer's buffers hold is
# what it sees late; left to autotuning that is up to 4 MiB, seconds of video. This much still
# carries a 960-wide MJPEG stream at full rate over a LAN, and ~20 fps at 100 ms round trip.
SEND_BUFFER_BYTES = 128 * 1024
# stop(): what still runs this long after the server stopped accepting is cut.
STOP_GRACE_S = 1.0
# Connections that arrive between bind() and serving (GPEN warming up) wait in the backlog.
BACKLOG = 128
# The scope extension through which an app cuts its own connection: scope["extensions"][...]
# ["cut"]() drops it at once, as if the client had gone (the app then sees http.disconnect).
CUT_EXTENSION = "streamgpen.cut"
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


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the bounds it lacks (see the module's docstring).

    Reads uvicorn's per-connection state (``cycle``, ``connections``, ``transport``); written
    against uvicorn 0.54, checked by tests/test_web.py.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._inner_app = self.app
        self.app = self._app_with_cut
        self._head_timer: Any = None  # set while the next request's head is awaited
        self._head_since = 0.0
        self._head_cycle: Any = None
        self._stall_timer: Any = None
        self._lost = False

    async def _app_with_cut(self, scope: Scope, receive: Receive, send: Send) -> None:
        extensions = dict(scope.get("extensions") or {})
        extensions[CUT_EXTENSION] = {"cut": self.cut}
        scope["extensions"] = extensions
        await self._inner_app(scope, receive, send)

    def cut(self) -> None:
        """Drop the connection now, unsent data and all; call it on the event loop."""
        if not self._lost:
            self.connections.discard(self)  # no longer counts; connection_lost follows
            self.transport.abort()

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        self._await_head()
        self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        for timer in (self._head_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_timer is not None and self.cycle is not self._head_cycle:
            self._head_timer.cancel()  # a request's head came in: its response is under way
            self._head_timer = None

    def on_response_complete(self) -> None:
        finished = self.cycle
        super().on_response_complete()  # may start a pipelined request's cycle
        if self.cycle is finished and not self.transport.is_closing():
            self._await_head()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(SEND_STALL_TIMEOUT_S, self.cut)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def shutdown(self) -> None:
        super().shutdown()
        # A response still going (a stream) or data a client does not take would hold the
        # server's stop forever: whatever is left after the grace period is cut.
        self.loop.call_later(STOP_GRACE_S, self.cut)

    def _await_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_cycle = self.cycle
        self._head_since = time.monotonic()
        self._head_timer = self.loop.call_later(REQUEST_HEAD_TIMEOUT_S, self.cut)

    def _make_room(self) -> None:
        """Beyond ``MAX_CONNECTIONS`` the connection waiting longest for a head gives way."""
        if len(self.connections) <= MAX_CONNECTIONS:
            return
        waiting = [
            other
            for other in self.connections
            if other is not self
            and isinstance(other, BoundedH11Protocol)
            and other._head_timer is not None
        ]
        if waiting:
            min(waiting, key=lambda other: other._head_since).cut()


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, telling when it accepts, and giving signals back as a return value."""

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self.ready = threading.Event()
        self.finished = threading.Event()
        self.signals: list[int] = []

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.ready.set()

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            super().run(sockets=sockets)
        finally:
            self.finished.set()

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.signals.append(sig)
        super().handle_exit(sig, frame)  # the first stops serving, a second SIGINT at once

    @contextlib.contextmanager
    def capture_signals(self):
        """SIGINT/SIGTERM stop serving (main thread only). Unlike uvicorn's own, the signal is
        not raised again afterwards: ``serve_forever()`` returns and its caller cleans up."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class HttpServer:
    """An ASGI app served by uvicorn on an address taken by ``bind()``.

    ``app`` may be set (or replaced) until serving starts, so a server can be bound before the
    app exists. ``option`` names the command-line option in error messages (``--port``).
    """

    def __init__(
        self, app: ASGIApp | None, host: str = DEFAULT_HOST, port: int = 0, *, option="--preview"
    ):
        self.app = app
        self.host = host
        self.port = port
        self.option = option
        self._socket: socket.socket | None = None
        self._server: _Uvicorn | None = None
        self._thread: threading.Thread | None = None

    def bind(self) -> HttpServer:
        """Take the address now, before serving; idempotent.

        Raises ``UserError`` with one line (``--preview HOST:PORT: port in use``, ``... cannot
        resolve host ...``) when the address cannot be had.
        """
        if self._socket is not None:
            return self
        family, address = self._resolve()
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT only
            sock.bind(address)
            sock.listen(BACKLOG)
        except OSError as error:
            sock.close()
            reason = _BIND_ERRORS.get(error.errno, error.strerror or str(error))
            raise UserError(f"{self.option} {self._spec()}: {reason}") from None
        self._socket = sock
        self.port = sock.getsockname()[1]
        return self

    def start(self) -> HttpServer:
        """Serve on a daemon thread (binding first if needed); returns once it accepts."""
        server = self._uvicorn()
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [self._socket]}, name="http-server", daemon=True
        )
        self._thread.start()
        while not server.ready.wait(0.05):
            if server.finished.is_set():
                self._server, self._thread = None, None
                raise RuntimeError("the HTTP server stopped while starting (see the log)")
        return self

    def serve_forever(self) -> int | None:
        """Serve in this thread until ``stop()`` (from another thread) or SIGINT/SIGTERM (in the
        main thread); returns the signal that ended it, or None. Binds first if needed."""
        server = self._uvicorn()
        try:
            server.run(sockets=[self._socket])
        except SystemExit:  # uvicorn's way to report an app that failed to start
            raise RuntimeError("the app failed to start (see the log)") from None
        return server.signals[0] if server.signals else None

    def stop(self) -> None:
        """Stop serving: no new connections, whatever still runs is cut ``STOP_GRACE_S`` later;
        then close the address. Idempotent; also after ``bind()`` alone."""
        server = self._server
        if server is not None:
            server.should_exit = True
            if threading.current_thread() is not self._thread:
                server.finished.wait(timeout=STOP_GRACE_S * 2 + 5)
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    @property
    def connections(self) -> int:
        """How many connections are open now."""
        return len(self._server.server_state.connections) if self._server else 0

    def url(self, path: str = "/", token: str | None = None) -> str:
        """The address of ``path`` (with ``?token=...`` when given); the port is known after
        ``bind()``. A wildcard host is shown as this machine's name."""
        host = socket.gethostname() if self.host in ("0.0.0.0", "::") else self.host
        if ":" in host:
            host = f"[{host}]"
        query = f"?token={token}" if token else ""
        return f"http://{host}:{self.port}{path}{query}"

    def __enter__(self) -> HttpServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _uvicorn(self) -> _Uvicorn:
        if self._server is not None:
            raise RuntimeError("the HTTP server is already running")
        if self.app is None:
            raise RuntimeError("no app to serve: set HttpServer.app first")
        self.bind()
        config = uvicorn.Config(
            self.app,
            http=BoundedH11Protocol,
            ws="none",  # no websocket endpoints; an upgraded connection would leave our bounds
            lifespan="on",  # the app's startup and shutdown run (Starlette and FastAPI have them)
            interface="asgi3",  # not guessed: a bound method or a middleware object is ASGI 3
            loop="asyncio",
            # Leave the process's logging alone (uvicorn's config would replace its handlers);
            # records reach the root logger. Errors only: uvicorn's warnings are what clients
            # cause (a malformed request, an upgrade attempt, the cap reached), one line each on
            # the console of a run for anyone on the network to write; app errors still show.
            log_config=None,
            log_level="error",
            access_log=False,
            proxy_headers=False,  # no proxy in front: X-Forwarded-* from anyone is not trusted
            server_header=False,
            limit_concurrency=MAX_CONNECTIONS + 1,
            timeout_keep_alive=KEEP_ALIVE_S,
            timeout_graceful_shutdown=int(STOP_GRACE_S * 2 + 1),
            h11_max_incomplete_event_size=MAX_HEAD_BYTES,
            backlog=BACKLOG,
        )
        self._server = _Uvicorn(config)
        return self._server

    def _resolve(self) -> tuple[socket.AddressFamily, tuple]:
        try:
            found = socket.getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except (OSError, UnicodeError, ValueError):  # gaierror; IDNA; a NUL in the name
            raise UserError(
                f"{self.option} {self._spec()}: cannot resolve host {self.host}"
            ) from None
        # IPv4 first where a name has both: "localhost" stays 127.0.0.1, what clients try first.
        family, _, _, _, address = min(found, key=lambda info: info[0] != socket.AF_INET)
        return family, address

    def _spec(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"
