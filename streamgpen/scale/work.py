"""One segment through the pipeline, on a worker that holds a warm enhancer (no Ray here).

The segment's source reads its span of the input (a seek to a key frame, no re-encode); the
pipeline is the single run's (``pipeline.build.video_pipeline``), with a fresh tracker fed from
the warm-up's first frame; the sink drops the warm-up's frames and writes the rest, video only,
with the run's encoder settings, under a temporary name renamed into place when the segment is
complete. A failed segment leaves no file under the segment's name.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np

from streamgpen.apps.videos import ABORT_WAIT_S
from streamgpen.config import RunConfig
from streamgpen.enhancer import Enhancer
from streamgpen.errors import UserError
from streamgpen.faces.track import Tracker
from streamgpen.media.sinks import Sink, open_sink
from streamgpen.media.video import Frame, open_source
from streamgpen.pipeline.build import video_pipeline
from streamgpen.pipeline.engine import EngineOptions
from streamgpen.scale.segments import Segment


@dataclass(frozen=True, kw_only=True)
class SegmentJob:
    """A segment to enhance: the ``source`` video, the ``segment`` of it, and the file (``path``,
    the output's container) its frames go to."""

    source: str
    path: str
    segment: Segment


@dataclass(frozen=True, kw_only=True)
class SegmentResult:
    """What a worker did: ``frames`` written (warm-up excluded), ``warmup`` frames processed
    and dropped, the ``seconds`` it took, the segment file's ``size`` in bytes and the
    ``worker``'s process id."""

    frames: int
    warmup: int
    seconds: float
    size: int
    worker: int


def enhance_segment(
    config: RunConfig,
    enhancer: Enhancer,
    job: SegmentJob,
    *,
    on_written: Callable[[int], None] | None = None,
) -> SegmentResult:
    """Enhance ``job``'s segment into its file; ``on_written(n)`` hears of each frame written.
    Raises UserError for an input or output that fails (the segment's file is then absent)."""
    started = time.perf_counter()
    encoder = config.video.sink
    with ExitStack() as stack:
        source = stack.enter_context(open_source(job.source, span=job.segment.span))
        sink = open_sink(
            job.path,
            source,
            codec=encoder.codec,
            crf=encoder.crf,
            preset=encoder.preset,
            pix_fmt=encoder.pix_fmt,
            copy_tracks=False,
        )
        segment = job.segment
        segment_sink = stack.enter_context(
            SegmentSink(
                sink,
                job.path,
                written=(segment.start_pts, segment.end_pts),
                on_written=on_written,
            )
        )
        if enhancer.device.type == "cuda":
            enhancer.warmup(source.height, source.width)  # per size: cheap once it is done
        pipeline = video_pipeline(
            source=source,
            sink=segment_sink,
            enhancer=enhancer,
            tracker=Tracker(enhancer.detector, detect_every=config.video.detect_every),
            options=EngineOptions(
                draw=config.extras.draw, sink_timeout=config.video.source.timeout
            ),
        )
        stats = pipeline.run()
    if not segment_sink.frames_written:
        end = "its end" if segment.end is None else f"frame {segment.end}"
        raise UserError(f"no frame decoded from frame {segment.start} to {end}")
    return SegmentResult(
        frames=segment_sink.frames_written,
        warmup=stats.frames_out - segment_sink.frames_written,
        seconds=time.perf_counter() - started,
        size=os.path.getsize(job.path),
        worker=os.getpid(),
    )


class SegmentSink(Sink):
    """A segment's file: the frames of pts in ``written`` [start, end) (None: unbounded) go to
    ``sink``, the others (the tracker's warm-up, the rest of the last chunk) are dropped; on a
    failure the partial file is removed, since a segment counts only whole (a rerun does it
    again)."""

    def __init__(
        self,
        sink: Sink,
        path: str,
        *,
        written: tuple[int | None, int | None],
        on_written: Callable[[int], None] | None = None,
    ):
        self.sink, self.path = sink, path
        self.start_pts, self.end_pts = written
        self.on_written = on_written
        self.frames_written = 0

    def write(self, frame: Frame, image: np.ndarray) -> None:
        if frame.pts is not None and not self._inside(frame.pts):
            return
        self.sink.write(frame, image)
        self.frames_written += 1
        if self.on_written is not None:
            self.on_written(self.frames_written)

    def _inside(self, pts: int) -> bool:
        return (self.start_pts is None or pts >= self.start_pts) and (
            self.end_pts is None or pts < self.end_pts
        )

    def close(self) -> None:
        self.sink.close()

    def abort(self, timeout: float | None = ABORT_WAIT_S) -> None:
        self.sink.abort(timeout)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
