"""Sinks for processed frames: video files, RTSP publishing, PNG directories, or nothing.

Video files are written under a temporary name beside the target
(:func:`streamgpen.files.temp_path`) and renamed into place on close, so a reader never sees a
half-written file under the final name.
MP4 and MOV are written fragmented (a fragment a second), so the temporary file of a run killed with
SIGKILL plays up to its last complete fragment; the next run writing the same output removes it.
Audio and subtitle streams of a file source are copied packet for packet by a second demuxer that
reads the source file alongside the pipeline.

Every failure to write, flush or close an output (a full disk, a server that stopped answering) is
one :class:`UserError` line naming the output and the reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import av.error
import cv2
import numpy as np
from av.video.reformatter import ColorRange, Colorspace

from streamgpen.errors import UserError
from streamgpen.files import describe_os_error, place, remove_stale, same_file, temp_path
from streamgpen.media.urls import PUBLISH_SCHEMES, is_publish_url, url_scheme
from streamgpen.media.video import Frame, VideoSource

log = logging.getLogger(__name__)

CONTAINER_FORMATS = {".mp4": "mp4", ".mkv": "matroska", ".mov": "mov", ".webm": "webm"}

# Audio codec to transcode into when a container cannot hold the source's audio as is.
AUDIO_FALLBACK = {"mp4": "aac", "mov": "aac", "webm": "libopus", "matroska": "libopus"}
_OPUS_RATES = (48000, 24000, 16000, 12000, 8000)

# MP4/MOV fragment length: what a SIGKILLed run loses at most, against a few hundred bytes of
# index per fragment.
FRAGMENT_US = 1_000_000

_AVCOL_SPC_RGB = 0
_AVCOL_SPC_UNSPECIFIED = 2

# What libavformat/libavcodec raise for I/O trouble: FFmpegError (errno ones are OSErrors too).
_MEDIA_ERRORS = (av.error.FFmpegError, OSError)


class Sink:
    """Where processed frames go. Use as a context manager, or call close()/abort()."""

    frames_written = 0

    def write(self, frame: Frame, image: np.ndarray) -> None:
        """Write ``image`` (HxWx3 uint8 RGB) at the timing of the source ``frame``."""
        raise NotImplementedError

    def close(self) -> None:
        """Finish the output."""

    def abort(self, timeout: float | None = None) -> None:
        """Finish after a failure: keep what was written, leave nothing if nothing was.

        ``timeout`` bounds how long to wait for a write in progress on another thread."""
        self.close()

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class NullSink(Sink):
    """Discards frames (benchmarks, dry runs)."""

    def write(self, frame: Frame, image: np.ndarray) -> None:
        self.frames_written += 1


class ImageDirSink(Sink):
    """Writes each frame as ``<index>.png`` (6 digits, source decode order)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create output directory {directory}: {exc}") from exc

    def write(self, frame: Frame, image: np.ndarray) -> None:
        path = os.path.join(self.directory, f"{frame.index:06d}.png")
        if not cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
            raise UserError(f"cannot write {path}")
        self.frames_written += 1


def open_sink(
    spec: str,
    source: VideoSource,
    *,
    codec: str = "libx264",
    crf: int = 18,
    preset: str = "medium",
    pix_fmt: str | None = None,
    timeout: float = 10.0,
    copy_tracks: bool = True,
) -> Sink:
    """Open the output named by ``spec`` for frames coming from ``source``.

    ``spec`` is a video file (``.mp4 .mkv .mov .webm``), an ``rtsp://`` or ``rtsps://`` URL to
    publish to, a directory (an existing one, or a path ending in ``/``) for PNG frames, or
    ``null``. ``codec``/``crf``/``preset``/``pix_fmt`` configure the video encoder;
    ``pix_fmt`` defaults to the source's when the encoder supports it, else yuv420p.
    ``timeout`` (seconds) bounds each network operation of a published stream: a server that
    stops answering is a :class:`UserError`, not a hang. ``copy_tracks`` False leaves a video
    file without the source's audio and subtitles (an archive job's segments: they are copied
    once, when the segments are joined).
    Raises :class:`UserError` for an unknown output type, an output that is the input, a
    directory that does not exist or refuses new files, a missing encoder or an encoder the
    container cannot hold.
    """
    if spec == "null":
        return NullSink()
    if is_publish_url(spec):
        encoder = _VideoEncoder(codec, crf, preset, pix_fmt, source, live=True)
        return _publish(spec, source, encoder, timeout)
    if url_scheme(spec):
        schemes = ", ".join(f"{s}://" for s in PUBLISH_SCHEMES)
        raise UserError(f"cannot publish to {spec}: outputs can be {schemes} streams")
    if spec.endswith(("/", os.sep)) or os.path.isdir(spec):
        return ImageDirSink(spec)
    ext = os.path.splitext(spec)[1].lower()
    if ext not in CONTAINER_FORMATS:
        raise UserError(
            f"cannot tell what kind of output {spec!r} is: use a {'/'.join(CONTAINER_FORMATS)} "
            "file, a directory/, an rtsp:// URL or null"
        )
    # A symlink or a hard link to the input is the input too: writing it would destroy it.
    if source.path and same_file(spec, source.path):
        raise UserError(f"output {spec} would overwrite the input")
    directory = os.path.dirname(os.path.abspath(spec))
    if not os.path.isdir(directory):
        raise UserError(f"output directory does not exist: {directory}")
    encoder = _VideoEncoder(codec, crf, preset, pix_fmt, source, live=False)
    return AtomicFileSink(spec, CONTAINER_FORMATS[ext], encoder, source, copy_tracks=copy_tracks)


def _publish(url: str, source: VideoSource, encoder: _VideoEncoder, timeout: float) -> Sink:
    # Interleaved TCP: over UDP (the muxer's default) a burst of large frames, as when a file is
    # published faster than real time, loses packets and the server records nothing. The rtsp
    # muxer's "timeout" (microseconds) becomes the TCP connection's connect and I/O timeout, so
    # it bounds the handshake at the first frame and every write after it.
    options = {"rtsp_transport": "tcp", "timeout": str(round(timeout * 1_000_000))}
    return EncodedSink(
        url, "rtsp", encoder, source, copy_tracks=False, container_options=options, timeout=timeout
    )


class _VideoEncoder:
    """Encoder settings, turned into an output stream once the first image's size is known."""

    def __init__(
        self,
        codec: str,
        crf: int,
        preset: str,
        pix_fmt: str | None,
        source: VideoSource,
        *,
        live: bool,
    ) -> None:
        try:
            self.codec = av.codec.Codec(codec, "w")
        except (ValueError, av.error.FFmpegError) as exc:
            raise UserError(f"video encoder {codec!r} is not available in this PyAV build") from exc
        self.options = _encoder_options(codec, crf, preset, live=live)
        self.pix_fmt = _choose_pix_fmt(self.codec, pix_fmt, source.pix_fmt)
        self.source = source

    def add_stream(
        self, container: av.container.OutputContainer, width: int, height: int
    ) -> av.video.stream.VideoStream:
        """Add the video stream, in the source's time base so every pts carries over."""
        src = self.source
        stream = container.add_stream(self.codec.name, rate=src.fps, options=self.options)
        stream.width, stream.height = width, height
        stream.pix_fmt = self.pix_fmt
        stream.time_base = src.time_base
        ctx = stream.codec_context
        ctx.time_base = src.time_base
        ctx.thread_count = 0
        ctx.color_range = src.color.range
        ctx.color_primaries = src.color.primaries
        ctx.color_trc = src.color.trc
        ctx.colorspace = self.colorspace
        return stream

    @property
    def colorspace(self) -> int:
        if av.VideoFormat(self.pix_fmt).is_rgb:
            return _AVCOL_SPC_RGB
        src = self.source.color.space
        return src if src != _AVCOL_SPC_RGB else _AVCOL_SPC_UNSPECIFIED

    def convert(self, image: np.ndarray, width: int, height: int) -> av.VideoFrame:
        """RGB array to a frame in the encoder's pixel format and the source's colour space."""
        pad_h, pad_w = height - image.shape[0], width - image.shape[1]
        if pad_h or pad_w:
            # Subsampled chroma needs even sizes; repeat the edge rather than lose a pixel.
            image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        rgb = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        if av.VideoFormat(self.pix_fmt).is_rgb:
            return rgb.reformat(format=self.pix_fmt)
        color = self.source.color
        return rgb.reformat(
            format=self.pix_fmt,
            dst_colorspace=_swscale_colorspace(self.colorspace),
            dst_color_range=ColorRange.JPEG if color.range == 2 else ColorRange.MPEG,
            dst_color_trc=color.trc,
            dst_color_primaries=color.primaries,
        )

    def coded_size(self, width: int, height: int) -> tuple[int, int]:
        """The size to encode ``width``x``height`` at: rounded up to even where chroma is halved."""
        fmt = av.VideoFormat(self.pix_fmt)
        if fmt.chroma_width(2) == 1:
            width += width % 2
        if fmt.chroma_height(2) == 1:
            height += height % 2
        return width, height


class EncodedSink(Sink):
    """Encodes frames into a container (a file or a network URL).

    Failures: any error from writing, flushing or closing the output becomes one
    :class:`UserError` line naming the output and the reason. The first one is raised (by
    :meth:`write`, or by :meth:`close` when it happens there); finishing after it releases the
    output without raising a second one that would hide it. :meth:`abort` never raises: it runs
    while another exception is on its way, and logs a failure to finish as a warning instead.

    Threads: the encoder thread calls :meth:`write`; another thread (the engine's stall
    watchdog) may call :meth:`abort`. A lock held by :meth:`write` and by finishing keeps them
    apart, since a libav context must not be used by two threads at once.
    ``abort(timeout=SECONDS)`` waits at most that long for the lock: when a write is stuck inside
    libav (a network peer that stopped reading, a hung disk), it logs a warning and returns
    without finishing, leaving the output as it is (a file's temporary name stays behind; the
    next run writing that file removes it once this process is gone).
    """

    def __init__(
        self,
        url: str,
        fmt: str,
        encoder: _VideoEncoder,
        source: VideoSource,
        *,
        copy_tracks: bool,
        container_options: dict[str, str] | None = None,
        timeout: float | None = None,
        name: str | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self.url = url
        self.name = name or url  # what messages call the output
        self.format = fmt
        self.frames_written = 0
        self._encoder = encoder
        self._source = source
        self._timeout = timeout
        self._error: UserError | None = None  # the first failure, raised once
        try:
            # PyAV 18 uses ``timeout`` for inputs only; the muxer options are what bound an output.
            self._container = av.open(
                url, "w", format=fmt, options=container_options or {}, timeout=timeout
            )
        except _MEDIA_ERRORS as exc:
            raise UserError(f"cannot open output {self.name}: {_reason(exc)}") from None
        # The rtsp muxer names only its defaults (AAC, MPEG-4) as supported although RTP carries
        # H.264/HEVC and more; a codec it cannot send fails when the stream starts instead.
        if fmt != "rtsp" and encoder.codec.canonical_name not in self._container.supported_codecs:
            self._container.close()
            raise UserError(
                f"{encoder.codec.name} video cannot be stored in {fmt} output {self.name}"
            )
        self._copy_tracks = copy_tracks
        self._copier: TrackCopier | None = None
        self._video: av.video.stream.VideoStream | None = None
        self._size: tuple[int, int] = (0, 0)
        self._resized = False
        self._last_pts: int | None = None
        self._end_pts = 0
        self._step = source.frame_duration
        self._finished = False

    def write(self, frame: Frame, image: np.ndarray) -> None:
        with self._lock, self._failures():
            if self._error is not None:
                raise self._error
            if self._finished:  # aborted by another thread (the stall watchdog)
                raise UserError(f"cannot write to {self.name}: it was closed")
            if self._video is None:
                self._start(image)
            elif image.shape[:2] != self._size[::-1]:
                image = self._fit(image)
            self._write_locked(frame, image)
            self.frames_written += 1

    def close(self) -> None:
        """Finish the output; raises a failure to finish it, unless a write raised one already."""
        with self._lock:
            error = self._complete(aborting=False)
        if error is not None:
            raise error

    def abort(self, timeout: float | None = None) -> None:
        """Finish after a failure or an interruption, keeping what was written; never raises.

        With ``timeout`` (seconds), give up when a write on another thread holds the sink that
        long: log a warning and leave the output unfinished."""
        if not self._lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            log.warning(
                "output %s: a write is stuck after %d frames; left unfinished",
                self.name,
                self.frames_written,
            )
            return
        try:
            error = self._complete(aborting=True)
        finally:
            self._lock.release()
        if error is not None:
            log.warning("%s", error)

    def _write_locked(self, frame: Frame, image: np.ndarray) -> None:
        pts = self._monotonic_pts(frame.pts)
        width, height = self._video.width, self._video.height
        video_frame = self._encoder.convert(image, width, height)
        video_frame.pts = pts
        video_frame.time_base = self._source.time_base
        if frame.duration:
            video_frame.duration = frame.duration
        self._end_pts = pts + (frame.duration or self._step)
        if self._copier is not None:
            self._copier.mux_until(pts * self._source.time_base)
        self._mux(self._video.encode(video_frame))

    def _start(self, image: np.ndarray) -> None:
        height, width = image.shape[:2]
        self._size = (width, height)
        coded_w, coded_h = self._encoder.coded_size(width, height)
        if (coded_w, coded_h) != (width, height):
            log.warning(
                "%s needs even sizes: padding %dx%d to %dx%d",
                self._encoder.pix_fmt,
                width,
                height,
                coded_w,
                coded_h,
            )
        self._video = self._encoder.add_stream(self._container, coded_w, coded_h)
        try:
            self._video.codec_context.open()
        except _MEDIA_ERRORS as exc:
            raise UserError(f"cannot start encoder {self._encoder.codec.name}: {exc}") from exc
        # Added after the video so that the video is the output's first stream.
        if self._copy_tracks:
            self._copier = TrackCopier(self._container, self._source)

    def _fit(self, image: np.ndarray) -> np.ndarray:
        """Scale an image whose size changed mid-stream (a camera that came back in another
        resolution) to the output's: a stream keeps one size."""
        width, height = self._size
        if not self._resized:
            self._resized = True
            log.warning(
                "%s: input size changed from %dx%d to %dx%d mid-stream; scaling it to %dx%d",
                self.name, width, height, image.shape[1], image.shape[0], width, height,
            )  # fmt: skip
        shrinking = image.shape[1] * image.shape[0] > width * height
        # INTER_AREA averages the pixels a smaller image drops; it would blur an enlargement.
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        return cv2.resize(image, (width, height), interpolation=interpolation)

    def _monotonic_pts(self, pts: int | None) -> int:
        """Keep the source pts; invent one only where it is missing or would go backwards."""
        if self._last_pts is not None and (pts is None or pts <= self._last_pts):
            pts = self._last_pts + self._step
        elif pts is None:
            pts = 0
        self._last_pts = pts
        return pts

    def _mux(self, packets: list[av.Packet]) -> None:
        # The first packet writes the header: an unreachable RTSP server shows up here.
        for packet in packets:
            self._container.mux(packet)

    @contextlib.contextmanager
    def _failures(self) -> Iterator[None]:
        """Turn a media error into the sink's one-line failure; remember the first failure."""
        started = time.monotonic()
        try:
            yield
        except UserError as exc:
            self._error = self._error or exc
            raise
        except _MEDIA_ERRORS as exc:
            reason = _reason(exc)
            if self._timeout is not None and time.monotonic() - started >= self._timeout:
                reason = f"no answer within {self._timeout:g} s ({reason})"
            error = UserError(f"cannot write to {self.name}: {reason}")
            self._error = self._error or error
            raise error from None

    def _complete(self, *, aborting: bool) -> UserError | None:
        """Finish (the lock is held); returns a new failure to finish, None if none or if an
        earlier failure was raised already."""
        if self._finished:
            return None
        if aborting and self.frames_written and self._error is None:
            log.warning("output %s is partial: %d frames", self.name, self.frames_written)
        return self._finish()

    def _finish(self) -> UserError | None:
        """Flush the encoder, copy the remaining audio and write the trailer, once; after a
        failure only release the output. Returns a failure that happened here."""
        self._finished = True
        earlier = self._error
        with contextlib.suppress(UserError), self._failures():
            if earlier is None:
                self._flush()
        # Closed even after a failure: it releases the file; its own error would say nothing new.
        with contextlib.suppress(UserError), self._failures():
            self._container.close()
        if self._copier is not None:
            self._copier.close()
        return self._error if earlier is None else None

    def _flush(self) -> None:
        if self._video is not None:
            self._mux(self._video.encode(None))
        if self._copier is not None:
            self._copier.finish(None if self._source_complete() else self._end_time())

    def _source_complete(self) -> bool:
        source = self._source
        return source.exhausted and self.frames_written >= source.frames_read

    def _end_time(self) -> Fraction:
        return self._end_pts * self._source.time_base


class AtomicFileSink(EncodedSink):
    """A video file written under a temporary name and renamed into place on close.

    The temporary file is created when the sink opens, so a directory that refuses new files is
    one error before any frame is processed. After a write failure (a full disk) the file is
    renamed into place when what reached the disk plays, with a warning; otherwise nothing
    is left.
    """

    def __init__(
        self,
        path: str,
        fmt: str,
        encoder: _VideoEncoder,
        source: VideoSource,
        *,
        copy_tracks: bool = True,
    ) -> None:
        self.path = path
        remove_stale(Path(path))  # temporary files of runs that were killed
        self.temp_path = os.fspath(temp_path(Path(path)))
        try:
            with open(self.temp_path, "xb"):
                pass
        except OSError as exc:
            raise UserError(f"cannot write to {path}: {describe_os_error(exc)}") from None
        try:
            super().__init__(
                self.temp_path,
                fmt,
                encoder,
                source,
                copy_tracks=copy_tracks,
                container_options=container_options(fmt),
                name=path,
            )
        except BaseException:
            _remove(self.temp_path)
            raise

    def _complete(self, *, aborting: bool) -> UserError | None:
        if self._finished:
            return None  # closed already: a second close() must not fail
        error = super()._complete(aborting=aborting)
        if not self.frames_written:
            # The muxer writes nothing before the first frame: there is nothing to keep.
            _remove(self.temp_path)
            if self._error is None:
                log.warning("no frames were written; %s not created", self.path)
        elif self._error is None:
            return self._place()
        else:
            self._keep_what_reached_the_disk()
        return error

    def _place(self) -> UserError | None:
        try:
            place(Path(self.temp_path), Path(self.path))
        except OSError as exc:
            _remove(self.temp_path)
            return UserError(f"cannot write to {self.path}: {describe_os_error(exc)}")
        return None

    def _keep_what_reached_the_disk(self) -> None:
        frames = _playable_frames(self.temp_path)
        if not frames:
            _remove(self.temp_path)
            log.warning("nothing playable reached the disk; %s not created", self.path)
            return
        if self._place() is None:
            log.warning(
                "output %s is partial: %d of %d frames reached the disk",
                self.path,
                frames,
                self.frames_written,
            )


def _copyable(codec: str, container: str, supported: set[str]) -> bool:
    """Whether a source track of ``codec`` can be copied packet for packet into ``container``."""
    # FFmpeg 8's mp4 muxer lists PCM (ISO 23003-5 'ipcm') but writes copied PCM from Matroska
    # with an empty sample description (fragmented) or fails at the trailer (EINVAL); MOV and
    # Matroska hold PCM well.
    if container == "mp4" and codec.startswith("pcm_"):
        return False
    return codec in supported


def _reason(exc: BaseException) -> str:
    """``No space left on device``: libav's or the system's reason, without decoration."""
    return getattr(exc, "strerror", None) or str(exc)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _playable_frames(path: str) -> int:
    """How many video frames reached ``path`` whole, when the first one decodes; else 0."""
    complete, playable = 0, False
    try:
        size = os.path.getsize(path)
        with av.open(path) as container:
            stream = container.streams.video[0]
            for packet in container.demux(stream):
                # The demuxer cuts a packet the file ends in to what is there: one that ends
                # exactly at the end of a file whose writing failed lost its tail.
                complete += packet.size > 0 and packet.pos + packet.size < size
                # Decoding stops at the first picture: the rest is only counted.
                playable = playable or bool(packet.decode())
    except (*_MEDIA_ERRORS, IndexError):
        pass  # a file cut short ends with a broken packet, or is not a media file at all
    return complete if playable else 0


class TrackCopier:
    """Copies a file source's audio and subtitles into the output, interleaved by time.

    A second demuxer reads the source file for these streams only, so the pipeline's
    video path stays independent of them.
    """

    def __init__(self, output: av.container.OutputContainer, source: VideoSource) -> None:
        self._input = av.open(source.path) if source.path and source.tracks else None
        self._copy: dict[int, av.stream.Stream] = {}
        self._transcode: dict[int, _AudioTranscoder] = {}
        if self._input is None:
            return
        container = output.format.name.split(",")[0]
        supported = output.supported_codecs
        fallback = AUDIO_FALLBACK.get(container, "aac")
        for track in source.tracks:
            stream = self._input.streams[track.index]
            if _copyable(track.codec, container, supported):
                self._copy[track.index] = output.add_stream_from_template(stream)
            elif track.kind == "audio":
                log.warning(
                    "%s audio cannot go into %s as is; transcoding to %s",
                    track.codec,
                    output.format.name,
                    fallback,
                )
                self._transcode[track.index] = _AudioTranscoder(output, stream, fallback)
            else:
                log.warning(
                    "dropping %s %s track: %s cannot hold it",
                    track.codec,
                    track.kind,
                    output.format.name,
                )
        self._output = output
        wanted = [self._input.streams[i] for i in (*self._copy, *self._transcode)]
        self._packets = self._input.demux(wanted) if wanted else iter(())
        self._held: av.Packet | None = None

    def mux_until(self, time: Fraction | None) -> None:
        """Mux the source's packets that start at or before ``time`` seconds (None: all)."""
        if self._input is None:
            return
        while True:
            packet = self._held if self._held is not None else next(self._packets, None)
            self._held = None
            if packet is None:
                return
            if packet.size == 0:
                continue  # the demuxer's empty flush packets carry nothing to copy
            start = packet.pts if packet.pts is not None else packet.dts
            if time is not None and start is not None and start * packet.time_base > time:
                self._held = packet
                return
            self._put(packet)

    def finish(self, time: Fraction | None) -> None:
        """Mux up to ``time`` (None: the rest) and flush the transcoders."""
        if self._input is None:
            return
        self.mux_until(time)
        for transcoder in self._transcode.values():
            transcoder.flush()

    def close(self) -> None:
        """Release the source file (finished or not); closing twice is harmless."""
        if self._input is not None:
            self._input.close()
            self._input = None

    def _put(self, packet: av.Packet) -> None:
        index = packet.stream.index
        if index in self._copy:
            packet.stream = self._copy[index]
            self._output.mux(packet)
        else:
            self._transcode[index].feed(packet)


class _AudioTranscoder:
    """Decodes one audio stream and re-encodes it for a container that cannot copy it.

    The source's timing is kept: every decoded frame keeps its pts, and the resampler (to the
    encoder's format and rate) works in swresample's async mode, which fills a gap in the source
    with silence and trims an overlap. The audio so starts where the source's does and stays
    in step with the video after a gap, instead of being re-timed from 0 and packed together.
    """

    def __init__(
        self, output: av.container.OutputContainer, stream: av.audio.AudioStream, codec: str
    ) -> None:
        rate = stream.codec_context.sample_rate
        if codec == "libopus" and rate not in _OPUS_RATES:
            rate = 48000
        self._output = output
        self._stream = output.add_stream(codec, rate=rate)
        self._stream.layout = _ordered_layout(stream.codec_context.layout)
        self._decoder = stream.codec_context
        encoder = self._stream.codec_context
        # async=1: follow the timestamps (stretching by at most 1 sample a second); a gap or an
        # overlap over min_hard_comp seconds is filled or trimmed at once. 20 ms stays under an
        # AAC frame and far above container timestamp rounding (1 ms in Matroska).
        self._resampler = av.AudioResampler(
            format=encoder.format,
            layout=encoder.layout,
            rate=rate,
            options={"async": "1", "min_hard_comp": "0.02"},
        )

    def feed(self, packet: av.Packet) -> None:
        for frame in self._decoder.decode(packet):
            self._encode(frame)

    def flush(self) -> None:
        for frame in self._decoder.decode(None):
            self._encode(frame)
        self._encode(None)
        for packet in self._stream.encode(None):
            self._output.mux(packet)

    def _encode(self, frame: av.AudioFrame | None) -> None:
        # The frames leave the resampler timed in 1/rate; the encoder rebases them to its own.
        for resampled in self._resampler.resample(frame):
            for packet in self._stream.encode(resampled):
                self._output.mux(packet)


# FFmpeg's default layout for a channel count (av_channel_layout_default).
_DEFAULT_LAYOUTS = {
    1: "mono",
    2: "stereo",
    3: "3.0",
    4: "4.0",
    5: "5.0",
    6: "5.1",
    7: "6.1",
    8: "7.1",
}


def _ordered_layout(layout: av.AudioLayout) -> av.AudioLayout:
    """``layout``, or the default one of its channel count when its order is unknown.

    Matroska stores no channel layout for PCM ("2 channels"), and encoders such as AAC refuse
    one without positions."""
    default = _DEFAULT_LAYOUTS.get(layout.nb_channels)
    if default and all(channel.name == "NONE" for channel in layout.channels):
        return av.AudioLayout(default)
    return layout


def container_options(fmt: str) -> dict[str, str]:
    """Muxer options that keep every copied timestamp as the input had it."""
    if fmt in ("mp4", "mov"):
        # Fragmented: a fragment is on disk each FRAGMENT_US (or key frame), so a killed run's
        # file plays up to its last fragment (faststart writes the index only at the end).
        # delay_moov writes the header once the first fragment is known, which lets it carry the
        # edit lists: without them the muxer shifts every stream to start at 0 (AAC priming
        # would move the video's pts); with them every pts stays exact.
        return {
            "movflags": "+frag_keyframe+empty_moov+delay_moov+default_base_moof",
            "frag_duration": str(FRAGMENT_US),
            "flush_packets": "1",
        }
    # Matroska would shift every stream so that AAC's priming packet (pts < 0) starts at 0, moving
    # the video's pts too; it stores negative timestamps correctly when asked not to.
    return {
        "avoid_negative_ts": "disabled",
        "cluster_time_limit": str(FRAGMENT_US // 1000),
        "flush_packets": "1",
    }


def _encoder_options(codec: str, crf: int, preset: str, *, live: bool) -> dict[str, str]:
    if codec in ("libx264", "libx264rgb"):  # libx264rgb: RGB, lossless at --crf 0
        options = {"crf": str(crf), "preset": preset}
        if live:
            options["tune"] = "zerolatency"
        return options
    if codec == "libx265":
        return {"crf": str(crf), "preset": preset, "x265-params": "log-level=error"}
    if codec.endswith("_nvenc"):
        return {"preset": preset, "rc": "vbr", "cq": str(crf)}
    if codec in ("libvpx-vp9", "libaom-av1", "libsvtav1"):
        return {"crf": str(crf), "b:v": "0"}
    if codec == "ffv1":
        # Version 3 with slices encodes in parallel and checks each slice with a CRC.
        return {"level": "3", "slicecrc": "1"}
    return {}


def _choose_pix_fmt(codec: av.codec.Codec, requested: str | None, source_fmt: str) -> str:
    supported = [f.name for f in codec.video_formats or ()]
    if requested is not None:
        if supported and requested not in supported:
            raise UserError(
                f"{codec.name} cannot encode {requested}; it takes {', '.join(supported)}"
            )
        return requested
    if not supported or source_fmt in supported:
        return source_fmt
    return "yuv420p" if "yuv420p" in supported else supported[0]


def _swscale_colorspace(space: int) -> Colorspace | None:
    """The swscale matrix for an AVColorSpace; None lets swscale use its default (BT.601)."""
    if space == 6:  # SMPTE 170M uses the BT.601 matrix
        return Colorspace.ITU601
    try:
        return Colorspace(space)
    except ValueError:
        return None
