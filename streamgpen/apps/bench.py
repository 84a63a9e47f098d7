"""Model-only speed of GPEN as the restorer runs it: faces/s, speed-ups and fraction of peak.

The networks are randomly initialised: their speed does not depend on the weights' values, and
so the benchmark needs no downloads. Every figure is compared with the official way of running
GPEN (eager fp32, one face at a time) measured in the same run, and with the FLOP/s of a dense
matrix multiply measured on the same device.
"""

from __future__ import annotations

import copy
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text

from streamgpen.apps.bench_photos import bench_jpeg_decode
from streamgpen.errors import UserError
from streamgpen.files import atomic_path
from streamgpen.models import weights
from streamgpen.models.gpen import GPEN
from streamgpen.runtime.device import resolve_device
from streamgpen.runtime.restorer import Restorer

# Floating-point operations per face, 2 per multiply-add, from shared/fixtures/gpen/flops.json
# (torch's FlopCounterMode on the official implementation).
FLOPS_PER_FACE = {
    "GPEN-BFR-256": 17406768128,
    "GPEN-BFR-512": 276220915712,
    "GPEN-BFR-1024": 346620474368,
}
RANDOM_WEIGHTS_NOTE = (
    "Networks are randomly initialised (seed 0): speed does not depend on the weights' values."
)


@dataclass(frozen=True)
class Mode:
    """One way of running the network: its name, weight precision, CUDA graphs, torch.compile."""

    name: str
    precision: str
    cuda_graphs: bool = False
    compile: bool = False


BASELINE = Mode("eager-fp32", "fp32")  # at batch 1: the official GPEN inference
CUDA_MODES = (Mode("eager-fp16", "fp16"), Mode("graphs-fp16", "fp16", cuda_graphs=True))
CPU_MODES = (BASELINE, Mode("eager-bf16", "bf16"))
# With --compile: whether torch.compile before capture measures faster than graphs alone.
CUDA_COMPILED = Mode("graphs-fp16-compiled", "fp16", cuda_graphs=True, compile=True)
CPU_COMPILED = Mode("compiled-fp32", "fp32", compile=True)


def bench_modes(device: torch.device, compiled: bool) -> tuple[Mode, ...]:
    """The modes measured on ``device`` besides the baseline at batch 1."""
    if device.type == "cuda":
        return CUDA_MODES + ((CUDA_COMPILED,) if compiled else ())
    return CPU_MODES + ((CPU_COMPILED,) if compiled else ())


@dataclass(frozen=True)
class Timing:
    """How long to measure: warm-up calls, then the median of ``repeats`` runs of ``iters``."""

    warmup: int
    repeats: int
    iters: int
    matmul_n: int


def timing(device: torch.device, quick: bool) -> Timing:
    """The measurement effort for ``device``; ``quick`` keeps a CPU run under a minute."""
    if device.type == "cuda":
        return Timing(3, 5, 3, 4096) if quick else Timing(10, 7, 10, 8192)
    return Timing(1, 3, 1, 1024) if quick else Timing(2, 5, 1, 2048)


def default_batch_sizes(device: torch.device, quick: bool) -> list[int]:
    """The batch sizes measured when none are given."""
    if quick:
        return [1, 2]
    return [1, 2, 4, 8, 16, 32] if device.type == "cuda" else [1, 2, 4]


def default_models(quick: bool) -> list[str]:
    """The models measured when none are given."""
    return ["GPEN-BFR-256"] if quick else ["GPEN-BFR-256", "GPEN-BFR-512"]


def default_pipeline_frames(device: torch.device, quick: bool) -> int:
    """Frames of the end-to-end clip: enough for steady state on a GPU, a glimpse on a CPU."""
    if device.type == "cuda":
        return 120 if quick else 600
    return 4 if quick else 16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, t: Timing) -> float:
    """Median wall time of one ``fn()`` call, after warm-up, over ``t.repeats`` runs."""
    for _ in range(t.warmup):
        fn()
    samples = []
    for _ in range(t.repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(t.iters):
            fn()
        _sync(device)  # CUDA work is asynchronous: time it to completion
        samples.append((time.perf_counter() - start) / t.iters)
    return statistics.median(samples)


def matmul_peak(device: torch.device, t: Timing) -> dict:
    """Dense matmul FLOP/s on ``device`` (fp16 on CUDA, fp32 on CPU): the practical peak."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    a = torch.randn(t.matmul_n, t.matmul_n, device=device, dtype=dtype)
    b = torch.randn(t.matmul_n, t.matmul_n, device=device, dtype=dtype)
    seconds = median_seconds(lambda: a @ b, device, t)
    flops = 2 * t.matmul_n**3 / seconds
    return {"dtype": str(dtype).removeprefix("torch."), "n": t.matmul_n, "tflops": flops / 1e12}


def device_name(device: torch.device) -> str:
    """A human-readable name of the device, for the report."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()}, {torch.get_num_threads()} threads"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux
    return platform.processor() or platform.machine()


def measure(
    model: GPEN, device: torch.device, mode: Mode, batch: int, t: Timing
) -> dict[str, float]:
    """Seconds per batch of ``batch`` faces through a Restorer running ``model`` in ``mode``."""
    restorer = Restorer(
        copy.deepcopy(model),
        device,
        batch,
        precision=mode.precision,
        cuda_graphs=mode.cuda_graphs,
        compile=mode.compile,
        buckets=(batch,),  # only full batches are timed: capture nothing else
    )
    restorer.warmup()
    crops = torch.rand(batch, 3, model.size, model.size, device=device) * 2 - 1
    seconds = median_seconds(lambda: restorer(crops), device, t)
    return {"ms_per_batch": seconds * 1e3, "faces_per_s": batch / seconds}


def bench_model(
    name: str,
    device: torch.device,
    batch_sizes: list[int],
    t: Timing,
    peak: dict,
    modes: tuple[Mode, ...],
) -> list[dict]:
    """Rows for one model: the baseline, then every mode at every batch size."""
    torch.manual_seed(0)
    model = GPEN.from_config(weights.get_spec(name).config).eval()
    runs = [(BASELINE, 1)] + [
        (mode, b) for mode in modes for b in batch_sizes if (mode, b) != (BASELINE, 1)
    ]
    rows = []
    for mode, batch in runs:
        row = {
            "model": name,
            "mode": mode.name,
            "precision": mode.precision,
            "cuda_graphs": mode.cuda_graphs,
            "compile": mode.compile,
            "batch": batch,
        }
        row.update(measure(model, device, mode, batch, t))
        rows.append(row)
    baseline = rows[0]["faces_per_s"]
    for row in rows:
        achieved = FLOPS_PER_FACE[name] * row["faces_per_s"]
        row["speedup_vs_baseline"] = row["faces_per_s"] / baseline
        row["tflops"] = achieved / 1e12
        row["fraction_of_peak"] = achieved / (peak["tflops"] * 1e12)
    return rows


def run_bench(
    device: str = "auto",
    models: list[str] | None = None,
    batch_sizes: list[int] | None = None,
    quick: bool = False,
    json_path: Path | None = None,
    pipeline_frames: int | None = None,
    detector: str = "retinaface_mobile0.25",
    weights_dir: Path | None = None,
    compiled: bool = False,
    profile: Path | None = None,
) -> dict:
    """Benchmark GPEN on ``device`` and return (and optionally save) a report.

    Model only: baseline eager fp32 at batch 1; on CUDA eager fp16 and fp16 with CUDA graphs
    at each batch size, on CPU eager fp32 and eager bf16; ``compiled`` adds the same with
    ``torch.compile`` (graphs-fp16-compiled, compiled-fp32). ``models`` and ``batch_sizes``
    default to :func:`default_models` and :func:`default_batch_sizes`. End to end (unless
    ``pipeline_frames`` is 0): a generated 1080p clip through the whole pipeline, see
    :mod:`streamgpen.apps.bench_pipeline`; it needs the ``detector``'s weights. ``profile``: a
    torch.profiler trace of the end-to-end file run is written there.
    """
    dev = resolve_device(device)
    models = models or default_models(quick)
    batch_sizes = batch_sizes or default_batch_sizes(dev, quick)
    unknown = [m for m in models if m not in FLOPS_PER_FACE]
    if unknown:
        raise UserError(f"unknown model {unknown[0]!r}; known: {', '.join(FLOPS_PER_FACE)}")
    _check_pipeline_args(pipeline_frames, profile, detector, weights_dir)
    t = timing(dev, quick)
    peak = matmul_peak(dev, t)
    report = _header(dev, device, models, batch_sizes, quick, compiled) | {
        "timing": asdict(t),
        "matmul_peak": peak,
        "model_rows": [
            row
            for m in models
            for row in bench_model(m, dev, batch_sizes, t, peak, bench_modes(dev, compiled))
        ],
        "pipeline_rows": [],
        "jpeg_decode": bench_jpeg_decode(dev, seconds=0.5 if quick else 2.0),
    }
    if pipeline_frames != 0:
        from streamgpen.apps.bench_pipeline import bench_pipeline

        model = "GPEN-BFR-256" if quick else "GPEN-BFR-512"
        frames = pipeline_frames or default_pipeline_frames(dev, quick)
        report["args"] |= {"pipeline_frames": frames, "detector": detector}
        report["pipeline_rows"] = bench_pipeline(
            dev, model, frames, detector, weights_dir, profile=profile
        )
    if not quick:  # a minute on a CPU: the parsers take seconds a face there
        report["stage_rows"] = _stage_rows(dev)
    if json_path is not None:
        with atomic_path(Path(json_path)) as temp:
            temp.write_text(json.dumps(report, indent=1) + "\n")
    return report


def _check_pipeline_args(
    frames: int | None, profile: Path | None, detector: str, weights_dir: Path | None
) -> None:
    if profile is not None and frames == 0:
        raise UserError("--profile profiles the end-to-end run, which --frames 0 skips")
    if frames != 0:
        # Fetched (or found missing) now, not after minutes of model timings.
        weights.ensure(detector, weights.weights_dir(weights_dir))


def _stage_rows(device: torch.device) -> list[dict]:
    from streamgpen.apps.bench_stages import bench_stages

    return bench_stages(device)


def _header(
    dev: torch.device, device: str, models, batch_sizes, quick: bool, compiled: bool
) -> dict:
    """What a report says about where and how it was measured."""
    return {
        "device": device_name(dev),
        "device_type": dev.type,
        "torch": torch.__version__,
        # fp32 convolutions on CUDA run in TF32 when this is on (PyTorch's default): the baseline's.
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "args": {
            "device": device,
            "models": models,
            "batch_sizes": batch_sizes,
            "quick": quick,
            "compile": compiled,
        },
        "note": RANDOM_WEIGHTS_NOTE,
    }


def format_report(report: dict) -> Group:
    """The model rows of a report: the device, torch and matmul peak, then one table per model.

    Every line fits 80 columns (a terminal's default): the model is each table's title and the
    speed-up's meaning a footnote, rather than two more columns.
    """
    peak = report["matmul_peak"]
    header = Text(
        f"{report['device']} - torch {report['torch']} - "
        f"matmul peak {peak['tflops']:.2f} TFLOP/s ({peak['dtype']})"
    )
    rows = report["model_rows"]
    tables = [_model_table(model, rows) for model in dict.fromkeys(row["model"] for row in rows)]
    note = Text(f"speed-up: faces/s over {BASELINE.name} at batch 1. {report['note']}")
    return Group(header, *tables, note)


def _model_table(model: str, rows: list[dict]) -> Table:
    """One model's rows: mode, batch, ms per batch, faces/s, speed-up, % of the matmul peak."""
    table = Table(title=f"{model}, model only", title_justify="left")
    for column in ("mode", "batch", "ms/batch", "faces/s", "speed-up", "% of peak"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for row in rows:
        if row["model"] == model:
            table.add_row(
                row["mode"],
                str(row["batch"]),
                f"{row['ms_per_batch']:.1f}",
                f"{row['faces_per_s']:.2f}",
                f"{row['speedup_vs_baseline']:.2f}x",
                f"{100 * row['fraction_of_peak']:.1f}",
            )
    return table


def format_jpeg_decode(report: dict) -> str:
    """One line on photo decoding: cv2 on the host against torchvision on the device."""
    row = report["jpeg_decode"]
    line = (
        f"JPEG {row['width']}x{row['height']} to {row['device']}: "
        f"cv2 {row['cv2_images_per_s']:.1f} images/s, "
    )
    if row["torchvision_images_per_s"] is None:
        return line + "torchvision could not decode it"
    return line + (
        f"torchvision {row['torchvision_images_per_s']:.1f} images/s ({row['speedup']:.2f}x)"
    )


def format_pipeline(report: dict) -> Group | None:
    """The end-to-end rows of a report (None when there are none), in two tables that each fit
    80 columns: each run's figures, then each stage's milliseconds per frame, a row per stage."""
    rows = report.get("pipeline_rows") or []
    if not rows:
        return None
    models = ", ".join(dict.fromkeys(row["model"] for row in rows))
    runs = Table(
        title=f"end to end: {models}, 1080p clip, 4 moving faces, output null",
        title_justify="left",
        caption="idle: the device worker's idle share; p50/p95: the live run's latency",
        caption_justify="left",
    )
    for column in ("run", "frames", "fps", "faces/frame", "idle", "p50 ms", "p95 ms", "dropped"):
        runs.add_column(column, justify="left" if column == "run" else "right")
    for row in rows:
        runs.add_row(
            row["mode"], str(row["frames"]), f"{row['fps']:.1f}",
            f"{row['faces_per_frame']:.1f}", f"{row['worker_idle_fraction']:.0%}",
            _opt(row.get("latency_ms_p50")), _opt(row.get("latency_ms_p95")),
            _opt(row.get("dropped")),
        )  # fmt: skip
    stages = Table(title="end to end: ms per frame in each stage", title_justify="left")
    stages.add_column("stage")
    for row in rows:
        stages.add_column(f"{row['mode']} run", justify="right")
    # The stages as the rows name them, in pipeline order (a new stage needs no change here).
    for stage in dict.fromkeys(s for row in rows for s in row["stage_ms_per_frame"]):
        times = (row["stage_ms_per_frame"].get(stage) for row in rows)
        stages.add_row(stage, *("" if ms is None else f"{ms:.1f}" for ms in times))
    return Group(runs, stages)


def _opt(value) -> str:
    return "" if value is None else str(value)
