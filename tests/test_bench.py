"""The model benchmark: a quick CPU run writes a complete report."""

from __future__ import annotations

import json

import pytest
import torch
from rich.table import Table

from streamgpen.apps.bench import (
    FLOPS_PER_FACE,
    Timing,
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
    table = format_report(report)
    assert isinstance(table, Table) and table.row_count == len(rows)


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
