"""The model benchmark: a quick CPU run writes a complete report."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from streamgpen.apps.bench import (
    FLOPS_PER_FACE,
    Timing,
    format_jpeg_decode,
    format_pipeline,
    format_report,
    median_seconds,
    run_bench,
)
from streamgpen.errors import UserError

REQUIRED = {
    "device",
    "torch",
    "date",
    "command",
    "args",
    "note",
    "matmul_peak",
    "model_rows",
    "pipeline_rows",
    "jpeg_decode",
}
ROW_FIELDS = {
    "model",
    "mode",
    "precision",
    "cuda_graphs",
    "batch",
    "ms_per_batch",
    "faces_per_s",
    "speedup_vs_baseline",
    "tflops",
    "fraction_of_peak",
}


def test_quick_cpu_bench_writes_a_complete_report(tmp_path):
    path = tmp_path / "results" / "cpu.json"
    report = run_bench("cpu", ["GPEN-BFR-256"], [1], quick=True, json_path=path, pipeline_frames=0)
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved.keys() >= REQUIRED
    assert saved["torch"] == torch.__version__
    assert "random" in saved["note"]
    assert saved["matmul_peak"]["tflops"] > 0
    rows = saved["model_rows"]
    # The baseline (eager fp32, batch 1) first, then bf16; fp32 at batch 1 is not measured twice.
    assert [(r["mode"], r["batch"]) for r in rows] == [("eager-fp32", 1), ("eager-bf16", 1)]
    assert rows[0]["speedup_vs_baseline"] == 1.0
    for row in rows:
        assert row.keys() >= ROW_FIELDS
        assert row["model"] == "GPEN-BFR-256"
        assert row["faces_per_s"] > 0 and row["speedup_vs_baseline"] > 0
        assert row["fraction_of_peak"] > 0
        expected = FLOPS_PER_FACE["GPEN-BFR-256"] * row["faces_per_s"] / 1e12
        assert row["tflops"] == pytest.approx(expected)
    tables = [t for t in format_report(report).renderables if isinstance(t, Table)]
    assert [t.title for t in tables] == ["GPEN-BFR-256, model only"]
    assert tables[0].row_count == len(rows)


def test_unknown_model_is_refused():
    # A user's mistake: one line from the CLI (it was a ValueError and a traceback).
    with pytest.raises(UserError, match="unknown model"):
        run_bench("cpu", ["GPEN-BFR-128"], [1], quick=True, json_path=None, pipeline_frames=0)


def test_median_seconds_counts_every_call():
    calls = []
    seconds = median_seconds(lambda: calls.append(1), torch.device("cpu"), Timing(2, 3, 4, 8))
    assert len(calls) == 2 + 3 * 4
    assert seconds >= 0


def test_end_to_end_benchmark_runs_the_real_pipeline(shared_dir, tmp_path):
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    name = "detection_mobilenet0.25_Final.pth"
    (weights_dir / name).write_bytes((shared_dir / "weights" / name).read_bytes())
    from streamgpen.apps.bench_pipeline import bench_pipeline

    trace = tmp_path / "trace.json"
    rows = bench_pipeline(
        torch.device("cpu"), "GPEN-BFR-256", 2, weights_dir=weights_dir, profile=trace
    )
    assert [row["mode"] for row in rows] == ["file", "live"]
    file_run, live_run = rows
    assert file_run["frames"] == 2 and file_run["faces_per_frame"] == 4
    assert file_run["fps"] > 0
    assert file_run["stage_ms_per_frame"]["restore"] > 0
    assert 0 <= file_run["worker_idle_fraction"] <= 1
    assert live_run["latency_ms_p95"] >= live_run["latency_ms_p50"] > 0
    # The file run was profiled: a Chrome trace with the worker's stages as named ranges.
    assert file_run["profile_trace"] == str(trace) and "profile_trace" not in live_run
    names = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
    assert {"stage:detect_track", "stage:restore", "stage:blend"} <= names
    top = file_run["profile_top_ops"]
    assert 0 < len(top) <= 15 and all(op["clock"] == "cpu" and op["self_ms"] > 0 for op in top)
    assert top == sorted(top, key=lambda op: op["self_ms"], reverse=True)


def widest_report() -> dict:
    """A report whose figures are as wide as real ones get, on a CPU and on a GPU: the longest
    mode name, five-digit ms per batch (GPEN-BFR-512 at batch 4 takes ~56 s on a 2-core CPU),
    four-digit faces/s (GPEN-BFR-256 in CUDA graphs), three-digit speed-ups, five-digit latency
    and drop counts, and the eight stages of a run with a face parser and an upscaler."""
    modes = ["eager-fp32", "eager-bf16", "eager-fp16", "graphs-fp16", "graphs-fp16-compiled"]
    model_rows = [
        {"model": model, "mode": mode, "batch": batch, "ms_per_batch": 56123.4,
         "faces_per_s": 9259.26, "speedup_vs_baseline": 166.67, "fraction_of_peak": 0.213}
        for model in ("GPEN-BFR-256", "GPEN-BFR-512") for mode in modes for batch in (1, 32)
    ]  # fmt: skip
    stages = ["decode", "detect_track", "restore", "parse", "upscale", "blend", "download",
              "encode"]  # fmt: skip
    pipeline_rows = [
        {"model": "GPEN-BFR-512", "mode": mode, "frames": 600, "fps": 1234.5,
         "faces_per_frame": 12.5, "worker_idle_fraction": 0.125,
         "stage_ms_per_frame": {s: 12345.67 for s in stages}} | extra
        for mode, extra in [("file", {}), ("live", {"latency_ms_p50": 45051.9,
                                                    "latency_ms_p95": 45081.9, "dropped": 12345})]
    ]  # fmt: skip
    return {
        "device": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz, 2 threads",
        "torch": "2.14.1+cu130", "note": "Networks are randomly initialised (seed 0).",
        "matmul_peak": {"dtype": "float16", "n": 8192, "tflops": 756.21},
        "model_rows": model_rows, "pipeline_rows": pipeline_rows,
        "jpeg_decode": {"width": 3840, "height": 2160, "device": "cuda:0",
                        "cv2_images_per_s": 45.3, "torchvision_images_per_s": 312.9,
                        "speedup": 6.91},
    }  # fmt: skip


def test_bench_tables_fit_80_columns_with_every_figure():
    report = widest_report()
    console = Console(file=io.StringIO(), width=80, force_terminal=False, color_system=None)
    model, pipeline = format_report(report), format_pipeline(report)
    tables = [t for group in (model, pipeline) for t in group.renderables if isinstance(t, Table)]
    assert len(tables) == 4  # one per model; the runs; the stages
    for table in tables:
        # Its natural width, not one rich squeezed (wrapping cells) to fit the console.
        assert Measurement.get(console, console.options, table).maximum <= 80, table.title
    for renderable in (model, format_jpeg_decode(report), pipeline):
        console.print(renderable)
    text = console.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    cells = [line.split("│")[1:-1] for line in text.splitlines() if line.startswith("│")]
    cells = [[c.strip() for c in row] for row in cells]
    assert ["graphs-fp16-compiled", "32", "56123.4", "9259.26", "166.67x", "21.3"] in cells
    assert ["live", "600", "1234.5", "12.5", "12%", "45051.9", "45081.9", "12345"] in cells
    assert ["file", "600", "1234.5", "12.5", "12%", "", "", ""] in cells
    assert [[row[0] for row in cells if row[1:] == ["12345.7", "12345.7"]]] == [
        ["decode", "detect_track", "restore", "parse", "upscale", "blend", "download", "encode"]
    ]
    assert len([row for row in cells if row[0] == "graphs-fp16-compiled"]) == 4


def test_stage_costs_are_measured_and_fit_80_columns():
    # A 180x320 frame, the cheap networks: the rows and the table, not the 1080p figures.
    from streamgpen.apps.bench_stages import bench_stages, format_stages

    rows = bench_stages(
        torch.device("cpu"),
        frame_size=(180, 320),
        upsamplers=("realesr-general-x4v3",),
        parsers=("bisenet",),
    )
    stages = [row["stage"] for row in rows]
    assert stages == [
        "upscale x2: resize (--bg-upsampler none)",
        "upscale x2: realesr-general-x4v3",
        "parse masks: bisenet, 4 faces",
        "paste 4 faces at 1x",
        "paste 4 faces at 2x",
        "--color-match, 4 faces",
        "--temporal flow, 4 faces",
    ]
    assert all(row["ms_per_frame"] > 0 for row in rows)
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(format_stages(rows, (180, 320)))
    assert max(len(line) for line in console.export_text().splitlines()) <= 80
