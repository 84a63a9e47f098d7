"""Video: decode -> detect/track -> crop -> restore -> paste back -> encode, on threads.

Three threads joined by bounded queues: the decoder, the device worker (the caller's thread, so
Ctrl-C lands there), and the encoder. A file source is processed frame by frame, every frame once,
in order. A live source never waits for the worker: when the worker falls behind, the decoder drops
the oldest waiting frame (counted) so latency stays bounded.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from streamgpen.enhancer import Enhancer
from streamgpen.io.facelog import FaceLog
from streamgpen.io.video import Frame, VideoSource
from streamgpen.overlay import draw_faces
from streamgpen.preview import PreviewServer
from streamgpen.track import TrackedFace, Tracker
from streamgpen.transfer import DeviceFrame, Downloader, HostImage, Uploader

_END = object()
LIVE_DEPTH = 2


@dataclass
class VideoOptions:
    """How the worker batches and what it writes besides frames."""

    frames_per_batch: int = 4
    draw: bool = False
    face_log: FaceLog | None = None
    sync_stages: bool = False
    preview: PreviewServer | None = None
    model_name: str = ""
    yuv_on_device: bool | None = None  # None: on CUDA (see transfer.Uploader)


STAGES = ("decode", "detect_track", "restore", "blend", "encode")
WORKER_STAGES = ("detect_track", "restore", "blend")  # the device worker's thread


@dataclass
class VideoStats:
    """Counters the progress display and the summary read (written by the pipeline's threads).

    ``stage_seconds`` adds up the wall time each stage took; with ``VideoOptions.sync_stages``
    the worker's stream is synchronised at its stage boundaries so that the figures are the
    device's too. ``decode`` includes queueing the upload, ``encode`` waiting for the download.
    """

    frames_in: int = 0
    frames_out: int = 0
    dropped: int = 0
    faces: int = 0
    full_detections: int = 0
    started: float = field(default_factory=time.perf_counter)
    latencies: deque = field(default_factory=lambda: deque(maxlen=600))
    stage_seconds: dict = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def fps(self) -> float:
        return self.frames_out / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def fps_in(self) -> float:
        return self.frames_in / self.elapsed if self.elapsed > 0 else 0.0

    def latency_ms(self, q: float) -> float | None:
        if not self.latencies:
            return None
        return float(np.quantile(np.asarray(self.latencies), q) * 1000)


@dataclass
class _Work:
    frame: Frame
    arrived: float
    pixels: DeviceFrame


class FrameQueue:
    """A bounded queue between the decoder and the worker.

    For a file the decoder blocks when it is full (every frame is processed); for a live source it
    drops the oldest frame instead, so the capture never stalls and stale frames are not enhanced.
    """

    def __init__(self, maxsize: int, live: bool, stats: VideoStats):
        self._queue: queue.Queue = queue.Queue(maxsize)
        self._live = live
        self._stats = stats

    def put(self, item, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                if self._live and item is not _END:
                    self._drop_oldest()

    def _drop_oldest(self) -> None:
        try:
            self._queue.get_nowait()
            self._stats.dropped += 1
        except queue.Empty:
            pass

    def get(self, timeout: float | None = None):
        return self._queue.get(timeout=timeout)

    def get_nowait(self):
        return self._queue.get_nowait()


class VideoPipeline:
    """Enhances a video source into a sink; ``run()`` returns the stats, or raises on Ctrl-C."""

    def __init__(
        self,
        source: VideoSource,
        sink,
        enhancer: Enhancer,
        tracker: Tracker,
        options: VideoOptions,
        on_frame: Callable[[VideoStats], None] | None = None,
    ):
        self.source = source
        self.sink = sink
        self.enhancer = enhancer
        self.tracker = tracker
        self.options = options
        self.on_frame = on_frame
        self.stats = VideoStats()
        self.stop = threading.Event()
        # Live latency grows with every frame waiting and with every frame batched together: a
        # live source keeps at most LIVE_DEPTH frames (faces within a frame still batch).
        depth = LIVE_DEPTH if source.is_live else 16
        self._chunk = min(options.frames_per_batch, depth)
        self._inbox = FrameQueue(depth, source.is_live, self.stats)
        self._outbox: queue.Queue = queue.Queue(16)
        self._errors: list[BaseException] = []
        self._reconnects = 0
        self._upload = Uploader(enhancer.device, options.yuv_on_device)
        self._download = Downloader(enhancer.device)

    def run(self) -> VideoStats:
        """Process until the source ends (or Ctrl-C, which stops cleanly and re-raises)."""
        decoder = threading.Thread(target=self._decode, name="decode", daemon=True)
        encoder = threading.Thread(target=self._encode, name="encode", daemon=True)
        decoder.start()
        encoder.start()
        try:
            self._work()
        finally:
            self.stop.set()
            self._outbox.put(_END)
            encoder.join()
            decoder.join(timeout=5)
        if self._errors:
            raise self._errors[0]
        return self.stats

    # --- threads ---------------------------------------------------------------------------

    def _decode(self) -> None:
        try:
            frames = iter(self.source)
            while True:
                with self._timed("decode"):
                    frame = next(frames, None)
                    pixels = self._upload(frame) if frame is not None else None
                if frame is None or self.stop.is_set():
                    break
                self.stats.frames_in += 1
                self._inbox.put(_Work(frame, time.perf_counter(), pixels), self.stop)
        except BaseException as e:  # surfaced by run() in the main thread
            self._errors.append(e)
        finally:
            self._inbox.put(_END, self.stop)

    def _encode(self) -> None:
        try:
            while True:
                item = self._outbox.get()
                if item is _END:
                    return
                work, pending, faces = item
                with self._timed("encode"):
                    image = pending.get()
                    self.sink.write(work.frame, image)
                self.stats.frames_out += 1
                self.stats.latencies.append(time.perf_counter() - work.arrived)
                if self.options.preview:
                    self._publish(work.frame.image, image, faces)
                if self.on_frame:
                    self.on_frame(self.stats)
        except BaseException as e:
            self._errors.append(e)
            self.stop.set()

    def _work(self) -> None:
        for chunk in self._chunks():
            images, faces = self._enhance(chunk)
            for item in zip(chunk, images, faces, strict=True):
                self._outbox.put(item)
            if self._errors:
                return

    def _chunks(self) -> Iterator[list[_Work]]:
        """Frames grouped for one batched restore: as many as are waiting, up to the limit."""
        while not self.stop.is_set():
            try:
                first = self._inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if first is _END:
                return
            chunk = [first]
            ended = False
            while len(chunk) < self._chunk:
                try:
                    item = self._inbox.get(timeout=None if not self.source.is_live else 0)
                except queue.Empty:
                    break
                if item is _END:
                    ended = True
                    break
                chunk.append(item)
            yield chunk
            if ended:
                return

    # --- the device work ---------------------------------------------------------------------

    def _enhance(self, chunk: list[_Work]) -> tuple[list[HostImage], list[int]]:
        """Track, align, restore and paste the faces of a chunk of frames.

        Returns the output images (on their way to the host) and each frame's face count.
        """
        enhancer = self.enhancer
        controls = self.options.preview.controls if self.options.preview else None
        enhance = controls is None or controls.enhance
        if controls is not None:
            enhancer.blend = controls.blend
        if self.source.reconnects != self._reconnects:
            # A new connection may show another scene: old tracks would be followed into it.
            self._reconnects = self.source.reconnects
            self.tracker.reset()
        with self._timed("detect_track"):
            frames = torch.stack([w.pixels.rgb() for w in chunk])  # [B, 3, H, W]
            tracked: list[list[TrackedFace]] = []
            for work, frame in zip(chunk, frames, strict=True):
                faces = self.tracker.update(frame, self._seconds(work.frame))
                tracked.append(faces)
                self._log(work.frame, faces)
        if enhance:
            with self._timed("restore"):
                batch = enhancer.align(frames, [[t.face for t in faces] for faces in tracked])
                enhancer.restore(batch)
        with self._timed("blend"):
            if enhance:
                frames = enhancer.paste(frames, batch)
            images = self._download(frames)
        counts = [len(faces) for faces in tracked]
        self.stats.faces += sum(counts)
        self.stats.full_detections = self.tracker.full_detections
        if self.options.draw or (controls is not None and controls.overlay):
            images = [
                HostImage(_draw(image.get(), faces))
                for image, faces in zip(images, tracked, strict=True)
            ]
        return images, counts

    @contextmanager
    def _timed(self, stage: str):
        start = time.perf_counter()
        try:
            # A named range in torch.profiler traces (bench --profile): which stage a kernel
            # belongs to.
            with torch.profiler.record_function(f"stage:{stage}"):
                yield
        finally:
            if (
                self.options.sync_stages
                and stage in WORKER_STAGES
                and self.enhancer.device.type == "cuda"
            ):
                # The worker's stream only: a device-wide sync would also wait for the
                # decoder's uploads and the encoder's downloads, which overlap by design.
                torch.cuda.current_stream(self.enhancer.device).synchronize()
            self.stats.stage_seconds[stage] += time.perf_counter() - start

    def _seconds(self, frame: Frame) -> float:
        # The tracker's smoothing needs a clock; frames without a timestamp use their index.
        if frame.time is not None:
            return frame.time
        return frame.index / float(self.source.fps or 25)

    def _publish(self, original: np.ndarray, enhanced: np.ndarray, faces: int) -> None:
        stats = self.stats
        self.options.preview.publish(
            original,
            enhanced,
            {
                "fps_in": round(stats.fps_in, 2),
                "fps_out": round(stats.fps, 2),
                "latency_ms_p50": stats.latency_ms(0.5),
                "latency_ms_p95": stats.latency_ms(0.95),
                "faces": faces,
                "dropped": stats.dropped,
                "model": self.options.model_name,
                "device": str(self.enhancer.device),
            },
        )

    def _log(self, frame: Frame, faces: list[TrackedFace]) -> None:
        log = self.options.face_log
        if log is None:
            return
        for t in faces:
            log.write(
                t.face,
                frame=frame.index,
                pts=frame.pts,
                track=t.track_id,
                detector_run=t.detector_run,
            )


def _draw(rgb: np.ndarray, faces: list[TrackedFace]) -> np.ndarray:
    labels = [f"#{t.track_id} {t.face.score:.2f}" for t in faces]
    bgr = draw_faces(rgb[..., ::-1], [t.face for t in faces], labels)
    return np.ascontiguousarray(bgr[..., ::-1])
