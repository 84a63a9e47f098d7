"""Enhanced segments joined into one video by remuxing their packets (no second encode).

Each segment was encoded on its own with the run's encoder settings and starts with a key frame,
so its packets follow the previous segment's as they are, each with its pts and dts. The source's
audio and subtitles are copied once, here, by the same ``TrackCopier`` a single run uses,
interleaved by time: the joined file holds what a single run's would (same frames, same pts,
same audio packets). The output is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import av
import av.error

from streamgpen.errors import UserError
from streamgpen.files import place, remove_stale, same_file, temp_path
from streamgpen.media.sinks import CONTAINER_FORMATS, TrackCopier, container_options
from streamgpen.media.video import open_source

_MEDIA_ERRORS = (av.error.FFmpegError, OSError)


def join_segments(source: str, parts: Sequence[str], output: str) -> int:
    """Remux the segment files ``parts`` (in order) into ``output``, with ``source``'s audio and
    subtitles; returns the video packets written. Raises UserError when a segment cannot be read
    or was encoded with other parameters than the first, or the output cannot be written."""
    fmt = CONTAINER_FORMATS.get(os.path.splitext(output)[1].lower())
    if fmt is None:
        raise UserError(f"cannot tell what kind of output {output!r} is")
    if same_file(output, source):
        raise UserError(f"output {output} would overwrite the input")
    remove_stale(Path(output))
    temp = os.fspath(temp_path(Path(output)))
    try:
        with open_source(source) as video_source:
            packets = _remux(video_source, parts, temp, fmt)
        place(Path(temp), Path(output))
    except _MEDIA_ERRORS as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise UserError(f"cannot write to {output}: {reason}") from None
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return packets


def _remux(video_source, parts: Sequence[str], temp: str, fmt: str) -> int:
    """The segments' packets, then the rest of the audio, into a new file at ``temp``."""
    written = 0
    with av.open(temp, "w", format=fmt, options=container_options(fmt)) as out:
        with av.open(parts[0]) as first:
            template = first.streams.video[0]
            video = out.add_stream_from_template(template)
            video.time_base = template.time_base
            extradata = template.codec_context.extradata
        # Added after the video, as a single run does: the video is the output's first stream.
        copier = TrackCopier(out, video_source)
        try:
            for part in parts:
                written += _copy_part(part, video, copier, out, extradata)
            copier.finish(None)
        finally:
            copier.close()
    return written


def _copy_part(part: str, video, copier: TrackCopier, out, extradata: bytes | None) -> int:
    written = 0
    with av.open(part) as container:
        stream = container.streams.video[0]
        if stream.codec_context.extradata != extradata:
            # Another encoder build or thread count can change the stream's parameters; the
            # joined file would then not decode past the first segment.
            raise UserError(f"segment {part} was encoded with other parameters than the first")
        for packet in container.demux(stream):
            if packet.size == 0:
                continue  # the demuxer's flush packet
            if packet.pts is not None:
                copier.mux_until(packet.pts * packet.time_base)
            packet.stream = video
            out.mux(packet)
            written += 1
    return written
