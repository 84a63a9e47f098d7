"""``streamgpen bench``: GPEN's speed on this machine, model only and end to end."""

from __future__ import annotations

import sys

from streamgpen.cli import options as o
from streamgpen.config import DetectorName


def bench(
    quick: o.Quick = False,
    json_path: o.JsonReport = None,
    frames: o.Frames = None,
    profile: o.Profile = None,
    model: o.BenchModels = None,
    detector: o.Detector = DetectorName.RETINAFACE_MOBILE,
    weights_dir: o.WeightsDir = None,
    device: o.Device = "auto",
    batch_size: o.BenchBatchSizes = None,
    compile_: o.BenchCompile = False,
) -> None:
    """Measure GPEN's speed on this machine (random weights: speed does not depend on them).

    Model only (faces/s per model, precision and batch size, against the official eager fp32
    batch-1 way) and end to end (a generated 1080p clip with four moving faces).
    """
    from rich.console import Console

    from streamgpen.apps.bench import format_jpeg_decode, format_pipeline, format_report, run_bench

    report = run_bench(
        device,
        [m.value for m in model] if model else None,
        batch_size or None,
        quick,
        json_path,
        frames,
        detector.value,
        weights_dir,
        compiled=compile_,
        profile=profile,
    )
    # Wide enough for the tables when the output is a file or a pipe (rich assumes 80 columns).
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(format_report(report))
    console.print(format_jpeg_decode(report), highlight=False)
    pipeline = format_pipeline(report)
    if pipeline is not None:
        console.print(pipeline)
