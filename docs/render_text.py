"""What streamgpen prints at 80 columns, rendered into docs/ for review.

Regenerate with ``python docs/render_text.py``.

``docs/progress-80.txt``: the progress bars and closing lines of a video run and of photo runs;
``docs/bench-80.txt``: ``streamgpen bench``'s tables. Everything is drawn by the code the
commands run (the bars, the figures, the summaries, the tables), fed fixed figures and a clock
that advances by fixed steps, so the files change only when the code's output does;
``tests/test_docs_text.py`` checks that they are the current rendering.
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
SAMPLE = ROOT / "samples" / "solvay_pan.mp4"
# A real report: `streamgpen bench --device cpu --quick --json ...` on the 2-core development
# machine (no GPU), while other jobs shared its cores.
CPU_REPORT = DOCS / "bench-report-cpu.json"
WIDTH = 80


class Clock:
    """A clock for rich's Console that the scenes move by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def terminal(clock: Clock) -> Console:
    """An 80-column console without colours, writing to memory and reading ``clock``."""
    return Console(
        file=io.StringIO(), width=WIDTH, force_terminal=False, color_system=None, get_time=clock
    )


def drawn(console: Console, renderable) -> str:
    """``renderable`` as ``console`` draws it, trailing spaces cut."""
    console.print(renderable)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())


def folded(line: str) -> str:
    """A one-line message as an 80-column terminal shows it: folded every 80 characters."""
    return "\n".join(line[i : i + WIDTH] for i in range(0, len(line), WIDTH))


def video_scene(seconds_per_frame: float, frames: int, output: str) -> tuple[str, str]:
    """A video run of the sample clip ``frames`` frames in, one frame every ``seconds_per_frame``:
    (the bar at that moment, the closing line had it ended there)."""
    from streamgpen.apps.videos import ProgressObserver, summary
    from streamgpen.media.video import open_source
    from streamgpen.pipeline.observers import RunStats
    from streamgpen.progress import task_bar

    clock = Clock()
    console = terminal(clock)
    with open_source(str(SAMPLE)) as source:
        bar = task_bar(console=console, disable=False, counted=True)
        task = bar.add_task("video", total=source.frame_count, info="")
        observer, stats = ProgressObserver(bar, task, source), RunStats()
        for done in range(1, frames + 1):
            clock.now += seconds_per_frame
            stats.frames_out, stats.faces, stats.full_detections = done, 4 * done, done // 5 + 1
            # RunStats reads time.perf_counter: its start is put that far in the past.
            stats.started = time.perf_counter() - done * seconds_per_frame
            observer.observe(None, stats)
        return drawn(console, bar.get_renderable()), summary(stats, source, output)


def photo_scene(faces: int, batch: int, seconds_per_face: float, batches: int) -> str:
    """One photo of ``faces`` faces, ``batches`` batches of ``batch`` restored: its bar."""
    from streamgpen.apps.photos import PhotoProgress

    clock = Clock()
    console = terminal(clock)
    progress = PhotoProgress(console=console, photos=1, quiet=False)
    clock.now += 1.5  # decoding and detection
    progress.found(faces)
    for _ in range(batches):
        clock.now += batch * seconds_per_face
        progress.restored(batch)
    return drawn(console, progress.bar.get_renderable())


def folder_scene(photos: int, done: int, seconds_per_photo: float) -> str:
    """A folder of ``photos`` photos, ``done`` of them written, 3 faces each: its bar."""
    from streamgpen.apps.photos import PhotoProgress, PhotoSummary

    clock = Clock()
    console = terminal(clock)
    progress = PhotoProgress(console=console, photos=photos, quiet=False)
    summary = PhotoSummary()
    for _ in range(done):
        clock.now += seconds_per_photo
        summary.images, summary.faces = summary.images + 1, summary.faces + 3
        progress.photo_done(summary)
    return drawn(console, progress.bar.get_renderable())


def photo_summary() -> str:
    """The closing line of the one-photo run of :func:`photo_scene`, once every face is done."""
    from streamgpen.apps.photos import PhotoSummary, summary_line

    done = PhotoSummary(images=1, faces=29, seconds=206.8, written_to=Path("photo_enhanced.jpg"))
    return summary_line(done)


def progress_text() -> str:
    """The contents of docs/progress-80.txt."""
    fast_bar, _ = video_scene(1 / 24.6, 40, "solvay_enhanced.mp4")
    slow_bar, slow_summary = video_scene(7.1, 30, "/tmp/solvay_enhanced.mp4")
    _, done_summary = video_scene(7.1, 100, "/tmp/solvay_enhanced.mp4")
    sections = [
        ("A video file on a GPU, 40 of the sample's 100 frames done (24.6 fps)", fast_bar),
        ("The same on a CPU, 30 frames done at 7.1 s a frame", slow_bar),
        ("Its closing line, had it stopped there (one line, folded by the terminal)",
         folded(slow_summary)),
        ("Its closing line once all 100 frames are done", folded(done_summary)),
        ("One photo with 29 faces on a CPU: detected, then 3 batches of 4 restored",
         photo_scene(29, 4, 7.0, 3)),
        ("Its closing line (one line, folded by the terminal)", folded(photo_summary())),
        ("A folder of 250 photos, 40 written at 2.5 s a photo", folder_scene(250, 40, 2.5)),
    ]  # fmt: skip
    return _document("What the progress bars and closing lines look like at 80 columns.", sections)


def widest_report() -> dict:
    """A made-up CUDA report whose figures are as wide as real ones get: every mode, batch 32,
    four- and five-digit rates and times, eight stages. The layout's worst case, not a run."""
    from streamgpen.apps.bench import FLOPS_PER_FACE

    peak = {"dtype": "float16", "n": 8192, "tflops": 756.21}
    # Each mode's time per face as a multiple of graphs-fp16's (eager fp32 at batch 1: 150x).
    modes = {"eager-fp32": 150.0, "eager-fp16": 3.0, "graphs-fp16": 1.0,
             "graphs-fp16-compiled": 0.9}  # fmt: skip
    model_rows = []
    for model, per_face_ms in (("GPEN-BFR-256", 0.12), ("GPEN-BFR-512", 1.9)):
        baseline = 1000 / (per_face_ms * modes["eager-fp32"])  # faces/s
        for mode, slower in modes.items():
            for batch in (1,) if mode == "eager-fp32" else (1, 32):
                faces_per_s = 1000 / (per_face_ms * slower)
                model_rows.append({
                    "model": model, "mode": mode, "batch": batch,
                    "ms_per_batch": batch * per_face_ms * slower, "faces_per_s": faces_per_s,
                    "speedup_vs_baseline": faces_per_s / baseline,
                    "fraction_of_peak": faces_per_s * FLOPS_PER_FACE[model] / peak["tflops"] / 1e12,
                })  # fmt: skip
    stages = ("decode", "detect_track", "restore", "parse", "upscale", "blend", "download",
              "encode")  # fmt: skip
    pipeline_rows = [
        {"model": "GPEN-BFR-512", "mode": mode, "frames": 600, "fps": 1234.5,
         "faces_per_frame": 4.0, "stage_ms_per_frame": dict.fromkeys(stages, 1234.56),
         "worker_idle_fraction": 0.125} | live
        for mode, live in (("file", {}), ("live", {"latency_ms_p50": 1234.5,
                                                   "latency_ms_p95": 12345.6, "dropped": 12345}))
    ]  # fmt: skip
    return {
        "device": "NVIDIA H100 80GB HBM3", "torch": "2.14.0+cu128", "matmul_peak": peak,
        "note": "Networks are randomly initialised (seed 0): speed does not depend on the "
        "weights' values.", "model_rows": model_rows, "pipeline_rows": pipeline_rows,
        "jpeg_decode": {"width": 3840, "height": 2160, "device": "cuda:0",
                        "cv2_images_per_s": 45.3, "torchvision_images_per_s": 312.9,
                        "speedup": 6.91},
    }  # fmt: skip


def bench_tables(report: dict) -> str:
    """``streamgpen bench``'s output for ``report`` at 80 columns."""
    from streamgpen.apps.bench import format_jpeg_decode, format_pipeline, format_report

    console = terminal(Clock())
    console.print(format_report(report))
    console.print(format_jpeg_decode(report), highlight=False)
    pipeline = format_pipeline(report)
    if pipeline is not None:
        console.print(pipeline)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())


def bench_text() -> str:
    """The contents of docs/bench-80.txt."""
    sections = [
        ("A real one: `streamgpen bench --device cpu --quick`, a busy 2-core machine",
         bench_tables(json.loads(CPU_REPORT.read_text()))),
        ("Made-up figures as wide as a GPU's (every CUDA mode, batch 32, 8 stages)",
         bench_tables(widest_report())),
    ]  # fmt: skip
    return _document("What `streamgpen bench` prints at 80 columns.", sections)


def _document(title: str, sections: list[tuple[str, str]]) -> str:
    parts = [title, "Regenerate: python docs/render_text.py (tests/test_docs_text.py checks it)."]
    for heading, body in sections:
        parts += ["", f"== {heading}", "", body]
    return "\n".join(parts) + "\n"


RENDERINGS: dict[str, Callable[[], str]] = {
    "progress-80.txt": progress_text,
    "bench-80.txt": bench_text,
}


def main() -> None:
    """Write every rendering into docs/."""
    for name, render in RENDERINGS.items():
        (DOCS / name).write_text(render())
        print(f"wrote {DOCS / name}", file=sys.stderr)


if __name__ == "__main__":
    main()
