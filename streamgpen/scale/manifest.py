"""An archive job's state on disk, so that rerunning the same command resumes it.

Each output video has a folder ``OUT_DIR/.streamgpen-job/NAME/`` holding its finished segment
files and ``manifest.json``: what the work is (the source's size and modification time, the
run's settings, the segment plan) and which segments are finished (their frames and bytes).
Only the driver writes it, atomically (``files.atomic_path``), after each segment a worker
finished. A rerun reuses the segments it lists when the work is the same, and starts the video
over otherwise; a video already joined is skipped while its output is the one recorded. The
folders are removed when the whole job has succeeded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from streamgpen.errors import UserError
from streamgpen.files import atomic_path, describe_os_error

JOB_DIR = ".streamgpen-job"
MANIFEST = "manifest.json"
VERSION = 1


def settings_key(*parts: object) -> str:
    """A short digest of what determines a segment's content (the run's settings, the plan's
    policy, the package version): a manifest made under other settings is not reused."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def job_folder(output: str) -> Path:
    """Where the segments and manifest of ``output`` live."""
    path = Path(output)
    return path.parent / JOB_DIR / path.name


@dataclass(kw_only=True)
class Manifest:
    """One output video's job: ``work`` (what must match to resume), ``finished`` segments
    (number -> {frames, size, worker}), and ``output`` ({size, mtime_ns}) once joined."""

    folder: Path
    work: dict
    finished: dict[int, dict] = field(default_factory=dict)
    output: dict | None = None

    @classmethod
    def open(cls, output: str, source: str, settings: str, plan: Sequence[tuple]) -> Manifest:
        """The manifest of ``output``: the one on disk when it describes the same work (its
        finished segments still there), else a fresh one (the old folder is emptied)."""
        stat = os.stat(source)
        work = {
            "version": VERSION,
            "source": os.path.abspath(source),
            "source_size": stat.st_size,
            "source_mtime_ns": stat.st_mtime_ns,
            "settings": settings,
            "plan": [list(bounds) for bounds in plan],
        }
        folder = job_folder(output)
        saved = _read(folder / MANIFEST)
        if saved is not None and saved.get("work") == work:
            manifest = cls(folder=folder, work=work, output=saved.get("output"))
            for number, record in saved.get("finished", {}).items():
                if _intact(manifest.segment_path(int(number), output), record["size"]):
                    manifest.finished[int(number)] = record
            return manifest
        shutil.rmtree(folder, ignore_errors=True)
        manifest = cls(folder=folder, work=work)
        manifest.save()  # the folder the workers write the segments to
        return manifest

    def segment_path(self, number: int, output: str) -> str:
        """The file segment ``number`` of ``output`` is written to (the output's container).
        Hidden, like the folder: a folder walk for videos (an output folder inside the archive)
        must not take segments for inputs."""
        return os.fspath(self.folder / f".segment-{number:05d}{Path(output).suffix}")

    def joined(self, output: str) -> bool:
        """Whether ``output`` is the file this job joined (not replaced or removed since)."""
        if self.output is None:
            return False
        try:
            stat = os.stat(output)
        except OSError:
            return False
        return self.output == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def record_segment(self, number: int, *, frames: int, size: int, worker: int) -> None:
        """Note a finished segment (its frames, bytes and the worker process that made it) and
        save."""
        self.finished[number] = {"frames": frames, "size": size, "worker": worker}
        self.save()

    def record_output(self, output: str) -> None:
        """Note the joined output, save, and remove the segment files (no longer needed)."""
        stat = os.stat(output)
        self.output = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        self.save()
        for number in list(self.finished):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.segment_path(number, output))

    def save(self) -> None:
        """Write the manifest atomically (temporary name, then rename)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create {self.folder}: {describe_os_error(exc)}") from None
        state = {"work": self.work, "finished": self.finished, "output": self.output}
        with atomic_path(self.folder / MANIFEST) as temp:
            temp.write_text(json.dumps(state, indent=1, sort_keys=True))


def remove_job_folders(outputs: Sequence[str]) -> None:
    """Remove the job's folders (after the whole job succeeded): a rerun starts afresh."""
    for output in outputs:
        folder = job_folder(output)
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            folder.parent.rmdir()  # .streamgpen-job, once no other output's folder is left


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _intact(path: str, size: int) -> bool:
    try:
        return os.path.getsize(path) == size
    except OSError:
        return False
