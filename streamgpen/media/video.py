"""Video sources: files, network streams and webcams, decoded to upright RGB frames.

Everything goes through PyAV; nothing here shells out to ffmpeg.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property

import av
import av.error
import numpy as np

from streamgpen.errors import UserError
from streamgpen.files import require_regular_file
from streamgpen.media.urls import LIVE_INPUT_SCHEMES, WEBCAM_PREFIX, is_webcam, url_scheme
from streamgpen.runtime.color import YUV420_FORMATS

log = logging.getLogger(__name__)

# Reconnection backoff for live sources: first wait, then doubling up to the cap.
RECONNECT_DELAY_S = 0.5
RECONNECT_MAX_DELAY_S = 8.0

# How long to wait before asking a device again when it has no frame ready yet.
_EAGAIN_SLEEP_S = 0.005

# Errors libavformat/libavcodec raise for I/O trouble, timeouts and dropped connections.
_MEDIA_ERRORS = (av.error.FFmpegError, OSError)


@dataclass(frozen=True)
class Frame:
    """One decoded video frame: the decoder's picture, its timing and how to show it upright.

    ``pts`` and ``duration`` are in ``time_base`` units; ``pts`` is None when the input
    carries no timestamp. ``rotation`` (degrees, counter-clockwise) turns ``picture`` upright.
    ``image`` is the upright HxWx3 uint8 RGB array, converted on first use; ``yuv420()``
    gives the raw planes instead, for converting on the device.
    """

    index: int
    pts: int | None
    time_base: Fraction
    picture: av.VideoFrame = field(repr=False)
    duration: int | None = None
    rotation: int = 0

    @property
    def time(self) -> float | None:
        """Presentation time in seconds, or None without a timestamp."""
        return None if self.pts is None else float(self.pts * self.time_base)

    @property
    def turns(self) -> int:
        """Quarter turns, counter-clockwise, that make the picture upright."""
        return round(self.rotation / 90) % 4

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) upright."""
        h, w = self.picture.height, self.picture.width
        return (w, h) if self.turns % 2 else (h, w)

    @cached_property
    def image(self) -> np.ndarray:
        """HxWx3 uint8 RGB, upright and C-contiguous (converted by libswscale)."""
        raw = self.picture
        image = raw.to_ndarray(format="rgb24", src_color_range=raw.color_range or None)
        if self.turns:
            # np.rot90 turns counter-clockwise, the same sense as the display matrix.
            image = np.ascontiguousarray(np.rot90(image, k=self.turns))
        return image

    def yuv420(self) -> np.ndarray | None:
        """The picture's planes as [H * 3 / 2, W] uint8 (not rotated) when it is 8-bit YUV
        4:2:0 of even size; None otherwise."""
        raw = self.picture
        if raw.format.name not in YUV420_FORMATS or raw.width % 2 or raw.height % 2:
            return None
        return raw.to_ndarray()


@dataclass(frozen=True, slots=True)
class Track:
    """An audio or subtitle stream of a file source that a sink may copy."""

    index: int
    kind: str
    codec: str


@dataclass(frozen=True, slots=True)
class ColorInfo:
    """Colour metadata of the source video, as libav enum values (0 = unspecified)."""

    range: int = 0
    space: int = 2
    primaries: int = 2
    trc: int = 2


@dataclass(frozen=True, kw_only=True)
class Span:
    """A stretch of a file read on its own (one segment of an archive job): the demuxer seeks to
    the key frame at ``seek_pts`` (None: reads from the start), frames before ``start_pts`` (None:
    none) are decoded and dropped, and the source ends before ``end_pts`` (None: at the end of
    the file). ``first_index`` is the index, in the whole video, of the first frame given;
    ``frames`` how many the span holds. Times are in the video stream's time base."""

    seek_pts: int | None
    start_pts: int | None
    end_pts: int | None
    first_index: int
    frames: int


@dataclass(frozen=True, slots=True)
class _Target:
    """Everything needed to (re)open an input."""

    url: str
    kind: str  # "file" | "network" | "device"
    format: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    timeout: tuple[float, float] | None = None


def open_source(
    spec: str,
    *,
    realtime: bool = False,
    rtsp_transport: str = "tcp",
    timeout: float = 10.0,
    input_size: tuple[int, int] | None = None,
    input_fps: float | Fraction | None = None,
    reconnect: int | None = None,
    span: Span | None = None,
) -> VideoSource:
    """Open a video input and return an iterator of upright RGB :class:`Frame`.

    ``spec`` is a file path, a network URL (rtsp, rtmp, http(s), udp, srt...) or
    ``webcam:N`` (``webcam:<name>`` for a dshow device name on Windows).
    ``realtime`` paces a file at its frame rate and treats it as live.
    ``timeout`` (seconds) bounds opening and each read of network inputs.
    ``input_size`` (width, height) and ``input_fps`` are requested from webcams.
    ``reconnect`` applies to network streams and webcams: None never reconnects, N
    gives up after N consecutive failed attempts, -1 retries forever.
    ``span`` (files only) reads one stretch of the file: see :class:`Span`.
    Raises :class:`UserError` for a missing or non-media file, a FIFO or device given as a
    file, a camera that does not exist, an input without video, or an input that cannot be
    reached.
    """
    target = _parse_spec(spec, rtsp_transport, timeout, input_size, input_fps)
    if target.kind == "file":
        _check_input_file(target.url)
    live = target.kind != "file"
    if span is not None and live:
        raise UserError(f"{spec}: only a file can be read from a position")
    return VideoSource(
        spec,
        target,
        realtime=realtime and not live,
        reconnect=reconnect if live else None,
        span=span,
    )


def _check_input_file(path: str) -> None:
    if not os.path.exists(path):
        raise UserError(f"input file not found: {path}")
    if os.path.isdir(path):
        raise UserError(f"input is a directory, not a video file: {path}")
    # Opening a FIFO blocks until a writer comes, maybe forever: refuse it before libav tries.
    require_regular_file(path)


def _parse_spec(
    spec: str,
    rtsp_transport: str,
    timeout: float,
    input_size: tuple[int, int] | None,
    input_fps: float | Fraction | None,
) -> _Target:
    if is_webcam(spec):
        return _webcam_target(spec.removeprefix(WEBCAM_PREFIX), input_size, input_fps)
    scheme = url_scheme(spec)
    if scheme in LIVE_INPUT_SCHEMES:
        options = {"rtsp_transport": rtsp_transport} if scheme.startswith("rtsp") else {}
        return _Target(spec, "network", options=options, timeout=(timeout, timeout))
    if scheme:
        raise UserError(f"unsupported input URL scheme {scheme!r} in {spec}")
    return _Target(spec, "file")


def _webcam_target(
    device: str, size: tuple[int, int] | None, fps: float | Fraction | None
) -> _Target:
    options = {}
    if size is not None:
        options["video_size"] = f"{size[0]}x{size[1]}"
    if fps is not None:
        options["framerate"] = str(fps)
    if sys.platform.startswith("linux"):
        url = f"/dev/video{device}" if device.isdigit() else device
        if not os.path.exists(url):
            # Retrying cannot make a camera appear that the system does not have.
            raise UserError(f"no such camera: {url}")
        return _Target(url, "device", "v4l2", options)
    if sys.platform == "darwin":
        # avfoundation refuses to open without an explicit frame rate.
        options.setdefault("framerate", "30")
        return _Target(device, "device", "avfoundation", options)
    if sys.platform == "win32":
        if device.isdigit():
            raise UserError("on Windows give the camera's name: webcam:<dshow device name>")
        return _Target(f"video={device}", "device", "dshow", options)
    raise UserError(f"webcams are not supported on {sys.platform}")


class VideoSource:
    """An iterator of :class:`Frame` over one video input.

    Opening decodes the first frame, so ``width``/``height`` (upright), ``rotation``,
    ``pix_fmt`` and ``color`` are known before iteration starts. Counters
    ``frames_read``, ``skipped_packets``, ``reconnects``, and the flags ``truncated``
    and ``exhausted`` report how decoding went.
    """

    def __init__(
        self,
        spec: str,
        target: _Target,
        *,
        realtime: bool,
        reconnect: int | None,
        span: Span | None = None,
    ) -> None:
        self.spec = spec
        self.span = span
        self._target = target
        self._realtime = realtime
        self._reconnect = reconnect
        self.is_live = realtime or target.kind != "file"
        self.path = target.url if target.kind == "file" else None

        self.frames_read = 0
        self.skipped_packets = 0
        self.reconnects = 0
        self.truncated = False
        self.exhausted = False

        self._container = self._connect(initial=True)
        if target.kind == "network" and not realtime and self._container.duration:
            # A network URL of a finite video (an HTTP file, an RTSP recording: the container
            # knows its duration) is read like a file: every frame, and no reconnect, which would
            # start it over. Measured before: a 22-frame MP4 over HTTP gave 3 frames (dropped as
            # live), and with reconnects it replayed 29 times.
            self.is_live, self._reconnect = False, None
        stream = self._container.streams.video[0]
        self.time_base: Fraction = stream.time_base or Fraction(1, 90000)
        self.fps: Fraction | None = stream.average_rate or stream.guessed_rate or None
        self.codec = stream.codec_context.name
        self.frame_count = None if self.is_live else _estimate_frame_count(stream, self.fps)
        self.tracks = _copyable_tracks(self._container) if self.path else ()
        if span is not None:
            self.frame_count = span.frames
            if span.seek_pts is not None:
                self._container.seek(span.seek_pts, stream=stream, backward=True)

        # Decoding the first frame tells the upright size, rotation and colour metadata.
        self._decoded = 0
        self._clock: tuple[float, int] | None = None
        self._frames = self._generate()
        self._pending = next(self._frames, None)
        if self._pending is None:
            self.close()
            raise UserError(f"no decodable video frame in {self.spec}")
        self.height, self.width = self._pending.shape

    def __repr__(self) -> str:
        return (
            f"VideoSource({self.spec!r}, {self.width}x{self.height}, fps={self.fps}, "
            f"codec={self.codec}, pix_fmt={self.pix_fmt}, rotation={self.rotation}, "
            f"live={self.is_live})"
        )

    def __iter__(self) -> Iterator[Frame]:
        return self

    def __next__(self) -> Frame:
        if self._pending is not None:
            frame, self._pending = self._pending, None
        else:
            frame = next(self._frames)
        if self._realtime:
            self._pace(frame)
        self.frames_read += 1
        return frame

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop decoding and release the input."""
        self._frames.close()
        self._container.close()

    # -- opening --------------------------------------------------------------------------

    def _open_once(self) -> av.container.InputContainer:
        t = self._target
        container = av.open(t.url, format=t.format, options=t.options, timeout=t.timeout)
        if not container.streams.video:
            container.close()
            raise UserError(f"no video stream in {self.spec}")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return container

    def _connect(self, *, initial: bool) -> av.container.InputContainer:
        """Open the input, retrying live inputs with exponential backoff."""
        failures = 0
        delay = RECONNECT_DELAY_S
        while True:
            try:
                return self._open_once()
            except UserError:
                raise
            except _MEDIA_ERRORS as exc:
                if self._target.kind == "file":
                    raise UserError(f"not a readable media file: {self.spec} ({exc})") from exc
                if not self._may_retry(failures):
                    what = "cannot open" if initial else "lost and could not reconnect to"
                    tries = f" after {failures} retries" if failures else ""
                    raise UserError(f"{what} {self.spec}{tries}: {exc}") from exc
                failures += 1
                log.warning(
                    "cannot open %s (%s); retry %d in %.1f s", self.spec, exc, failures, delay
                )
                time.sleep(delay)
                delay = min(2 * delay, RECONNECT_MAX_DELAY_S)

    def _may_retry(self, failures: int) -> bool:
        if self._reconnect is None:
            return False
        return self._reconnect < 0 or failures < self._reconnect

    # -- decoding -------------------------------------------------------------------------

    def _generate(self) -> Iterator[Frame]:
        """Yield frames across reconnections, with pts offset to stay monotonic."""
        offset = 0
        next_pts: int | None = None  # where the first frame after a reconnect should land
        while True:
            rebase = next_pts is not None
            for raw in self._raw_frames(self._container):
                pts = _rescale(raw.pts, raw.time_base, self.time_base)
                duration = _rescale(raw.duration, raw.time_base, self.time_base) or None
                if self.span is not None and self._outside_span(pts):
                    if self.exhausted:
                        return
                    continue
                if pts is None:
                    # A live stream's first frame after a (re)connect can lack a timestamp:
                    # put it where the next frame is due, so pts stay monotonic.
                    pts = next_pts
                else:
                    if rebase:
                        offset, rebase = next_pts - pts, False
                    pts += offset
                if pts is not None:
                    next_pts = pts + (duration or self.frame_duration)
                yield self._to_frame(raw, pts, duration)
            self._container.close()
            if self._target.kind == "file" or self._reconnect is None:
                self.exhausted = True
                return
            self.reconnects += 1
            log.warning("lost %s; reconnecting (drop %d)", self.spec, self.reconnects)
            self._container = self._connect(initial=False)

    def _outside_span(self, pts: int | None) -> bool:
        """Whether a decoded frame falls before the span (dropped) or after it (``exhausted``
        is set: the span is read)."""
        span = self.span
        start = span.start_pts
        if start is not None and (pts is None or (self._decoded == 0 and pts > start)):
            # A frame past the start (or without a time) first: the seek missed the key frame.
            raise UserError(f"{self.spec}: cannot seek to pts {start} (got {pts})")
        if span.end_pts is not None and pts is not None and pts >= span.end_pts:
            self.exhausted = True
            return True
        return start is not None and pts < start

    def _pace(self, frame: Frame) -> None:
        """Hold a frame back until its presentation time, counted from the first pull."""
        if frame.pts is None:
            return
        if self._clock is None:
            self._clock = (time.monotonic(), frame.pts)
            return
        start_wall, start_pts = self._clock
        _sleep_until(start_wall + float((frame.pts - start_pts) * self.time_base))

    def _raw_frames(self, container: av.container.InputContainer) -> Iterator[av.VideoFrame]:
        """Decode one connection's video; skip corrupt packets, stop on read errors."""
        stream = container.streams.video[0]
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.BlockingIOError:
                # Devices answer EAGAIN when no frame is ready; the demux generator is spent.
                time.sleep(_EAGAIN_SLEEP_S)
                packets = container.demux(stream)
                continue
            except _MEDIA_ERRORS as exc:
                self._note_read_error(exc)
                yield from self._drain(stream)
                return
            try:
                yield from packet.decode()
            except av.error.InvalidDataError as exc:
                self.skipped_packets += 1
                log.debug("skipped corrupt packet at pts %s: %s", packet.pts, exc)
        self._check_complete()

    def _drain(self, stream: av.video.stream.VideoStream) -> Iterator[av.VideoFrame]:
        """Flush the decoder after a read error so buffered frames are not lost."""
        try:
            yield from stream.codec_context.decode(None)
        except av.error.FFmpegError:
            self.skipped_packets += 1

    def _note_read_error(self, exc: Exception) -> None:
        if self._target.kind == "file":
            self.truncated = True
            log.warning(
                "%s: read error after %d frames, stopping (%s)", self.spec, self.frames_read, exc
            )
        else:
            log.warning("%s: connection dropped (%s)", self.spec, exc)

    def _check_complete(self) -> None:
        if self._target.kind != "file" or self.frame_count is None:
            return
        # Corrupt packets that were skipped are missing frames too, but not a truncation.
        if self._decoded + self.skipped_packets + 1 < self.frame_count:
            self.truncated = True
            log.warning(
                "%s ended early: about %d of %d frames (file truncated?)",
                self.spec,
                self._decoded,
                self.frame_count,
            )

    @property
    def frame_duration(self) -> int:
        """One frame's nominal duration in ``time_base`` units (1 when the rate is unknown)."""
        if self.fps:
            return max(1, round(1 / (self.fps * self.time_base)))
        return 1

    def _to_frame(self, raw: av.VideoFrame, pts: int | None, duration: int | None) -> Frame:
        if self._decoded == 0:
            self._describe(raw)
        first = self.span.first_index if self.span is not None else 0
        frame = Frame(first + self._decoded, pts, self.time_base, raw, duration, raw.rotation)
        self._decoded += 1
        return frame

    def _describe(self, raw: av.VideoFrame) -> None:
        self.rotation: int = raw.rotation
        self.pix_fmt: str = raw.format.name
        self.color = ColorInfo(
            int(raw.color_range), int(raw.colorspace), int(raw.color_primaries), int(raw.color_trc)
        )


def _copyable_tracks(container: av.container.InputContainer) -> tuple[Track, ...]:
    return tuple(
        Track(s.index, s.type, s.codec_context.codec.canonical_name)
        for s in container.streams
        if s.type in ("audio", "subtitle") and s.codec_context is not None
    )


def _estimate_frame_count(stream: av.video.stream.VideoStream, fps: Fraction | None) -> int | None:
    if stream.frames:
        return stream.frames
    if stream.duration and fps:
        return round(stream.duration * stream.time_base * fps)
    container_duration = stream.container.duration
    if container_duration and fps:
        return round(Fraction(container_duration, av.time_base) * fps)
    return None


def _rescale(value: int | None, src: Fraction | None, dst: Fraction) -> int | None:
    if value is None or src is None or src == dst:
        return value
    return round(value * src / dst)


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)
