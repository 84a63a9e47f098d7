"""Temporal stabilisation (issue #15): flicker, lag and cost of ``--temporal off|ema|flow``.

Clips: ``sample``, the first ``--frames`` frames of ``samples/solvay_pan.mp4`` (a slow pan, ~14
faces a frame), and ``dance``, a generated clip of Solvay faces moving 10-22 px a frame and
turning (``tests/motion_clips.dance``, 3 faces, 640x360, known true landmarks). Each is enhanced
by the command line with a seeded random GPEN-BFR-256 (the real weights cannot be had here):

- ``gpen``: ``torch.manual_seed(0)`` and the architecture's own initialisation, as the tests
  make it. Its noise-injection weights start at zero, so its output depends on the encoder's
  features only through the style code z: ``ema``'s feature mixing has nothing to act on.
- ``gpen-features`` (``--features``): the same with every noise weight drawn N(0, 1) (seed 1),
  as the tiny fixture's are, so the encoder features reach the output as in a trained GPEN.

Figures, per clip and mode:

- warping error of the output's face regions along the source's optical flow
  (``streamgpen.apps.evaluate.evaluate_video``, the ``streamgpen eval`` figures), beside the
  source's own (its floor), and the factor off / mode;
- lag: the displacement of each face's output content from ``off``'s (phase correlation inside
  the face box, x1.5; ``off`` restores each frame alone and pastes it with the frame's own
  matrix, so it cannot lag), in % of the inter-ocular distance (IOD): its mean size, and its
  mean component against the face's motion (``behind``), over faces moving >= 1 px a frame;
- on ``dance``, the tracker's landmark lag (``motion_clips.against_truth`` of the face log:
  against the truth, and against per-frame detection), and ``flow`` with the identity model
  against the input itself (real face content carried by the flow);
- cost: ms per face of each mode's own work (the latent mixing, the flow plan and blend),
  measured in-process on the sample's crops, apart from GPEN's, on one thread
  (``--cost-only`` measures it again into the JSON file's figures).

    python benchmarks/temporal.py --frames 30 --json benchmarks/results/temporal-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import av
import cv2
import numpy as np
import torch

from streamgpen.apps.evaluate import evaluate_video, read_face_log
from streamgpen.faces.detect import FaceDetector
from streamgpen.files import atomic_path
from streamgpen.models.gpen import GPEN
from streamgpen.models.weights import MODELS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the generated clips the tracker's tests use
import motion_clips as clips  # noqa: E402

SAMPLE = ROOT / "samples" / "solvay_pan.mp4"
MOBILENET = "detection_mobilenet0.25_Final.pth"
SHARED_WEIGHTS = ROOT.parent / "shared" / "weights"
MODES = ("off", "ema", "flow")
BOX_SCALE = 1.5  # the lag's window around a face box
MOVING = 1.0  # px per frame: the faces whose lag counts


def random_gpen(path: Path, features: bool) -> Path:
    """A seeded random GPEN-BFR-256 checkpoint at ``path`` (see the module's docstring)."""
    torch.manual_seed(0)
    model = GPEN.from_config(MODELS["GPEN-BFR-256"].config)
    if features:
        generator = torch.Generator().manual_seed(1)
        for name, parameter in model.named_parameters():
            if name.endswith("noise.weight"):
                parameter.data = torch.randn(1, generator=generator)
    torch.save(model.state_dict(), path)
    return path


def write_lossless(frames: list[np.ndarray], path: Path, fps: int = 25) -> Path:
    """RGB uint8 frames [H, W, 3] as an FFV1 clip (the source the runs and eval read)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv444p"
        for rgb in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def decoded(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def enhance(clip: Path, out: Path, model: list[str], mode: str, weights: Path) -> float:
    """``streamgpen enhance --temporal MODE`` of ``clip`` (lossless, with its face log beside
    ``out``) in this process: its seconds."""
    from typer.testing import CliRunner

    from streamgpen.cli.app import app

    args = ["enhance", str(clip), "-o", str(out), *model, "--detector", "retinaface_mobile0.25",
            "--weights-dir", str(weights), "--device", "cpu", "--mask", "box", "--codec", "ffv1",
            "--quiet", "--faces-json", str(out.with_suffix(".jsonl")),
            "--temporal", mode]  # fmt: skip
    start = time.perf_counter()
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    if result.exit_code != 0:
        raise RuntimeError(result.output)
    return time.perf_counter() - start


def content_shift(reference: np.ndarray, output: np.ndarray, box: np.ndarray) -> np.ndarray:
    """How far ``output``'s content sits from ``reference``'s inside ``box`` (x BOX_SCALE),
    (dx, dy) pixels, by phase correlation of their luma."""
    height, width = reference.shape[:2]
    centre, half = (box[:2] + box[2:]) / 2, BOX_SCALE * (box[2:] - box[:2]) / 2
    x1, y1 = np.maximum(np.floor(centre - half), 0).astype(int)
    x2, y2 = np.minimum(np.ceil(centre + half), (width, height)).astype(int)
    a, b = (cv2.cvtColor(image[y1:y2, x1:x2], cv2.COLOR_RGB2GRAY) for image in (reference, output))
    window = cv2.createHanningWindow(a.shape[::-1], cv2.CV_32F)
    (dx, dy), _ = cv2.phaseCorrelate(np.float32(a), np.float32(b), window)
    return np.array([dx, dy])


def lag(reference: list[np.ndarray], output: list[np.ndarray], faces_json: Path) -> dict:
    """Each moving face's output content against ``reference``'s (see the module's doc)."""
    log = read_face_log(faces_json)
    centres = {(t, f.track): f.landmarks.mean(axis=0) for t, faces in log.items() for f in faces}
    sizes, behind = [], []
    for t, faces in log.items():
        for face in faces:
            before, after = centres.get((t - 1, face.track)), centres.get((t + 1, face.track))
            if before is None or after is None:
                continue
            velocity = (after - before) / 2
            speed = float(np.linalg.norm(velocity))
            iod = float(np.linalg.norm(face.landmarks[1] - face.landmarks[0]))
            if speed < MOVING or iod < 1:
                continue
            shift = content_shift(reference[t], output[t], face.box)
            sizes.append(100 * float(np.linalg.norm(shift)) / iod)
            behind.append(-100 * float(shift @ velocity) / speed / iod)
    return {
        "faces": len(sizes),
        "shift_pct_iod": float(np.mean(sizes)) if sizes else None,
        "behind_pct_iod": float(np.mean(behind)) if behind else None,
    }


def warping(run: dict) -> dict:
    figures = run["warping_error"]
    return {"output": figures["output"]["mean"], "source": figures["source"]["mean"]}


def measure_clip(clip: Path, folder: Path, model: list[str], weights: Path) -> dict:
    """Every mode's run of ``clip``: warping error, lag against off, run time."""
    report, outputs = {}, {}
    for mode in MODES:
        out = folder / f"{clip.stem}-{mode}.mkv"
        seconds = enhance(clip, out, model, mode, weights)
        figures = evaluate_video(
            str(out), str(clip), faces_json=out.with_suffix(".jsonl"), quiet=True
        )
        outputs[mode] = decoded(out)
        report[mode] = {"run_seconds": round(seconds, 1), "warping_error": warping(figures)}
        report[mode]["landmark_jitter_iod"] = figures["landmark_jitter"]["mean"]
    off = report["off"]["warping_error"]["output"]
    for mode in MODES:
        error = report[mode]["warping_error"]
        error["factor_vs_off"] = off / error["output"]
        if mode != "off":
            jsonl = folder / f"{clip.stem}-{mode}.jsonl"
            report[mode]["lag_vs_off"] = lag(outputs["off"], outputs[mode], jsonl)
    return report


def tracker_lag(clip: clips.Clip, faces_json: Path, detector: FaceDetector) -> dict:
    """The face log's landmarks against the clip's truth and per-frame detection
    (``motion_clips.against_truth``: the tracker's own lag is ``lag_vs_detection_pct_iod``)."""
    from streamgpen.faces.types import Face

    log = read_face_log(faces_json)
    faces = [
        [Face(box=f.box, landmarks=f.landmarks, score=1.0) for f in log.get(t, [])]
        for t in range(len(clip.frames))
    ]
    return clips.against_truth(clip, faces, clips.detect_each(detector, clip.tensors()))


def sample_batches(clip: Path, faces_json: Path, frames: int, size: int):
    """The clip's first ``frames`` frames' faces aligned at ``size`` as the run did (the face log's
    landmarks), one FaceBatch per frame with its track keys."""
    from streamgpen.enhancer import Enhancer
    from streamgpen.faces.types import Face
    from streamgpen.runtime.restorer import Identity, Restorer

    aligner = Enhancer(
        restorer=Restorer(Identity(size), "cpu"), face_detector=object(), device="cpu", mask="box"
    )
    log = read_face_log(faces_json)
    batches = []
    for t, rgb in enumerate(decoded(clip)[:frames]):
        image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
        faces = [Face(box=f.box, landmarks=np.float32(f.landmarks), score=1.0) for f in log[t]]
        batch = aligner.align(image, [faces])
        batch.tracks = [f.track for f in log[t]]
        batches.append(batch)
    return batches


def cost(checkpoint: Path, clip: Path, faces_json: Path, frames: int) -> dict:
    """ms per face over the clip's first ``frames`` frames: the GPEN itself, and each mode's own
    work on top of it."""
    from streamgpen.faces.temporal import FlowSmoother, LatentSmoother
    from streamgpen.models.weights import load_gpen
    from streamgpen.runtime.restorer import Restorer

    # One thread: on this loaded 2-core machine, two threads' wake-ups took longer than the work
    # (stacking 13 crops at 256: 100 ms with two threads, 1.2 ms with one).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    restorer = Restorer(load_gpen(checkpoint), "cpu", batch_size=8, halves=True)
    batches = sample_batches(clip, faces_json, frames, restorer.size)
    latents, flow = LatentSmoother(), FlowSmoother()
    seconds = {"gpen": 0.0, "ema": 0.0, "flow": 0.0}
    for batch in batches:
        mixer = latents.mixer(batch.tracks, batch.crops)

        def timed_mix(*args, mixer=mixer):
            start = time.perf_counter()
            mixer(*args)
            seconds["ema"] += time.perf_counter() - start

        start = time.perf_counter()
        restored = restorer(batch.crops)
        seconds["gpen"] += time.perf_counter() - start
        restorer(batch.crops, mix=timed_mix)
        start = time.perf_counter()
        flow.blend(flow.plan(batch.tracks, batch.crops), restored)
        seconds["flow"] += time.perf_counter() - start
    torch.set_num_threads(threads)
    faces = sum(len(b.faces) for b in batches)
    return {
        "faces": faces,
        "ms_per_face": {k: round(1000 * v / faces, 2) for k, v in seconds.items()},
        "torch_threads": 1,
    }


def measure_clips(args, folder: Path, model: list[str], weights: Path) -> dict:
    """The sample's and the dance clip's figures (see the module's docstring)."""
    sample = write_lossless(decoded(SAMPLE)[: args.frames], folder / "sample.mkv")
    report = {"sample": measure_clip(sample, folder, model, weights)}
    detector = FaceDetector("mobile0.25", SHARED_WEIGHTS / MOBILENET)
    photo = clips.load_photo()
    dance = clips.dance(photo, clips.source_faces(detector, photo), args.dance_frames, 3)
    dance_clip = write_lossless(list(dance.frames), folder / "dance.mkv")
    report["dance"] = measure_clip(dance_clip, folder, model, weights)
    report["dance"]["tracker_lag"] = tracker_lag(dance, folder / "dance-off.jsonl", detector)
    out = folder / "dance-identity-flow.mkv"
    enhance(dance_clip, out, ["--model", "identity"], "flow", weights)
    report["dance"]["identity_flow_lag_vs_input"] = lag(
        list(dance.frames), decoded(out), out.with_suffix(".jsonl")
    )
    return report


def measure_cost(folder: Path, model: list[str], weights: Path, frames: int) -> dict:
    """:func:`cost` on the sample's first ``frames`` frames, their faces from an ``off`` run."""
    clip = write_lossless(decoded(SAMPLE)[:frames], folder / "cost.mkv")
    enhance(clip, folder / "cost-off.mkv", model, "off", weights)
    return cost(Path(model[-1]), clip, folder / "cost-off.jsonl", frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=30, help="the sample's first frames")
    parser.add_argument("--dance-frames", type=int, default=40)
    parser.add_argument("--features", action="store_true", help="noise weights N(0, 1) too")
    parser.add_argument("--cost-frames", type=int, default=6)
    parser.add_argument("--cost-only", action="store_true", help="update the cost figures only")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="this GPEN instead (real weights, say)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    label = "gpen-features" if args.features else "gpen"
    if args.checkpoint is not None:
        label = args.checkpoint.stem
    results = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    report = results.get(label, {}) if args.cost_only else {}
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        weights = folder / "weights"
        weights.mkdir()
        (weights / MOBILENET).symlink_to(SHARED_WEIGHTS / MOBILENET)
        checkpoint = args.checkpoint or random_gpen(folder / "gpen256.pth", args.features)
        model = ["--model-path", str(checkpoint)]
        if not args.cost_only:
            report = measure_clips(args, folder, model, weights)
            report["command"] = " ".join(["python", "benchmarks/temporal.py", *sys.argv[1:]])
        report["cost"] = measure_cost(folder, model, weights, args.cost_frames)
    report["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": cpu_count()}
    print(json.dumps(report, indent=2))
    if args.json is not None:
        results[label] = report
        with atomic_path(args.json) as temp:
            temp.write_text(json.dumps(results, indent=2) + "\n")


def cpu_count() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
