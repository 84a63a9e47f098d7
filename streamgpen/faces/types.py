"""The face types every layer shares: a detected face, a tracked one, a batch of aligned crops.

Nothing here imports facexlib or a model: the media, pipeline and preview layers use these types
without loading a detector.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face, in original image pixel coordinates.

    ``box``: float32 [4] x1, y1, x2, y2. ``landmarks``: float32 [5, 2] x, y of the left eye, right
    eye, nose tip, left and right mouth corners, left/right as seen in the image. ``score``: the
    detector's face probability. The arrays are read-only; equality is identity.
    """

    box: np.ndarray
    landmarks: np.ndarray
    score: float


@dataclass(frozen=True, eq=False)
class TrackedFace:
    """A face of one frame.

    face: box and landmarks after smoothing, in frame pixels, with the detector's score.
    track_id: the same for the same face across frames while it stays tracked.
    detector_run: True when a full-frame detection ran on this frame.
    """

    face: Face
    track_id: int
    detector_run: bool


@dataclass
class FaceBatch:
    """The faces of a batch of frames, aligned: what the restorer consumes and the pasting needs.

    ``frame_index`` [N] says which frame each face belongs to; ``matrices`` [N, 2, 3] map frame
    pixels to crop pixels; ``crops`` [N, 3, S, S] are RGB in [-1, 1]; ``frame_size`` is the
    frames' (height, width). The restorer fills ``restored`` (like ``crops``), a face parser
    ``masks`` [N, 1, S, S] in [0, 1] (None: the feathered box).

    ``tracks`` (video): one key per face naming its track, unique over the run and across inputs
    (a track that starts over, after a discontinuity, gets a new key), for the per-track state
    of temporal smoothing; the faces come in frame order. None for photos: no history.
    """

    faces: list[Face]
    frame_index: torch.Tensor
    matrices: torch.Tensor
    crops: torch.Tensor
    frame_size: tuple[int, int]
    restored: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    tracks: list[Hashable] | None = None


def nearest_to_center(faces: list[Face], width: int, height: int) -> int | None:
    """The index of the face whose box centre is nearest the image centre (None: no face)."""
    if not faces:
        return None
    centre = np.array([width / 2, height / 2])
    distances = [float(np.hypot(*((f.box[:2] + f.box[2:]) / 2 - centre))) for f in faces]
    return int(np.argmin(distances))
