"""Enhancing a video file, stream or webcam: open the ends, run the pipeline, report."""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from streamgpen.enhancer import Enhancer
from streamgpen.errors import UserError
from streamgpen.io.facelog import FaceLog
from streamgpen.io.sinks import open_sink
from streamgpen.io.video import VideoSource, open_source
from streamgpen.pipeline import VideoOptions, VideoPipeline, VideoStats
from streamgpen.preview import PreviewServer
from streamgpen.track import Tracker

LIVE_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "srt://")


@dataclass
class SourceOptions:
    """How to open the input (``--realtime``, ``--reconnect``, ``--rtsp-transport``...)."""

    realtime: bool = False
    reconnect: int | None = None
    rtsp_transport: str = "tcp"
    timeout: float = 10.0
    input_size: tuple[int, int] | None = None
    input_fps: float | None = None


@dataclass
class SinkOptions:
    """How to encode the output (``--codec``, ``--crf``, ``--preset``, ``--pix-fmt``)."""

    codec: str = "libx264"
    crf: int = 18
    preset: str = "medium"
    pix_fmt: str | None = None


def is_stream_spec(spec: str) -> bool:
    return spec.startswith(LIVE_SCHEMES) or spec.startswith("webcam:")


def default_output(spec: str) -> str:
    """``clip_enhanced.mp4`` beside a file; live inputs must name their output."""
    if is_stream_spec(spec):
        raise UserError(
            f"{spec}: a live input needs -o (a video file, rtsp://..., a folder/ or null)"
        )
    path = Path(spec)
    suffix = path.suffix.lower() if path.suffix.lower() in (".mp4", ".mkv", ".mov") else ".mp4"
    return str(path.with_name(f"{path.stem}_enhanced{suffix}"))


def enhance_video(
    spec: str,
    output: str | None,
    enhancer: Enhancer,
    *,
    detect_every: int = 5,
    source_options: SourceOptions | None = None,
    sink_options: SinkOptions | None = None,
    video_options: VideoOptions | None = None,
    faces_json: Path | None = None,
    quiet: bool = False,
    preview: PreviewServer | None = None,
) -> VideoStats:
    """Enhance every frame of ``spec`` into ``output``; Ctrl-C/SIGTERM keep what was done.

    On interruption the output is finalised (a playable file of the frames so far) and
    KeyboardInterrupt is re-raised for the caller to exit with 130.
    """
    so, ko = source_options or SourceOptions(), sink_options or SinkOptions()
    options = video_options or VideoOptions()
    # GPEN's graphs (and compilation) before connecting: seconds to minutes during which a live
    # stream would not be read. The detector, cheap to prepare, waits for the frame size below.
    enhancer.restorer.warmup()
    source = open_source(
        spec,
        realtime=so.realtime,
        rtsp_transport=so.rtsp_transport,
        timeout=so.timeout,
        input_size=so.input_size,
        input_fps=so.input_fps,
        reconnect=so.reconnect,
    )
    console = Console(stderr=True)
    if output is None and preview is not None:
        output = "null"  # watching is the point; nothing is written unless asked
    try:
        sink = open_sink(
            output or default_output(spec),
            source,
            codec=ko.codec,
            crf=ko.crf,
            preset=ko.preset,
            pix_fmt=ko.pix_fmt,
        )
    except BaseException:
        source.close()
        raise
    if preview is not None:
        options.preview = preview.start()
        console.print(f"preview: {preview.url}", markup=False, soft_wrap=True)
    options.face_log = FaceLog(faces_json) if faces_json else None
    if enhancer.device.type == "cuda":
        enhancer.warmup(source.height, source.width)  # the restorer's part is done already
    tracker = Tracker(enhancer.detector, detect_every=detect_every)
    progress = _progress(console, source, disable=quiet)
    pipeline = VideoPipeline(source, sink, enhancer, tracker, options)
    task = progress.add_task("video", total=source.frame_count, info="")
    pipeline.on_frame = lambda stats: progress.update(
        task, completed=stats.frames_out, info=_info(stats, source)
    )
    try:
        with _sigterm_as_interrupt(), progress:
            stats = pipeline.run()
    finally:
        if preview is not None:
            preview.stop()
        sink.close()
        source.close()
        if options.face_log:
            options.face_log.close()
        if not quiet:
            console.print(_summary(pipeline.stats, source), markup=False, soft_wrap=True)
    return stats


def _progress(console: Console, source: VideoSource, disable: bool) -> Progress:
    columns = [TextColumn("[bold]{task.description}")]
    if source.frame_count and not source.is_live:
        columns += [BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    columns.append(TextColumn("{task.fields[info]}"))
    return Progress(*columns, console=console, disable=disable)


def _info(stats: VideoStats, source: VideoSource) -> str:
    per_frame = stats.faces / stats.frames_out if stats.frames_out else 0.0
    text = f"{stats.frames_out} frames, {stats.fps:.1f} fps, {per_frame:.1f} faces/frame"
    if source.is_live:
        p95 = stats.latency_ms(0.95)
        text += f", dropped {stats.dropped}" + (f", p95 {p95:.0f} ms" if p95 else "")
    return text


def _summary(stats: VideoStats, source: VideoSource) -> str:
    line = f"{_info(stats, source)}; {stats.full_detections} full detections"
    if source.skipped_packets:
        line += f"; {source.skipped_packets} corrupt packet(s) skipped"
    if source.truncated:
        line += "; the input is truncated: enhanced what decoded"
    if source.reconnects:
        line += f"; reconnected {source.reconnects} time(s)"
    return line


class _sigterm_as_interrupt:  # lower case: a context manager used like a function
    """SIGTERM stops a run like Ctrl-C: the output so far is finalised, exit code 130."""

    def __enter__(self):
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
