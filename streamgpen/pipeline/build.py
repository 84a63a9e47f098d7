"""Wiring the engine for an enhancer: the stages in order, the copies to and from the device."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

from streamgpen.enhancer import Enhancer
from streamgpen.faces.track import Tracker
from streamgpen.media.sinks import Sink
from streamgpen.media.video import VideoSource
from streamgpen.pipeline.engine import EngineOptions, Lane, VideoPipeline
from streamgpen.pipeline.observers import Observer
from streamgpen.pipeline.packet import Controls
from streamgpen.pipeline.stages import DownloadStage, RestoreStage, StageClock, TrackStage
from streamgpen.runtime.transfer import Downloader, Uploader


def video_pipeline(
    *,
    source: VideoSource,
    sink: Sink,
    enhancer: Enhancer,
    tracker: Tracker,
    observers: Sequence[Observer] = (),
    options: EngineOptions = EngineOptions(),
    controls: Callable[[], Controls] | None = None,
    yuv_on_device: bool | None = None,
    sync_stages: bool = False,
    stop: threading.Event | None = None,
    device_lock: AbstractContextManager | None = None,
) -> VideoPipeline:
    """source -> track -> restore (align, GPEN, paste) -> download -> sink, with ``observers``.

    ``controls`` gives the live controls (a viewer's); by default the enhancer's blend, on.
    ``yuv_on_device`` (default: on CUDA) uploads 4:2:0 planes and converts them there;
    ``sync_stages`` synchronises the worker's stream at each stage's end (bench's figures);
    ``stop`` and ``device_lock`` are :class:`VideoPipeline`'s (an early end; the lock of a
    device shared with other runs).
    """
    return VideoPipeline(
        source=source,
        sink=sink,
        stages=_stages(enhancer, tracker, sync_stages),
        uploader=Uploader(enhancer.device, yuv_on_device),
        controls=_controls(enhancer, controls),
        observers=observers,
        options=options,
        stop=stop,
        device_lock=device_lock,
    )


def video_lane(
    *,
    name: str,
    source: VideoSource,
    sink: Sink,
    enhancer: Enhancer,
    tracker: Tracker,
    observers: Sequence[Observer] = (),
    options: EngineOptions = EngineOptions(),
    controls: Callable[[], Controls] | None = None,
) -> Lane:
    """One input of a run of several (:class:`~streamgpen.pipeline.engine.DeviceWorker`): its
    own tracker, stages, ends and observers, the enhancer's models shared with the others."""
    return Lane(
        name=name,
        source=source,
        sink=sink,
        stages=_stages(enhancer, tracker, False),
        uploader=Uploader(enhancer.device, None),
        controls=_controls(enhancer, controls),
        observers=observers,
        options=options,
    )


def _stages(enhancer: Enhancer, tracker: Tracker, sync_stages: bool) -> tuple:
    clock = StageClock(enhancer.device if sync_stages else None)
    return (
        TrackStage(tracker, clock, only_center_face=enhancer.only_center_face),
        RestoreStage(enhancer, clock, tracked=True, smoother=_smoother(enhancer)),
        DownloadStage(Downloader(enhancer.device), clock),
    )


def _controls(enhancer: Enhancer, controls: Callable[[], Controls] | None):
    """The live controls, or by default the enhancer's blend, on."""
    if controls is not None:
        return controls
    fixed = Controls(blend=enhancer.blend)
    return lambda: fixed


def _smoother(enhancer: Enhancer):
    """Per-track smoothing of the parsed masks, when the masks are parsed."""
    if enhancer.parser is None:
        return None
    from streamgpen.faces.parse import MaskSmoother

    return MaskSmoother()
