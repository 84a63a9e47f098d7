"""Enhancing photos: one file, or a folder whose relative tree is kept in the output."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from streamgpen.enhancer import Enhancer, EnhanceResult
from streamgpen.errors import UserError
from streamgpen.io.facelog import FaceLog
from streamgpen.io.images import (
    copy_file,
    is_image_path,
    iter_folder,
    merge_channels,
    read_photo,
    write_image,
)
from streamgpen.overlay import draw_faces


@dataclass
class PhotoOptions:
    """What to write besides the enhanced image."""

    aligned: bool = False
    draw: bool = False
    save_faces: Path | None = None
    faces_json: Path | None = None
    quiet: bool = False


@dataclass
class PhotoSummary:
    images: int = 0
    faces: int = 0
    failed: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def plan_outputs(source: Path, output: Path | None) -> list[tuple[Path, Path]]:
    """(input, output) pairs: a file to a file (or into a folder), a folder to a folder tree."""
    if not source.exists():
        raise UserError(f"{source}: no such file or folder")
    if source.is_dir():
        out_dir = output or source.with_name(source.name + "_enhanced")
        if out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"{out_dir}: exists and is not a folder (the input is a folder)")
        if out_dir.resolve() == source.resolve():
            raise UserError(f"{out_dir}: the output folder must differ from the input folder")
        pairs = [(p, out_dir / p.relative_to(source)) for p in iter_folder(source)]
        if not pairs:
            raise UserError(f"{source}: no image files in this folder")
        return pairs
    if output is None:
        target = source.with_name(f"{source.stem}_enhanced{source.suffix}")
    elif output.is_dir() or str(output).endswith(("/", "\\")):
        target = output / source.name
    else:
        target = output
    if target.resolve() == source.resolve():
        raise UserError(f"{target}: refusing to overwrite the input")
    if not is_image_path(target):
        raise UserError(f"{target}: unsupported output image extension")
    return [(source, target)]


def enhance_photos(
    enhancer: Enhancer, pairs: list[tuple[Path, Path]], options: PhotoOptions
) -> PhotoSummary:
    """Enhance each (input, output) pair; a bad file is reported in one line and skipped."""
    summary = PhotoSummary()
    console = Console(stderr=True)
    face_log = FaceLog(options.faces_json) if options.faces_json else None
    start = time.perf_counter()
    progress = _progress(console, disable=options.quiet or len(pairs) == 0)
    try:
        with progress:
            task = progress.add_task("photos", total=len(pairs), rate="")
            for source, target in pairs:
                try:
                    n = _enhance_one(enhancer, source, target, options, face_log)
                    summary.images += 1
                    summary.faces += n
                except UserError as e:
                    summary.failed.append(source)
                    progress.console.print(
                        f"streamgpen: error: {e}", markup=False, highlight=False, soft_wrap=True
                    )
                elapsed = max(time.perf_counter() - start, 1e-9)
                done = summary.images + len(summary.failed)
                rate = f"{done / elapsed:.2f} images/s, {summary.faces / elapsed:.1f} faces/s"
                progress.update(task, advance=1, rate=rate)
    finally:
        if face_log:
            face_log.close()
    summary.seconds = time.perf_counter() - start
    if not options.quiet:
        _print_summary(console, summary)
    return summary


def _progress(console: Console, disable: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
    )


def _enhance_one(
    enhancer: Enhancer, source: Path, target: Path, options: PhotoOptions, face_log: FaceLog | None
) -> int:
    photo = read_photo(source)
    try:
        if options.aligned:
            result = enhancer.enhance_aligned(photo.color)
        else:
            result = enhancer.enhance(photo.color)
    except torch.OutOfMemoryError:
        raise UserError(f"{source}: out of memory (try a smaller --batch-size)") from None
    if face_log:
        for face in result.faces:
            face_log.write(face, file=str(source), frame=0, track=None, detector_run=True)
    if options.save_faces is not None:
        _save_faces(options.save_faces, source, result)
    untouched = not result.faces and not options.aligned
    if untouched and source.suffix.lower() == target.suffix.lower():
        copy_file(source, target)  # no face: the file itself, bit for bit
        return 0
    image = draw_faces(result.image, result.faces) if options.draw else result.image
    write_image(target, merge_channels(photo, image))
    return len(result.faces)


def _save_faces(folder: Path, source: Path, result: EnhanceResult) -> None:
    """Aligned crop, restored crop and the two side by side, per face."""
    crops, restored = _to_bgr(result.crops), _to_bgr(result.restored)
    for i, (crop, face) in enumerate(zip(crops, restored, strict=True)):
        stem = folder / f"{source.stem}_{i:02d}"
        write_image(stem.with_name(stem.name + "_crop.png"), crop)
        write_image(stem.with_name(stem.name + "_restored.png"), face)
        write_image(stem.with_name(stem.name + "_compare.png"), np.hstack([crop, face]))


def _to_bgr(crops: torch.Tensor) -> np.ndarray:
    # [N, 3, S, S] RGB in [-1, 1] -> [N, S, S, 3] uint8 BGR
    out = ((crops.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return out.flip(1).permute(0, 2, 3, 1).cpu().numpy()


def _print_summary(console: Console, summary: PhotoSummary) -> None:
    rate = summary.images / summary.seconds if summary.seconds else 0.0
    line = (
        f"{summary.images} image(s), {summary.faces} face(s) in {summary.seconds:.1f} s "
        f"({rate:.2f} images/s)"
    )
    if summary.failed:
        line += f"; {len(summary.failed)} failed"
    console.print(line, markup=False, highlight=False, soft_wrap=True)
    sys.stderr.flush()
