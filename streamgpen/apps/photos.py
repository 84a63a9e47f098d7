"""Enhancing photos: one file, or a folder whose relative tree is kept in the output."""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from streamgpen.config import ImageFormat, NamingConfig, value_of
from streamgpen.enhancer import Enhancer
from streamgpen.errors import UserError
from streamgpen.faces.overlay import draw_faces
from streamgpen.files import require_regular_file, same_file
from streamgpen.media.facelog import FaceLog
from streamgpen.media.images import (
    IMAGE_EXTENSIONS,
    Photo,
    copy_file,
    decode_photo,
    is_image_path,
    iter_folder,
    merge_channels,
    write_image,
)
from streamgpen.pipeline.packet import Controls, FramePacket
from streamgpen.pipeline.stages import DetectStage, RestoreStage, StageClock, faces_of
from streamgpen.progress import duration, rate, stderr_console, task_bar

# Photos decoded ahead of the device, and enhanced ones waiting for the writer: enough to keep the
# device busy while files are read and written, few enough to bound memory (whole images each).
READ_AHEAD = 3
WRITE_BEHIND = 2


@dataclass(frozen=True, kw_only=True)
class PhotoOptions:
    """What to write besides the enhanced image."""

    aligned: bool = False
    draw: bool = False
    save_faces: Path | None = None
    faces_json: Path | None = None
    quiet: bool = False


@dataclass
class PhotoSummary:
    """What a photo run did: images written, faces restored, files that failed or had no face."""

    images: int = 0
    faces: int = 0
    failed: list[Path] = field(default_factory=list)
    faceless: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    written_to: Path | None = None  # the output file, or the folder of a folder run


def plan_outputs(
    source: Path, output: Path | str | None, naming: NamingConfig = NamingConfig()
) -> list[tuple[Path, Path]]:
    """(input, output) pairs: a file to a file (or into a folder: an existing one, or a path
    ending in ``/``), a folder to a folder tree (an output folder inside it is left out).

    Outputs in a folder or beside the input are named by ``naming`` (``--suffix``, ``--ext``);
    ``-o FILE`` names its file itself, so ``naming`` must then be the default.
    """
    source = Path(source)
    if not source.exists():
        raise UserError(f"{source}: no such file or folder")
    require_regular_file(source)
    if source.is_dir():
        return _plan_folder(source, None if output is None else Path(output), naming)
    if output is None:
        target = source.with_name(output_name(source, naming, default_suffix="enhanced"))
    elif Path(output).is_dir() or str(output).endswith(("/", "\\")):
        target = Path(output) / output_name(source, naming)
    elif naming != NamingConfig():
        raise UserError(
            f"-o {output} names the output file: --suffix and --ext name outputs in a folder "
            "(-o DIR/) or beside the input"
        )
    else:
        target = Path(output)
    if same_file(target, source):
        raise UserError(f"{target}: refusing to overwrite the input")
    if not is_image_path(target):
        supported = " ".join(sorted(IMAGE_EXTENSIONS))
        raise UserError(f"{target}: unsupported output image extension (use one of {supported})")
    return [(source, target)]


def output_name(source: Path, naming: NamingConfig, default_suffix: str | None = None) -> str:
    """The file name of ``source``'s output, as GFPGAN names it: ``STEM_SUFFIX.EXT``.

    ``naming.suffix`` (else ``default_suffix``; none: ``STEM.EXT``); ``naming.ext`` auto keeps
    the input's extension as it is spelt.
    """
    suffix = naming.suffix if naming.suffix is not None else default_suffix
    stem = f"{source.stem}_{suffix}" if suffix else source.stem
    ext = value_of(naming.ext)
    return stem + (source.suffix if ext == ImageFormat.AUTO else f".{ext}")


def _plan_folder(
    source: Path, output: Path | None, naming: NamingConfig
) -> list[tuple[Path, Path]]:
    out_dir = output or source.with_name(source.name + "_enhanced")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder (the input is a folder)")
    if same_file(out_dir, source):
        raise UserError(f"{out_dir}: the output folder must differ from the input folder")
    # An output folder inside the input: its files are last run's outputs, not inputs.
    pairs = [
        (p, out_dir / p.relative_to(source).with_name(output_name(p, naming)))
        for p in iter_folder(source, exclude=out_dir)
    ]
    if not pairs:
        raise UserError(f"{source}: no image files in this folder")
    _refuse_shared_targets(pairs)
    return pairs


def _refuse_shared_targets(pairs: list[tuple[Path, Path]]) -> None:
    """Two inputs written to one output (``a.jpg`` and ``a.png`` with ``--ext png``) would lose
    one of them: refused before anything is written."""
    first: dict[Path, Path] = {}
    for source, target in pairs:
        if target in first:
            raise UserError(
                f"{first[target]} and {source} would both be written to {target} "
                "(use another --ext, or --ext auto)"
            )
        first[target] = source


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
    run = _PhotoRun(enhancer, options, total=len(pairs))
    run.summary.written_to = _written_to(pairs)
    decode = partial(decode_photo, device=enhancer.device, on_device=device_decode)
    # On CUDA, capture GPEN's graphs before the readers start decoding on the device.
    enhancer.restorer.warmup()
    with ExitStack() as stack:
        if options.faces_json:
            run.face_log = stack.enter_context(FaceLog(options.faces_json))
        stack.enter_context(run.progress)
        readers = stack.enter_context(_threads(READ_AHEAD))
        writer = stack.enter_context(_threads(1))
        pending: deque[tuple[Path, int, Future]] = deque()
        photos = _prefetch(readers, decode, (source for source, _ in pairs), READ_AHEAD)
        for (source, target), photo in zip(pairs, photos, strict=True):
            pending.append(run.enhance(source, target, photo, writer))
            while pending and (pending[0][2].done() or len(pending) > WRITE_BEHIND):
                run.finish(*pending.popleft())
        while pending:
            run.finish(*pending.popleft())
    run.summary.seconds = time.perf_counter() - run.started
    if not options.quiet:
        _print_summary(run.console, run.summary)
    return run.summary


class _PhotoRun:
    """The state of one photo run: progress, summary, face log, and the stages it shares with
    video (a photo is a one-frame packet through detection and restoration)."""

    def __init__(self, enhancer: Enhancer, options: PhotoOptions, total: int):
        self.enhancer, self.options = enhancer, options
        self.summary = PhotoSummary()
        self.console = stderr_console()
        self.face_log: FaceLog | None = None
        self.started = time.perf_counter()
        self.progress = PhotoProgress(console=self.console, photos=total, quiet=options.quiet)
        clock = StageClock()
        self.stages = (
            DetectStage(enhancer, clock),
            RestoreStage(enhancer, clock, tracked=False, on_batch=self.progress.restored),
        )

    def enhance(self, source: Path, target: Path, photo: Future, writer) -> tuple:
        """Enhance one decoded photo; (source, faces, the future of its writing)."""
        try:
            write, faces = self._enhance_one(photo.result(), target)
            return source, faces, writer.submit(write)
        except UserError as e:
            return source, -1, _failed(e)

    def finish(self, source: Path, faces: int, written: Future) -> None:
        """Account for one photo once written (or failed), and move the bar."""
        summary = self.summary
        try:
            written.result()
            summary.images += 1
            summary.faces += faces
            if faces == 0:
                summary.faceless.append(source)
        except UserError as e:
            summary.failed.append(source)
            self.progress.console.print(
                f"streamgpen: error: {e}", markup=False, highlight=False, soft_wrap=True
            )
        self.progress.photo_done(summary)

    def _enhance_one(self, photo: Photo, target: Path) -> tuple[Callable[[], None], int]:
        """Enhance ``photo`` on the device; returns the writing left to do, and the face count."""
        enhancer, options, source = self.enhancer, self.options, photo.path
        try:
            frame, dtype = _on_device(enhancer, photo)
            if options.aligned:
                self.progress.found(1)  # the photo is the face
                result = enhancer.enhance_aligned_tensor(frame)
                self.progress.restored(1)
                image, faces, crops = result.image, [], (result.crops, result.restored)
            else:
                image, faces, crops = self._restore(frame)
            # no face (and no --upscale): the file itself, bit for bit
            copy = (
                not faces
                and not options.aligned
                and enhancer.upscale == 1
                and _same_kind(source, target)
            )
            # The writer gets the enhanced image on the host (with the photo's alpha and gray),
            # not the decoded pixels on the device.
            out = None if copy else replace(photo, color=enhancer.download(image, dtype))
            if options.save_faces is not None and crops[0] is not None:
                crops = _to_bgr(crops[0]), _to_bgr(crops[1])
            else:
                crops = None
        except torch.OutOfMemoryError:
            raise UserError(f"{source}: out of memory (try a smaller --batch-size)") from None
        if self.face_log:
            for face in faces:
                self.face_log.write(face, file=str(source), frame=0, track=None, detector_run=True)
        scale = image.shape[-1] / frame.shape[-1]  # --upscale: faces are in input pixels
        write = partial(_write, options, source, target, out, faces, crops, scale)
        return write, len(faces)

    def _restore(self, frame: torch.Tensor) -> tuple[torch.Tensor, list, tuple]:
        """[1, 3, H, W] through the shared stages: (enhanced [1, 3, H, W], faces, crops)."""
        packet = FramePacket(
            frame=None, seconds=0.0, image=frame[0], controls=Controls(blend=self.enhancer.blend)
        )
        detect, restore = self.stages
        detect.process([packet])
        self.progress.found(len(packet.faces))
        restore.process([packet])
        batch = packet.batch
        crops = (batch.crops, batch.restored) if batch is not None else (None, None)
        return packet.output[None], faces_of(packet), crops


class PhotoProgress:
    """A photo run's bar on stderr: the photos done of the total; for a single photo, its faces
    restored of those found, moved after each restored batch (the Solvay photo's 29 faces took
    400 s on a 2-core CPU, with a photos bar at 0/1 all along).

    Its times and rates run on ``console.get_time``, the clock the bar's own columns read.
    """

    def __init__(self, *, console: Console, photos: int, quiet: bool):
        self.console = console
        self.by_face = photos == 1
        self.faces_done = 0
        self.bar = task_bar(console=console, disable=quiet or photos == 0)
        # A photo's faces are known once it is detected: until then the total is unknown.
        name, total = ("faces", None) if self.by_face else ("photos", photos)
        self.task = self.bar.add_task(name, total=total, info="")
        self.started = console.get_time()

    def __enter__(self) -> PhotoProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.bar.stop()

    def found(self, faces: int) -> None:
        """The photo's faces were detected: with a single photo, they are the bar's total."""
        if self.by_face:
            self.bar.update(self.task, total=faces, refresh=True)

    def restored(self, faces: int) -> None:
        """A batch of ``faces`` came out of the restorer."""
        if self.by_face:
            self.faces_done += faces
            info = rate(self.faces_done, self.console.get_time() - self.started, "face")
            # Drawn now rather than at the next tick: it is news after seconds of work.
            self.bar.update(self.task, advance=faces, info=info, refresh=True)

    def photo_done(self, summary: PhotoSummary) -> None:
        """A photo was written, or failed: the photos' bar moves on."""
        if not self.by_face:
            done = summary.images + len(summary.failed)
            elapsed = self.console.get_time() - self.started
            info = f"{rate(done, elapsed, 'image')}, {summary.faces} faces"
            self.bar.update(self.task, advance=1, info=info)


def _written_to(pairs: list[tuple[Path, Path]]) -> Path | None:
    """The output file of a single photo, the folder holding a folder run's outputs."""
    if len(pairs) == 1:
        return pairs[0][1]
    return Path(os.path.commonpath([target.parent for _, target in pairs])) if pairs else None


def _on_device(enhancer: Enhancer, photo: Photo) -> tuple[torch.Tensor, np.dtype]:
    """The photo as [1, 3, H, W] float RGB in [0, 1] on the device, and its depth."""
    if isinstance(photo.color, torch.Tensor):  # decoded on the device: [3, H, W] uint8 RGB
        if photo.color.is_cuda:
            # Allocated on the decoder's stream: keep it from being reused while this one
            # still reads it.
            photo.color.record_stream(torch.cuda.current_stream(photo.color.device))
        return photo.color[None].float() / 255, np.uint8
    return enhancer.upload(photo.color), photo.color.dtype


def _same_kind(source: Path, target: Path) -> bool:
    return source.suffix.lower() == target.suffix.lower()


def _write(options, source: Path, target: Path, out, faces, crops, scale: float) -> None:
    if crops is not None:
        _save_faces(options.save_faces, source, *crops)
    if out is None:
        copy_file(source, target)
    else:
        image = draw_faces(out.color, faces, scale=scale) if options.draw else out.color
        write_image(target, merge_channels(out, image))


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


def summary_line(summary: PhotoSummary) -> str:
    """The closing line: what was done, in how long, where it went, and what went wrong."""
    images, faces, seconds = summary.images, summary.faces, summary.seconds
    line = f"{images} image(s), {faces} face(s) in {duration(seconds)}"
    # The rate per image says nothing the time does not for one image; none per face without any.
    rates = [rate(images, seconds, "image")] if images > 1 else []
    rates += [rate(faces, seconds, "face")] if faces else []
    line += f" ({', '.join(rates)})" if rates else ""
    if summary.written_to is not None and images:
        line += f"; written to {summary.written_to}"
    if summary.failed:
        line += f"; {len(summary.failed)} failed"
    if summary.faceless:
        names = ", ".join(str(p) for p in summary.faceless[:5])
        more = f" and {len(summary.faceless) - 5} more" if len(summary.faceless) > 5 else ""
        line += f"; no face in {len(summary.faceless)} (copied unchanged): {names}{more}"
    return line


def _print_summary(console: Console, summary: PhotoSummary) -> None:
    console.print(summary_line(summary), markup=False, highlight=False, soft_wrap=True)
    sys.stderr.flush()
