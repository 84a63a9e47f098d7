"""``streamgpen eval``: how good and how steady an enhancement is, in the figures papers report.

Photos (``eval OUT --reference HQ``): PSNR, SSIM and LPIPS (:mod:`streamgpen.quality.images`) of
each output against its ground truth, matched by name: the path below the folder without its
extension (``a/b.png`` matches ``a/b.jpg``; with ``--suffix X``, ``a/b_X.png`` matches too). Files
on one side only are listed and counted, and a pair of different sizes or an unreadable file is
one line on stderr and skipped; none of that is fatal unless no pair is left. Two files make one
pair whatever their names.

Videos (``eval OUT --source IN``): the temporal figures of :mod:`streamgpen.quality.temporal`,
which need no ground truth. Frames are paired in decode order (enhance writes one output frame per
input frame); the clips must have as many frames. An upscaled output is resized (area filter) to
the source's size, so every figure is in source pixels and comparable with the source's own. The
face regions come from ``--faces-json`` (enhance's face log) or from tracking the source with the
project's tracker, as enhance would with the same detector options.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text

from streamgpen.config import DetectorConfig
from streamgpen.errors import UserError
from streamgpen.files import atomic_path
from streamgpen.media.images import is_image_path, iter_folder, read_photo
from streamgpen.media.video import Frame, VideoSource, open_source
from streamgpen.progress import stderr_console, task_bar
from streamgpen.quality.temporal import (
    MASK_THRESHOLD,
    PASTE_SCALE,
    FrameFigures,
    Spread,
    TemporalMeter,
    spread,
    track_jitter,
)
from streamgpen.runtime.device import resolve_device

if TYPE_CHECKING:
    from streamgpen.quality.images import ImageScores, Lpips

log = logging.getLogger(__name__)

# How many names a "no match" line lists before "and N more" (the JSON report has them all).
LISTED_NAMES = 10
# Output and source frames whose width/height ratios differ by more than this are not one picture.
ASPECT_TOLERANCE = 0.02


def write_json(report: dict, path: Path) -> None:
    """The report as JSON at ``path``, written atomically."""
    with atomic_path(Path(path)) as temp:
        temp.write_text(json.dumps(report, indent=1) + "\n")


def _rounded(value: float | None, digits: int) -> float | None:
    """A figure for the JSON report: None stays None, and so does an infinite PSNR."""
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


# --- photos ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Pairing:
    """Outputs matched to references: ``pairs`` (name, output, reference), the names found on one
    side only, and names that two files of one side share (``a.png`` and ``a.jpg``)."""

    pairs: list[tuple[str, Path, Path]]
    outputs_only: list[str] = field(default_factory=list)
    references_only: list[str] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)


def _by_name(root: Path, suffix: str | None) -> tuple[dict[str, Path], set[str]]:
    """The images below ``root`` by their matching name (relative path without extension, and
    without ``_SUFFIX``), and the names more than one file has."""
    found: dict[str, Path] = {}
    twice: set[str] = set()
    for path in iter_folder(root):
        name = path.relative_to(root).with_suffix("").as_posix()
        if suffix and name.endswith(f"_{suffix}"):
            name = name.removesuffix(f"_{suffix}")
        if name in found:
            twice.add(name)
        found[name] = path
    return found, twice


def pair_photos(output: Path, reference: Path, suffix: str | None = None) -> Pairing:
    """Match the outputs to their references: two files, or two folders matched by name."""
    for path, what in ((output, "output"), (reference, "reference")):
        if not path.exists():
            raise UserError(f"{what} not found: {path}")
    if output.is_file() and reference.is_file():
        for path in (output, reference):
            if not is_image_path(path):
                raise UserError(f"{path}: not an image file (eval compares photos or folders)")
        return Pairing(pairs=[(output.stem, output, reference)])
    if not (output.is_dir() and reference.is_dir()):
        raise UserError(f"give two image files or two folders ({output}, {reference})")
    outputs, outputs_twice = _by_name(output, suffix)
    references, references_twice = _by_name(reference, suffix)
    ambiguous = sorted(outputs_twice | references_twice)
    common = sorted(set(outputs) & set(references) - set(ambiguous))
    return Pairing(
        pairs=[(name, outputs[name], references[name]) for name in common],
        outputs_only=sorted(set(outputs) - set(references) - set(ambiguous)),
        references_only=sorted(set(references) - set(outputs) - set(ambiguous)),
        ambiguous=ambiguous,
    )


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:LISTED_NAMES])
    more = len(names) - LISTED_NAMES
    return shown + (f" and {more} more" if more > 0 else "")


def _warn_unpaired(pairing: Pairing) -> None:
    """One line on stderr per kind of file left without a partner."""
    if pairing.outputs_only:
        count = len(pairing.outputs_only)
        log.warning("%d output(s) without a reference: %s", count, _names(pairing.outputs_only))
    if pairing.references_only:
        count = len(pairing.references_only)
        log.warning("%d reference(s) without an output: %s", count, _names(pairing.references_only))
    if pairing.ambiguous:
        count = len(pairing.ambiguous)
        log.warning(
            "%d name(s) shared by two files of one side, skipped: %s",
            count,
            _names(pairing.ambiguous),
        )


def _read_pair(output: Path, reference: Path) -> tuple[np.ndarray, np.ndarray]:
    """Both images' colour (BGR, the file's depth); UserError when unreadable or sizes differ."""
    out, ref = read_photo(output).color, read_photo(reference).color
    if out.shape != ref.shape:
        raise UserError(
            f"{output}: {out.shape[1]}x{out.shape[0]}, its reference {reference}: "
            f"{ref.shape[1]}x{ref.shape[0]} (sizes differ)"
        )
    return out, ref


def _score_pairs(
    pairing: Pairing, lpips: Lpips | None, quiet: bool
) -> tuple[list[dict], list[dict]]:
    """Each pair's figures, and the pairs skipped (a user error of one pair, of many: a line)."""
    from streamgpen.quality.images import score

    rows, skipped = [], []
    single = len(pairing.pairs) == 1 and not (pairing.outputs_only or pairing.references_only)
    bar = task_bar(console=stderr_console(), disable=quiet or single)
    task = bar.add_task("photos", total=len(pairing.pairs), info="")
    with bar:
        for name, output, reference in pairing.pairs:
            bar.update(task, advance=1, info=name)
            try:
                out, ref = _read_pair(output, reference)
            except UserError as e:
                if single:
                    raise
                log.warning("%s: skipped", e)
                skipped.append({"name": name, "reason": str(e)})
                continue
            rows.append(_image_row(name, output, reference, score(out, ref, lpips)))
    return rows, skipped


def _image_row(name: str, output: Path, reference: Path, scores: ImageScores) -> dict:
    return {
        "name": name,
        "output": str(output),
        "reference": str(reference),
        "psnr": _rounded(scores.psnr, 4),
        "identical": scores.psnr == math.inf,
        "ssim": _rounded(scores.ssim, 6),
        "lpips": _rounded(scores.lpips, 6),
    }


def _photo_summary(rows: list[dict]) -> dict:
    """Means over the pairs (PSNR over those not identical: theirs is infinite)."""

    def mean(key: str) -> float | None:
        values = [row[key] for row in rows if row[key] is not None]
        return round(float(np.mean(values)), 6) if values else None

    return {
        "pairs": len(rows),
        "identical": sum(row["identical"] for row in rows),
        "psnr": mean("psnr"),
        "ssim": mean("ssim"),
        "lpips": mean("lpips"),
    }


def evaluate_photos(
    output: Path,
    reference: Path,
    *,
    suffix: str | None = None,
    lpips_net: str = "alex",
    device: str = "auto",
    quiet: bool = False,
) -> dict:
    """PSNR, SSIM and (weights permitting) LPIPS of the outputs against their references: the
    report as a dict (what ``--json`` writes). UserError when no pair can be measured."""
    pairing = pair_photos(Path(output), Path(reference), suffix)
    _warn_unpaired(pairing)
    if not pairing.pairs:
        raise UserError(f"no output in {output} has a reference of the same name in {reference}")
    # torchvision and torchmetrics (2 s to import) once the files are known to be there.
    from streamgpen.quality.images import load_lpips, lpips_status

    lpips, status = load_lpips(lpips_status(lpips_net), resolve_device(device))
    rows, skipped = _score_pairs(pairing, lpips, quiet)
    if status.reason:  # after the pairs: a single pair's error stays the one line
        log.warning("%s", status.reason)
    if not rows:
        raise UserError(f"none of the {len(pairing.pairs)} pair(s) could be measured")
    return {
        "kind": "photos",
        "output": str(output),
        "reference": str(reference),
        "conventions": "RGB in [0, 1] from the file's depth; PSNR in dB (identical: null, left "
        "out of the mean); SSIM Gaussian 11/1.5; LPIPS lower is closer",
        "lpips": {"net": lpips_net, "available": status.available, "reason": status.reason},
        "summary": _photo_summary(rows),
        "images": rows,
        "skipped": skipped,
        "outputs_without_reference": pairing.outputs_only,
        "references_without_output": pairing.references_only,
        "ambiguous": pairing.ambiguous,
    }


def _figure(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_photos(report: dict) -> Group:
    """The per-image table with the means as its last row, and what was left out."""
    table = Table(title="photos against references", title_justify="left")
    for column in ("image", "PSNR dB", "SSIM", "LPIPS"):
        table.add_column(column, justify="left" if column == "image" else "right")
    for row in report["images"]:
        psnr = "inf" if row["identical"] else _figure(row["psnr"], 2)
        table.add_row(row["name"], psnr, _figure(row["ssim"], 4), _figure(row["lpips"], 4))
    summary = report["summary"]
    table.add_section()
    table.add_row(
        f"mean of {summary['pairs']}",
        _figure(summary["psnr"], 2),
        _figure(summary["ssim"], 4),
        _figure(summary["lpips"], 4),
    )
    notes = []
    if not report["lpips"]["available"]:
        notes.append("LPIPS not available (why: on stderr)")
    if summary["identical"]:
        notes.append(f"{summary['identical']} identical pair(s): PSNR inf, not in the mean")
    unpaired = len(report["outputs_without_reference"]) + len(report["references_without_output"])
    if unpaired or report["skipped"] or report["ambiguous"]:
        notes.append(f"{unpaired} file(s) unmatched, {len(report['skipped'])} pair(s) skipped")
    return Group(table, Text("; ".join(notes))) if notes else Group(table)


# --- videos ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FaceRecord:
    """One face of one frame, from the face log or the tracker: ``box`` [4], ``landmarks``
    [5, 2] in source pixels, ``track`` (None when the log has none)."""

    track: int | None
    box: np.ndarray
    landmarks: np.ndarray


def _parse_face_line(path: Path, number: int, line: str) -> tuple[int, FaceRecord]:
    """One line of enhance's face log -> (frame index, face); UserError naming the line."""
    where = f"{path}:{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: not a face record (a JSON object per line)")
    if "file" in record:
        raise UserError(f"{path} is a photo face log (give the one of the video's enhance run)")
    try:
        frame, track = record["frame"], record.get("track")
        box = np.asarray(record["box"], dtype=np.float64).reshape(4)
        landmarks = np.asarray(record["landmarks"], dtype=np.float64).reshape(5, 2)
        if not isinstance(frame, int) or not (track is None or isinstance(track, int)):
            raise TypeError("frame and track are integers")
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: not a face record of enhance --faces-json ({e})") from None
    return frame, FaceRecord(track=track, box=box, landmarks=landmarks)


def read_face_log(path: Path) -> dict[int, list[FaceRecord]]:
    """``enhance --faces-json``'s file as frame index -> faces (:mod:`streamgpen.media.facelog`
    writes it); UserError naming the line that is not a face record."""
    faces: dict[int, list[FaceRecord]] = defaultdict(list)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"face log not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the face log ({e})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            frame, face = _parse_face_line(Path(path), number, line)
            faces[frame].append(face)
    return dict(faces)


class SourceFaces:
    """The faces of each source frame: from a face log, or from tracking the source (the
    project's detector and tracker, as enhance runs them)."""

    def __init__(
        self,
        face_log: Path | None,
        *,
        detector: DetectorConfig,
        detect_every: int,
        weights_dir: Path | None,
        device: torch.device,
        quiet: bool,
    ):
        self._log = read_face_log(face_log) if face_log is not None else None
        self._tracker = None
        self.device = device
        if self._log is None:
            from streamgpen.enhancer import build_detector
            from streamgpen.faces.track import Tracker

            found = build_detector(
                detector.name,
                device,
                weights_dir,
                detector.det_size,
                detector.threshold,
                detector.min_face,
                progress=not quiet,
            )
            self._tracker = Tracker(found, detect_every=detect_every)
        self.described = (
            f"face log {face_log}"
            if face_log is not None
            else f"tracking the source ({detector.name}, detect every {detect_every})"
        )

    def of(self, frame: Frame, fps: float) -> list[FaceRecord]:
        """The faces of ``frame`` (frames must come in order when tracking)."""
        if self._log is not None:
            return self._log.get(frame.index, [])
        image = torch.from_numpy(frame.image).to(self.device).permute(2, 0, 1)
        timestamp = frame.time if frame.time is not None else frame.index / fps
        return [
            FaceRecord(track=t.track_id, box=t.face.box, landmarks=t.face.landmarks)
            for t in self._tracker.update(image, timestamp)
        ]


def _check_clips(output: VideoSource, source: VideoSource, frames: int | None) -> None:
    """Refuse live inputs, pictures of other shapes, and (all frames asked for) clips whose
    lengths clearly differ: a partial output is measured with ``frames``."""
    for clip in (output, source):
        if clip.is_live:
            raise UserError(f"{clip.spec}: eval reads video files, not live streams")
        if clip.frame_count is not None and clip.frame_count < 2:
            raise UserError(f"{clip.spec}: {clip.frame_count} frame(s): nothing to measure")
    out_aspect, in_aspect = output.width / output.height, source.width / source.height
    if abs(out_aspect / in_aspect - 1) > ASPECT_TOLERANCE:
        raise UserError(
            f"{output.spec} is {output.width}x{output.height}, its source {source.spec} "
            f"{source.width}x{source.height}: not the same picture"
        )
    counts = (output.frame_count, source.frame_count)
    # Estimated from the duration for some containers: one frame of slack.
    if frames is None and None not in counts and abs(counts[0] - counts[1]) > 1:
        raise UserError(
            f"{output.spec} has {counts[0]} frames, its source {source.spec} {counts[1]} "
            "(eval pairs the frames in order)"
        )


def _paired_frames(
    output: VideoSource, source: VideoSource, frames: int | None
) -> Iterator[tuple[Frame, np.ndarray]]:
    """(source frame, output image at the source's size) in decode order, at most ``frames``;
    UserError when one clip ends before the other."""
    size = (source.width, source.height)
    count = 0
    while frames is None or count < frames:
        src, out = next(source, None), next(output, None)
        if src is None and out is None:
            return
        if src is None or out is None:
            longer, shorter = (output, source) if src is None else (source, output)
            raise UserError(
                f"{shorter.spec} ended after {count} frames, {longer.spec} goes on "
                "(eval pairs the frames in order: give the output of this source)"
            )
        image = out.image
        if image.shape[:2] != src.shape:
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        count += 1
        yield src, image


def _frame_row(frame: Frame, faces: list[FaceRecord], figures: FrameFigures) -> dict:
    return {
        "frame": frame.index,
        "pts": frame.pts,
        "faces": len(faces),
        "warp_output": _rounded(figures.warp_output, 4),
        "warp_source": _rounded(figures.warp_source, 4),
        "mask_change": _rounded(figures.mask_change, 4),
    }


def _measure(
    output: VideoSource, source: VideoSource, faces: SourceFaces, frames: int | None, quiet: bool
) -> tuple[list[dict], dict[int, dict[int, np.ndarray]]]:
    """Every frame's figures, and each track's landmarks (track -> frame -> [5, 2])."""
    meter = TemporalMeter()
    tracks: dict[int, dict[int, np.ndarray]] = defaultdict(dict)
    rows = []
    known = [n for n in (frames, source.frame_count) if n is not None]
    total = min(known) if known else None
    bar = task_bar(console=stderr_console(), disable=quiet, counted=total is not None)
    task = bar.add_task("frames", total=total, info="")
    fps = float(source.fps or 25)
    with bar:
        for frame, image in _paired_frames(output, source, frames):
            found = faces.of(frame, fps)
            boxes = np.array([face.box for face in found], dtype=np.float64).reshape(-1, 4)
            rows.append(_frame_row(frame, found, meter.add(frame.image, image, boxes)))
            for face in found:
                if face.track is not None:
                    tracks[face.track][frame.index] = face.landmarks
            bar.update(task, advance=1, info=f"{len(found)} faces")
    return rows, dict(tracks)


def _spread_dict(values: Spread, digits: int) -> dict:
    return {
        "mean": _rounded(values.mean, digits),
        "p95": _rounded(values.p95, digits),
        "count": values.count,
    }


def _warping_figures(rows: list[dict]) -> dict:
    """The clip's warping errors: means over the frames where both were measured."""
    measured = [r for r in rows if r["warp_output"] is not None and r["warp_source"] is not None]
    out = spread([r["warp_output"] for r in measured])
    src = spread([r["warp_source"] for r in measured])
    ratio = None
    if out.mean is not None and src.mean:
        ratio = out.mean / src.mean
    return {
        "scale": "mean absolute error in 8-bit levels (0-255), face regions, occlusions excluded",
        "output": _spread_dict(out, 4),
        "source": _spread_dict(src, 4),
        "ratio": _rounded(ratio, 4),
    }


def _jitter_figures(tracks: dict[int, dict[int, np.ndarray]]) -> dict:
    """Landmark jitter per track and over all of them (fractions of the inter-ocular distance)."""
    per_track = {track: track_jitter(frames) for track, frames in sorted(tracks.items())}
    pooled = np.concatenate(list(per_track.values())) if per_track else np.zeros(0)
    return {
        "unit": "fraction of the inter-ocular distance: |l[t-1] - 2 l[t] + l[t+1]| / 2 / IOD",
        **_spread_dict(spread(pooled), 6),
        "tracks": {
            str(track): _spread_dict(spread(values), 6)
            for track, values in per_track.items()
            if values.size
        },
    }


def evaluate_video(
    output: str,
    source: str,
    *,
    faces_json: Path | None = None,
    frames: int | None = None,
    detector: DetectorConfig = DetectorConfig(),
    detect_every: int = 5,
    weights_dir: Path | None = None,
    device: str = "auto",
    quiet: bool = False,
) -> dict:
    """The temporal figures of ``output`` against its ``source``, the first ``frames`` frames
    (None: all): the report as a dict (what ``--json`` writes)."""
    for path in (output, source):
        if is_image_path(Path(path)):
            raise UserError(f"{path} is a photo: --source is for videos (photos: --reference)")
    with open_source(str(source)) as src, open_source(str(output)) as out:
        _check_clips(out, src, frames)  # before the detector is built (and maybe downloaded)
        faces = SourceFaces(
            faces_json,
            detector=detector,
            detect_every=detect_every,
            weights_dir=weights_dir,
            device=resolve_device(device),
            quiet=quiet,
        )
        rows, tracks = _measure(out, src, faces, frames, quiet)
        size = {"output": [out.width, out.height], "source": [src.width, src.height]}
    return {
        "kind": "video",
        "output": str(output),
        "source": str(source),
        "frames": len(rows),
        "size": size,
        "faces_from": faces.described,
        "warping_error": _warping_figures(rows),
        "landmark_jitter": _jitter_figures(tracks),
        "mask_change": {
            "definition": f"1 - IoU of consecutive paste footprints (output differs from source "
            f"by > {MASK_THRESHOLD} levels inside the face boxes x{PASTE_SCALE:g}), the previous "
            "warped by the source's flow",
            **_spread_dict(spread([r["mask_change"] for r in rows]), 4),
        },
        "per_frame": rows,
    }


def format_video(report: dict) -> Group:
    """The clip's figures as a table, with what they were measured on."""
    warp, jitter, mask = report["warping_error"], report["landmark_jitter"], report["mask_change"]
    table = Table(title="temporal figures", title_justify="left")
    for column in ("figure", "output", "source", "ratio"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    table.add_row(
        "warping error, face regions (0-255)",
        _figure(warp["output"]["mean"], 3),
        _figure(warp["source"]["mean"], 3),
        _figure(warp["ratio"], 3),
    )
    table.add_row("landmark jitter mean (% IOD)", _percent(jitter["mean"]), "", "")
    table.add_row("landmark jitter p95 (% IOD)", _percent(jitter["p95"]), "", "")
    table.add_row("mask change mean (1 - IoU)", _figure(mask["mean"], 3), "", "")
    table.add_row("mask change p95 (1 - IoU)", _figure(mask["p95"], 3), "", "")
    note = (
        f"{report['frames']} frames; faces from {report['faces_from']}; warping error over "
        f"{warp['output']['count']} frame pairs, jitter over {jitter['count']} landmark triples, "
        f"mask change over {mask['count']} frames ('-': nothing to measure)"
    )
    return Group(table, Text(note))


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"
