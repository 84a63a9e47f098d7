"""End-to-end speed: a generated 1080p clip with four moving faces through the whole pipeline.

Decode -> detect/track -> restore -> blend -> download -> encode (to ``null``), with a randomly
initialised GPEN (speed does not depend on weight values) and the real RetinaFace. Reports frames/s,
the time each stage took, the fraction of the run the device worker was idle, and for a live
(``--realtime``) run the per-frame latency p50/p95.
"""

from __future__ import annotations

import math
import tempfile
from contextlib import contextmanager
from pathlib import Path

import av
import cv2
import numpy as np
import torch

from streamgpen.enhancer import Enhancer, build_detector
from streamgpen.errors import UserError
from streamgpen.faces.track import Tracker
from streamgpen.media.sinks import open_sink
from streamgpen.media.video import open_source
from streamgpen.models.gpen import GPEN
from streamgpen.models.weights import MODELS
from streamgpen.pipeline.build import video_pipeline
from streamgpen.pipeline.observers import STAGES, WORKER_STAGES
from streamgpen.runtime.restorer import Restorer

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "solvay_pan.mp4"
# In the sample's first frame this 320x180 window holds four faces; 6x gives them ~240 px.
WINDOW = (400, 100, 320, 180)
PAN_PX = 24


def make_clip(path: Path, frames: int, size=(1920, 1080), fps: int = 30) -> Path:
    """Write an H.264 clip of ``frames`` frames: four faces from the sample, slowly panning."""
    if not SAMPLE.exists():
        raise UserError(f"the end-to-end benchmark needs {SAMPLE} (run it from a checkout)")
    with av.open(str(SAMPLE)) as sample:
        still = next(sample.decode(video=0)).to_ndarray(format="rgb24")
    x0, y0, w, h = WINDOW
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "18"})
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            dx = PAN_PX * math.sin(2 * math.pi * i / max(frames, 60))
            dy = PAN_PX / 2 * math.cos(2 * math.pi * i / max(frames, 60))
            matrix = np.float32([[size[0] / w, 0, -(x0 + dx) * size[0] / w],
                                 [0, size[1] / h, -(y0 + dy) * size[1] / h]])  # fmt: skip
            image = cv2.warpAffine(still, matrix, size, flags=cv2.INTER_CUBIC)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


def bench_pipeline(
    device: torch.device,
    model: str,
    frames: int,
    detector: str = "retinaface_mobile0.25",
    weights_dir: Path | None = None,
    batch_size: int = 8,
    profile: Path | None = None,
) -> list[dict]:
    """Two runs over the generated clip: as fast as possible, then live (paced at its rate).

    ``profile``: run the first under torch.profiler, write its Chrome trace there (the worker's
    stages are named ranges ``stage:...``) and add the ops that took most time to its row.
    """
    network = GPEN.from_config(MODELS[model].config)
    enhancer = Enhancer(
        restorer=Restorer(network, device, batch_size),
        face_detector=build_detector(detector, device, weights_dir),
        device=device,
        mask="box",  # the parsers' cost is bench_stages' (random parsers would need files here)
    )
    enhancer.warmup(1080, 1920)
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_clip(Path(tmp) / "faces_1080p.mp4", frames)
        return [_run(enhancer, clip, model, False, profile), _run(enhancer, clip, model, True)]


def _run(
    enhancer: Enhancer, clip: Path, model: str, live: bool, profile: Path | None = None
) -> dict:
    source = open_source(str(clip), realtime=live)
    pipeline = video_pipeline(
        source=source,
        sink=open_sink("null", source),
        enhancer=enhancer,
        tracker=Tracker(enhancer.detector),
        sync_stages=not live,
    )
    with source, _profiled(profile, enhancer.device) as profiler:
        stats = pipeline.run()
    wall = max(stats.elapsed, 1e-9)
    worker = sum(stats.stage_seconds[s] for s in WORKER_STAGES)
    row = {
        "model": model,
        "mode": "live" if live else "file",
        "frames": stats.frames_out,
        "faces_per_frame": round(stats.faces / max(stats.frames_out, 1), 2),
        "fps": round(stats.frames_out / wall, 2),
        "stage_ms_per_frame": {
            s: round(1000 * stats.stage_seconds[s] / max(stats.frames_out, 1), 2) for s in STAGES
        },
        # Stages are synchronised in the file run, so this is the device worker's idle share.
        "worker_idle_fraction": round(max(0.0, 1 - worker / wall), 3),
    }
    if profiler is not None:
        profiler.export_chrome_trace(str(profile))
        row |= {"profile_trace": str(profile), "profile_top_ops": top_ops(profiler)}
    if live:
        row |= {
            "latency_ms_p50": _round(stats.latency_ms(0.5)),
            "latency_ms_p95": _round(stats.latency_ms(0.95)),
            "dropped": stats.dropped,
        }
    return row


@contextmanager
def _profiled(path: Path | None, device: torch.device):
    """torch.profiler around the block when ``path`` is given (CUDA kernels included), else None."""
    if path is None:
        yield None
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        yield profiler


def top_ops(profiler: torch.profiler.profile, count: int = 15) -> list[dict]:
    """The ops (and on CUDA, kernels) that took most self time: device time on a GPU, else CPU.

    CPU ops are those of the worker thread (torch.profiler follows the thread that started it);
    GPU kernels are recorded whichever thread launched them.
    """
    events = profiler.key_averages()
    on_device = any(e.self_device_time_total > 0 for e in events)

    def self_us(e) -> float:
        return e.self_device_time_total if on_device else e.self_cpu_time_total

    ranked = sorted((e for e in events if self_us(e) > 0), key=self_us, reverse=True)
    return [
        {
            "name": e.key,
            "calls": e.count,
            "self_ms": round(self_us(e) / 1e3, 3),
            "clock": "device" if on_device else "cpu",
        }
        for e in ranked[:count]
    ]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
