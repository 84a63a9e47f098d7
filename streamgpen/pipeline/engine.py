"""The video engine: source -> decode -> [channel] -> stages -> [channel] -> encode -> sink.

Three threads joined by two :class:`~streamgpen.pipeline.channel.Channel`: the decoder (reads and
uploads frames), the device worker (the caller's thread, so Ctrl-C lands there; it runs the
stages on chunks of frames) and the encoder (waits for each download, writes it, then hands the
packet to the observers). A file source is processed frame by frame, every frame once, in order. A
live source never waits for the worker: its channel is leaky, so when the worker falls behind the
oldest waiting frame is dropped (counted) and latency stays bounded.

Failure: whichever thread fails first sets the run's stop event, which releases every ``put`` and
``get`` at once; ``run()`` then raises that first error. A sink whose ``write`` has not returned
for ``sink_timeout`` seconds (a stalled disk or server) stops the run the same way, with a
:class:`UserError`. The engine imports no UI: the live page and progress bars are observers
written above it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

from streamgpen.errors import UserError
from streamgpen.faces.overlay import draw_tracked
from streamgpen.media.planes import host_planes
from streamgpen.media.sinks import Sink
from streamgpen.media.video import Frame, VideoSource
from streamgpen.pipeline.channel import Channel, Closed
from streamgpen.pipeline.observers import STAGES, WORKER_STAGES, Observer, RunStats
from streamgpen.pipeline.packet import Controls, FramePacket
from streamgpen.pipeline.stages import Stage
from streamgpen.runtime.transfer import Uploader

__all__ = ["STAGES", "WORKER_STAGES", "EngineOptions", "VideoPipeline"]

# Frames waiting between threads. A live source keeps at most LIVE_DEPTH: latency grows with every
# frame waiting and every frame batched together (faces within a frame still batch).
FILE_DEPTH = 16
LIVE_DEPTH = 2
# How long run() waits for a stuck encoder thread after a stall before giving up on it.
STALL_GRACE_S = 2.0


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """How the engine batches and what it draws.

    ``frames_per_chunk``: frames whose faces share one batched restore (at most LIVE_DEPTH for a
    live source). ``draw``: boxes and landmarks on every output frame (the live controls'
    ``overlay`` does the same per chunk). ``sink_timeout``: seconds a single write may take.
    """

    frames_per_chunk: int = 4
    draw: bool = False
    sink_timeout: float = 10.0


class VideoPipeline:
    """Enhances a video source into a sink; ``run()`` returns the stats, or raises."""

    def __init__(
        self,
        *,
        source: VideoSource,
        sink: Sink,
        stages: Sequence[Stage],
        uploader: Uploader,
        controls: Callable[[], Controls],
        observers: Sequence[Observer] = (),
        options: EngineOptions = EngineOptions(),
        stop: threading.Event | None = None,
        device_lock: AbstractContextManager | None = None,
    ):
        """``controls`` gives the current controls' snapshot (read once per chunk).

        ``stop``: an event the caller may set to end the run early (a job canceled); what was
        processed is written and ``run()`` returns. ``device_lock``: held while the stages run on a
        chunk, so runs that share one enhancer (the service's jobs, streams and image batches)
        take turns on it; the decoder and encoder threads never wait for it.
        """
        self.source, self.sink, self.stages = source, sink, list(stages)
        self.uploader = uploader
        self.controls = controls
        self.observers = list(observers)
        self.options = options
        self.stats = RunStats()
        self.stop = stop if stop is not None else threading.Event()
        self._device_lock = device_lock if device_lock is not None else contextlib.nullcontext()
        live = source.is_live
        depth = LIVE_DEPTH if live else FILE_DEPTH
        self._chunk = min(options.frames_per_chunk, depth)
        self._inbox: Channel[FramePacket] = Channel(
            depth, stop=self.stop, leaky=live, on_drop=self._dropped
        )
        self._outbox: Channel[FramePacket] = Channel(FILE_DEPTH, stop=self.stop)
        self._errors: list[BaseException] = []
        self._writing_since: float | None = None  # when the current sink.write began

    def run(self) -> RunStats:
        """Process until the source ends; the first error of any thread is raised here."""
        threads = {
            name: threading.Thread(target=self._guard, args=args, name=name, daemon=True)
            for name, args in (
                # A failed input still lets the frames decoded so far through; a failed output
                # stops everything at once.
                ("decode", (self._decode, False)),
                ("encode", (self._encode, True)),
                ("watchdog", (self._watch, True)),
            )
        }  # daemons: a libav call stuck in a stalled server must not keep the process alive
        for thread in threads.values():
            thread.start()
        try:
            self._work()
        finally:
            self._outbox.close()  # the encoder writes what was processed, then ends
            try:
                self._join_encoder(threads["encode"])
            finally:
                self.stop.set()
                threads["decode"].join(timeout=5)
        if self._errors:
            raise self._errors[0]
        return self.stats

    # --- threads ---------------------------------------------------------------------------

    def _guard(self, body: Callable[[], None], stops: bool) -> None:
        try:
            body()
        except BaseException as e:  # surfaced by run() in the caller's thread
            self._fail(e, stop=stops)

    def _fail(self, error: BaseException, *, stop: bool = True) -> None:
        self._errors.append(error)
        if stop:
            self.stop.set()

    def _decode(self) -> None:
        frames, reconnects = iter(self.source), self.source.reconnects
        try:
            while not self.stop.is_set():
                start = time.perf_counter()
                frame = next(frames, None)
                if frame is None:
                    return
                # The first frame of a new connection may show another scene.
                packet = self._packet(frame, self.source.reconnects != reconnects, start)
                reconnects = self.source.reconnects
                self.stats.frames_in += 1
                if not self._inbox.put(packet):
                    return
        finally:
            self._inbox.close()

    def _packet(self, frame: Frame, discontinuity: bool, start: float) -> FramePacket:
        pixels = self.uploader(host_planes(frame, yuv=self.uploader.yuv_on_device))
        packet = FramePacket(
            frame=frame, seconds=self._seconds(frame), discontinuity=discontinuity, pixels=pixels
        )
        packet.add_time("decode", time.perf_counter() - start)
        return packet

    def _seconds(self, frame: Frame) -> float:
        # The tracker's smoothing needs a clock; frames without a timestamp use their index.
        if frame.time is not None:
            return frame.time
        return frame.index / float(self.source.fps or 25)

    def _work(self) -> None:
        while True:
            try:
                chunk = self._inbox.get_many(self._chunk, wait_for_more=not self.source.is_live)
            except Closed:
                return
            controls = self.controls()  # one immutable snapshot per chunk
            for packet in chunk:
                packet.controls = controls
            with self._device_lock:
                for stage in self.stages:
                    stage.process(chunk)
            for packet in chunk:
                if not self._outbox.put(packet):
                    return

    def _encode(self) -> None:
        while True:
            try:
                packet = self._outbox.get()
            except Closed:
                return
            start = time.perf_counter()
            image = packet.host.get()
            if self.options.draw or packet.controls.overlay:
                scale = image.shape[1] / packet.image.shape[-1]  # --upscale
                image = draw_tracked(image, packet.faces, scale)
            self._writing_since = time.monotonic()
            self.sink.write(packet.frame, image)
            self._writing_since = None
            packet.result = image
            packet.add_time("encode", time.perf_counter() - start)
            self.stats.observe(packet)
            for observer in self.observers:
                observer.observe(packet, self.stats)

    # --- a stalled sink ----------------------------------------------------------------------

    def _watch(self) -> None:
        """Stop the run with one clear error when a single write takes too long."""
        while not self.stop.wait(0.1):
            if self._stalled():
                limit = self.options.sink_timeout
                message = f"the output stalled: a frame took over {limit:g} s to write"
                self._fail(UserError(f"{message} (see --timeout)"))
                return

    def _join_encoder(self, encoder: threading.Thread) -> None:
        # Polled, so that the watchdog's verdict on a stalled write is seen; after a failure the
        # encoder gets a short grace to end (a write stuck in libav may never return).
        while encoder.is_alive() and not self.stop.is_set():
            encoder.join(0.1)
        encoder.join(STALL_GRACE_S)

    def _stalled(self) -> bool:
        since = self._writing_since
        return since is not None and time.monotonic() - since > self.options.sink_timeout

    def _dropped(self, packet: FramePacket) -> None:
        self.stats.dropped += 1
