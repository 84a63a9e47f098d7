"""Live preview in a browser: original and enhanced video side by side, with figures and controls.

``PreviewServer`` is what ``enhance --preview`` runs: a ``PreviewState`` (frames, figures,
controls), its page (``preview_app``) behind ``TokenGuard`` and ``SecurityHeaders``, served by
``web.server.HttpServer`` (uvicorn) on a daemon thread, the same server ``streamgpen serve``
runs. The pipeline calls ``publish()`` once per frame; that only stores references to the newest
frames, so a slow or stalled viewer can never hold the pipeline back. Beyond loopback a token is
required (generated if none is given; ``url`` carries it); on loopback without one the Host header
must be loopback. No response may be framed by another site.

The viewer's controls are a frozen ``Controls`` snapshot (the run's own at first): ``controls``
reads the current one, ``POST /controls`` replaces it.

Order of use: ``bind()`` first (it raises ``UserError`` for a port in use or a host that does not
resolve, so call it before anything slow such as warming up GPEN; connections that arrive before
``start()`` wait in the backlog), then ``start()`` (serves on a daemon thread; binds if not yet
bound), ``publish()`` per frame, ``stop()`` at the end (also after a ``bind()`` alone; it ends
the streams, the server can not be started again). Example::

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

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from streamgpen.pipeline.packet import Controls
from streamgpen.preview.app import MAX_BODY_BYTES, inputs_app, preview_app
from streamgpen.preview.state import MAX_STREAMS, STATS_KEYS, PreviewState
from streamgpen.web.auth import TokenGuard, access_token, cookie_name, is_loopback
from streamgpen.web.responses import SecurityHeaders
from streamgpen.web.server import DEFAULT_HOST, MAX_CONNECTIONS, HttpServer, parse_bind

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

DEFAULT_PORT = 8765


class PreviewServer:
    """The live page of one run: ``bind()``, ``start()``, ``stop()``, or a context manager."""

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        token: str | None = None,
        controls: Controls = Controls(),
        jpeg_quality: int = 80,
        max_width: int = 960,
        inputs: Sequence[str] = (),
    ):
        """``inputs``: the names of a run's several inputs, each with a ``PreviewState`` of its
        own in ``states`` (published to and controlled one by one) and a page picking them."""
        self.host = host
        #: token_generated: no token was given for a non-loopback address and one was made up.
        self.token, self.token_generated = access_token(host, token)
        self.inputs = list(inputs)
        self.states = [
            PreviewState(controls=controls, jpeg_quality=jpeg_quality, max_width=max_width)
            for _ in self.inputs or [None]
        ]
        self.state = self.states[0]
        self._http = HttpServer(None, host, port, option="--preview")

    @property
    def port(self) -> int:
        """The port: the one asked for, the real one once bound."""
        return self._http.port

    @property
    def url(self) -> str:
        """The page's address (with ``?token=...`` when a token is set); port known after bind."""
        return self._http.url("/", self.token)

    @property
    def controls(self) -> Controls:
        """The viewer's current controls, a frozen snapshot (the run's own until changed)."""
        return self.state.controls

    def update_controls(self, values: Mapping[str, Any]) -> Controls:
        """Apply ``values`` (all or nothing) and return the new snapshot; ``ValueError`` if bad."""
        return self.state.update_controls(values)

    @property
    def viewers(self) -> int:
        """How many MJPEG streams are open now."""
        return self.state.viewers

    @property
    def connections(self) -> int:
        """How many connections are open now."""
        return self._http.connections

    def publish(
        self, original_rgb: np.ndarray, enhanced_rgb: np.ndarray, stats: Mapping | None = None
    ) -> None:
        """Offer the newest frame pair (HxWx3 uint8 RGB) and figures; never waits for viewers.
        See ``PreviewState.publish``."""
        self.state.publish(original_rgb, enhanced_rgb, stats)

    def stats(self) -> dict[str, Any]:
        """What ``/stats`` returns; see ``PreviewState.stats``."""
        return self.state.stats()

    def bind(self) -> PreviewServer:
        """Take the address now, before serving; idempotent.

        Raises ``UserError`` with one line (``--preview HOST:PORT: port in use``, ``... cannot
        resolve host ...``) when the address cannot be had.
        """
        self._http.bind()
        if self._http.app is None:  # the cookie is named by the real port
            cookie = cookie_name(self.port)
            if len(self.inputs) > 1:
                page = inputs_app(list(zip(self.inputs, self.states, strict=True)))
            else:
                page = preview_app(self.state)
            self._http.app = SecurityHeaders(TokenGuard(page, token=self.token, cookie_name=cookie))
        return self

    def start(self) -> PreviewServer:
        """Serve on a daemon thread, binding first if ``bind()`` was not called (``UserError``)."""
        if self.state.closed:
            raise RuntimeError("the preview server was stopped")
        self.bind()._http.start()
        return self

    def stop(self) -> None:
        """End the streams, stop serving, close the address."""
        for state in self.states:
            state.close()
        self._http.stop()

    def __enter__(self) -> PreviewServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
