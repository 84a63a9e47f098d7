"""The device worker of image requests: the faces of every request in flight share batches.

Requests wait in one bounded :class:`~streamgpen.pipeline.channel.Channel`. The worker takes the
first, then whatever else arrives within the batching window (up to a round's worth), and runs the
round under the service's device lock: each image is detected and aligned on its own (images differ
in size), then every face of the round goes through the restorer in one call, so that sixteen
one-face requests cost two batches of eight instead of sixteen batches of one, and the face parser
likewise; each image is then pasted with its own request's options and handed back.

A full queue is refused at once (``QueueFull``: 503 with Retry-After), never waited on: a client
told to come back is better served than one whose connection hangs.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from streamgpen.enhancer import Enhancer
from streamgpen.errors import UserError
from streamgpen.faces.types import Face
from streamgpen.pipeline.channel import Channel, Closed

if TYPE_CHECKING:
    from streamgpen.service.core import Service

log = logging.getLogger(__name__)
# Requests one round takes at most: enough for several of the restorer's batches.
ROUND_REQUESTS = 32
# Pixels one round holds at most (its frames are on the device at once, as float RGB: 12 bytes a
# pixel, ~400 MB here): a round closes early when the next photo would pass it, and a photo
# larger than this goes alone.
ROUND_PIXELS = 32_000_000


class QueueFull(Exception):
    """The device worker's queue is full: come back later."""


@dataclass(eq=False, kw_only=True)
class ImageRequest:
    """One photo to enhance: HxWx3 BGR (uint8/uint16) on the host, the request's enhancer (the
    service's, or a view with the request's options), and the future of its result."""

    bgr: np.ndarray
    enhancer: Enhancer
    future: Future = field(default_factory=Future)
    queued: float = field(default_factory=time.perf_counter)


@dataclass(kw_only=True)
class ImageResult:
    """The enhanced photo (same layout and depth as the request's), its faces, and how long it
    waited for the device and spent there."""

    bgr: np.ndarray
    faces: list[Face]
    wait_s: float
    device_s: float


class FaceBatcher:
    """Collects image requests into rounds and runs them on the shared enhancer's device."""

    def __init__(self, service: Service):
        self.service = service
        self._stop = threading.Event()
        self._queue: Channel[ImageRequest] = Channel(service.limits.max_queue, stop=self._stop)
        self._thread: threading.Thread | None = None
        self._held: ImageRequest | None = None  # taken, but past the last round's budget
        self.submitted = 0  # requests accepted so far

    @property
    def queued(self) -> int:
        """Requests waiting for the device worker."""
        return len(self._queue)

    def start(self) -> None:
        """Start the worker thread."""
        self._thread = threading.Thread(target=self._work, name="image-worker", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the worker; requests still queued fail with a 503-worthy error."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        left = [self._held] if self._held is not None else []
        for request in left + self._queue.drain():
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(QueueFull("the service is stopping"))

    def submit(self, request: ImageRequest) -> Future:
        """Queue ``request``; its future gives an :class:`ImageResult`. ``QueueFull`` at once
        when ``max_queue`` requests are waiting (or the service is stopping)."""
        if self._stop.is_set():
            raise QueueFull("the service is stopping")
        if not self._queue.offer(request):
            raise QueueFull(f"{self._queue.maxsize} requests are waiting for the device")
        self.submitted += 1
        self.service.metrics.queue_depth.set(len(self._queue))
        return request.future

    def _work(self) -> None:
        while True:
            try:
                requests = self._take_round()
            except Closed:
                return
            self.service.metrics.queue_depth.set(len(self._queue))
            # A request whose client went away (its future cancelled by the server) is skipped;
            # the others are now running: their futures can no longer be cancelled.
            requests = [r for r in requests if r.future.set_running_or_notify_cancel()]
            if requests:
                self._round(requests)

    def _take_round(self) -> list[ImageRequest]:
        """The first request waiting (waiting for one), then those that come within the batching
        window, up to ``ROUND_REQUESTS`` and ``ROUND_PIXELS``; one left over starts the next."""
        if self._held is not None:
            requests, self._held = [self._held], None
        else:
            requests = [self._queue.get()]
        pixels = requests[0].bgr.shape[0] * requests[0].bgr.shape[1]
        deadline = time.monotonic() + self.service.limits.batch_window_s
        while len(requests) < ROUND_REQUESTS:
            try:
                request = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except (Closed, TimeoutError):
                break
            pixels += request.bgr.shape[0] * request.bgr.shape[1]
            if pixels > ROUND_PIXELS:
                self._held = request
                break
            requests.append(request)
        return requests

    def _round(self, requests: list[ImageRequest]) -> None:
        """One round; a failure fails the round's requests, never the worker."""
        try:
            with self.service.device_lock:
                start = time.perf_counter()
                results = self._enhance(requests)
                device_s = time.perf_counter() - start
        except Exception as error:  # a bad image, out of memory: each request hears of it
            if not isinstance(error, UserError | torch.OutOfMemoryError):
                log.exception("image round of %d request(s) failed", len(requests))
            for request in requests:
                request.future.set_exception(error)
            return
        for request, (bgr, faces) in zip(requests, results, strict=True):
            wait_s = start - request.queued
            request.future.set_result(
                ImageResult(bgr=bgr, faces=faces, wait_s=wait_s, device_s=device_s)
            )

    def _enhance(self, requests: list[ImageRequest]) -> list[tuple[np.ndarray, list[Face]]]:
        """Detect and align each image; restore and parse every face together; paste each."""
        metrics = self.service.metrics
        frames, batches = [], []
        for request in requests:
            frame = request.enhancer.upload(request.bgr)  # [1, 3, H, W]
            faces = request.enhancer.detect(frame)[0]
            frames.append(frame)
            batches.append(request.enhancer.align(frame, [faces]))

        def counted(faces: int) -> None:
            metrics.device_batches.inc()
            metrics.faces_per_batch.observe(faces)

        base = self.service.enhancer
        base.restore_many(batches, counted)
        parsed = [
            b for r, b in zip(requests, batches, strict=True) if r.enhancer.parser is not None
        ]
        base.parse_many(parsed)
        metrics.requests_per_round.observe(len(requests))
        metrics.faces.inc(sum(len(b.faces) for b in batches))
        return [
            (
                r.enhancer.download(r.enhancer.paste(r.enhancer.background(f), b), r.bgr.dtype),
                b.faces,
            )
            for r, f, b in zip(requests, frames, batches, strict=True)
        ]
