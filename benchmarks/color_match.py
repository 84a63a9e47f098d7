"""What ``--color-match`` changes on the Solvay faces: colour shift of restored against input crops.

For each of the photo's faces, the mean luma and chroma (BT.601 YCbCr, 0-255 scale) over the
feathered paste mask, of the input crop and of the restored one, with and without the match; the
report gives the mean absolute shift and the luma spread (which carries GPEN's detail, and which
the match keeps). The GPEN is a seeded random GPEN-BFR-256 (real weights are unavailable here):
its colours are far from a trained one's, so the figures show the mechanism, not a trained
network's cast.

    python benchmarks/color_match.py --json benchmarks/results/color-match-cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import torch

from streamgpen.enhancer import Enhancer
from streamgpen.faces.align import paste_mask
from streamgpen.faces.color_match import match_color, to_ycbcr
from streamgpen.faces.detect import FaceDetector
from streamgpen.models.gpen import GPEN
from streamgpen.models.weights import MODELS
from streamgpen.runtime.restorer import Restorer

SHARED = Path(__file__).resolve().parents[2] / "shared"


def statistics(crops: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per face: mean Y, Cb, Cr [N, 3] and luma spread [N] over ``weights``, 0-255 scale."""
    ycc = to_ycbcr((crops + 1) / 2) * 255
    w = weights / weights.sum((2, 3), keepdim=True)
    mean = (ycc * w).sum((2, 3))
    spread = (((ycc[:, :1] - mean[:, :1, None, None]) ** 2 * w).sum((2, 3))).sqrt()[:, 0]
    return {"mean": mean, "luma_spread": spread}


def measure() -> dict:
    torch.manual_seed(0)
    gpen = GPEN.from_config(MODELS["GPEN-BFR-256"].config).eval()
    detector = FaceDetector("mobile0.25", SHARED / "weights" / "detection_mobilenet0.25_Final.pth")
    enhancer = Enhancer(
        restorer=Restorer(gpen, "cpu"), face_detector=detector, device="cpu", mask="box"
    )
    photo = cv2.imread(str(SHARED / "media" / "Solvay_conference_1927.png"))
    frame = enhancer.upload(photo)
    batch = enhancer.restore(enhancer.align(frame, enhancer.detect(frame)))
    weights = paste_mask(enhancer.size).expand(len(batch.faces), -1, -1, -1)
    matched = match_color((batch.restored + 1) / 2, (batch.crops + 1) / 2, weights) * 2 - 1
    source = statistics(batch.crops, weights)
    report = {"faces": len(batch.faces), "gpen": "GPEN-BFR-256, seeded random weights"}
    for name, crops in (("restored", batch.restored), ("color_matched", matched)):
        stats = statistics(crops, weights)
        shift = (stats["mean"] - source["mean"]).abs().mean(0)
        report[name] = {
            "mean_abs_shift_Y_Cb_Cr": [round(float(v), 2) for v in shift],
            "luma_spread_mean": round(float(stats["luma_spread"].mean()), 2),
        }
    report["input_luma_spread_mean"] = round(float(source["luma_spread"].mean()), 2)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    text = json.dumps(measure(), indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
