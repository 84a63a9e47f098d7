"""Enhancing a video file, stream or webcam: open the ends, run the engine, report.

Every resource the run opens (source, sink, face log; the preview and signal handlers are opened
by :mod:`streamgpen.apps.enhance`) is owned by one ``ExitStack``, so every path — success, a
user's error, Ctrl-C, a failed or stalled output — closes everything, and the output keeps the
frames written so far.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path

from rich.console import Console

from streamgpen.config import RunConfig, value_of
from streamgpen.enhancer import Enhancer
from streamgpen.errors import UserError
from streamgpen.faces.track import Tracker
from streamgpen.media.facelog import FaceLog
from streamgpen.media.sinks import Sink, open_sink
from streamgpen.media.urls import is_live_input
from streamgpen.media.video import VideoSource, open_source
from streamgpen.pipeline.build import video_pipeline
from streamgpen.pipeline.engine import EngineOptions
from streamgpen.pipeline.observers import FaceLogObserver, Observer, RunStats
from streamgpen.pipeline.packet import FramePacket
from streamgpen.progress import duration, rate, task_bar

log = logging.getLogger(__name__)
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".webm")
# How long closing may wait for a write stuck in a stalled output before leaving it.
ABORT_WAIT_S = 5.0


def default_output(spec: str) -> str:
    """``clip_enhanced.mp4`` beside a file; live inputs must name their output."""
    if is_live_input(spec):
        raise UserError(
            f"{spec}: a live input needs -o (a video file, rtsp://..., a folder/ or null)"
        )
    path = Path(spec)
    suffix = path.suffix.lower() if path.suffix.lower() in VIDEO_EXTENSIONS else ".mp4"
    return str(path.with_name(f"{path.stem}_enhanced{suffix}"))


def enhance_video(
    config: RunConfig,
    enhancer: Enhancer,
    *,
    console: Console,
    preview=None,
    observers: Sequence[Observer] = (),
    stop: threading.Event | None = None,
    device_lock: AbstractContextManager | None = None,
) -> RunStats:
    """Enhance every frame of ``config.input`` into ``config.output``.

    ``preview`` is a started preview server or a mounted preview (or None): it gets every frame
    and gives the controls. ``observers`` also see every written frame (a service job's
    progress); setting ``stop`` ends the run early with a finished output of the frames so far;
    ``device_lock`` is held while the enhancer runs (the service's runs share one device).
    On Ctrl-C/SIGTERM the output is finalised (a playable file of the frames so far) and
    KeyboardInterrupt is re-raised for the caller to exit with 130.
    """
    device_lock = device_lock if device_lock is not None else contextlib.nullcontext()
    # GPEN's graphs (and compilation) before connecting: seconds to minutes during which a live
    # stream would not be read. The detector, cheap to prepare, waits for the frame size below.
    with device_lock:
        enhancer.restorer.warmup()
    with ExitStack() as stack:
        source = stack.enter_context(open_video_source(config))
        output = config.output or ("null" if preview is not None else None)
        output = output or default_output(config.input)
        sink = open_video_sink(config, source, output)
        stack.enter_context(ClosingSink(sink, output))
        observers = [*_observers(config, stack, preview, enhancer), *observers]
        if enhancer.device.type == "cuda":
            with device_lock:
                enhancer.warmup(source.height, source.width)  # the restorer's part is done
        pipeline = video_pipeline(
            source=source,
            sink=sink,
            enhancer=enhancer,
            tracker=Tracker(enhancer.detector, detect_every=config.video.detect_every),
            observers=observers,
            options=EngineOptions(
                draw=config.extras.draw, sink_timeout=config.video.source.timeout
            ),
            controls=(lambda: preview.controls) if preview is not None else None,
            stop=stop,
            device_lock=device_lock,
        )
        return _run(pipeline, source, output, console, quiet=config.quiet)


def open_video_source(config: RunConfig) -> VideoSource:
    """``config.input`` opened with ``config``'s source options (what a run reads)."""
    options = config.video.source
    return open_source(
        config.input,
        realtime=options.realtime,
        rtsp_transport=value_of(options.rtsp_transport),
        timeout=options.timeout,
        input_size=options.input_size,
        input_fps=options.input_fps,
        reconnect=options.reconnect,
    )


def open_video_sink(config: RunConfig, source: VideoSource, output: str) -> Sink:
    """The sink of ``output`` with ``config``'s encoder options (what a run writes)."""
    encoder = config.video.sink
    return open_sink(
        output,
        source,
        codec=encoder.codec,
        crf=encoder.crf,
        preset=encoder.preset,
        pix_fmt=encoder.pix_fmt,
        timeout=config.video.source.timeout,
    )


class ClosingSink:
    """Closes a sink when the run ends: finished on success, kept as a partial output on any
    failure or interruption (waiting a bounded time for a write stuck in a stalled output).
    ``close()``/``abort()`` may also be called before (one input of several ending on its own):
    the end of the ``with`` block then does nothing more."""

    def __init__(self, sink: Sink, output: str):
        self.sink, self.output = sink, output
        self._done = False

    def __enter__(self) -> ClosingSink:
        return self

    def close(self) -> None:
        """Finish the output (raises a failure to finish it)."""
        self._done = True
        self.sink.close()

    def abort(self) -> None:
        """Keep what was written (never raises)."""
        self._done = True
        self.sink.abort(timeout=ABORT_WAIT_S)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._done:
            return
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _observers(config: RunConfig, stack: ExitStack, preview, enhancer: Enhancer) -> list:
    observers = []
    if config.extras.faces_json is not None:
        face_log = stack.enter_context(FaceLog(config.extras.faces_json))
        observers.append(FaceLogObserver(face_log))
    if preview is not None:
        observers.append(PreviewObserver(preview, config.enhancer.model.label, enhancer))
    return observers


class PreviewObserver:
    """Publishes each written frame, beside its original, to the live preview page."""

    def __init__(self, server, model: str, enhancer: Enhancer):
        self.server, self.model, self.device = server, model, str(enhancer.device)

    def observe(self, packet: FramePacket, stats: RunStats) -> None:
        figures = {
            "fps_in": round(stats.fps_in, 2),
            "fps_out": round(stats.fps, 2),
            "latency_ms_p50": stats.latency_ms(0.5),
            "latency_ms_p95": stats.latency_ms(0.95),
            "faces": len(packet.faces),
            "dropped": stats.dropped,
            "model": self.model,
            "device": self.device,
        }
        self.server.publish(packet.frame.image, packet.result, figures)


class ProgressObserver:
    """Moves the progress bar after each written frame."""

    def __init__(self, progress, task, source: VideoSource):
        self.progress, self.task, self.source = progress, task, source

    def observe(self, packet: FramePacket, stats: RunStats) -> None:
        self.progress.update(
            self.task, completed=stats.frames_out, info=figures(stats, self.source)
        )


def _run(pipeline, source: VideoSource, output: str, console: Console, *, quiet: bool):
    counted = bool(source.frame_count) and not source.is_live
    progress = task_bar(console=console, disable=quiet, counted=counted)
    task = progress.add_task("video", total=source.frame_count if counted else None, info="")
    pipeline.observers.append(ProgressObserver(progress, task, source))
    try:
        with progress:
            stats = pipeline.run()
    except KeyboardInterrupt:
        if not quiet:
            written = pipeline.stats.frames_out
            total = f" of {source.frame_count}" if counted else ""
            console.print(
                f"interrupted: {written}{total} frames written to {output}",
                markup=False,
                soft_wrap=True,
            )
        raise
    if not quiet:
        console.print(summary(stats, source, output), markup=False, soft_wrap=True)
    return stats


def figures(stats: RunStats, source: VideoSource) -> str:
    """The progress line's figures: frames, rate, faces per frame (and drops, latency live)."""
    per_frame = stats.faces / stats.frames_out if stats.frames_out else 0.0
    text = f"{stats.frames_out} frames, {rate(stats.frames_out, stats.elapsed)}, "
    text += f"{per_frame:.1f} faces/frame"
    if source.is_live:
        p95 = stats.latency_ms(0.95)
        text += f", dropped {stats.dropped}" + (f", p95 {p95:.0f} ms" if p95 else "")
    return text


def summary(stats: RunStats, source: VideoSource, output: str) -> str:
    """The closing line: what was done, in how long, where it went, and what went wrong."""
    line = f"{figures(stats, source)} in {duration(stats.elapsed)}; "
    line += f"{stats.full_detections} full detections; written to {output}"
    if source.skipped_packets:
        line += f"; {source.skipped_packets} corrupt packet(s) skipped"
    if source.truncated:
        line += "; the input is truncated: enhanced what decoded"
    if source.reconnects:
        line += f"; reconnected {source.reconnects} time(s)"
    return line
