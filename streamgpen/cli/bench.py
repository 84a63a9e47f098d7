"""``streamgpen bench``: GPEN's speed on this machine, model only and end to end."""

from __future__ import annotations

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
    batch-1 way), end to end (a generated 1080p clip with four moving faces) and, without
    --quick, what each output-quality stage costs per 1080p frame (upscaling, parse masks).
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
    # Every table fits 80 columns, rich's width for a file or a pipe (see docs/bench-80.txt).
    console = Console()
    console.print(format_report(report))
    console.print(format_jpeg_decode(report), highlight=False)
    pipeline = format_pipeline(report)
    if pipeline is not None:
        console.print(pipeline)
    if report.get("stage_rows"):
        from streamgpen.apps.bench_stages import format_stages

        console.print(format_stages(report["stage_rows"]))
