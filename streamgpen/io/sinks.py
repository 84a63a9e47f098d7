"""Sinks for processed frames: video files, RTSP publishing, PNG directories, or nothing.

Video files are written under a temporary name beside the target and renamed into place
on close, so a reader never sees a half-written file under the final name. Audio and
subtitle streams of a file source are copied packet for packet by a second demuxer that
reads the source file alongside the pipeline.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from fractions import Fraction

import av
import av.error
import cv2
import numpy as np
from av.video.reformatter import ColorRange, Colorspace

from streamgpen.errors import UserError
from streamgpen.io.video import Frame, VideoSource

log = logging.getLogger(__name__)

CONTAINER_FORMATS = {".mp4": "mp4", ".mkv": "matroska", ".mov": "mov", ".webm": "webm"}

# Audio codec to transcode into when a container cannot hold the source's audio as is.
AUDIO_FALLBACK = {"mp4": "aac", "mov": "aac", "webm": "libopus", "matroska": "libopus"}
_OPUS_RATES = (48000, 24000, 16000, 12000, 8000)

_AVCOL_SPC_RGB = 0
_AVCOL_SPC_UNSPECIFIED = 2


class Sink:
    """Where processed frames go. Use as a context manager, or call close()/abort()."""

    frames_written = 0

    def write(self, frame: Frame, image: np.ndarray) -> None:
        """Write ``image`` (HxWx3 uint8 RGB) at the timing of the source ``frame``."""
        raise NotImplementedError

    def close(self) -> None:
        """Finish the output."""

    def abort(self) -> None:
        """Finish after a failure: keep what was written, leave nothing if nothing was."""
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
) -> Sink:
    """Open the output named by ``spec`` for frames coming from ``source``.

    ``spec`` is a video file (``.mp4 .mkv .mov .webm``), an ``rtsp://`` URL to publish
    to, a directory (an existing one, or a path ending in ``/``) for PNG frames, or
    ``null``. ``codec``/``crf``/``preset``/``pix_fmt`` configure the video encoder;
    ``pix_fmt`` defaults to the source's when the encoder supports it, else yuv420p.
    Raises :class:`UserError` for an unknown output type, a missing encoder or an
    encoder the container cannot hold.
    """
    if spec == "null":
        return NullSink()
    if spec.startswith(("rtsp://", "rtsps://")):
        encoder = _VideoEncoder(codec, crf, preset, pix_fmt, source, live=True)
        # Interleaved TCP: over UDP (the muxer's default) a burst of large frames, as when a file
        # is published faster than real time, loses packets and the server records nothing.
        return EncodedSink(
            spec,
            "rtsp",
            encoder,
            source,
            copy_tracks=False,
            container_options={"rtsp_transport": "tcp"},
        )
    if spec.endswith(("/", os.sep)) or os.path.isdir(spec):
        return ImageDirSink(spec)
    ext = os.path.splitext(spec)[1].lower()
    if ext not in CONTAINER_FORMATS:
        raise UserError(
            f"cannot tell what kind of output {spec!r} is: use a {'/'.join(CONTAINER_FORMATS)} "
            "file, a directory/, an rtsp:// URL or null"
        )
    if source.path and os.path.abspath(spec) == os.path.abspath(source.path):
        raise UserError(f"output {spec} would overwrite the input")
    directory = os.path.dirname(os.path.abspath(spec))
    if not os.path.isdir(directory):
        raise UserError(f"output directory does not exist: {directory}")
    encoder = _VideoEncoder(codec, crf, preset, pix_fmt, source, live=False)
    return AtomicFileSink(spec, CONTAINER_FORMATS[ext], encoder, source)


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
    """Encodes frames into a container (a file or a network URL)."""

    def __init__(
        self,
        url: str,
        fmt: str,
        encoder: _VideoEncoder,
        source: VideoSource,
        *,
        copy_tracks: bool,
        container_options: dict[str, str] | None = None,
    ) -> None:
        self.url = url
        self.format = fmt
        self.frames_written = 0
        self._encoder = encoder
        self._source = source
        try:
            self._container = av.open(url, "w", format=fmt, options=container_options or {})
        except (av.error.FFmpegError, OSError) as exc:
            raise UserError(f"cannot open output {url}: {exc}") from exc
        # The rtsp muxer names only its defaults (AAC, MPEG-4) as supported although RTP carries
        # H.264/HEVC and more; a codec it cannot send fails when the stream starts instead.
        if fmt != "rtsp" and encoder.codec.canonical_name not in self._container.supported_codecs:
            self._container.close()
            raise UserError(f"{encoder.codec.name} video cannot be stored in {fmt} output {url}")
        self._copy_tracks = copy_tracks
        self._copier: _TrackCopier | None = None
        self._video: av.video.stream.VideoStream | None = None
        self._size: tuple[int, int] = (0, 0)
        self._last_pts: int | None = None
        self._end_pts = 0
        self._step = source.frame_duration
        self._finished = False

    def write(self, frame: Frame, image: np.ndarray) -> None:
        if self._video is None:
            self._start(image)
        elif image.shape[:2] != self._size[::-1]:
            raise ValueError(f"image size {image.shape[1]}x{image.shape[0]} changed mid-stream")
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
        self.frames_written += 1

    def close(self) -> None:
        self._finish()

    def abort(self) -> None:
        if self.frames_written:
            log.warning("output %s is partial: %d frames", self.url, self.frames_written)
        self._finish()

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
        except (av.error.FFmpegError, OSError) as exc:
            raise UserError(f"cannot start encoder {self._encoder.codec.name}: {exc}") from exc
        # Added after the video so that the video is the output's first stream.
        if self._copy_tracks:
            self._copier = _TrackCopier(self._container, self._source)

    def _monotonic_pts(self, pts: int | None) -> int:
        """Keep the source pts; invent one only where it is missing or would go backwards."""
        if self._last_pts is not None and (pts is None or pts <= self._last_pts):
            pts = self._last_pts + self._step
        elif pts is None:
            pts = 0
        self._last_pts = pts
        return pts

    def _mux(self, packets: list[av.Packet]) -> None:
        try:
            for packet in packets:
                self._container.mux(packet)
        except (av.error.FFmpegError, OSError) as exc:
            # The first packet writes the header: an unreachable RTSP server shows up here.
            raise UserError(f"cannot write to {self.url}: {exc}") from exc

    def _finish(self) -> None:
        """Flush the encoder, copy the remaining audio, and write the trailer (once)."""
        if self._finished:
            return
        self._finished = True
        try:
            if self._video is not None:
                self._mux(self._video.encode(None))
            if self._copier is not None:
                self._copier.finish(None if self._source_complete() else self._end_time())
        finally:
            self._container.close()

    def _source_complete(self) -> bool:
        source = self._source
        return source.exhausted and self.frames_written >= source.frames_read

    def _end_time(self) -> Fraction:
        return self._end_pts * self._source.time_base


class AtomicFileSink(EncodedSink):
    """A video file written under a temporary name and renamed into place on close."""

    def __init__(self, path: str, fmt: str, encoder: _VideoEncoder, source: VideoSource) -> None:
        self.path = path
        directory, name = os.path.split(os.path.abspath(path))
        ext = os.path.splitext(name)[1]
        # Same directory, so the final rename is atomic; same extension for the muxer's sake.
        self.temp_path = os.path.join(directory, f".{name}.partial-{secrets.token_hex(4)}{ext}")
        options = _container_options(fmt)
        try:
            super().__init__(
                self.temp_path,
                fmt,
                encoder,
                source,
                copy_tracks=True,
                container_options=options,
            )
        except BaseException:
            if os.path.exists(self.temp_path):
                os.unlink(self.temp_path)
            raise

    def close(self) -> None:
        self._finish_and_place()

    def abort(self) -> None:
        if self.frames_written:
            log.warning("output %s is partial: %d frames", self.path, self.frames_written)
        self._finish_and_place()

    def _finish_and_place(self) -> None:
        if self._finished:
            return  # closed already: a second close() must not fail
        if not self.frames_written:
            self._finished = True
            self._container.close()
            # The muxer creates the file only when it writes the header, at the first frame.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp_path)
            log.warning("no frames were written; %s not created", self.path)
            return
        self._finish()
        os.replace(self.temp_path, self.path)


class _TrackCopier:
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
        supported = output.supported_codecs
        fallback = AUDIO_FALLBACK.get(output.format.name.split(",")[0], "aac")
        for track in source.tracks:
            stream = self._input.streams[track.index]
            if track.codec in supported:
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
        """Mux up to ``time`` (None: the rest), flush transcoders and release the input."""
        if self._input is None:
            return
        self.mux_until(time)
        for transcoder in self._transcode.values():
            transcoder.flush()
        self._input.close()

    def _put(self, packet: av.Packet) -> None:
        index = packet.stream.index
        if index in self._copy:
            packet.stream = self._copy[index]
            self._output.mux(packet)
        else:
            self._transcode[index].feed(packet)


class _AudioTranscoder:
    """Decodes one audio stream and re-encodes it for a container that cannot copy it."""

    def __init__(
        self, output: av.container.OutputContainer, stream: av.audio.AudioStream, codec: str
    ) -> None:
        rate = stream.codec_context.sample_rate
        if codec == "libopus" and rate not in _OPUS_RATES:
            rate = 48000
        self._output = output
        self._stream = output.add_stream(codec, rate=rate)
        self._stream.layout = stream.codec_context.layout
        self._decoder = stream.codec_context

    def feed(self, packet: av.Packet) -> None:
        for frame in self._decoder.decode(packet):
            self._encode(frame)

    def flush(self) -> None:
        for frame in self._decoder.decode(None):
            self._encode(frame)
        for packet in self._stream.encode(None):
            self._output.mux(packet)

    def _encode(self, frame: av.AudioFrame) -> None:
        # The encoder resamples and re-times itself; source pts in another rate would clash.
        frame.pts = None
        for packet in self._stream.encode(frame):
            self._output.mux(packet)


def _container_options(fmt: str) -> dict[str, str]:
    """Muxer options that keep every copied timestamp as the input had it."""
    if fmt in ("mp4", "mov"):
        # faststart moves the index to the front so players can start before the download ends;
        # negative audio timestamps (AAC priming) become an edit list.
        return {"movflags": "+faststart"}
    # Matroska would shift every stream so that AAC's priming packet (pts < 0) starts at 0, moving
    # the video's pts too; it stores negative timestamps correctly when asked not to.
    return {"avoid_negative_ts": "disabled"}


def _encoder_options(codec: str, crf: int, preset: str, *, live: bool) -> dict[str, str]:
    if codec == "libx264":
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
