"""Video jobs: a video enhanced in the background, with progress, its result kept in the spool.

``POST /v1/jobs`` takes an upload (multipart, streamed into the spool) or a ``source`` (JSON: a
file of the operator's source folder, or an rtsp/rtmp/http URL) and answers 202 at once; one
runner thread runs the jobs in order, one at a time (the device is shared with the image requests
anyway). Nothing of a job depends on the connection that created it.

Each job is a folder ``spool/jobs/ID/``: ``job.json`` (its state, rewritten atomically on every
change and about once a second for progress), ``input.EXT`` (an upload, removed once the job has
finished) and ``output.mp4``. The
sink writes the output under a temporary name and renames it when finished, also when a job is
canceled or fails, so ``output.mp4`` exists only as a complete, playable file. A restart finds
the folders again: finished jobs as they were, queued ones queued again, and a job that was
running when the server died failed (its output, if one was finished, kept).
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio.to_thread
from rich.console import Console
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Route

from streamgpen.apps.videos import VIDEO_EXTENSIONS, enhance_video, open_video_source
from streamgpen.config import RunConfig
from streamgpen.errors import UserError
from streamgpen.files import atomic_path, remove_stale
from streamgpen.media.urls import CONNECTING_INPUT_SCHEMES, is_webcam, redacted, url_scheme
from streamgpen.pipeline.observers import RunStats
from streamgpen.pipeline.packet import FramePacket
from streamgpen.service.core import ID_PATTERN, new_id
from streamgpen.service.metrics import JOB_STATES
from streamgpen.service.uploads import receive_upload
from streamgpen.web.responses import (
    HttpError,
    busy,
    content_length,
    json_response,
    read_json,
    refuse_oversized,
)

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running")
FINISHED = ("succeeded", "failed", "canceled")
JOB_FILE = "job.json"
OUTPUT_FILE = "output.mp4"
# The upload is received under this name, then renamed to input.EXT once its file name is known
# (the multipart part brings it, after the target was chosen).
UPLOAD_FILE = "input.upload"
INTERRUPTED = "interrupted: the server stopped during the job"
QUOTA_REACHED = "stopped: the spool reached its quota"
# How often job.json is rewritten for progress alone (state changes are written at once), and
# how often a running job checks the spool against the quota (a live source never ends).
CHECKPOINT_S = 1.0
# How long DELETE waits for a running job to finish its output before answering 202.
CANCEL_WAIT_S = 10.0
RETRY_AFTER_S = 30
JSON_KEYS = ("source", "options")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _no_progress() -> dict[str, Any]:
    return {"frames_done": 0, "frames_total": None, "fps": 0.0, "eta_s": None}


@dataclass(kw_only=True, eq=False)
class Job:
    """One job: what it reads (``input``: the upload's name in its folder, a file of the source
    folder or a URL; ``source`` describes it to clients), the request's enhancer options, its
    state and progress. ``cancel`` stops its run; ``done`` is set once it has finished."""

    id: str
    folder: Path
    input: str
    source: dict[str, Any]
    options: dict[str, Any]
    state: str = "queued"
    created: str = field(default_factory=_now)
    started: str | None = None
    finished: str | None = None
    error: str | None = None
    progress: dict[str, Any] = field(default_factory=_no_progress)
    stop_reason: str | None = None  # "canceled", "closing" or "quota": who set ``cancel``
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def url(self) -> str:
        return f"/v1/jobs/{self.id}"

    @property
    def output(self) -> Path:
        return self.folder / OUTPUT_FILE

    def input_spec(self) -> str:
        """What the engine opens."""
        if self.source["kind"] == "upload":
            return str(self.folder / self.input)
        return self.input

    def public(self, message: str) -> str:
        """``message`` with the job's files named as its client knows them: no path of the
        spool or the source folder, no credentials of a URL."""
        source = self.source
        name = source.get("filename") or source.get("path") or source.get("url") or "the upload"
        message = message.replace(self.input_spec(), name).replace(str(self.output), OUTPUT_FILE)
        return message.replace(f"{self.folder}{os.sep}", "")

    def stop(self, reason: str) -> None:
        """End the run early; the first reason given is the one that counts."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.cancel.set()

    def record(self) -> dict[str, Any]:
        """What job.json holds: the view and what the runner needs to run it again."""
        return {**self.view(), "input": self.input}

    def view(self) -> dict[str, Any]:
        """What clients see."""
        has_result = self.state in FINISHED and self.output.is_file()
        return {
            "id": self.id,
            "state": self.state,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "progress": self.progress,
            "error": self.error,
            "cancel_requested": self.stop_reason == "canceled",
            "options": self.options,
            "source": self.source,
            "result": f"{self.url}/result" if has_result else None,
        }

    @classmethod
    def from_record(cls, folder: Path, record: dict[str, Any]) -> Job:
        """A job read back from its job.json; ValueError for one that is not ours."""
        if record["id"] != folder.name or record["state"] not in JOB_STATES:
            raise ValueError("not a job record of this folder")
        if record["source"]["kind"] == "upload" and Path(record["input"]).name != record["input"]:
            raise ValueError("an upload outside its folder")
        fields = ("state", "created", "started", "finished", "error", "progress")
        return cls(
            id=record["id"],
            folder=folder,
            input=record["input"],
            source=dict(record["source"]),
            options=dict(record["options"]),
            **{name: record[name] for name in fields},
        )


class JobManager:
    """The jobs of a service: their routes, their folders in the spool, the runner thread."""

    def __init__(self, service):
        self.service = service
        self.root = Path(service.spool).absolute() / "jobs"
        self._jobs: dict[str, Job] = {}
        self._queue: collections.deque[Job] = collections.deque()
        self._lock = threading.Condition()  # guards the above, the states and job.json writes
        self._closing = False
        self._running: Job | None = None
        self._thread: threading.Thread | None = None

    # --- the manager protocol ----------------------------------------------------------------

    def start(self) -> None:
        """Find the spool's jobs (see the module's docstring) and start the runner."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock:
            for job in self._found():
                if job.state == "running":  # the server died during it
                    job.state, job.error, job.finished = "failed", INTERRUPTED, _now()
                    self._save(job)
                if job.state == "queued":
                    self._queue.append(job)
                else:
                    job.done.set()
                self._jobs[job.id] = job
        self._count()
        self._thread = threading.Thread(target=self._run_queue, name="jobs", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the running job (it fails as interrupted, its output finished); queued ones stay
        queued in their job.json for the next start."""
        with self._lock:
            self._closing = True
            if self._running is not None:
                self._running.stop("closing")
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()

    def routes(self) -> list[BaseRoute]:
        """The endpoints, for ``app.build_app`` (which sets ``app.state.service``)."""
        return [
            Route("/v1/jobs", create_job, methods=["POST"]),
            Route("/v1/jobs", list_jobs, methods=["GET"]),
            Route("/v1/jobs/{id}", show_job, methods=["GET"]),
            Route("/v1/jobs/{id}", delete_job, methods=["DELETE"]),
            Route("/v1/jobs/{id}/result", job_result, methods=["GET"]),
        ]

    # --- what the endpoints ask ----------------------------------------------------------------

    def find(self, job_id: str) -> Job:
        """The job of ``job_id``; 404 for an unknown one or one that is no job id at all (the
        id is checked before it names anything)."""
        job = self._jobs.get(job_id) if ID_PATTERN.fullmatch(job_id) else None
        if job is None:
            raise HttpError(404, "no such job")
        return job

    def jobs(self) -> list[Job]:
        """Every job, oldest first."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda job: job.created)

    def cancel(self, job: Job) -> str:
        """Cancel a queued job (at once) or a running one (its run ends, its output finished);
        forget a finished one (its folder is the caller's to remove). Returns the state it had."""
        with self._lock:
            state = job.state
            if state == "queued":
                self._queue.remove(job)
                job.stop("canceled")
                self._set(job, "canceled", finished=_now())
            elif state == "running":
                job.stop("canceled")
            elif self._jobs.pop(job.id, None) is not None:
                self._count()
        return state

    # --- submitting --------------------------------------------------------------------------

    def refuse_when_full(self) -> None:
        """503 with Retry-After when ``limits.max_jobs`` jobs are queued or running, or the
        service is shutting down."""
        with self._lock:
            active = sum(job.state in ACTIVE for job in self._jobs.values())
            if self._closing:
                raise HttpError(503, "the service is shutting down")
        if active >= self.service.limits.max_jobs:
            message = f"{active} jobs are queued or running, the most this server takes"
            raise busy(message, RETRY_AFTER_S)

    def _room(self, declared: int) -> int:
        """The spool's bytes left; 507 when ``declared`` more bytes would go over the quota."""
        quota = self.service.limits.spool_quota_bytes
        used = spool_bytes(self.service.spool)
        if used + declared > quota:
            raise HttpError(507, f"the spool is full ({used} of {quota} bytes used)")
        return quota - used

    async def receive(self, request: Request) -> Job:
        """A job on a multipart upload, streamed into its folder: 413 over
        ``limits.max_video_bytes``, 507 over the spool's quota, 400 for bad options."""
        limits = self.service.limits
        refuse_oversized(request, limits.max_video_bytes)
        room = self._room(content_length(request) or 0)
        # A chunked upload declares nothing: it is cut where it would cross the quota.
        cap = min(limits.max_video_bytes, room)
        job_id = new_id()
        folder = self.root / job_id
        try:
            upload = await receive_upload(request, folder / UPLOAD_FILE, max_bytes=cap)
            options = dict(upload.fields)
            self.service.request_enhancer(options)  # a bad option is a 400 now, not a failed job
            suffix = Path(upload.filename).suffix.lower()
            name = "input" + (suffix if suffix in VIDEO_EXTENSIONS else ".mp4")
            os.replace(upload.path, folder / name)
        except BaseException as error:
            shutil.rmtree(folder, ignore_errors=True)
            quota_cut = cap < limits.max_video_bytes
            if isinstance(error, HttpError) and error.status == 413 and quota_cut:
                raise HttpError(507, f"the upload is over the spool's {room} bytes left") from None
            raise
        source = {"kind": "upload", "filename": upload.filename[:255], "bytes": upload.size}
        return Job(id=job_id, folder=folder, input=name, source=source, options=options)

    def from_json(self, body: Any) -> Job:
        """A job on a JSON request's ``source`` and ``options``; 400/403 for what it may not
        read, 507 when the spool is full."""
        if not isinstance(body, dict) or not isinstance(body.get("source"), str):
            raise HttpError(400, 'send {"source": "FILE or URL", "options": {...}}')
        unknown = sorted(set(body) - set(JSON_KEYS))
        if unknown:
            raise HttpError(400, f"unknown field(s): {', '.join(unknown)}")
        options = body.get("options", {})
        if not isinstance(options, dict):
            raise HttpError(400, "options must be an object")
        self.service.request_enhancer(options)
        spec, source = self._source(body["source"])
        self._room(0)
        job_id = new_id()
        folder = self.root / job_id
        folder.mkdir(parents=True)
        return Job(id=job_id, folder=folder, input=spec, source=source, options=options)

    def _source(self, spec: str) -> tuple[str, dict[str, Any]]:
        """What the engine will open for a JSON job's ``source``, and its description."""
        if is_webcam(spec):
            raise HttpError(400, "a camera is a live stream: start it with POST /v1/streams")
        scheme = url_scheme(spec)
        if scheme:
            if scheme not in CONNECTING_INPUT_SCHEMES:
                known = ", ".join(f"{s}://" for s in CONNECTING_INPUT_SCHEMES)
                raise HttpError(400, f"a job's source URL may be {known}, not {scheme}://")
            return spec, {"kind": "url", "url": redacted(spec)}
        path = source_file(spec, self.service.limits.source_dir)
        relative = path.relative_to(Path(self.service.limits.source_dir).resolve())
        return str(path), {"kind": "file", "path": relative.as_posix()}

    def submit(self, job: Job) -> None:
        """Queue a job received or described; 503 when ``limits.max_jobs`` are queued or
        running (its folder is removed then)."""
        try:
            with self._lock:
                self.refuse_when_full()  # again, under the lock: others came in meanwhile
                self._jobs[job.id] = job
                self._queue.append(job)
                self._save(job)
                self._lock.notify_all()
        except BaseException:
            self._jobs.pop(job.id, None)
            shutil.rmtree(job.folder, ignore_errors=True)
            raise
        self._count()

    # --- running -----------------------------------------------------------------------------

    def _run_queue(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._lock.wait()
                if self._closing:
                    return
                job = self._running = self._queue.popleft()
                self._set(job, "running", started=_now())
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._running = None

    def _run(self, job: Job) -> None:
        error = None
        try:
            self._enhance(job)
        except UserError as failure:  # the input, the output, the options: one line
            error = job.public(str(failure))
        except HttpError as failure:  # options a restarted server no longer takes
            error = failure.message
        except Exception as failure:
            log.exception("job %s failed", job.id)
            error = f"internal error ({type(failure).__name__}); the server's log has the details"
        if error is None and job.stop_reason in ("closing", "quota"):
            error = INTERRUPTED if job.stop_reason == "closing" else QUOTA_REACHED
        state = "failed" if error else "canceled" if job.stop_reason else "succeeded"
        with self._lock:
            self._set(job, state, finished=_now(), error=error)
        if job.source["kind"] == "upload":  # a finished job is never run again: its upload goes
            with contextlib.suppress(OSError):
                os.unlink(job.input_spec())

    def _enhance(self, job: Job) -> RunStats:
        enhancer = self.service.request_enhancer(job.options)
        spec = job.input_spec()
        if job.source["kind"] == "file":  # again: a restart may find another --source-dir
            source_file(spec, self.service.limits.source_dir)
        base = self.service.config
        config = replace(
            base,
            input=spec,
            output=str(job.output),
            quiet=True,
            # The service's own face log is not every job's.
            extras=replace(base.extras, faces_json=None, save_faces=None),
        )
        total = _frames_of(config)
        job.progress = {**_no_progress(), "frames_total": total}
        return enhance_video(
            config,
            enhancer,
            console=Console(file=io.StringIO()),
            observers=[JobProgress(job, total, checkpoint=self._checkpoint)],
            stop=job.cancel,
            device_lock=self.service.device_lock,
        )

    def _checkpoint(self, job: Job) -> None:
        """About once a second during a run: progress to job.json, the spool to its quota."""
        with self._lock:
            self._save(job)
        if spool_bytes(self.service.spool) > self.service.limits.spool_quota_bytes:
            log.warning("job %s: the spool reached its quota; stopping it", job.id)
            job.stop("quota")

    # --- state -------------------------------------------------------------------------------

    def _set(self, job: Job, state: str, **changes: Any) -> None:
        """A new state, written to job.json at once (the lock is held)."""
        job.state = state
        for name, value in changes.items():
            setattr(job, name, value)
        self._save(job)
        if state in FINISHED:
            job.done.set()
        self._count()

    def _save(self, job: Job) -> None:
        # Under the lock: the record is taken and written by one thread at a time, so the last
        # write holds the newest state. A full disk must not fail the run: logged only.
        try:
            with atomic_path(job.folder / JOB_FILE) as temp:
                temp.write_text(json.dumps(job.record(), indent=1))
        except UserError as error:
            log.warning("job %s: %s", job.id, error)

    def _count(self) -> None:
        with self._lock:
            counts = collections.Counter(job.state for job in self._jobs.values())
        for state in JOB_STATES:
            self.service.metrics.jobs.labels(state=state).set(counts[state])

    def _found(self) -> list[Job]:
        """The jobs of the spool, oldest first."""
        jobs = []
        for folder in sorted(self.root.iterdir()):
            if not ID_PATTERN.fullmatch(folder.name) or not folder.is_dir():
                continue
            record = folder / JOB_FILE
            if not record.exists():  # an upload the server stopped during: nobody knows of it
                shutil.rmtree(folder, ignore_errors=True)
                continue
            for name in (JOB_FILE, OUTPUT_FILE):
                remove_stale(folder / name)  # temporary files of a server that was killed
            try:
                jobs.append(Job.from_record(folder, json.loads(record.read_text())))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                log.warning("%s: not a readable job (%s); left alone", folder, error)
        return sorted(jobs, key=lambda job: job.created)


# --- the endpoints (module functions: the app documents them, their docstrings in OpenAPI) --


def _manager(request: Request) -> JobManager:
    return request.app.state.service.jobs


async def create_job(request: Request) -> Response:
    """Start a video job, answered at once (202, the job, ``Location: /v1/jobs/{id}``).

    Either a multipart/form-data upload: a ``file`` part (the video) and, optionally, the fields
    blend, upscale, only_center_face, mask; or application/json: ``{"source": ..., "options":
    {...}}`` where the source is a file of the server's source folder (when its operator names
    one) or an ``rtsp(s)://``, ``rtmp(s)://`` or ``http(s)://`` URL (a live one runs until
    canceled). 413 for an upload over the limit, 507 over the spool's quota, 503 (Retry-After)
    when the queue is full."""
    manager = _manager(request)
    manager.refuse_when_full()
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind == "multipart/form-data":
        job = await manager.receive(request)
    else:
        job = manager.from_json(await read_json(request))
    manager.submit(job)
    return json_response(job.view(), status=202, headers={"Location": job.url})


async def list_jobs(request: Request) -> Response:
    """Every job, oldest first, as ``GET /v1/jobs/{id}`` shows it."""
    return json_response({"jobs": [job.view() for job in _manager(request).jobs()]})


async def show_job(request: Request) -> Response:
    """A job: its state (queued, running, succeeded, failed, canceled), progress (frames_done,
    frames_total, fps, eta_s), error, options, source, and its result's URL once there is one."""
    return json_response(_manager(request).find(request.path_params["id"]).view())


async def job_result(request: Request) -> Response:
    """The output video (MP4; Range requests honoured); 409 until the job has finished with
    one. A canceled or failed job's output holds the frames written before it stopped."""
    job = _manager(request).find(request.path_params["id"])
    if job.state not in FINISHED:
        raise HttpError(409, f"the job is {job.state}: its result comes when it ends")
    if not job.output.is_file():
        raise HttpError(409, f"the job {job.state} without an output")
    return FileResponse(job.output, media_type="video/mp4", filename=f"job-{job.id}.mp4")


async def delete_job(request: Request) -> Response:
    """Cancel a queued or running job: 200 with the job once canceled (its output, the frames
    so far, kept and playable), 202 while a running one is still finishing it. A finished job
    is removed with its files: 204."""
    manager = _manager(request)
    job = manager.find(request.path_params["id"])
    state = manager.cancel(job)
    if state in FINISHED:
        await anyio.to_thread.run_sync(shutil.rmtree, job.folder, True)
        return Response(status_code=204)
    await anyio.to_thread.run_sync(job.done.wait, CANCEL_WAIT_S)
    return json_response(job.view(), status=200 if job.done.is_set() else 202)


class JobProgress:
    """An observer: a job's frames done, fps and ETA after each written frame, and a checkpoint
    (job.json, the quota) about once a second."""

    def __init__(self, job: Job, total: int | None, *, checkpoint):
        self.job, self.total, self.checkpoint = job, total, checkpoint
        self._last = float("-inf")

    def observe(self, packet: FramePacket, stats: RunStats) -> None:
        done, fps, total = stats.frames_out, stats.fps, self.total
        eta = max(0.0, (total - done) / fps) if total and fps > 0 else None
        self.job.progress = {
            "frames_done": done,
            "frames_total": total,
            "fps": round(fps, 2),
            "eta_s": None if eta is None else round(eta, 1),
        }
        now = time.monotonic()
        if now - self._last >= CHECKPOINT_S:
            self._last = now
            self.checkpoint(self.job)


def source_file(spec: str, source_dir: Path | None) -> Path:
    """The file of ``source_dir`` a job's ``source`` names (relative to it, or absolute inside
    it), resolved: 403 when the server takes no paths, 400 for one that leads outside the folder
    (``..``, a symlink) or to no regular file."""
    if source_dir is None:
        raise HttpError(403, "this server reads no files of its own: upload the video instead")
    root = Path(source_dir).resolve()
    try:
        path = (root / spec).resolve()
        inside = path.is_relative_to(root) and path != root
        regular = inside and path.is_file()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a symlink loop
        raise HttpError(400, "the source is not a usable file name") from None
    if not inside:
        raise HttpError(400, "the source must be a file inside the server's source folder")
    if not regular:
        raise HttpError(400, f"no such file in the source folder: {spec}")
    return path


def _frames_of(config: RunConfig) -> int | None:
    """The frames the job's video holds, as the engine's source counts them (None unknown).
    A live source (a camera's URL) is refused: it would hold the one runner for ever, and the
    jobs queued behind it; it is a stream's work."""
    with open_video_source(config) as source:
        if source.is_live:
            raise UserError("the source is live: start it as a stream (POST /v1/streams)")
        return source.frame_count


def spool_bytes(spool: Path) -> int:
    """The bytes of every file under ``spool`` (uploads, outputs being written, results)."""
    total = 0
    for folder, _, names in os.walk(spool):
        for name in names:
            with contextlib.suppress(OSError):  # removed meanwhile
                total += os.lstat(os.path.join(folder, name)).st_size
    return total
