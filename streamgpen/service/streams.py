"""Live streams: a camera or network stream enhanced, as it comes, into a recording, an RTSP
publication and/or a live preview page, each stream on its own thread.

Routes (JSON in and out; ``app.build_app`` puts the token check in front of all of them)::

    POST   /v1/streams                  {"source": "rtsp://...|webcam:N", "sink": null|"file"|
                                         "rtsp://host:port/path", "preview": bool, "options": {}}
                                        -> 201, the stream, Location: /v1/streams/{id}
    GET    /v1/streams                  {"streams": [...]}: every stream with its figures
    GET    /v1/streams/{id}             one stream
    DELETE /v1/streams/{id}             stops it (its recording finalised) -> the final figures;
                                        a finished one is removed with its recording (204)
    GET    /v1/streams/{id}/recording   the recording (``"sink": "file"``), once stopped
    *      /v1/streams/{id}/preview/    the live page of a stream started with ``"preview": true``

Only live inputs are streams (a file is a job); a camera is named by its number only
(``webcam:0``), as a device path would be a path from the request. ``"file"`` records into the
spool (``streams/{id}/output.mp4``): the client never names a path. A stream runs until it is
stopped, fails (its source unreachable after the reconnect budget, its output broken: one line
in ``error``) or its source ends. At most ``limits.max_streams`` run at once (503 beyond); the
newest ``KEPT_FINISHED`` finished streams stay listed, an older one is forgotten with its
recording.
"""

from __future__ import annotations

import io
import logging
import re
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from fastapi.routing import APIRoute
from rich.console import Console
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from streamgpen.apps.videos import enhance_video
from streamgpen.config import RunConfig
from streamgpen.enhancer import Enhancer
from streamgpen.errors import UserError
from streamgpen.media.urls import connects_out, is_publish_url, is_webcam, redacted
from streamgpen.pipeline.observers import RunStats
from streamgpen.pipeline.packet import Controls, FramePacket
from streamgpen.preview import PreviewState, preview_app
from streamgpen.service.core import ID_PATTERN, Service, new_id
from streamgpen.web.responses import HttpError, busy, error_response, json_response, read_json

log = logging.getLogger(__name__)

CAMERA = re.compile(r"webcam:[0-9]{1,3}")
FIELDS = ("source", "sink", "preview", "options")
TAGS = ["streams"]
# An RTSP URL with credentials and a query is a few hundred characters; more is not a URL.
MAX_URL_CHARS = 2048
# How long DELETE and close() wait for a stream to finish its output: the engine lets the frame
# being written finish, closes the sink (an MP4's last fragment) and waits up to 5 s for a
# decoder stuck in a read. Measured on a 2-core CPU: 0.17-0.29 s for a flowing RTSP stream,
# 4.0 s for one whose server froze (the read's timeout); a reconnect's backoff can add 8 s.
STOP_WAIT_S = 20.0
# A live stream ends when someone stops it, not on its own: a client refused for want of a
# slot should not poll faster than this.
RETRY_AFTER_S = 60
# Finished streams kept in the listing (with their recordings); the oldest goes beyond.
KEPT_FINISHED = 64


class StreamState(StrEnum):
    """Where a stream is: ``starting`` (warming up, connecting) until its first frame is
    written, ``running``, ``stopping`` (asked to stop, finishing its output), then ``stopped``
    (stopped, or its source ended) or ``failed`` (``error`` says why)."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


ACTIVE = (StreamState.STARTING, StreamState.RUNNING, StreamState.STOPPING)


@dataclass(frozen=True, kw_only=True)
class StreamRequest:
    """What ``POST /v1/streams`` asked for, checked: a live ``source``; ``sink`` None, ``"file"``
    (a recording in the spool) or an ``rtsp(s)://`` URL to publish to; ``preview`` on or off;
    the enhancer's ``options`` (``Service.REQUEST_OPTIONS``)."""

    source: str
    sink: str | None = None
    preview: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


def parse_request(body: Any) -> StreamRequest:
    """The request a JSON body asks for; ``HttpError(400)`` names what is wrong with it."""
    if not isinstance(body, dict):
        raise HttpError(400, "send a JSON object: {source, sink, preview, options}")
    unknown = set(body) - set(FIELDS)
    if unknown:
        raise HttpError(400, f"unknown field(s): {', '.join(sorted(unknown))}")
    source, sink = body.get("source"), body.get("sink")
    preview, options = body.get("preview", False), body.get("options", {})
    _check_url("source", source)
    live = CAMERA.fullmatch(source) if is_webcam(source) else connects_out(source)
    if not live:
        raise HttpError(
            400, "source: a live input the service connects to (rtsp, rtmp, http(s), webcam:N)"
        )
    if sink is not None and sink != "file":
        _check_url("sink", sink)
        if not is_publish_url(sink):
            raise HttpError(400, 'sink: null, "file" or an rtsp:// URL to publish to')
    if not isinstance(preview, bool):
        raise HttpError(400, "preview must be true or false")
    if not isinstance(options, dict):
        raise HttpError(400, "options must be a JSON object")
    if sink is None and not preview:
        raise HttpError(400, "a stream needs a sink, a preview or both")
    return StreamRequest(source=source, sink=sink, preview=preview, options=options)


def _check_url(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise HttpError(400, f"{name} must be a non-empty string")
    if len(value) > MAX_URL_CHARS or not value.isprintable() or " " in value:
        raise HttpError(400, f"{name} is not a URL")


def without_passwords(text: str, request: StreamRequest) -> str:
    """``text`` (a media error naming the source or sink) with their passwords masked."""
    for url in (request.source, request.sink):
        if url:
            text = text.replace(url, redacted(url))
    return text


class LiveStream:
    """One stream: what was asked, its thread and stop request, its preview, its figures.

    ``observe`` (the engine's observer, on the encode thread) keeps a snapshot of the figures,
    so that a listing never reads the run's statistics while they change.
    """

    def __init__(self, *, stream_id: str, request: StreamRequest, recording: Path | None):
        self.id = stream_id
        self.request = request
        self.recording = recording
        self.created = time.time()
        self.state = StreamState.STARTING
        self.error: str | None = None
        self.stop_event = threading.Event()
        self.preview: PreviewState | None = None
        self.preview_app: ASGIApp | None = None
        self.thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._reconnects = 0
        self._figures = figures(RunStats(), faces=0, reconnects=0)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def url(self) -> str:
        return f"/v1/streams/{self.id}"

    def observe(self, packet: FramePacket, stats: RunStats) -> None:
        """After each written frame: the figures, and ``running`` from the first frame on."""
        # The first frame of a new connection; one dropped on a full queue goes uncounted.
        self._reconnects += packet.discontinuity
        snapshot = figures(stats, faces=len(packet.faces), reconnects=self._reconnects)
        with self._lock:
            self._figures = snapshot
            if self.state is StreamState.STARTING:
                self.state = StreamState.RUNNING

    def request_stop(self) -> None:
        """Ask the run to end (it finishes its output on its own thread)."""
        with self._lock:
            if self.active:
                self.state = StreamState.STOPPING
        self.stop_event.set()

    def finish(
        self, state: StreamState, *, error: str | None = None, stats: RunStats | None = None
    ) -> None:
        """The run is over: its final state, error and figures."""
        with self._lock:
            self.state, self.error = state, error
            if stats is not None:
                self._figures = figures(
                    stats, faces=self._figures["faces"], reconnects=self._reconnects
                )

    def has_recording(self) -> bool:
        """Whether the recording is there to download: the stream ended and wrote frames."""
        return not self.active and self.recording is not None and self.recording.is_file()

    def as_json(self) -> dict[str, Any]:
        """The stream as ``GET /v1/streams/{id}`` shows it."""
        with self._lock:
            state, error, snapshot = self.state, self.error, dict(self._figures)
        base = self.url
        served = self.request.preview and state in ACTIVE
        return {
            "id": self.id,
            "source": redacted(self.request.source),
            "sink": redacted(self.request.sink) if self.request.sink else None,
            "options": dict(self.request.options),
            "state": state.value,
            "error": error,
            "created": round(self.created, 3),
            **snapshot,
            "preview": f"{base}/preview/" if served else None,
            "recording": f"{base}/recording" if self.has_recording() else None,
        }


def figures(stats: RunStats, *, faces: int, reconnects: int) -> dict[str, Any]:
    """A stream's figures: frames written and decoded, rates, latency, drops, the newest frame's
    faces, reconnections seen, seconds run."""
    p50, p95 = stats.latency_ms(0.5), stats.latency_ms(0.95)
    return {
        "frames": stats.frames_out,
        "frames_in": stats.frames_in,
        "fps_in": round(stats.fps_in, 2),
        "fps_out": round(stats.fps, 2),
        "latency_ms_p50": None if p50 is None else round(p50, 1),
        "latency_ms_p95": None if p95 is None else round(p95, 1),
        "dropped": stats.dropped,
        "faces": faces,
        "reconnects": reconnects,
        "seconds": round(stats.elapsed, 2),
    }


class StreamManager:
    """The service's live streams: started by ``POST``, listed, stopped by ``DELETE``; ``close()``
    stops them all."""

    def __init__(self, service: Service):
        self.service = service
        self.folder = service.spool / "streams"
        self._streams: dict[str, LiveStream] = {}
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        """Make the recordings' folder."""
        self.folder.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        """Stop every stream and wait (``STOP_WAIT_S`` in all) for their outputs to finish."""
        with self._lock:
            self._closed = True
            streams = list(self._streams.values())
        for stream in streams:
            stream.request_stop()
        deadline = time.monotonic() + STOP_WAIT_S
        for stream in streams:
            if stream.thread is not None:
                stream.thread.join(max(0.0, deadline - time.monotonic()))
        self._count()

    def routes(self) -> list[BaseRoute]:
        """``/v1/streams`` (POST, GET), ``/v1/streams/{id}`` (GET, DELETE), its ``/recording``
        and its ``/preview/``, for ``app.build_app``."""
        streams, one = "/v1/streams", "/v1/streams/{stream_id}"
        return [
            APIRoute(streams, self.start_stream, methods=["POST"], status_code=201, tags=TAGS),
            APIRoute(streams, self.list_streams, methods=["GET"], tags=TAGS),
            APIRoute(one, self.show_stream, methods=["GET"], tags=TAGS),
            APIRoute(one, self.stop_stream, methods=["DELETE"], tags=TAGS),
            APIRoute(f"{one}/recording", self.download_recording, methods=["GET"], tags=TAGS),
            Mount(f"{one}/preview", app=PreviewDispatch(self)),
        ]

    # --- the endpoints -----------------------------------------------------------------------

    async def start_stream(self, request: Request) -> Response:
        """Start enhancing a live source. JSON body: ``source`` (``rtsp://...``, ``webcam:N``
        ...), ``sink`` (null, ``"file"``: a recording to download once stopped, or an
        ``rtsp://`` URL to publish to), ``preview`` (a live page at ``/v1/streams/{id}/preview/``),
        ``options`` (blend, upscale, only_center_face, mask): a sink, a preview or both. 201 with
        the stream and its ``Location``; 503 with Retry-After at ``max_streams``."""
        stream = self.create(parse_request(await read_json(request)))
        return json_response(stream.as_json(), status=201, headers={"Location": stream.url})

    async def list_streams(self, request: Request) -> Response:
        """Every stream, oldest first, with its state (starting, running, stopping, stopped,
        failed) and figures: frames, fps in and out, latency p50/p95 (ms), dropped, faces,
        reconnects, error, preview and recording paths."""
        return json_response({"streams": [stream.as_json() for stream in self.streams()]})

    async def show_stream(self, request: Request, stream_id: str) -> Response:
        """One stream, as the listing shows it."""
        return json_response(self.find(stream_id).as_json())

    async def stop_stream(self, request: Request, stream_id: str) -> Response:
        """Stop a running stream, its recording finalised: 200 with the final figures (202 while
        it is still finishing its output); remove a finished one and its recording (204)."""
        stream = self.find(stream_id)
        if not stream.active:
            self.forget(stream)
            return Response(status_code=204)
        await run_in_threadpool(self.stop, stream)  # joins the stream's thread, bounded
        return json_response(stream.as_json(), status=202 if stream.active else 200)

    async def download_recording(self, request: Request, stream_id: str) -> Response:
        """The MP4 recording of a stream started with ``"sink": "file"``, once it has stopped
        (409 before)."""
        stream = self.find(stream_id)
        if stream.recording is None:
            raise HttpError(404, 'the stream records nothing (start it with "sink": "file")')
        if stream.active:
            raise HttpError(409, "the recording is ready once the stream stops")
        if not stream.has_recording():
            raise HttpError(404, "the stream wrote no frame")
        name = f"stream-{stream.id}.mp4"
        return FileResponse(stream.recording, media_type="video/mp4", filename=name)

    # --- the work ----------------------------------------------------------------------------

    def create(self, request: StreamRequest) -> LiveStream:
        """Start a stream on its own thread; ``HttpError`` 400 for bad options, 503 when
        ``limits.max_streams`` run already or the service is closing."""
        enhancer = self.service.request_enhancer(request.options)
        stream_id = new_id()
        recording = self.folder / stream_id / "output.mp4" if request.sink == "file" else None
        stream = LiveStream(stream_id=stream_id, request=request, recording=recording)
        if request.preview:
            stream.preview = PreviewState(controls=Controls(blend=enhancer.blend))
            stream.preview_app = preview_app(stream.preview)
        stream.thread = threading.Thread(
            target=self._run, args=(stream, enhancer), name=f"stream-{stream_id}", daemon=True
        )
        with self._lock:
            self._admit()
            self._streams[stream_id] = stream
        if recording is not None:
            recording.parent.mkdir(parents=True, exist_ok=True)
        self._count()
        stream.thread.start()
        return stream

    def _admit(self) -> None:
        """Refuse a new stream (the lock is held) when closing or at ``max_streams``."""
        if self._closed:
            raise HttpError(503, "the service is shutting down")
        limit = self.service.limits.max_streams
        if sum(stream.active for stream in self._streams.values()) >= limit:
            message = f"{limit} live stream(s) are running, the most this service takes"
            raise busy(message, RETRY_AFTER_S)

    def find(self, stream_id: str) -> LiveStream:
        """The stream of ``stream_id``; ``HttpError(404)`` for none."""
        stream = self._streams.get(stream_id) if ID_PATTERN.fullmatch(stream_id) else None
        if stream is None:
            raise HttpError(404, "no such stream")
        return stream

    def stop(self, stream: LiveStream, timeout: float = STOP_WAIT_S) -> LiveStream:
        """Ask ``stream`` to stop and wait (up to ``timeout``) for its output to be finished."""
        stream.request_stop()
        if stream.thread is not None:
            stream.thread.join(timeout)
        return stream

    def preview_of(self, stream_id: str) -> ASGIApp | None:
        """The preview app of a running stream of ``stream_id`` with a preview, or None."""
        stream = self._streams.get(stream_id) if ID_PATTERN.fullmatch(stream_id) else None
        if stream is None or not stream.active:
            return None
        return stream.preview_app

    def _run(self, stream: LiveStream, enhancer: Enhancer) -> None:
        """The stream's thread: the run, then its final state."""
        request = stream.request
        try:
            stats = enhance_video(
                self._config(request.source, self._output(stream)),
                enhancer,
                console=Console(file=io.StringIO()),  # quiet: nothing is printed
                preview=stream.preview,
                observers=[stream],
                stop=stream.stop_event,
                device_lock=self.service.device_lock,
            )
        except UserError as error:
            message = without_passwords(str(error), request)
            log.warning("stream %s failed: %s", stream.id, message)
            stream.finish(StreamState.FAILED, error=message)
        except Exception:
            log.exception("stream %s (%s) failed", stream.id, redacted(request.source))
            stream.finish(StreamState.FAILED, error="internal error (see the service's log)")
        else:
            stream.finish(StreamState.STOPPED, stats=stats)
        finally:
            if stream.preview is not None:
                stream.preview.close()  # ends the viewers' MJPEG streams
            self._retire()

    def _config(self, source: str, output: str) -> RunConfig:
        """The run's configuration: the service's, for this source and output. The face log
        (``--faces-json``) is a command-line run's; a stream writes none. The source options
        (reconnect budget, timeout, transport) are the service's: a live source is read as it
        comes, so ``--realtime`` has nothing to pace."""
        base = self.service.config
        extras = replace(base.extras, faces_json=None, save_faces=None)
        return replace(base, input=source, output=output, quiet=True, extras=extras, preview=None)

    @staticmethod
    def _output(stream: LiveStream) -> str:
        if stream.recording is not None:
            return str(stream.recording)
        return stream.request.sink or "null"

    def forget(self, stream: LiveStream) -> None:
        """Remove a finished stream from the listing, and its recording from the spool."""
        with self._lock:
            self._streams.pop(stream.id, None)
        shutil.rmtree(self.folder / stream.id, ignore_errors=True)

    def _retire(self) -> None:
        """After a stream ends: the gauge, and the oldest finished streams beyond
        ``KEPT_FINISHED`` forgotten."""
        finished = [stream for stream in self.streams() if not stream.active]
        for stream in finished[: max(0, len(finished) - KEPT_FINISHED)]:
            self.forget(stream)
        self._count()

    def _count(self) -> None:
        with self._lock:
            running = sum(stream.active for stream in self._streams.values())
        self.service.metrics.streams.set(running)

    def streams(self) -> list[LiveStream]:
        """Every stream listed, oldest first."""
        with self._lock:
            return list(self._streams.values())


class PreviewDispatch:
    """ASGI app mounted at ``/v1/streams/{id}/preview``: the live page of that stream, served by
    its own preview app; 404 for a stream that is not running with a preview."""

    def __init__(self, manager: StreamManager):
        self.manager = manager

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream_id = scope.get("path_params", {}).get("stream_id", "")
        app = self.manager.preview_of(stream_id)
        if app is None:
            await error_response(404, "no live preview of such a stream")(scope, receive, send)
            return
        await app(scope, receive, send)
