"""A video cut into segments at key frames, found by demuxing its packets (nothing is decoded).

A segment is the frames ``[start, end)`` of the video, in presentation order. Its worker seeks to
the key frame at or before ``warm`` and feeds the pipeline from ``warm`` on, so that the tracker
(its One-Euro smoothing, its tracks) is warm by ``start``; what comes out before ``start`` is
dropped. ``warm`` is a multiple of the cadence (``detect_every`` and the engine's chunk of frames,
counted from frame 0), so a warm-up's full detections fall on the frames the single-process run
detects on, and its chunks are the single run's chunks. The segment is read on to the end of its
last chunk (the frames past ``end`` are dropped too): a chunk's frames are batched together, and
a batch of other frames can round its floats differently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import av
import av.error

from streamgpen.errors import UserError
from streamgpen.media.video import Span

# When the frame rate is unknown, seconds are turned into frames at this rate.
FALLBACK_FPS = 25.0


@dataclass(frozen=True, kw_only=True)
class SegmentPolicy:
    """How videos are cut: each segment holds at least ``min_seconds`` of video (cut at the next
    key frame; a video shorter than twice that is one segment), and its tracker starts at least
    ``warmup_seconds`` before it.

    The defaults: a warm-up of 3 s made a fresh tracker's output bit-identical to the single run's
    on the clips measured (docs/scale.md: 51-67 frames at 25 fps once the detection phase agrees),
    and 60 s segments keep that warm-up's cost at 5% of the frames.
    """

    min_seconds: float = 60.0
    warmup_seconds: float = 3.0


@dataclass(frozen=True, kw_only=True)
class VideoIndex:
    """A video's frames as its demuxer sees them: ``pts`` [T] of every frame in presentation
    order, the indices of its ``keyframes`` (into ``pts``), the stream's ``time_base`` and
    ``fps``. ``pts`` is empty when some packet has no timestamp (such a video is one segment)."""

    pts: tuple[int, ...]
    keyframes: tuple[int, ...]
    time_base: Fraction
    fps: Fraction | None

    @property
    def frames_per_second(self) -> float:
        return float(self.fps) if self.fps else FALLBACK_FPS


@dataclass(frozen=True, kw_only=True)
class Segment:
    """Frames ``[start, end)`` of a video (``end`` None: to its end, for an unindexed video),
    the pipeline fed from frame ``warm``; ``span`` is how the source reads it (None: the whole
    file from its start); ``start_pts`` the first pts written (None: from the first),
    ``end_pts`` the first not written (None: to the last)."""

    number: int
    start: int
    end: int | None
    warm: int
    span: Span | None
    start_pts: int | None
    end_pts: int | None

    @property
    def frames(self) -> int:
        """Frames written (0 when unknown)."""
        return 0 if self.end is None else self.end - self.start


def index_video(path: str) -> VideoIndex:
    """Every video packet's pts and key flag, by demuxing ``path`` (reads the file, decodes
    nothing). Raises UserError for a file that is not a readable video."""
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise UserError(f"no video stream in {path}")
            stream = container.streams.video[0]
            pts, keys = [], set()
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue  # the demuxer's flush packet
                if packet.pts is None:
                    pts = None
                    break
                pts.append(packet.pts)
                if packet.is_keyframe:
                    keys.add(packet.pts)
            time_base = stream.time_base or Fraction(1, 90000)
            fps = stream.average_rate or stream.guessed_rate or None
    except (av.error.FFmpegError, OSError) as exc:
        raise UserError(f"not a readable media file: {path} ({exc})") from None
    if pts is None:
        return VideoIndex(pts=(), keyframes=(), time_base=time_base, fps=fps)
    ordered = tuple(sorted(pts))
    keyframes = tuple(i for i, value in enumerate(ordered) if value in keys)
    return VideoIndex(pts=ordered, keyframes=keyframes, time_base=time_base, fps=fps)


def plan_segments(
    index: VideoIndex, policy: SegmentPolicy, *, cadence: int, chunk: int
) -> list[Segment]:
    """The segments of an indexed video: cut at key frames, each at least ``policy.min_seconds``
    long, each warmed up from a multiple of ``cadence`` (a multiple of ``chunk``, the engine's
    frames per chunk) and read to the end of its last chunk."""
    total = len(index.pts)
    if total == 0 or not index.keyframes or index.keyframes[0] != 0:
        # No index (or a first frame that is no key frame): one segment, read as a plain run.
        return [
            Segment(
                number=0, start=0, end=total or None, warm=0, span=None, start_pts=None,
                end_pts=None,
            )
        ]  # fmt: skip
    fps = index.frames_per_second
    min_frames = max(1, round(policy.min_seconds * fps))
    warmup = round(policy.warmup_seconds * fps)
    cuts = [0]
    for key in index.keyframes:
        if key - cuts[-1] >= min_frames and total - key >= min_frames:
            cuts.append(key)
    bounds = zip(cuts, [*cuts[1:], total], strict=True)
    return [
        _segment(index, number, start, end, warmup, cadence, chunk)
        for number, (start, end) in enumerate(bounds)
    ]


def _segment(
    index: VideoIndex, number: int, start: int, end: int, warmup: int, cadence: int, chunk: int
) -> Segment:
    pts = index.pts
    end_pts = pts[end] if end < len(pts) else None
    # The warm-up's first frame: at least ``warmup`` frames early, on the cadence.
    warm = max(0, math.floor((start - warmup) / cadence) * cadence) if start else 0
    read_end = min(len(pts), math.ceil(end / chunk) * chunk)
    key = max(k for k in index.keyframes if k <= warm)
    span = Span(
        seek_pts=pts[key] if warm else None,  # the first segment reads the file from its start
        start_pts=pts[warm] if warm else None,
        end_pts=pts[read_end] if read_end < len(pts) else None,
        first_index=warm,
        frames=read_end - warm,
    )
    return Segment(
        number=number,
        start=start,
        end=end,
        warm=warm,
        span=span,
        start_pts=pts[start] if start else None,
        end_pts=end_pts,
    )
