"""What ``/metrics`` exposes (prometheus-client), in a registry of the service's own.

A registry per service rather than the process-wide default: two services in one process (the
tests start several) keep their figures apart, and nothing of the Python runtime's collectors
mixes in unasked.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Faces per device batch: powers of two up to the largest batch a GPU takes (--batch-size).
FACE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Request latency: a faceless photo is a few ms; a face on a CPU is seconds (GPEN-BFR-512 ~14 s).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
JOB_STATES = ("queued", "running", "succeeded", "failed", "canceled")


class Metrics:
    """The service's figures; ``render()`` is the ``/metrics`` body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "streamgpen_requests", "HTTP requests answered", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "streamgpen_request_seconds",
            "HTTP request latency, first byte in to last byte out",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.device_batches = Counter(
            "streamgpen_device_batches", "Restorer batches run for image requests", registry=r
        )
        self.faces_per_batch = Histogram(
            "streamgpen_faces_per_batch",
            "Faces in each restorer batch of image requests",
            buckets=FACE_BUCKETS,
            registry=r,
        )
        self.requests_per_round = Histogram(
            "streamgpen_requests_per_round",
            "Image requests whose faces one device round restored together",
            buckets=FACE_BUCKETS,
            registry=r,
        )
        self.faces = Counter("streamgpen_faces", "Faces restored for image requests", registry=r)
        self.queue_depth = Gauge(
            "streamgpen_queue_depth", "Image requests waiting for the device", registry=r
        )
        self.jobs = Gauge("streamgpen_jobs", "Video jobs by state", ["state"], registry=r)
        for state in JOB_STATES:
            self.jobs.labels(state=state).set(0)
        self.streams = Gauge("streamgpen_streams", "Live streams running", registry=r)

    def render(self) -> bytes:
        """The text exposition format of every figure."""
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware: counts and times every HTTP request by its route's path template (not the
    raw path: job ids would make a series per job) and status."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.latency.labels(route=route).observe(time.perf_counter() - start)
