"""Annotations drawn on output images: boxes, landmarks and scores (``--draw``)."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np

from streamgpen.faces.types import Face, TrackedFace

# BGR colours of the five landmarks: eyes, nose, mouth corners.
LANDMARK_COLOURS = ((0, 0, 255), (0, 255, 255), (255, 0, 255), (0, 255, 0), (255, 0, 0))
BOX_COLOUR = (0, 255, 0)


def draw_faces(
    bgr: np.ndarray, faces: list[Face], labels: list[str] | None = None, scale: float = 1.0
) -> np.ndarray:
    """A copy of ``bgr`` (uint8 or uint16) with each face's box, landmarks and score drawn.

    ``scale``: the image's size over the one the faces were found in (``--upscale``).
    """
    faces = [_scaled(face, scale) for face in faces] if scale != 1 else faces
    out = bgr.copy()
    peak = int(np.iinfo(out.dtype).max)
    scale = peak / 255
    thickness = max(1, round(max(out.shape[:2]) / 800))
    for i, face in enumerate(faces):
        x1, y1, x2, y2 = (round(float(v)) for v in face.box)
        box_colour = tuple(c * scale for c in BOX_COLOUR)
        cv2.rectangle(out, (x1, y1), (x2, y2), box_colour, thickness)
        for (x, y), colour in zip(face.landmarks, LANDMARK_COLOURS, strict=True):
            radius = thickness + 1
            cv2.circle(
                out,
                (round(float(x)), round(float(y))),
                radius,
                tuple(c * scale for c in colour),
                -1,
            )
        text = f"{face.score:.2f}" if labels is None else labels[i]
        cv2.putText(
            out,
            text,
            (x1, max(0, y1 - 3)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.35 * thickness,
            box_colour,
            thickness,
            cv2.LINE_AA,
        )
    return out


def draw_tracked(rgb: np.ndarray, faces: list[TrackedFace], scale: float = 1.0) -> np.ndarray:
    """A copy of the RGB frame ``rgb`` with each tracked face drawn, labelled ``#track score``
    (``scale`` as for :func:`draw_faces`)."""
    labels = [f"#{t.track_id} {t.face.score:.2f}" for t in faces]
    bgr = draw_faces(rgb[..., ::-1], [t.face for t in faces], labels, scale)
    return np.ascontiguousarray(bgr[..., ::-1])


def _scaled(face: Face, scale: float) -> Face:
    """``face`` in an image ``scale`` times larger (pixel centres at integers in both)."""

    def move(v: np.ndarray) -> np.ndarray:
        return (v + 0.5) * scale - 0.5

    return replace(face, box=move(face.box), landmarks=move(face.landmarks))
