"""The service's state: one enhancer on one device, shared by image requests, jobs and streams.

``Service`` owns what every endpoint needs: the run configuration ``streamgpen serve`` was started
with (the requests' defaults), the enhancer (its models loaded once), the device lock every user
of the enhancer holds while it runs (the image batcher per round, a job's or a stream's engine per
chunk), the metrics, the spool folder and the limits. Routes live with their managers
(``images``, ``jobs``, ``streams``); ``app.build_app`` joins them.
"""

from __future__ import annotations

import re
import secrets
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from streamgpen.config import MaskKind, RunConfig, ServiceLimits
from streamgpen.enhancer import Enhancer
from streamgpen.errors import UserError
from streamgpen.service.metrics import Metrics
from streamgpen.web.responses import HttpError

# The ids of jobs, streams and uploads: 64 random bits as hex, checked before a path is made.
ID_PATTERN = re.compile(r"[0-9a-f]{16}")


def new_id() -> str:
    """A fresh id for a job, a stream or an upload (``ID_PATTERN``)."""
    return secrets.token_hex(8)


# What a request may change: the paste, not the models (loaded once for every request).
REQUEST_OPTIONS = ("blend", "upscale", "only_center_face", "mask")


class FairLock:
    """A lock granted in the order it was asked for (a ticket lock).

    ``threading.Lock`` is not: a video job that releases it after a chunk and asks again at once
    mostly wins it back, and a photo waited 7-9 s behind a job on a 2-core CPU (chunks of ~2 s)
    where it now waits one chunk at most. Not reentrant.
    """

    def __init__(self) -> None:
        self._turn = threading.Condition()
        self._issued = 0  # tickets given out
        self._serving = 0  # the ticket whose holder has the lock

    def __enter__(self) -> FairLock:
        with self._turn:
            ticket = self._issued
            self._issued += 1
            self._turn.wait_for(lambda: self._serving == ticket)
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._turn:
            self._serving += 1
            self._turn.notify_all()

    def locked(self) -> bool:
        """Whether someone holds it (or waits for it)."""
        with self._turn:
            return self._issued != self._serving


class Service:
    """The enhancer, its device lock, the figures, the spool and the managers of the work."""

    def __init__(
        self,
        *,
        config: RunConfig,
        enhancer: Enhancer,
        spool: Path,
        limits: ServiceLimits = ServiceLimits(),
        token: str | None = None,
    ):
        from streamgpen.service.batcher import FaceBatcher
        from streamgpen.service.jobs import JobManager
        from streamgpen.service.streams import StreamManager

        self.config = config
        self.enhancer = enhancer
        self.spool = Path(spool)
        self.limits = limits
        self.token = token
        # Held by whoever runs the enhancer: the restorer's CUDA graphs have static buffers and
        # the models one set of weights, so one user at a time; each holds it per round or chunk,
        # in the order they asked.
        self.device_lock = FairLock()
        self.metrics = Metrics()
        self.batcher = FaceBatcher(self)
        self.jobs = JobManager(self)
        self.streams = StreamManager(self)

    def start(self) -> Service:
        """Start the device worker, find the spool's jobs, run queued ones."""
        self.spool.mkdir(parents=True, exist_ok=True)
        # Photo uploads are scratch: whatever a killed server left there is of no request now.
        shutil.rmtree(self.spool / "uploads", ignore_errors=True)
        self.batcher.start()
        self.jobs.start()
        self.streams.start()
        return self

    def close(self) -> None:
        """Stop streams and jobs (their outputs finalised) and the device worker."""
        self.streams.close()
        self.jobs.close()
        self.batcher.close()

    def request_enhancer(self, options: Mapping[str, Any]) -> Enhancer:
        """The enhancer with a request's overrides of ``REQUEST_OPTIONS`` (strings from a form
        or JSON values); ``HttpError(400)`` names a bad or unknown one."""
        unknown = set(options) - set(REQUEST_OPTIONS)
        if unknown:
            raise HttpError(400, f"unknown option(s): {', '.join(sorted(unknown))}")
        if not options:
            return self.enhancer
        parsed = _parsed(options)
        if parsed.get("upscale", 1.0) > self.limits.max_upscale:
            raise HttpError(400, f"upscale may be at most {self.limits.max_upscale:g} here")
        try:
            return self.enhancer.with_options(**parsed)
        except UserError as error:
            raise HttpError(400, str(error)) from None


def _parsed(options: Mapping[str, Any]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for key, value in options.items():
        try:
            if key in ("blend", "upscale"):
                parsed[key] = _number(key, value)
            elif key == "only_center_face":
                parsed[key] = _flag(key, value)
            else:
                parsed[key] = MaskKind(str(value))
        except ValueError as error:
            raise HttpError(400, str(error) or f"bad {key}") from None
    return parsed


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{key} must be a number")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{key} must be a number") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"{key} must be a finite number")
    return number


def _flag(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{key} must be true or false")
