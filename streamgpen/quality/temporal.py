"""Temporal figures of an enhanced video that need no ground truth: flicker, jitter, mask change.

All three are measured against the *input's* motion: the optical flow of the source clip (OpenCV's
DIS, no weights) says where each pixel of frame t was in frame t-1, and an enhancement that is
temporally stable moves with its input.

- **Warping error** (Lai et al., "Learning Blind Video Temporal Consistency", ECCV 2018, with the
  mean absolute error in place of their squared one): frame t-1 warped to frame t with the
  source's flow, ``mean |frame_t(p) - frame_{t-1}(p + flow(p))|`` over the RGB channels and the
  pixels ``p`` of the face regions, in 8-bit levels (0-255). Pixels whose flow fails the
  forward-backward check (occluded, or sampled from outside the frame) are left out. Measured on
  the output and on the source itself with the same flow: the source's figure is the floor (what
  flow error, noise and lighting alone give), the ratio output/source says how much flicker the
  enhancement adds (1: none).
- **Landmark jitter**: per track, ``|l[t-1] - 2 l[t] + l[t+1]| / 2`` per landmark (pixels), the
  mean over the 5 landmarks, over the inter-ocular distance (IOD, the eyes' distance at frame t).
  The second difference is how far a landmark sits from the midpoint of its neighbours in time:
  zero for a face still or moving at constant velocity, so a pan does not count as jitter, and
  dividing by the IOD makes faces of every size comparable.
- **Mask change**: the paste footprint of frame t is where the output differs from the source by
  more than ``MASK_THRESHOLD`` levels (in any channel) inside the paste regions (each face box
  scaled by ``PASTE_SCALE`` about its centre). Frame t-1's footprint warped to frame t by the
  source's flow is compared with frame t's: ``1 - IoU`` over the pixels that pass the
  forward-backward check (0: the pasted area moves with the picture; 1: no overlap).

Shapes: H, W frame size; images are HxWx3 uint8 RGB, flows HxWx2 float32 (x, y) in pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

# Forward-backward consistency (Sundaram, Brox and Keutzer, ECCV 2010, as Lai et al. and
# Ruder et al. use it): a pixel is occluded when its round trip misses by more than
# ALPHA * (|w_b|^2 + |w_f|^2) + BETA squared pixels.
FB_ALPHA = 0.01
FB_BETA = 0.5
# Where the output differs from its source by more than this (8-bit levels, any channel) counts as
# pasted: above the re-encoding's own error. x264 at enhance's crf 18 re-encoding the sample's first
# 20 frames leaves 2.2% of the pixels more than 5 levels from the decoded input, 0.07% more than 10,
# 0.02% more than 12.
MASK_THRESHOLD = 10
# The paste region around a face box: GPEN's aligned crop spans about 2.4 face boxes (the eyes are
# 0.21 of the crop apart, a box about two eye distances wide); 2 keeps neighbours' crops apart.
PASTE_SCALE = 2.0


def flow_estimator() -> cv2.DISOpticalFlow:
    """OpenCV's DIS optical flow, medium preset (54 ms a 960x540 pair on one CPU core)."""
    return cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)


def gray(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB -> HxW uint8 luma, what the flow estimator takes."""
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def sampling_maps(flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The positions ``p + flow(p)`` as cv2.remap's two HxW float32 maps (x, then y)."""
    height, width = flow.shape[:2]
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    return xs + flow[..., 0], ys + flow[..., 1]


def warp(image: np.ndarray, flow: np.ndarray, *, nearest: bool = False) -> np.ndarray:
    """``image`` sampled at ``p + flow(p)`` for every pixel ``p`` (bilinear, or nearest for
    masks); float32 for images, the input's dtype with ``nearest``. Outside the frame: 0."""
    map_x, map_y = sampling_maps(flow)
    source = image if nearest else image.astype(np.float32)
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.remap(source, map_x, map_y, interpolation, borderMode=cv2.BORDER_CONSTANT)


def consistent(backward: np.ndarray, forward: np.ndarray) -> np.ndarray:
    """HxW bool: the pixels of frame t whose flow can be trusted.

    ``backward``: flow from frame t to t-1 (frame_t(p) ~ frame_{t-1}(p + backward(p))),
    ``forward``: from t-1 to t. A pixel passes when ``p + backward(p)`` lies inside the frame and
    the forward flow there brings it back to ``p`` (see FB_ALPHA, FB_BETA).
    """
    height, width = backward.shape[:2]
    map_x, map_y = sampling_maps(backward)
    inside = (map_x >= 0) & (map_x <= width - 1) & (map_y >= 0) & (map_y <= height - 1)
    forward_there = cv2.remap(forward, map_x, map_y, cv2.INTER_LINEAR)
    miss = np.square(backward + forward_there).sum(axis=-1)
    bound = FB_ALPHA * (np.square(backward).sum(-1) + np.square(forward_there).sum(-1)) + FB_BETA
    return inside & (miss < bound)


@dataclass(frozen=True, kw_only=True)
class SourceMotion:
    """The source's motion from frame t-1 to t: ``backward`` flow [H, W, 2] (t to t-1) and the
    pixels of frame t where it passes the forward-backward check (``valid``, HxW bool)."""

    backward: np.ndarray
    valid: np.ndarray


def source_motion(
    estimator: cv2.DISOpticalFlow, previous: np.ndarray, current: np.ndarray
) -> SourceMotion:
    """The flow between two consecutive source frames (HxW uint8 luma, see ``gray``)."""
    backward = estimator.calc(current, previous, None)
    forward = estimator.calc(previous, current, None)
    return SourceMotion(backward=backward, valid=consistent(backward, forward))


def warping_error(
    previous: np.ndarray, current: np.ndarray, motion: SourceMotion, region: np.ndarray
) -> float | None:
    """Mean absolute difference (0-255) between ``current`` and ``previous`` warped onto it by
    ``motion``, over the RGB channels and the pixels of ``region`` (HxW bool) that ``motion``
    trusts; None when no pixel is left."""
    pixels = region & motion.valid
    if not pixels.any():
        return None
    warped = warp(previous, motion.backward)
    difference = np.abs(current.astype(np.float32) - warped).mean(axis=-1)
    return float(difference[pixels].mean())


def box_region(boxes: np.ndarray, shape: tuple[int, int], scale: float = 1.0) -> np.ndarray:
    """HxW bool: the union of ``boxes`` ([N, 4] x1, y1, x2, y2 in pixels), each scaled by
    ``scale`` about its centre, clipped to the frame. A pixel is in a box when its index lies in
    [floor(x1), ceil(x2))."""
    height, width = shape
    region = np.zeros(shape, dtype=bool)
    for x1, y1, x2, y2 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        cx, cy, half_w, half_h = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        left, right = cx - scale * half_w, cx + scale * half_w
        top, bottom = cy - scale * half_h, cy + scale * half_h
        columns = slice(max(0, int(np.floor(left))), min(width, int(np.ceil(right))))
        rows = slice(max(0, int(np.floor(top))), min(height, int(np.ceil(bottom))))
        region[rows, columns] = True
    return region


def paste_footprint(
    output: np.ndarray, source: np.ndarray, region: np.ndarray, threshold: float = MASK_THRESHOLD
) -> np.ndarray:
    """HxW bool: the pixels of ``region`` where ``output`` differs from ``source`` by more than
    ``threshold`` levels in some channel (where the enhancement pasted something)."""
    difference = np.abs(output.astype(np.int16) - source.astype(np.int16)).max(axis=-1)
    return region & (difference > threshold)


def mask_change(previous: np.ndarray, current: np.ndarray, motion: SourceMotion) -> float | None:
    """``1 - IoU`` of the footprint ``current`` (HxW bool) and ``previous`` warped onto it by
    ``motion``, over the pixels ``motion`` trusts; None when both are empty there."""
    carried = warp(previous.astype(np.uint8), motion.backward, nearest=True).astype(bool)
    union = ((current | carried) & motion.valid).sum()
    if union == 0:
        return None
    return float(1.0 - (current & carried & motion.valid).sum() / union)


def inter_ocular(landmarks: np.ndarray) -> float:
    """The distance between the eyes (landmarks 0 and 1 of [5, 2]), in pixels."""
    return float(np.hypot(*(landmarks[1] - landmarks[0])))


def track_jitter(frames: Mapping[int, np.ndarray]) -> np.ndarray:
    """One track's jitter at each frame t whose neighbours t-1 and t+1 are in the track: the mean
    over the landmarks of ``|l[t-1] - 2 l[t] + l[t+1]| / 2``, over the IOD at t (see the module's
    docstring). ``frames``: frame index -> landmarks [5, 2]. Frames with an IOD under a pixel
    (a degenerate face) are left out."""
    values = []
    for t in sorted(frames):
        if t - 1 not in frames or t + 1 not in frames:
            continue
        current = np.asarray(frames[t], dtype=np.float64)
        iod = inter_ocular(current)
        if iod < 1.0:
            continue
        second = np.asarray(frames[t - 1]) - 2 * current + np.asarray(frames[t + 1])
        values.append(float(np.linalg.norm(second, axis=-1).mean() / 2 / iod))
    return np.array(values, dtype=np.float64)


@dataclass(frozen=True, kw_only=True)
class Spread:
    """A figure over many samples: their mean and 95th percentile (linear interpolation), and
    how many there were; None for both when there were none."""

    mean: float | None
    p95: float | None
    count: int


def spread(values: Sequence[float | None] | np.ndarray) -> Spread:
    """The Spread of ``values``, Nones (unmeasurable frames) left out."""
    kept = np.array([v for v in values if v is not None], dtype=np.float64)
    if kept.size == 0:
        return Spread(mean=None, p95=None, count=0)
    return Spread(mean=float(kept.mean()), p95=float(np.percentile(kept, 95)), count=int(kept.size))


@dataclass(frozen=True, kw_only=True)
class FrameFigures:
    """One frame's figures (None on the first frame, and where nothing could be measured)."""

    faces: int
    warp_output: float | None
    warp_source: float | None
    mask_change: float | None


class TemporalMeter:
    """Feeds consecutive (source, output, face boxes) frames through the figures above.

    ``add`` takes frame t's source and output (HxWx3 uint8 RGB, the same size) and its face
    boxes [N, 4] (source pixels) and returns frame t's figures against frame t-1.
    """

    def __init__(self, threshold: float = MASK_THRESHOLD, paste_scale: float = PASTE_SCALE):
        self.threshold = threshold
        self.paste_scale = paste_scale
        self._estimator = flow_estimator()
        self._previous: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    def add(self, source: np.ndarray, output: np.ndarray, boxes: np.ndarray) -> FrameFigures:
        """Frame t's figures; the first frame has none (there is no t-1)."""
        if source.shape != output.shape:
            raise ValueError(f"source {source.shape} and output {output.shape} differ in size")
        shape = source.shape[:2]
        luma = gray(source)
        footprint = paste_footprint(
            output, source, box_region(boxes, shape, self.paste_scale), self.threshold
        )
        previous, self._previous = self._previous, (source, output, luma, footprint)
        faces = len(np.asarray(boxes).reshape(-1, 4))
        if previous is None:
            return FrameFigures(faces=faces, warp_output=None, warp_source=None, mask_change=None)
        last_source, last_output, last_luma, last_footprint = previous
        motion = source_motion(self._estimator, last_luma, luma)
        region = box_region(boxes, shape)
        return FrameFigures(
            faces=faces,
            warp_output=warping_error(last_output, output, motion, region),
            warp_source=warping_error(last_source, source, motion, region),
            mask_change=mask_change(last_footprint, footprint, motion),
        )
