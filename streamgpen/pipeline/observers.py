"""Observers read finished packets at the end of the pipeline: figures, the face log.

They run on the encoding thread after each frame is written, in the order given, and must not
block (the live page's, in the apps layer, only stores references). An observer has one method,
``observe(packet, stats)``; the engine imports no UI, so progress bars and the live page are
observers written above it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from streamgpen.media.facelog import FaceLog
from streamgpen.pipeline.packet import FramePacket

STAGES = ("decode", "detect_track", "restore", "parse", "upscale", "blend", "download", "encode")
# The device worker's thread.
WORKER_STAGES = ("detect_track", "restore", "parse", "upscale", "blend", "download")


class Observer(Protocol):
    """Something that reads each finished packet."""

    def observe(self, packet: FramePacket, stats: RunStats) -> None: ...


@dataclass
class RunStats:
    """A run's figures, added up from the packets that went through (and the frames dropped).

    ``stage_seconds`` adds up the wall time each stage took (see ``StageClock``): ``decode``
    includes queueing the upload, ``encode`` waiting for the download.
    """

    frames_in: int = 0
    frames_out: int = 0
    dropped: int = 0
    faces: int = 0
    full_detections: int = 0
    started: float = field(default_factory=time.perf_counter)
    latencies: deque = field(default_factory=lambda: deque(maxlen=600))
    stage_seconds: dict = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    last_faces: int = 0  # faces of the newest frame written

    def observe(self, packet: FramePacket, stats: RunStats | None = None) -> None:
        """Count a written packet (the engine calls this first, before the other observers)."""
        self.frames_out += 1
        self.last_faces = len(packet.faces)
        self.faces += self.last_faces
        self.full_detections += packet.full_detection
        self.latencies.append(time.perf_counter() - packet.arrived)
        for stage, seconds in packet.stage_seconds.items():
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

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
        """The ``q`` quantile of decode-to-written latency over the last 600 frames, in ms."""
        if not self.latencies:
            return None
        return float(np.quantile(np.asarray(self.latencies), q) * 1000)


class FaceLogObserver:
    """``--faces-json`` for video: one line per tracked face of each written frame."""

    def __init__(self, log: FaceLog):
        self.log = log

    def observe(self, packet: FramePacket, stats: RunStats) -> None:
        frame = packet.frame
        batches = packet.face_batches or [None] * len(packet.faces)  # enhancement off: none
        for tracked, batch in zip(packet.faces, batches, strict=True):
            self.log.write(
                tracked.face,
                frame=frame.index,
                pts=frame.pts,
                track=tracked.track_id,
                detector_run=tracked.detector_run,
                batch=batch,
            )
