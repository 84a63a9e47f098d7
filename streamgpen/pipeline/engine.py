"""The video engine: for each input, source -> decode -> [channel] -> stages -> [channel] ->
encode -> sink; one device worker runs the stages for every input.

Each input is a :class:`Lane`: its decoder thread (reads and uploads frames) and its encoder
thread (waits for each download, writes it, then hands the packet to the observers) joined to the
device worker by two :class:`~streamgpen.pipeline.channel.Channel`. The :class:`DeviceWorker`
(the caller's thread, so Ctrl-C lands there) takes a chunk from each input that has one, tracks
each, restores all their faces in shared device batches
(:func:`~streamgpen.pipeline.stages.restore_together`), and hands each chunk back to its lane. A
file is processed frame by frame, every frame once, in order, in whole chunks. A live source never
waits for the worker: its channel is leaky, so when the worker falls behind the oldest waiting
frame is dropped (counted) and latency stays bounded; beside live inputs, files take one chunk a
round in turn (they fill the spare capacity).

Failure: an input whose thread fails stops alone (its lane's stop event releases its channels);
the others go on, and its first error stays on the lane. A sink whose ``write`` has not returned for
``sink_timeout`` seconds (a stalled disk or server) stops its lane the same way, with a
:class:`UserError`. :class:`VideoPipeline` is the one-input run: ``run()`` raises that error. The
engine imports no UI: the live page and progress bars are observers written above it.
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
from streamgpen.pipeline.stages import RestoreStage, Stage, restore_together
from streamgpen.runtime.transfer import Uploader

__all__ = ["STAGES", "WORKER_STAGES", "DeviceWorker", "EngineOptions", "Lane", "VideoPipeline"]

# Frames waiting between threads. A live source keeps at most LIVE_DEPTH: latency grows with every
# frame waiting and every frame batched together (faces within a frame still batch).
FILE_DEPTH = 16
LIVE_DEPTH = 2
# How long run() waits for a stuck encoder thread after a stall before giving up on it.
STALL_GRACE_S = 2.0
# How long the worker sleeps with no chunk anywhere before looking at the stop event again.
IDLE_S = 0.05


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


class Lane:
    """One input's ends and threads: source -> decode thread -> inbox, and outbox -> encode
    thread -> sink, with the stages the device worker runs on its chunks.

    ``stages`` run in order; a :class:`RestoreStage` among them is run by the worker together with
    the other inputs' (shared device batches). ``controls`` gives the current controls' snapshot
    (read once per chunk); ``stats`` are this input's; ``stop`` is set when this input fails or
    the run ends; ``errors`` keeps its failures, the first one first.
    """

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
        name: str = "",
    ):
        self.source, self.sink, self.name = source, sink, name
        self.before, self.restore, self.after = _split(stages)
        self.uploader = uploader
        self.controls = controls
        self.observers = list(observers)
        self.options = options
        self.stats = RunStats()
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.ready = threading.Event()  # the worker's: set when a frame or the end comes
        live = source.is_live
        depth = LIVE_DEPTH if live else FILE_DEPTH
        self.chunk = min(options.frames_per_chunk, depth)
        self.inbox: Channel[FramePacket] = Channel(
            depth, stop=self.stop, leaky=live, on_drop=self._dropped, on_put=self._notify
        )
        self._outbox: Channel[FramePacket] = Channel(FILE_DEPTH, stop=self.stop)
        self._threads: dict[str, threading.Thread] = {}
        self._writing_since: float | None = None  # when the current sink.write began

    def start(self) -> None:
        """Start the decoder, the encoder and the stall watchdog."""
        self._threads = {
            name: threading.Thread(target=self._guard, args=args, name=name, daemon=True)
            for name, args in (
                # A failed input still lets the frames decoded so far through; a failed output
                # stops this input at once.
                ("decode", (self._decode, False)),
                ("encode", (self._encode, True)),
                ("watchdog", (self._watch, True)),
            )
        }  # daemons: a libav call stuck in a stalled server must not keep the process alive
        for thread in self._threads.values():
            thread.start()

    def take(self) -> list[FramePacket]:
        """The next chunk if one is ready now (a file's only when whole), else []; raises
        :class:`Closed` once the input has ended (or failed) and everything was taken."""
        return self.inbox.take(self.chunk, whole=not self.source.is_live)

    def deliver(self, chunk: list[FramePacket]) -> None:
        """Hand a processed chunk to the encoder."""
        for packet in chunk:
            if not self._outbox.put(packet):
                return

    def finish(self) -> None:
        """The encoder writes what was processed, then every thread of this input ends, and
        its restore stage lets go of its tracks' history."""
        self._outbox.close()
        try:
            self._join_encoder()
        finally:
            self.stop.set()
            if "decode" in self._threads:
                self._threads["decode"].join(timeout=5)
            if self.restore is not None:
                self.restore.close()

    # --- threads ---------------------------------------------------------------------------

    def _guard(self, body: Callable[[], None], stops: bool) -> None:
        try:
            body()
        except BaseException as e:  # kept for the caller, in the caller's thread
            self._fail(e, stop=stops)

    def _fail(self, error: BaseException, *, stop: bool = True) -> None:
        self.errors.append(error)
        if stop:
            self.stop.set()
            self._notify()

    def _notify(self) -> None:
        self.ready.set()

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
                if not self.inbox.put(packet):
                    return
        finally:
            self.inbox.close()

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
        """Stop this input with one clear error when a single write takes too long."""
        while not self.stop.wait(0.1):
            if self._stalled():
                limit = self.options.sink_timeout
                message = f"the output stalled: a frame took over {limit:g} s to write"
                self._fail(UserError(f"{message} (see --timeout)"))
                return

    def _join_encoder(self) -> None:
        # Polled, so that the watchdog's verdict on a stalled write is seen; after a failure the
        # encoder gets a short grace to end (a write stuck in libav may never return).
        encoder = self._threads.get("encode")
        if encoder is None:
            return
        while encoder.is_alive() and not self.stop.is_set():
            encoder.join(0.1)
        encoder.join(STALL_GRACE_S)

    def _stalled(self) -> bool:
        since = self._writing_since
        return since is not None and time.monotonic() - since > self.options.sink_timeout

    def _dropped(self, packet: FramePacket) -> None:
        self.stats.dropped += 1


class DeviceWorker:
    """Runs every lane's stages on its chunks, in rounds, until every input has ended.

    A round takes a chunk from each input that has one ready, each live input every round and,
    beside live inputs, one file in turn (round-robin, so none starves): their faces share the
    restorer's device batches. ``stop``: an event the caller may set to end every input early
    (a job canceled); what was processed is written. ``device_lock``: held while a round runs,
    so runs that share one enhancer (the service's jobs, streams and image batches) take turns;
    the decoders and encoders never wait for it.
    """

    def __init__(
        self,
        lanes: Sequence[Lane],
        *,
        stop: threading.Event | None = None,
        device_lock: AbstractContextManager | None = None,
    ):
        self.lanes = list(lanes)
        self.stop = stop if stop is not None else threading.Event()
        self._device_lock = device_lock if device_lock is not None else contextlib.nullcontext()
        self._ready = threading.Event()

    def run(self) -> None:
        """Process until every input ends; each input's errors stay on its lane."""
        for lane in self.lanes:
            lane.ready = self._ready
            lane.start()
        try:
            self._work()
        finally:
            for lane in self.lanes:
                lane.finish()

    def _work(self) -> None:
        active, turn = list(self.lanes), 0
        while active and not self.stop.is_set():
            self._ready.clear()  # before looking: a frame that comes meanwhile sets it again
            work = self._round(active, turn)
            if not work:
                self._ready.wait(IDLE_S)
                continue
            turn += 1
            self._process(work)

    def _round(self, active: list[Lane], turn: int) -> list[tuple[Lane, list[FramePacket]]]:
        """A chunk from each lane due this round; lanes that ended leave ``active``."""
        live = any(lane.source.is_live for lane in active)
        work, files = [], 0
        start = turn % len(active)
        for lane in active[start:] + active[:start]:
            if live and files and not lane.source.is_live:
                continue  # beside live inputs, one file a round
            try:
                chunk = lane.take()
            except Closed:
                active.remove(lane)
                continue
            if chunk:
                work.append((lane, chunk))
                files += not lane.source.is_live
        return work

    def _process(self, work: list[tuple[Lane, list[FramePacket]]]) -> None:
        for lane, chunk in work:
            controls = lane.controls()  # one immutable snapshot per chunk
            for packet in chunk:
                packet.controls = controls
        with self._device_lock:
            for lane, chunk in work:
                for stage in lane.before:
                    stage.process(chunk)
            restore_together([(lane.restore, chunk) for lane, chunk in work if lane.restore])
            for lane, chunk in work:
                for stage in lane.after:
                    stage.process(chunk)
        for lane, chunk in work:
            lane.deliver(chunk)


class VideoPipeline:
    """Enhances one video source into a sink; ``run()`` returns the stats, or raises."""

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
        """A :class:`Lane` of these ends and stages, run by its own :class:`DeviceWorker`
        (``stop`` and ``device_lock`` are the worker's)."""
        self.lane = Lane(
            source=source,
            sink=sink,
            stages=stages,
            uploader=uploader,
            controls=controls,
            observers=observers,
            options=options,
        )
        self.worker = DeviceWorker([self.lane], stop=stop, device_lock=device_lock)

    @property
    def stats(self) -> RunStats:
        return self.lane.stats

    @property
    def observers(self) -> list[Observer]:
        return self.lane.observers

    @property
    def stop(self) -> threading.Event:
        return self.worker.stop

    def run(self) -> RunStats:
        """Process until the source ends; the first error of any thread is raised here."""
        self.worker.run()
        if self.lane.errors:
            raise self.lane.errors[0]
        return self.stats


def _split(stages: Sequence[Stage]) -> tuple[list[Stage], RestoreStage | None, list[Stage]]:
    """The stages before the restore stage, it (None: there is none), and those after it."""
    for i, stage in enumerate(stages):
        if isinstance(stage, RestoreStage):
            return list(stages[:i]), stage, list(stages[i + 1 :])
    return list(stages), None, []
