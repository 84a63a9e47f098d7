"""Face detection with facexlib's RetinaFace, batched on the torch device.

facexlib's own ``detect_faces``/``batched_detect_faces`` copy every frame to numpy and run NMS per
image on the CPU; here the resize, normalisation, network, decoding, thresholding and NMS of a whole
batch run on the device, and only the kept faces are copied back.

Shapes: B batch, H/W image size, P priors (anchors).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from facexlib.detection.retinaface import RetinaFace
from facexlib.detection.retinaface_utils import PriorBox, batched_decode, batched_decode_landm

from streamgpen.errors import UserError
from streamgpen.faces.types import Face
from streamgpen.models import weights
from streamgpen.runtime.device import fixed_algorithms

NETWORKS = ("resnet50", "mobile0.25")
# RetinaFace was trained on BGR images in [0, 255] minus this per-channel (B, G, R) mean.
BGR_MEAN = (104.0, 117.0, 123.0)

# The long side the detector sees. Small faces need resolution: on the 1328x568 Solvay photo
# (29 faces, ~35x45 px each) mobilenet0.25 at threshold 0.9 finds 12 faces at det_size 640, 23 at
# 832, 28 at 1024 and 1216 (one face scores 0.86 there, 0.98 at full size), all 29 at 1248 and up.
# 1280 finds all 29 (lowest score 0.98), runs 720p frames at full size and 1080p at 1/1.5.
DEFAULT_DET_SIZE = 1280


class FaceDetector:
    """RetinaFace (facexlib's network and released weights) with a batched, on-device pipeline."""

    def __init__(
        self,
        network_name: str,
        weights_path: Path,
        device: str | torch.device = "cpu",
        det_size: int = DEFAULT_DET_SIZE,
        threshold: float = 0.9,
        min_face: int = 10,
        nms_threshold: float = 0.4,
    ) -> None:
        """Build the network and load its weights.

        network_name: ``'resnet50'`` or ``'mobile0.25'``, matching ``weights_path`` (facexlib's
        ``detection_Resnet50_Final.pth`` or ``detection_mobilenet0.25_Final.pth``).
        det_size: images whose long side exceeds it are downscaled to it before detection (never
        upscaled). threshold: minimum face probability. min_face: faces whose box is narrower or
        shorter than this, in original pixels, are dropped. nms_threshold: IoU above which the
        lower-scored of two overlapping boxes is suppressed.
        """
        if network_name not in NETWORKS:
            raise ValueError(f"network_name must be one of {NETWORKS}, got {network_name!r}")
        self.device = torch.device(device)
        self.det_size = det_size
        self.threshold = threshold
        self.min_face = min_face
        self.nms_threshold = nms_threshold
        with warnings.catch_warnings():
            # facexlib builds its ResNet-50 with torchvision's deprecated `pretrained=False`.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.models")
            self.net = RetinaFace(
                network_name=network_name, half=False, phase="test", device=self.device
            )
        self.net.load_state_dict(load_weights(Path(weights_path), network_name))
        self._variances = self.net.cfg["variance"]
        self._mean = torch.tensor(BGR_MEAN, device=self.device).view(1, 3, 1, 1)
        self._priors: dict[tuple[int, int], torch.Tensor] = {}

    @torch.inference_mode()
    def detect(self, images: torch.Tensor) -> list[list[Face]]:
        """Detect the faces in a batch of same-sized RGB images.

        images: [B, 3, H, W] on the detector's device, uint8 in [0, 255] or floating point in
        [0, 1]. Returns one list per image, faces sorted by score, highest first.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        x = self._preprocess(images)
        # cuDNN's autotuner off: see runtime.device (every photo and crop is a new shape).
        with fixed_algorithms():
            loc, conf, landm = self.net(x)
        priors = self._priors_for(x.shape[-2:])
        # Decoded coordinates are fractions of the network input, which spans the whole original
        # image: scaling by the original size maps them back exactly, whatever the resize.
        batch, n_priors = loc.shape[:2]
        boxes = batched_decode(loc, priors, self._variances).view(batch, n_priors, 2, 2)
        landmarks = batched_decode_landm(landm, priors, self._variances).view(batch, n_priors, 5, 2)
        for points in (boxes, landmarks):
            points[..., 0] *= width
            points[..., 1] *= height
        return self._select(boxes.flatten(2), landmarks, conf[..., 1])

    def detect_numpy(self, bgr: np.ndarray) -> list[Face]:
        """Detect the faces in one HxWx3 uint8 BGR image (OpenCV's layout); see ``detect``."""
        if bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 image, got {bgr.shape} {bgr.dtype}")
        rgb = torch.from_numpy(bgr).to(self.device).permute(2, 0, 1).flip(0)
        return self.detect(rgb[None])[0]

    def _preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """RGB batch -> RetinaFace's input: BGR, [0, 255] minus the mean, long side <= det_size."""
        x = images.float() if images.dtype == torch.uint8 else images.float() * 255.0
        height, width = x.shape[-2:]
        scale = self.det_size / max(height, width)
        if scale < 1:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        return x.flip(1) - self._mean

    def _priors_for(self, size: tuple[int, int]) -> torch.Tensor:
        """The anchors [1, P, 4] for a network input size; built once per size (a Python loop)."""
        key = (int(size[0]), int(size[1]))
        if key not in self._priors:
            priors = PriorBox(self.net.cfg, image_size=key).forward()
            self._priors[key] = priors.to(self.device).unsqueeze(0)
        return self._priors[key]

    def _select(
        self, boxes: torch.Tensor, landmarks: torch.Tensor, scores: torch.Tensor
    ) -> list[list[Face]]:
        """Threshold, size filter and per-image NMS over the batch; copy the survivors out.

        boxes: [B, P, 4], landmarks: [B, P, 5, 2], scores: [B, P], original pixel coordinates.
        """
        batch = scores.shape[0]
        sides = torch.minimum(boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1])
        image_idx, prior_idx = torch.nonzero(
            (scores > self.threshold) & (sides >= self.min_face), as_tuple=True
        )
        boxes, landmarks = boxes[image_idx, prior_idx], landmarks[image_idx, prior_idx]
        scores = scores[image_idx, prior_idx]
        # Indices come back sorted by decreasing score, which a per-image split preserves.
        keep = torchvision.ops.batched_nms(boxes, scores, image_idx, self.nms_threshold)
        faces: list[list[Face]] = [[] for _ in range(batch)]
        for i, box, points, score in zip(
            image_idx[keep].tolist(),
            boxes[keep].cpu().numpy(),
            landmarks[keep].cpu().numpy(),
            scores[keep].tolist(),
            strict=True,
        ):
            faces[i].append(Face(box=_frozen(box), landmarks=_frozen(points), score=score))
        return faces


def _frozen(array: np.ndarray) -> np.ndarray:
    """A read-only copy, so a frozen ``Face`` cannot be changed through its arrays."""
    array = array.copy()
    array.flags.writeable = False
    return array


def load_weights(path: Path, network_name: str) -> dict[str, torch.Tensor]:
    """facexlib's RetinaFace ``network_name`` state_dict from ``path`` (``module.`` prefix gone),
    its keys and shapes checked: a corrupt, truncated, pickled-code or other network's file is one
    UserError line naming the file and the one to put in its place."""
    if not path.is_file():
        raise UserError(f"RetinaFace weights not found: {path}")
    return weights.load_retinaface(path, network_name)
