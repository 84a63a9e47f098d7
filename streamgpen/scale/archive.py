"""``streamgpen enhance ARCHIVE_DIR/ -o OUT_DIR/ --ray [auto|local|ADDRESS]``: the driver.

The driver plans (each video indexed and cut into segments, its manifest read so that a rerun
resumes), starts one worker per GPU or CPU slot, hands each idle worker the next segment, records
each finished one, joins a video as soon as its last segment is in, and shows one bar for the
whole archive. Inputs, outputs and segment files are on a filesystem every node sees (one
machine's disk, or NFS/Lustre for a cluster): workers read the inputs and write segments there,
the driver joins them there (docs/scale.md says why bytes are not shipped through Ray).
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.console import Console

from streamgpen import __version__
from streamgpen.config import RunConfig
from streamgpen.errors import UserError
from streamgpen.media.sinks import CONTAINER_FORMATS
from streamgpen.media.urls import is_live_input, url_scheme
from streamgpen.pipeline.engine import EngineOptions
from streamgpen.progress import duration, rate, task_bar
from streamgpen.scale import ray_workers
from streamgpen.scale.join import join_segments
from streamgpen.scale.manifest import Manifest, remove_job_folders, settings_key
from streamgpen.scale.segments import Segment, SegmentPolicy, index_video, plan_segments
from streamgpen.scale.work import SegmentJob, SegmentResult

# How often the driver wakes to hand out work and move the bar when no segment finishes.
POLL_S = 0.25


@dataclass(kw_only=True)
class _Video:
    """One input's job: its segments, manifest, and failure (None while all is well)."""

    source: str
    output: str
    segments: list[Segment]
    manifest: Manifest
    failed: str | None = None

    @property
    def frames(self) -> int:
        return sum(segment.frames for segment in self.segments)

    @property
    def done(self) -> bool:
        return self.manifest.joined(self.output)

    def pending(self) -> list[Segment]:
        return [s for s in self.segments if s.number not in self.manifest.finished]

    def job(self, segment: Segment) -> SegmentJob:
        path = self.manifest.segment_path(segment.number, self.output)
        return SegmentJob(source=self.source, path=path, segment=segment)


@dataclass(kw_only=True)
class _Tally:
    """What the bar and the summary show."""

    total_frames: int
    total_segments: int
    frames: int = 0  # frames of finished segments (resumed ones included)
    segments: int = 0
    fresh_frames: int = 0  # frames this run enhanced (for the rate)
    in_flight: dict = field(default_factory=dict)  # worker -> frames of its current segment
    started: float = field(default_factory=time.perf_counter)


def run_archive(
    config: RunConfig,
    pairs: list[tuple[str, str]],
    *,
    console: Console,
    policy: SegmentPolicy = SegmentPolicy(),
) -> int:
    """Enhance every (input video, output video) of ``pairs`` on the Ray cluster ``config.ray``
    names; ``config.input`` and ``config.output`` are ignored; ``policy`` says how videos are
    cut. Returns 0, or 1 when some inputs failed (each failure one line). Rerunning the same
    command after an interruption reuses the segments finished. Raises UserError when Ray is
    missing or unreachable, or an option cannot run on a cluster; KeyboardInterrupt after
    Ctrl-C (the finished segments are kept)."""
    ray_workers.require_ray()
    _refuse_unsupported(config)
    videos, failures = _plan(config, pairs, policy)
    tally = _tally(videos)
    todo = [video for video in videos if not video.done]
    try:
        workers = _run(config, todo, tally, console)
    except KeyboardInterrupt:
        if not config.quiet:
            line = f"interrupted: {tally.segments} of {tally.total_segments} segments are done "
            line += "and kept; the same command again resumes"
            console.print(line, markup=False, soft_wrap=True)
        raise
    failures += [f"{video.source}: {video.failed}" for video in todo if video.failed]
    for line in failures:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    if not failures:
        remove_job_folders([video.output for video in videos])
    if not config.quiet:
        console.print(_summary(videos, tally, workers, failures), markup=False, soft_wrap=True)
    return 1 if failures else 0


def _tally(videos: list[_Video]) -> _Tally:
    """The totals, with what earlier runs finished counted as done."""
    tally = _Tally(
        total_frames=sum(v.frames for v in videos),
        total_segments=sum(len(v.segments) for v in videos),
    )
    for video in videos:
        kept = video.manifest.finished
        finished = [s for s in video.segments if video.done or s.number in kept]
        tally.frames += sum(s.frames for s in finished)
        tally.segments += len(finished)
    return tally


def _refuse_unsupported(config: RunConfig) -> None:
    if config.preview is not None:
        raise UserError("--preview shows one stream; it cannot follow a --ray archive job")
    if config.extras.faces_json is not None:
        raise UserError("--faces-json writes one log; it cannot be used with --ray")


def _plan(
    config: RunConfig, pairs: Sequence[tuple[str, str]], policy: SegmentPolicy
) -> tuple[list[_Video], list[str]]:
    """Every input indexed and cut, with its manifest; the inputs that cannot be read, as
    failure lines."""
    settings = settings_key(
        __version__, config.enhancer, config.video, config.extras.draw, policy, _cadence(config)
    )
    videos, failures = [], []
    for source, output in pairs:
        try:
            _check_pair(source, output)
            segments = plan_segments(
                index_video(source),
                policy,
                cadence=_cadence(config),
                chunk=EngineOptions().frames_per_chunk,
            )
            plan = [(s.start, s.end, s.warm, s.span and s.span.frames) for s in segments]
            manifest = Manifest.open(output, source, settings, plan)
        except (UserError, OSError) as exc:
            failures.append(f"{source}: {exc}")
            continue
        videos.append(_Video(source=source, output=output, segments=segments, manifest=manifest))
    return videos, failures


def _check_pair(source: str, output: str) -> None:
    """A Ray job reads video files and writes video files: streams, cameras and folders of
    frames are one process's work."""
    if is_live_input(source) or url_scheme(source):
        raise UserError("--ray enhances video files, not streams or cameras")
    if os.path.splitext(output)[1].lower() not in CONTAINER_FORMATS:
        kinds = "/".join(CONTAINER_FORMATS)
        raise UserError(f"--ray writes {kinds} files, not {output}")


def _cadence(config: RunConfig) -> int:
    """Warm-ups start on multiples of this: the tracker's full detections and the engine's
    chunks (whose batch makes the float results) then fall as in a single run."""
    return math.lcm(config.video.detect_every, EngineOptions().frames_per_chunk)


def _run(config: RunConfig, videos: list[_Video], tally: _Tally, console: Console) -> int:
    """Join what earlier runs finished; connect, hand out the segments, record and join; returns
    how many workers ran (none when nothing was left to enhance)."""
    jobs = deque((video, segment) for video in videos for segment in video.pending())
    for video in videos:
        if not video.pending():  # every segment was finished by an earlier run
            try:
                _join(video)
            except UserError as exc:
                video.failed = str(exc)
    if not jobs:
        return 0
    started = ray_workers.connect(config.ray or "auto")
    try:
        count, resources = ray_workers.worker_slots(config)
        workers = ray_workers.start_workers(config, min(count, len(jobs)), resources)
        progress = task_bar(console=console, disable=config.quiet, counted=True)
        bar = progress.add_task("archive", total=tally.total_frames, info="")
        tally.started = time.perf_counter()
        try:
            with progress:
                _dispatch(workers, jobs, tally, lambda: _show(progress, bar, tally, len(workers)))
        finally:
            ray_workers.stop_workers(workers)
    finally:
        if started:
            ray_workers.require_ray().shutdown()
    return len(workers)


def _dispatch(workers: list, jobs: deque, tally: _Tally, show) -> None:
    """Keep every worker on a segment until none is left; each result recorded as it comes."""
    ray = ray_workers.require_ray()
    idle, running, polls = deque(workers), {}, {}
    while jobs or running:
        while idle and jobs:
            video, segment = jobs.popleft()
            if video.failed is None:
                worker = idle.popleft()
                running[worker.run.remote(video.job(segment))] = (worker, video, segment)
        if not running:
            _no_workers_left(jobs)
            continue
        ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
        for ref in ready:
            worker, video, segment = running.pop(ref)
            tally.in_flight.pop(worker, None)
            try:
                _finished(video, segment, ray.get(ref), tally)
            except ray.exceptions.RayActorError as exc:  # died on it as often as it restarts
                video.failed = video.failed or ray_workers.failure(exc)
                continue  # that worker is gone for good
            except Exception as exc:  # the segment's own error, or the join's
                video.failed = video.failed or ray_workers.failure(exc)
            idle.append(worker)
        _poll(ray, [w for w, _, _ in running.values()], polls, tally)
        show()


def _no_workers_left(jobs: deque) -> None:
    """With nothing running, the jobs left are of inputs that failed, or no worker is left to
    run them: their inputs fail."""
    while jobs:
        video, _ = jobs.popleft()
        video.failed = video.failed or "no Ray worker left: each died on its segments"


def _finished(video: _Video, segment: Segment, result: SegmentResult, tally: _Tally) -> None:
    manifest = video.manifest
    manifest.record_segment(
        segment.number, frames=result.frames, size=result.size, worker=result.worker
    )
    tally.frames += segment.frames or result.frames
    tally.fresh_frames += result.frames
    tally.segments += 1
    if not video.pending():
        _join(video)


def _join(video: _Video) -> None:
    parts = [video.manifest.segment_path(s.number, video.output) for s in video.segments]
    join_segments(video.source, parts, video.output)
    video.manifest.record_output(video.output)


def _poll(ray, busy: list, polls: dict, tally: _Tally) -> None:
    """Ask each busy worker how far its segment is, without waiting for an answer."""
    for worker in busy:
        if worker not in polls:
            polls[worker] = worker.progress.remote()
    if not polls:
        return
    answered, _ = ray.wait(list(polls.values()), num_returns=len(polls), timeout=0)
    for worker, ref in list(polls.items()):
        if ref in answered:
            del polls[worker]
            try:
                frames = ray.get(ref)
            except Exception:  # a worker that died meanwhile: its segment is run again
                frames = 0
            if worker in busy:
                tally.in_flight[worker] = frames


def _show(progress, bar, tally: _Tally, workers: int) -> None:
    done = tally.frames + sum(tally.in_flight.values())
    fresh = tally.fresh_frames + sum(tally.in_flight.values())
    info = f"{tally.segments}/{tally.total_segments} segments, "
    info += f"{rate(fresh, time.perf_counter() - tally.started)} on {workers} workers"
    progress.update(bar, completed=done, info=info)


def _summary(videos: list[_Video], tally: _Tally, workers: int, failures: list[str]) -> str:
    elapsed = time.perf_counter() - tally.started
    line = f"{_count(len(videos), 'video')}, {_count(tally.segments, 'segment')}, "
    line += f"{tally.frames} frames; "
    line += f"enhanced {tally.fresh_frames} frames in {duration(elapsed)} "
    line += f"({rate(tally.fresh_frames, elapsed)} on {workers} workers)"
    if failures:
        line += f"; {len(failures)} failed"
    return line


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"
