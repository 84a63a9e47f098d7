"""Planning a run of several videos: ``enhance IN1 IN2 ... -o OUT_DIR/`` (files, folders of
videos, stream URLs, webcams, mixed) and ``enhance ARCHIVE_DIR/ -o OUT_DIR/ --ray ...``.

Every input gets its own output before anything opens, so that a clash (two inputs named alike)
or a missing output folder is refused in a moment. A folder stands for the videos in it, found
recursively and sorted, and its layout is kept below the output folder. A live input is named
after its URL's last path part (``rtsp://host/cam3`` -> ``cam3.mp4``) or its webcam number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from streamgpen.errors import UserError
from streamgpen.media.urls import WEBCAM_PREFIX, is_live_input, is_webcam, redacted

# The videos a folder input stands for (read by PyAV: any container libavformat reads; these
# are the names videos go by). Outputs keep their input's container when streamgpen writes it
# (apps.videos.VIDEO_EXTENSIONS), else become .mp4.
VIDEO_INPUT_EXTENSIONS = (".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v", ".ts")
NULL_OUTPUT = "null"


@dataclass(frozen=True, kw_only=True)
class VideoPlan:
    """One input of a run of several: where it is read, where it goes, what it is called."""

    input: str
    output: str
    name: str


def folder_videos(folder: Path) -> list[Path]:
    """The videos below ``folder`` (by extension, recursively), sorted by path; temporary
    files of an interrupted run are not videos."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in VIDEO_INPUT_EXTENSIONS
        and path.is_file()
        and not path.name.startswith(".")
    )


def is_many(specs: tuple[str, ...]) -> bool:
    """Whether the inputs make a run of several videos (more than one input, or a folder
    holding videos) rather than one video or photos."""
    if len(specs) > 1:
        return True
    path = Path(specs[0])
    return not is_live_input(specs[0]) and path.is_dir() and bool(folder_videos(path))


def plan_videos(specs: tuple[str, ...], output: str | None) -> list[VideoPlan]:
    """Each input's output: in the ``output`` folder (``-o DIR/``, created), ``null`` for all,
    or (files only, no ``-o``) beside each input as ``NAME_enhanced``; one video may also go to
    the file ``output`` names."""
    if len(specs) == 1 and not is_many(specs) and not _names_folder(output):
        return [_one(specs[0], output)]
    folder = _output_folder(output)
    plans = [plan for spec in specs for plan in _expand(spec, folder, output)]
    if not plans:
        kinds = ", ".join(VIDEO_INPUT_EXTENSIONS)
        raise UserError(f"no videos in {', '.join(specs)} (looked for {kinds})")
    if output == NULL_OUTPUT:
        plans = [replace(plan, output=NULL_OUTPUT) for plan in plans]
    seen: dict[str, str] = {}
    for plan in plans:
        if plan.output != NULL_OUTPUT and plan.output in seen:
            raise UserError(
                f"{seen[plan.output]} and {plan.name} would both be written to {plan.output}: "
                "give them different names"
            )
        seen[plan.output] = plan.name
    return plans


def _one(spec: str, output: str | None) -> VideoPlan:
    """One video into the file (or URL) ``output``, or beside it."""
    from streamgpen.apps.videos import default_output

    name = redacted(spec) if "://" in spec else spec
    return VideoPlan(input=spec, output=output or default_output(spec), name=name)


def _names_folder(output: str | None) -> bool:
    return output is not None and (output.endswith(("/", "\\")) or Path(output).is_dir())


def _output_folder(output: str | None) -> Path | None:
    if output is None or output == NULL_OUTPUT:
        return None
    path = Path(output)
    if not _names_folder(output):
        raise UserError(
            f"-o {output}: several videos go into a folder (end it with / to create it), or null"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {output}: {e.strerror}") from None
    return path


def _expand(spec: str, folder: Path | None, output: str | None) -> list[VideoPlan]:
    """The plans of one input: a live source, a file, or each video of a folder."""
    if is_live_input(spec) or "://" in spec:
        if folder is None and output != NULL_OUTPUT:
            raise UserError(f"{redacted(spec)}: a live input needs -o (a folder/ or null)")
        return [_plan(spec, Path(f"{_live_name(spec)}.mp4"), folder, redacted(spec))]
    path = Path(spec)
    if not path.exists():
        raise UserError(f"input not found: {spec} (no such file or folder)")
    if path.is_dir():
        return [_plan(str(v), v.relative_to(path), folder, str(v)) for v in folder_videos(path)]
    from streamgpen.media.images import IMAGE_EXTENSIONS

    if path.suffix.lower() in IMAGE_EXTENSIONS:
        raise UserError(f"{spec}: a photo among several inputs; photos go one, or a folder, a run")
    return [_plan(spec, Path(path.name), folder, spec)]


def _plan(spec: str, relative: Path, folder: Path | None, name: str) -> VideoPlan:
    from streamgpen.apps.videos import VIDEO_EXTENSIONS, default_output

    if folder is None:  # a file beside its input; a live input only with -o null
        live = is_live_input(spec) or "://" in spec
        output = NULL_OUTPUT if live else default_output(spec)
        return VideoPlan(input=spec, output=output, name=name)
    if relative.suffix.lower() not in VIDEO_EXTENSIONS:
        relative = relative.with_suffix(".mp4")
    target = folder / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    return VideoPlan(input=spec, output=str(target), name=name)


def _live_name(spec: str) -> str:
    """A file name for a live input: ``webcam0``, or its URL's last path part (or host)."""
    if is_webcam(spec):
        return "webcam" + spec.removeprefix(WEBCAM_PREFIX)
    rest = spec.split("://", 1)[-1].split("?", 1)[0].rstrip("/")
    rest = rest.rsplit("@", 1)[-1]  # no password in a file name
    last = rest.rsplit("/", 1)[-1] if "/" in rest else rest.replace(":", "_")
    return re.sub(r"[^A-Za-z0-9._-]", "_", Path(last).stem or last) or "stream"
