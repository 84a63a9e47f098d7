"""Enhancing several videos in one process: ``streamgpen enhance IN1 IN2 ... -o OUT_DIR/``.

Each input has its own decoder, tracker, encoder and face log (a :class:`Lane`); one
:class:`DeviceWorker` restores the faces of all of them in shared device batches, so N cameras
cost one set of models and full batches rather than N processes. An input that cannot be opened,
or fails while running (its source gone for good, its output unwritable), ends alone with one
line; the others go on, and the exit code is 1. Ctrl-C stops them all, each output finalised as
a playable file of the frames done.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from streamgpen.apps.inputs import VideoPlan
from streamgpen.apps.videos import (
    ClosingSink,
    PreviewObserver,
    ProgressObserver,
    open_video_sink,
    open_video_source,
    summary,
)
from streamgpen.config import RunConfig
from streamgpen.enhancer import Enhancer
from streamgpen.errors import UserError
from streamgpen.faces.track import Tracker
from streamgpen.media.facelog import FaceLog
from streamgpen.pipeline.build import video_lane
from streamgpen.pipeline.engine import DeviceWorker, EngineOptions, Lane
from streamgpen.pipeline.observers import FaceLogObserver
from streamgpen.progress import task_bar


def enhance_many(
    config: RunConfig,
    enhancer: Enhancer,
    plans: list[VideoPlan],
    *,
    console: Console,
    preview=None,
    stop: threading.Event | None = None,
) -> int:
    """Enhance every planned input into its output with one device worker; returns the exit
    code: 0, or 1 when some input failed (each said in one line). KeyboardInterrupt (Ctrl-C) is
    re-raised after every output was finalised. ``preview``: a started preview server with a
    state per input (``PreviewServer(inputs=...)``): each input's frames, figures, controls."""
    enhancer.restorer.warmup()
    failed = 0
    with ExitStack() as stack:
        lanes: list[tuple[Lane, ClosingSink]] = []
        for n, plan in enumerate(plans):
            state = preview.states[n] if preview is not None else None
            try:
                lanes.append(_open_lane(config, plan, enhancer, stack, state))
            except UserError as e:
                failed += 1
                _say(console, f"{plan.name}: {e}")
        if not lanes:
            return 1
        _run(config, [lane for lane, _ in lanes], console, stop)
        for lane, closing in lanes:
            failed += not _finish(lane, closing, console, quiet=config.quiet)
    return 1 if failed else 0


def _open_lane(config: RunConfig, plan: VideoPlan, enhancer: Enhancer, stack: ExitStack, state):
    """The input's source, sink and face log (owned by ``stack``) and its lane; ``state``: its
    live page's (or None)."""
    lane_config = replace(config, input=plan.input, inputs=(plan.input,), output=plan.output)
    source = stack.enter_context(open_video_source(lane_config))
    sink = open_video_sink(lane_config, source, plan.output)
    closing = stack.enter_context(ClosingSink(sink, plan.output))
    observers = []
    if config.extras.faces_json is not None:
        log = stack.enter_context(FaceLog(face_log_path(config.extras.faces_json, plan)))
        observers.append(FaceLogObserver(log))
    if state is not None:
        observers.append(PreviewObserver(state, config.enhancer.model.label, enhancer))
    if enhancer.device.type == "cuda":
        enhancer.warmup(source.height, source.width)
    lane = video_lane(
        name=plan.name,
        source=source,
        sink=closing.sink,
        enhancer=enhancer,
        tracker=Tracker(enhancer.detector, detect_every=config.video.detect_every),
        observers=observers,
        options=EngineOptions(draw=config.extras.draw, sink_timeout=config.video.source.timeout),
        controls=(lambda: state.controls) if state is not None else None,
    )
    return lane, closing


def face_log_path(faces_json: Path, plan: VideoPlan) -> Path:
    """With several inputs ``--faces-json`` names a folder: one log per input, named after its
    output (``OUT.jsonl``; ``INPUT.jsonl`` for a null output)."""
    if faces_json.suffix.lower() in (".json", ".jsonl"):
        raise UserError(f"--faces-json {faces_json}: with several inputs, give a folder")
    faces_json.mkdir(parents=True, exist_ok=True)
    named = plan.output if plan.output != "null" else plan.name
    return faces_json / f"{Path(named).stem}.jsonl"


def _run(config: RunConfig, lanes: list[Lane], console: Console, stop) -> None:
    """The device worker over every lane, with a progress bar per input."""
    counted = all(lane.source.frame_count and not lane.source.is_live for lane in lanes)
    progress = task_bar(console=console, disable=config.quiet, counted=counted)
    for lane in lanes:
        total = lane.source.frame_count if counted else None
        task = progress.add_task(Path(lane.name).name, total=total, info="")
        lane.observers.append(ProgressObserver(progress, task, lane.source))
    try:
        with progress:
            DeviceWorker(lanes, stop=stop).run()
    except KeyboardInterrupt:
        if not config.quiet:
            for lane in lanes:
                _say(console, f"interrupted: {lane.stats.frames_out} frames of {lane.name}")
        raise


def _finish(lane: Lane, closing: ClosingSink, console: Console, *, quiet: bool) -> bool:
    """Finalise one input's output and say how it went; False when it failed."""
    error = lane.errors[0] if lane.errors else None
    if error is None:
        try:
            closing.close()
        except UserError as e:
            error = e
    else:
        closing.abort()
    if error is not None and not isinstance(error, UserError | OSError):
        raise error  # a bug, not a fault of this input: the traceback says where
    if error is not None:
        _say(console, f"{lane.name}: {error} ({lane.stats.frames_out} frames written)")
    elif not quiet:
        _say(console, f"{lane.name}: {summary(lane.stats, lane.source, closing.output)}")
    return error is None


def _say(console: Console, line: str) -> None:
    console.print(line, markup=False, highlight=False, soft_wrap=True)
