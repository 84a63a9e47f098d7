"""The live page as an ASGI app (Starlette): ``preview_app(state)``.

Endpoints, all relative, so the app serves the same under a ``Mount`` (the service mounts one per
stream at ``/v1/streams/{id}/preview``); anything else is a JSON 404, a wrong method a JSON 405::

    GET  /                      the page (package data: page.html)
    GET  /stream/original.mjpg  multipart/x-mixed-replace; boundary=frame (each part is
    GET  /stream/enhanced.mjpg  followed at once by the next delimiter, so browsers show it now)
    GET  /stats                 JSON, see ``PreviewState.stats``; NaN/inf become null
    GET  /controls              JSON: enhance, blend, overlay
    POST /controls              JSON object with any of those keys; 400 on bad input

A run of several inputs serves ``inputs_app``: a picker page at ``/`` (package data:
inputs.html), ``/stats`` with every input's figures, and each input's ``preview_app`` at
``/inputs/{n}/``.

Who may ask is not decided here: wrap the app in ``web.auth.TokenGuard`` (and
``web.responses.SecurityHeaders``), as ``PreviewServer`` does.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from importlib import resources

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from streamgpen.preview.frames import PANES
from streamgpen.preview.state import MAX_STREAMS, PreviewState
from streamgpen.preview.streams import Stream
from streamgpen.web.responses import (
    EXCEPTION_HANDLERS,
    HttpError,
    error_response,
    json_response,
    read_json,
)
from streamgpen.web.server import CUT_EXTENSION

BOUNDARY = "frame"
MJPEG_TYPE = f"multipart/x-mixed-replace; boundary={BOUNDARY}"
MAX_BODY_BYTES = 4096
_DELIMITER = f"--{BOUNDARY}\r\n".encode()


@functools.cache
def page_html(name: str = "page.html") -> bytes:
    """A page, read once from the package data."""
    return resources.files("streamgpen.preview").joinpath(name).read_bytes()


def preview_app(state: PreviewState) -> Starlette:
    """The page, its streams, figures and controls for ``state``. (Its token cookie is set by
    ``TokenGuard`` when the page is opened with ``?token=``.)"""

    async def page(request: Request) -> Response:
        return HTMLResponse(page_html())

    async def stats(request: Request) -> Response:
        return json_response(state.stats())

    async def controls(request: Request) -> Response:
        if request.method == "POST":
            values = await read_json(request, max_bytes=MAX_BODY_BYTES)
            try:
                updated = state.update_controls(values)
            except ValueError as error:  # every bad control, a huge number's overflow too
                raise HttpError(400, str(error) or "bad controls") from None
            return json_response(updated.as_dict())
        return json_response(state.controls.as_dict())

    def stream(pane: str):
        async def endpoint(request: Request):
            if request.method == "HEAD":
                return Response(media_type=MJPEG_TYPE)
            return MjpegStream(state, pane)

        return endpoint

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/stats", stats, methods=["GET"]),
        Route("/controls", controls, methods=["GET", "POST"]),
        *(Route(f"/stream/{pane}.mjpg", stream(pane), methods=["GET"]) for pane in PANES),
    ]
    return Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS)


def inputs_app(inputs: Sequence[tuple[str, PreviewState]]) -> Starlette:
    """The live page of several inputs (``(name, state)`` pairs): a picker listing them with
    their figures, each input's own page below it."""

    async def page(request: Request) -> Response:
        return HTMLResponse(page_html("inputs.html"))

    async def stats(request: Request) -> Response:
        listed = [
            {"name": name, "path": f"inputs/{n}/"} | state.stats()
            for n, (name, state) in enumerate(inputs)
        ]
        return json_response({"inputs": listed})

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/stats", stats, methods=["GET"]),
        *(Mount(f"/inputs/{n}", app=preview_app(state)) for n, (_, state) in enumerate(inputs)),
    ]
    return Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS)


class MjpegStream:
    """One viewer's stream of ``pane`` (an ASGI response): a slot, then a part per new frame.

    The stream waits for a frame newer than the last one it sent, then sends the newest: a viewer
    that was slow to take the last one skips whatever came in between. The time each send is
    blocked (the viewer not reading) is noted for ``Streams``' eviction; ending a stream cuts its
    connection (the server's ``CUT_EXTENSION``), or, served elsewhere, cancels it.
    """

    def __init__(self, state: PreviewState, pane: str):
        self.state = state
        self.pane = pane

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.state.closed:
            await error_response(410, "this preview has ended")(scope, receive, send)
            return
        cut = (scope.get("extensions") or {}).get(CUT_EXTENSION, {}).get("cut")
        with anyio.CancelScope() as cancel_scope:
            stream = self.state.streams.open(cut or cancel_scope.cancel)
            if stream is None:
                await error_response(503, f"at most {MAX_STREAMS} streams at once")(
                    scope, receive, send
                )
                return
            try:
                async with contextlib.aclosing(self._parts(stream)) as parts:
                    await StreamingResponse(parts, media_type=MJPEG_TYPE)(scope, receive, send)
            finally:
                self.state.streams.close(stream)

    async def _parts(self, stream: Stream):
        streams, frames = self.state.streams, self.state.frames
        streams.sent(stream)  # the response head went out before the first part is asked for
        # Each part is closed by the next delimiter right away: browsers show a part only once
        # they see the delimiter after it, which would otherwise come a frame late.
        chunk, seq = _DELIMITER, 0
        while True:
            # The chunk is sent between the yield and the next step: that is the blocking send.
            streams.sending(stream)
            yield chunk
            streams.sent(stream)
            if not await frames.wait_newer(seq):
                return
            seq, jpeg = await frames.jpeg(self.pane)
            chunk = _part_head(seq, len(jpeg)) + jpeg + b"\r\n" + _DELIMITER


def _part_head(seq: int, length: int) -> bytes:
    return (
        f"Content-Type: image/jpeg\r\nContent-Length: {length}\r\nX-Frame: {seq}\r\n\r\n".encode()
    )
