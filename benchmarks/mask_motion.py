"""How much the paste masks move from frame to frame on the sample clip: parsed against box.

For each pair of consecutive frames it measures the mean absolute change of the union paste mask
(the alpha each pixel gets) over the pixels that either frame pastes: the box mask moves only
with the tracked face (its landmarks, smoothed by the tracker), a parsed mask moves with the face
and with whatever the parser decides anew each frame; ``parse_smoothed`` is the same through the
video pipeline's per-track :class:`~streamgpen.faces.parse.MaskSmoother`. A parsed mask has more
edge than a square, so it changes more under the same motion: ``crop_space`` separates the
parser's own flicker, the change of each track's mask in its crop (where the face stays put).
Real parser weights are unavailable here, so the parser is seeded random (stated in the output).

    python benchmarks/mask_motion.py --frames 12 --parser bisenet --json benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import av
import torch

from streamgpen.enhancer import Enhancer
from streamgpen.faces.align import paste_alpha
from streamgpen.faces.detect import FaceDetector
from streamgpen.faces.parse import NETWORKS, FaceParser, MaskSmoother, build_network
from streamgpen.faces.track import Tracker
from streamgpen.runtime.restorer import Identity, Restorer

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "solvay_pan.mp4"
MOBILENET = ROOT.parent / "shared" / "weights" / "detection_mobilenet0.25_Final.pth"


def frames(limit: int):
    with av.open(str(SAMPLE)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i == limit:
                return
            rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
            yield i / 25, rgb.float() / 255


def measure(limit: int, parser_name: str, size: int) -> dict:
    torch.manual_seed(0)
    detector = FaceDetector("mobile0.25", MOBILENET)
    enhancer = Enhancer(
        restorer=Restorer(Identity(size), "cpu"), face_detector=detector, device="cpu", mask="box"
    )
    parser = FaceParser(
        build_network(parser_name), NETWORKS[parser_name], device="cpu", dtype=torch.float32
    )
    tracker, smoother = Tracker(detector), MaskSmoother()
    previous, change = None, {"box": [], "parse": [], "parse_smoothed": []}
    crop_change, before = {"parse": [], "parse_smoothed": []}, {}
    for seconds, image in frames(limit):
        tracked = tracker.update(image, seconds)
        batch = enhancer.align(image[None], [[t.face for t in tracked]])
        masks = parser.masks(batch.crops)
        steady = smoother(masks, [t.track_id for t in tracked])
        now = {t.track_id: (m, q) for t, m, q in zip(tracked, masks, steady, strict=True)}
        for track, (mask, smooth) in now.items():
            if track in before:
                for kind, a, b in (("parse", mask, before[track][0]),
                                   ("parse_smoothed", smooth, before[track][1])):  # fmt: skip
                    covered = (a > 0) | (b > 0)
                    crop_change[kind].append(float((a - b).abs()[covered].mean()))
        before = now
        alphas = {
            "box": paste_alpha(image[None], batch.matrices, size)[0, 0],
            "parse": paste_alpha(image[None], batch.matrices, size, masks=masks)[0, 0],
            "parse_smoothed": paste_alpha(image[None], batch.matrices, size, masks=steady)[0, 0],
        }
        if previous is not None:
            for kind, alpha in alphas.items():
                covered = (alpha > 0) | (previous[kind] > 0)
                change[kind].append(float((alpha - previous[kind]).abs()[covered].mean()))
        previous = alphas
    mean = {kind: sum(v) / len(v) for kind, v in change.items()}
    return {
        "clip": SAMPLE.name,
        "frames": limit,
        "crop": size,
        "parser": f"{parser_name} (seeded random weights)",
        "mean_alpha_change_per_frame": mean,
        "crop_space_change_per_frame": {k: sum(v) / len(v) for k, v in crop_change.items()},
        "parse_over_box": mean["parse"] / mean["box"],
        "smoothed_over_box": mean["parse_smoothed"] / mean["box"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--parser", choices=list(NETWORKS), default="bisenet")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = measure(args.frames, args.parser, args.size)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
