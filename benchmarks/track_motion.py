"""The tracker on fast motion (issue #15): error, lag, jitter, recall and cost per clip.

Clips (``tests/motion_clips.py``): ``dance`` (Solvay faces moving, scaling and turning fast) and
``crossing`` (pairs of faces walking across each other), both 640x360 at 25 fps with known true
landmarks; and ``sample``, the slow pan of ``samples/solvay_pan.mp4`` (960x540, 100 frames).
Each is run through per-frame detection (the detector alone: the reference), the tracker with
``detect_every=1`` (detection every frame, smoothed) and the default tracker (``detect_every=5``).
The sample is also measured as ``tests/test_video.py`` counts it: against the tracker with
``detect_every=1``. Figures are written under ``--label`` into the JSON file, which keeps the
other labels (``before``: the tracker before the fast-motion work; ``after``: with it).

    python benchmarks/track_motion.py --frames 80 --label after \\
        --json benchmarks/results/track-motion-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import av
import numpy as np
import torch

from streamgpen.faces.detect import FaceDetector
from streamgpen.faces.track import Tracker
from streamgpen.files import atomic_path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the clips and measurements the tests use
import motion_clips as clips  # noqa: E402

SAMPLE = ROOT / "samples" / "solvay_pan.mp4"
MOBILENET = ROOT.parent / "shared" / "weights" / "detection_mobilenet0.25_Final.pth"


def sample_frames() -> torch.Tensor:
    """The sample clip's frames, [T, 3, H, W] float RGB."""
    with av.open(str(SAMPLE)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255


class PixelCount:
    """Counts the pixels the detector's network is given (full frames, follow crops, edge
    strips, after any downscale): the tracker's cost independent of how loaded the machine is.
    It wraps ``FaceDetector._preprocess``, which every detection, the follower's included,
    goes through."""

    def __init__(self) -> None:
        self.pixels = 0
        self._preprocess = FaceDetector._preprocess
        count = self

        def counted(detector: FaceDetector, images: torch.Tensor) -> torch.Tensor:
            x = count._preprocess(detector, images)
            count.pixels += x.shape[0] * x.shape[2] * x.shape[3]
            return x

        FaceDetector._preprocess = counted


def timed(function, frames: torch.Tensor, pixels: PixelCount) -> tuple[list, dict]:
    """``function(frames)`` and its cost per frame: wall and CPU (process) time in ms, and the
    megapixels the detector's network saw. The CPU time is the steadier figure on a shared
    machine; both count the detector's threads."""
    start, cpu, seen = time.perf_counter(), time.process_time(), pixels.pixels
    result = function(frames)
    count = len(frames)
    return result, {
        "ms_per_frame": 1000 * (time.perf_counter() - start) / count,
        "cpu_ms_per_frame": 1000 * (time.process_time() - cpu) / count,
        "network_mpx_per_frame": (pixels.pixels - seen) / count / 1e6,
    }


def tracked(detector: FaceDetector, detect_every: int, fps: float):
    """A function that tracks frames with a fresh tracker; it also returns the tracker."""

    def run(frames: torch.Tensor):
        tracker = Tracker(detector, detect_every=detect_every)
        return [tracker.update(f, i / fps) for i, f in enumerate(frames)], tracker

    return run


def measure_clip(
    detector: FaceDetector, clip: clips.Clip | None, frames: torch.Tensor, pixels: PixelCount
) -> dict:
    """The three runs over one clip; ``clip`` carries the truth (None for the sample)."""
    fps = clip.fps if clip else 25.0
    reference, cost = timed(lambda x: clips.detect_each(detector, x), frames, pixels)
    report = {"frames": len(frames), "detection": cost}
    if clip:
        report["detection"] |= clips.measure(clip, reference, reference)
    smoothed = None
    for name, every in (("detect_every_1", 1), ("tracked", 5)):
        (result, tracker), cost = timed(tracked(detector, every, fps), frames, pixels)
        faces = clips.faces_of(result)
        row = clips.measure(clip, reference, result) if clip else {}
        if not clip:
            row |= clips.against_detection(reference, faces)
            row["jitter_pct_iod"] = clips.track_jitter(result)
        row |= {"full_detected_fraction": tracker.full_detections / len(frames)} | cost
        if smoothed is not None:
            # As tests/test_video.py counts the sample: against detection every frame, smoothed.
            row["vs_detect_every_1"] = clips.against_detection(smoothed, faces)
        smoothed = faces
        report[name] = row
    return report


def main() -> None:
    """Measure every clip and write the figures under the label."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=80, help="frames of each generated clip")
    parser.add_argument("--label", default="after")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    pixels = PixelCount()
    detector = FaceDetector("mobile0.25", MOBILENET)
    photo = clips.load_photo()
    pool = clips.source_faces(detector, photo)
    figures = {}
    for make in (clips.dance, clips.crossing):
        clip = make(photo, pool, frames=args.frames)
        figures[clip.name] = measure_clip(detector, clip, clip.tensors(), pixels)
        print(clip.name, json.dumps(figures[clip.name], indent=1), flush=True)
    figures["sample"] = measure_clip(detector, None, sample_frames(), pixels)
    print("sample", json.dumps(figures["sample"], indent=1))
    if args.json:
        report = json.loads(args.json.read_text()) if args.json.exists() else {"runs": {}}
        report["machine"] = (
            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        )
        report["command"] = " ".join(["python", *sys.argv])
        report["runs"][args.label] = figures
        with atomic_path(args.json) as temp:
            temp.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
