"""Enhancing photos: one file, or a folder whose relative tree is kept in the output."""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from streamgpen.enhancer import Enhancer
from streamgpen.errors import UserError
from streamgpen.io.facelog import FaceLog
from streamgpen.io.images import (
    Photo,
    copy_file,
    decode_photo,
    is_image_path,
    iter_folder,
    merge_channels,
    write_image,
)
from streamgpen.overlay import draw_faces

# Photos decoded ahead of the device, and enhanced ones waiting for the writer: enough to keep the
# device busy while files are read and written, few enough to bound memory (whole images each).
READ_AHEAD = 3
WRITE_BEHIND = 2


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
    enhancer: Enhancer,
    pairs: list[tuple[Path, Path]],
    options: PhotoOptions,
    device_decode: bool | None = None,
) -> PhotoSummary:
    """Enhance each (input, output) pair; a bad file is reported in one line and skipped.

    The next photos are decoded on background threads and the outputs encoded and written on
    another, in order, so that the device does not wait for files. ``device_decode`` overrides
    :func:`decode_photo`'s choice of decoder (the tests use it to run torchvision's on the CPU).
    """
    summary = PhotoSummary()
    console = Console(stderr=True)
    face_log = FaceLog(options.faces_json) if options.faces_json else None
    start = time.perf_counter()
    progress = _progress(console, disable=options.quiet or len(pairs) == 0)
    decode = partial(decode_photo, device=enhancer.device, on_device=device_decode)
    # On CUDA, capture GPEN's graphs before the readers start decoding on the device.
    enhancer.restorer.warmup()
    try:
        with progress, _threads(READ_AHEAD) as readers, _threads(1) as writer:
            task = progress.add_task("photos", total=len(pairs), rate="")

            def finish(source: Path, faces: int, written: Future) -> None:
                try:
                    written.result()
                    summary.images += 1
                    summary.faces += faces
                except UserError as e:
                    summary.failed.append(source)
                    progress.console.print(
                        f"streamgpen: error: {e}", markup=False, highlight=False, soft_wrap=True
                    )
                elapsed = max(time.perf_counter() - start, 1e-9)
                done = summary.images + len(summary.failed)
                rate = f"{done / elapsed:.2f} images/s, {summary.faces / elapsed:.1f} faces/s"
                progress.update(task, advance=1, rate=rate)

            pending: deque[tuple[Path, int, Future]] = deque()
            photos = _prefetch(readers, decode, (source for source, _ in pairs), READ_AHEAD)
            for (source, target), photo in zip(pairs, photos, strict=True):
                try:
                    write, faces = _enhance_one(enhancer, photo.result(), target, options, face_log)
                    pending.append((source, faces, writer.submit(write)))
                except UserError as e:
                    pending.append((source, 0, _failed(e)))
                while pending and (pending[0][2].done() or len(pending) > WRITE_BEHIND):
                    finish(*pending.popleft())
            while pending:
                finish(*pending.popleft())
    finally:
        if face_log:
            face_log.close()
    summary.seconds = time.perf_counter() - start
    if not options.quiet:
        _print_summary(console, summary)
    return summary


@contextmanager
def _threads(count: int) -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(count, thread_name_prefix="streamgpen-photos")
    try:
        yield pool
    finally:
        # After Ctrl-C or an error, queued reads and writes are dropped instead of run; a write
        # under way ends (atomic: no *.partial is left), so this waits for one file at most.
        pool.shutdown(wait=True, cancel_futures=True)


def _prefetch(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    """Futures of ``fn(item)``, in order, each submitted ``ahead`` items before it is yielded."""
    futures: deque[Future] = deque()
    for item in items:
        futures.append(pool.submit(fn, item))
        if len(futures) > ahead:
            yield futures.popleft()
    yield from futures


def _failed(error: Exception) -> Future:
    future: Future = Future()
    future.set_exception(error)
    return future


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
    enhancer: Enhancer, photo: Photo, target: Path, options: PhotoOptions, face_log: FaceLog | None
) -> tuple[Callable[[], None], int]:
    """Enhance ``photo`` on the device; returns the writing left to do, and the number of faces."""
    source = photo.path
    try:
        if isinstance(photo.color, torch.Tensor):  # decoded on the device: [3, H, W] uint8 RGB
            if photo.color.is_cuda:
                # Allocated on the decoder's stream: keep it from being reused while this one
                # still reads it.
                photo.color.record_stream(torch.cuda.current_stream(photo.color.device))
            frame, dtype = photo.color[None].float() / 255, np.uint8
        else:
            frame, dtype = enhancer.upload(photo.color), photo.color.dtype
        if options.aligned:
            result = enhancer.enhance_aligned_tensor(frame)
        else:
            result = enhancer.enhance_tensor(frame)
        faces = result.faces
        # no face: the file itself, bit for bit
        copy = not faces and not options.aligned and source.suffix.lower() == target.suffix.lower()
        # The writer gets the enhanced image on the host (with the photo's alpha and gray), not
        # the decoded pixels on the device.
        out = None if copy else replace(photo, color=enhancer.download(result.image, dtype))
        crops = None
        if options.save_faces is not None:
            crops = _to_bgr(result.crops), _to_bgr(result.restored)
    except torch.OutOfMemoryError:
        raise UserError(f"{source}: out of memory (try a smaller --batch-size)") from None
    if face_log:
        for face in faces:
            face_log.write(face, file=str(source), frame=0, track=None, detector_run=True)

    def write() -> None:
        if crops is not None:
            _save_faces(options.save_faces, source, *crops)
        if out is None:
            copy_file(source, target)
        else:
            image = draw_faces(out.color, faces) if options.draw else out.color
            write_image(target, merge_channels(out, image))

    return write, len(faces)


def _save_faces(folder: Path, source: Path, crops: np.ndarray, restored: np.ndarray) -> None:
    """Aligned crop, restored crop and the two side by side, per face."""
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
