"""The Ray side of an archive job: connecting, the workers, and what their failures mean.

One long-lived actor per GPU of the cluster (``num_gpus=1``), or per CPU without GPUs, holds a
warm enhancer: its models load (and on CUDA its graphs are captured) once, in ``__init__``, and
it enhances segment after segment. A worker process that dies (killed, out of memory, its node
lost) is started again by Ray (``max_restarts``) and the segment it was on is run again there
(``max_task_retries``); an error of the work itself (a ``UserError``: a broken input) is not
retried, it fails that input. Ray is imported here only, and only when ``--ray`` is asked for.
"""

from __future__ import annotations

import os
from dataclasses import replace

from streamgpen.config import RunConfig
from streamgpen.errors import UserError
from streamgpen.scale.work import SegmentJob, SegmentResult, enhance_segment

# A worker process is started again this many times, and a segment it was on is run again as
# often: a segment that kills its worker every time fails its input after that many tries.
MAX_RESTARTS = 3
# Segment calls and progress polls of one worker may run side by side (the driver never sends
# a worker a second segment before the first is done).
WORKER_CONCURRENCY = 2
RAY_MISSING = "--ray needs Ray: pip install streamgpen[ray]"


def require_ray():
    """The ``ray`` module, or one clear UserError line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(RAY_MISSING) from None
    return ray


def connect(where: str) -> bool:
    """Join the cluster ``where`` names: ``local`` starts one on this machine (all its CPUs and
    GPUs), ``auto`` finds a running one (``ray start --head``; RAY_ADDRESS), anything else is a
    cluster's address. An already initialised Ray (a caller's) is used as it is. Returns
    whether this call started the connection (the caller then shuts it down)."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    # The workers' logs stay in Ray's log folder: failures come back as one line per input.
    options = {"log_to_driver": False, "logging_level": "warning"}
    try:
        if where == "local":
            ray.init(address="local", include_dashboard=False, **options)
        else:
            ray.init(address=where, **options)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise UserError(f"cannot reach the Ray cluster {where!r}: {exc}") from None
    return True


def worker_slots(config: RunConfig) -> tuple[int, dict]:
    """How many workers the cluster holds and each one's resources: one per GPU, or per CPU
    when the cluster has no GPU or ``--device cpu`` was asked for."""
    ray = require_ray()
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus and config.enhancer.device != "cpu":
        return gpus, {"num_gpus": 1, "num_cpus": 1}
    return max(1, int(resources.get("CPU", 1))), {"num_cpus": 1}


def start_workers(config: RunConfig, count: int, resources: dict) -> list:
    """``count`` workers, each with ``resources``, once every one has loaded its enhancer.
    Raises UserError with a worker's own message when its models cannot be loaded."""
    ray = require_ray()
    actor = ray.remote(
        max_restarts=MAX_RESTARTS,
        max_task_retries=MAX_RESTARTS,
        max_concurrency=WORKER_CONCURRENCY,
        **resources,
    )(SegmentWorker)
    quiet = replace(config, quiet=True)  # no download bars in the workers' logs
    workers = [actor.remote(quiet) for _ in range(count)]
    for error in ray.get([worker.ready.remote() for worker in workers]):
        if error is not None:
            stop_workers(workers)
            raise UserError(error)
    return workers


def stop_workers(workers: list) -> None:
    """End the workers (their models are freed; nothing is restarted)."""
    ray = require_ray()
    for worker in workers:
        ray.kill(worker, no_restart=True)


def failure(exc: BaseException) -> str:
    """What went wrong with a segment, in one line: the work's own error, its worker's end, or
    the driver's (a join that failed)."""
    ray = require_ray()
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause
        if isinstance(cause, UserError):
            return str(cause)
        return f"{type(cause).__name__}: {cause}"
    if isinstance(exc, ray.exceptions.RayActorError):
        return f"its worker died {MAX_RESTARTS + 1} times on the same segment"
    if isinstance(exc, UserError):
        return str(exc)  # the driver's own (a join)
    return f"{type(exc).__name__}: {exc}"


class SegmentWorker:
    """A Ray actor (made one by :func:`start_workers`): a warm enhancer that enhances segments.

    ``__init__`` keeps a failure to load the models as ``error``, which ``ready`` returns, so the
    driver shows it as one line rather than a remote traceback."""

    def __init__(self, config: RunConfig):
        from streamgpen.apps.enhance import load_enhancer

        self.config = config
        self.written = 0  # frames of the current segment written (read by progress polls)
        self.enhancer, self.error = None, None
        try:
            self.enhancer = load_enhancer(config)
        except UserError as exc:
            self.error = str(exc)
            return
        if self.enhancer.device.type == "cpu":
            import torch

            # One CPU per worker: more threads would fight the other workers for the cores.
            torch.set_num_threads(1)
        else:
            self.enhancer.restorer.warmup()  # CUDA graphs captured once per worker

    def ready(self) -> str | None:
        """None once the enhancer is loaded; the reason it could not be, otherwise."""
        return self.error

    def pid(self) -> int:
        """This worker's process id."""
        return os.getpid()

    def progress(self) -> int:
        """Frames of the current segment written so far."""
        return self.written

    def run(self, job: SegmentJob) -> SegmentResult:
        """Enhance one segment into its file."""
        self.written = 0
        return enhance_segment(self.config, self.enhancer, job, on_written=self._count)

    def _count(self, frames: int) -> None:
        self.written = frames
