"""Draws docs/quality.png: what --upscale and --mask do, on four faces of the Solvay photo.

Real GPEN and parser weights cannot be downloaded where this is made, so it says what stands in:
the identity model (each face pasted back as it was cropped, which shows the geometry: an
upscaled output whose faces are sampled from the input at the output's resolution) and a seeded
random ParseNet (its masks show where a parsed paste lands and how it is feathered, not what a
trained parser would keep). Run from the checkout: ``python docs/quality_pictures.py``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from streamgpen.enhancer import Enhancer, output_matrices
from streamgpen.faces.align import paste_alpha
from streamgpen.faces.detect import FaceDetector
from streamgpen.faces.parse import NETWORKS, FaceParser, build_network
from streamgpen.runtime.restorer import Identity, Restorer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REGION = (slice(60, 230), slice(430, 730))  # four faces of the back row
LABEL_HEIGHT = 22


def labelled(image: np.ndarray, text: str) -> np.ndarray:
    """``image`` (BGR uint8) with a caption strip above it."""
    strip = np.full((LABEL_HEIGHT, image.shape[1], 3), 255, np.uint8)
    cv2.putText(strip, text, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([strip, image])


def alpha_picture(alpha: torch.Tensor, image: np.ndarray) -> np.ndarray:
    """The paste alpha [H, W] over a dimmed ``image``: where and how strongly faces land."""
    a = alpha.numpy()[..., None]
    tint = np.array([40, 200, 255], np.float32)
    return (image * (0.35 + 0.25 * (1 - a)) + tint * a * 0.6).clip(0, 255).astype(np.uint8)


def main() -> None:
    photo = cv2.imread(str(SHARED / "media" / "Solvay_conference_1927.png"))[REGION]
    detector = FaceDetector("mobile0.25", SHARED / "weights" / "detection_mobilenet0.25_Final.pth")
    enhancer = Enhancer(
        restorer=Restorer(Identity(512), "cpu"),
        face_detector=detector,
        device="cpu",
        mask="box",
        upscale=2.0,
    )
    result = enhancer.enhance(photo)
    h, w = photo.shape[:2]
    batch = enhancer.align(enhancer.upload(photo), [result.faces])
    matrices = output_matrices(batch.matrices, (h, w), (2 * h, 2 * w))
    torch.manual_seed(0)
    parser = FaceParser(build_network("parsenet"), NETWORKS["parsenet"], device="cpu",
                        dtype=torch.float32)  # fmt: skip
    masks = parser.masks(batch.crops)
    frame = torch.zeros(1, 3, 2 * h, 2 * w)
    box = paste_alpha(frame, matrices, 512)[0, 0]
    parsed = paste_alpha(frame, matrices, 512, masks=masks)[0, 0]
    nearest = cv2.resize(photo, (2 * w, 2 * h), interpolation=cv2.INTER_NEAREST)
    panels = [
        labelled(nearest, "input (pixels shown 2x)"),
        labelled(result.image, "--upscale 2 (identity model)"),
        labelled(alpha_picture(box, result.image), "--mask box: where faces land"),
        labelled(alpha_picture(parsed, result.image), "--mask parse (random ParseNet)"),
    ]
    top, bottom = np.hstack(panels[:2]), np.hstack(panels[2:])
    out = ROOT / "docs" / "quality.png"
    cv2.imwrite(str(out), np.vstack([top, bottom]), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"{out}: {len(result.faces)} faces")


if __name__ == "__main__":
    main()
