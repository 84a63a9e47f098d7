"""Face tracking on clips generated in memory from the Solvay photo, real mobilenet0.25 detector.

Measured on the pan clip below (640x360, 40 frames, faces ~25x32 px, ~8 px/frame at 25 fps), CPU:
landmark error in inter-ocular distances (IOD) against a reference (the detector on the photo
upscaled 2x, mapped through each frame's warp): per-frame detection 0.087, tracked with
detect_every=5 0.090 (0.073 when the follower enlarged faces under 40 px, seeing them at another
scale than full detection does); keeping the last box instead of re-detecting in crops 0.32
against per-frame detection, finding 49% of its faces. Tracked against per-frame detection:
0.021 IOD with the follow crops on the network's stride grid at the full detection's scale (0.07
before: crops anywhere, faces under 40 px enlarged). Static noisy clip, mean frame-to-frame
landmark motion: unsmoothed tracked 0.026 IOD (0.069 with the enlarged crops), One-Euro
(min_cutoff 1 Hz, beta 20) 0.0096 (0.024 before), per-frame detection 0.013.

Fast motion (issue #15; clips from tests/motion_clips.py, 640x360, 40 frames, seeded): ``dance``,
six faces moving 12 px a frame on average (up to ~25), turning +-10-20 degrees and scaling, and
``crossing``, three pairs walking across each other at ~13 px a frame. Figures of the whole
80-frame clips, before and after, are in benchmarks/results/track-motion-cpu.json.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import cv2
import motion_clips
import numpy as np
import pytest
import torch

from streamgpen.faces.detect import FaceDetector
from streamgpen.faces.track import Tracker
from streamgpen.faces.types import Face, TrackedFace

SHARED = Path(__file__).resolve().parents[2] / "shared"
FPS = 25.0
WIDTH, HEIGHT = 640, 360
FRAMES = 40
# A slow pan left to right with a slight zoom in: faces ~25x32 px, some leave on the left.
PAN = {"w0": 960.0, "w1": 880.0, "x0": 0.0, "x1": 448.0}


def shared(relative: str) -> Path:
    path = SHARED / relative
    assert path.exists(), f"missing shared file {path}: the tests need ../shared beside the repo"
    return path


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    bgr = cv2.imread(str(shared("media/Solvay_conference_1927.png")))
    assert bgr is not None
    return np.ascontiguousarray(bgr[..., ::-1])


def warp(index: int, w0: float, w1: float, x0: float, x1: float) -> np.ndarray:
    """The 2x3 affine map from photo pixels to frame ``index``'s pixels."""
    f = index / (FRAMES - 1)
    window = w0 + (w1 - w0) * f
    scale = WIDTH / window
    x = x0 + (x1 - x0) * f
    y = (568 - window * HEIGHT / WIDTH) / 2
    return np.float32([[scale, 0, -x * scale], [0, scale, -y * scale]])


def clip(photo: np.ndarray, **motion: float) -> torch.Tensor:
    """[FRAMES, 3, H, W] float RGB frames of a pan/zoom over the photo."""
    frames = [
        cv2.warpAffine(photo, warp(i, **motion), (WIDTH, HEIGHT), flags=cv2.INTER_LINEAR)
        for i in range(FRAMES)
    ]
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255


def track(
    detector: FaceDetector, frames: torch.Tensor, **options
) -> tuple[list[list[TrackedFace]], Tracker]:
    tracker = Tracker(detector, **options)
    result = [tracker.update(frame, i / FPS) for i, frame in enumerate(frames)]
    assert tracker.frames == len(frames)
    return result, tracker


def to_frame(points: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Points of the 2x upscaled photo [N, 2] into a frame of affine map ``m``."""
    return (points / 2) @ m[:, :2].T + m[:, 2]


def iod(face: Face) -> float:
    return float(np.linalg.norm(face.landmarks[1] - face.landmarks[0]))


def boxes(faces) -> np.ndarray:
    return np.stack([face.box for face in faces]).reshape(-1, 4)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def matches(reference: list[Face], faces: list[Face]) -> list[tuple[Face, Face]]:
    """Each reference face with the face that overlaps it most, where that IoU is >= 0.5."""
    if not reference or not faces:
        return []
    overlap = iou(boxes(reference), boxes(faces))
    best = overlap.argmax(axis=1)
    pairs = zip(reference, best, overlap.max(axis=1), strict=True)
    return [(r, faces[j]) for r, j, o in pairs if o >= 0.5]


def landmark_error(reference: list[list[Face]], frames: list[list[Face]]) -> tuple[float, float]:
    """Mean landmark distance in reference IODs, and the fraction of reference faces found."""
    errors, total = [], 0
    for ref, faces in zip(reference, frames, strict=True):
        total += len(ref)
        for r, f in matches(ref, faces):
            errors.append(np.linalg.norm(r.landmarks - f.landmarks, axis=1).mean() / iod(r))
    return float(np.mean(errors)), len(errors) / total


def faces_of(frames: list[list[TrackedFace]]) -> list[list[Face]]:
    return [[t.face for t in frame] for frame in frames]


@pytest.fixture(scope="module")
def pan(photo) -> torch.Tensor:
    return clip(photo, **PAN)


@pytest.fixture(scope="module")
def per_frame(detector, pan):
    return track(detector, pan, detect_every=1)


@pytest.fixture(scope="module")
def tracked(detector, pan):
    return track(detector, pan, detect_every=5)


def test_tracked_faces_follow_per_frame_detection(per_frame, tracked):
    reference, _ = per_frame
    result, tracker = tracked
    error, found = landmark_error(faces_of(reference), faces_of(result))
    # Measured 0.022 (0.072 before the follow crops sat on the stride grid at full scale).
    assert error <= 0.04
    assert found >= 0.9
    assert tracker.full_detections <= FRAMES // 4
    assert [any(t.detector_run for t in frame) for frame in result][:1] == [True]


def test_tracking_is_as_accurate_as_per_frame_detection(detector, photo, pan, tracked):
    # Reference: the detector on the photo upscaled 2x, where faces are ~70x90 px, mapped into
    # each frame; faces not wholly inside the frame are left out.
    big = cv2.resize(photo, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    big_faces = detector.detect(torch.from_numpy(big).permute(2, 0, 1)[None])[0]
    reference = []
    for i in range(FRAMES):
        m = warp(i, **PAN)
        mapped = [
            Face(to_frame(f.box.reshape(2, 2), m), to_frame(f.landmarks, m), 1) for f in big_faces
        ]
        reference.append(
            [
                Face(f.box.reshape(4), f.landmarks, 1.0)
                for f in mapped
                if f.box.min() >= 0 and f.box[:, 0].max() <= WIDTH and f.box[:, 1].max() <= HEIGHT
            ]
        )
    raw = [detector.detect(frame[None])[0] for frame in pan]
    per_frame_error, _ = landmark_error(reference, raw)
    tracked_error, _ = landmark_error(reference, faces_of(tracked[0]))
    assert tracked_error <= per_frame_error + 0.01


def test_track_ids_are_stable(tracked):
    result, _ = tracked
    followed = 0
    for before, after in itertools.pairwise(result):
        for a, b in matches([t.face for t in before], [t.face for t in after]):
            id_a = next(t.track_id for t in before if t.face is a)
            id_b = next(t.track_id for t in after if t.face is b)
            assert id_a == id_b
            followed += 1
    assert followed > 15 * (FRAMES - 1)
    for frame in result:
        ids = [t.track_id for t in frame]
        assert len(ids) == len(set(ids))


def test_smoothing_reduces_jitter_on_a_static_clip(detector, photo):
    still = cv2.warpAffine(photo, warp(0, 700, 700, 300, 300), (WIDTH, HEIGHT)).astype(np.float32)
    rng = np.random.default_rng(0)
    noisy = [np.clip(still + rng.normal(0, 4, still.shape), 0, 255) for _ in range(20)]
    frames = torch.from_numpy(np.stack(noisy)).permute(0, 3, 1, 2) / 255

    def jitter(**options) -> float:
        result, _ = track(detector, frames, **options)
        motion, previous = [], {}
        for frame in result:
            current = {t.track_id: t.face for t in frame}
            for key, face in current.items():
                if key in previous:
                    step = np.linalg.norm(face.landmarks - previous[key].landmarks, axis=1)
                    motion.append(step.mean() / iod(face))
            previous = current
        assert len(motion) > 10 * (len(frames) - 1)
        return float(np.mean(motion))

    smoothed, raw = jitter(), jitter(min_cutoff=math.inf)
    # Measured 0.0096 against 0.026 unsmoothed (0.024 against 0.067 before the stride grid).
    assert smoothed < 0.5 * raw
    assert smoothed < 0.015


def test_a_face_leaving_the_frame_loses_its_track(detector, photo):
    # Pan right fast enough that the faces on the left leave within a few frames.
    frames = clip(photo, w0=700, w1=700, x0=0, x1=600)[:12]
    result, _ = track(detector, frames)
    first = {t.track_id: t.face for t in result[0]}
    leftmost = min(first, key=lambda key: first[key].box[0])
    present = [leftmost in {t.track_id for t in frame} for frame in result]
    gone_at = present.index(False)
    assert 0 < gone_at < len(result)
    assert not any(present[gone_at:])
    for frame in result:
        for t in frame:
            centre = (t.face.box[:2] + t.face.box[2:]) / 2
            assert -5 <= centre[0] <= WIDTH + 5


def test_empty_frames_reset_and_input_forms(detector, pan):
    tracker = Tracker(detector, detect_every=2)
    assert tracker.update(torch.zeros(3, HEIGHT, WIDTH), 0.0) == []
    assert tracker.update(torch.zeros(3, HEIGHT, WIDTH), 0.04) == []
    faces = tracker.update(pan[0][None], 0.08)
    assert faces and all(t.detector_run for t in faces)
    uint8 = (pan[1] * 255).round().to(torch.uint8)
    follow = tracker.update(uint8, 0.12)
    assert follow and not any(t.detector_run for t in follow)
    # Followed tracks continue; a new one is a face coming in at an edge the pan moves in from
    # (found by the edge probe on this frame, not at the next full detection).
    known = {t.track_id for t in faces}
    reach = 2 * max(float(t.face.box[2] - t.face.box[0]) for t in faces) + 20
    for t in follow:
        x1, _, x2, _ = t.face.box
        assert t.track_id in known or x1 < reach or x2 > WIDTH - reach, t
    assert (tracker.frames, tracker.full_detections) == (4, 2)
    tracker.reset()
    again = tracker.update(pan[2], 0.0)
    assert all(t.detector_run for t in again)
    assert min(t.track_id for t in again) > max(t.track_id for t in faces)
    with pytest.raises(ValueError):
        tracker.update(pan[:2], 0.2)
    with pytest.raises(ValueError):
        Tracker(detector, detect_every=0)


def test_follow_crops_stay_bounded_beside_a_degenerate_box(detector):
    """After an RTSP reconnect a track was predicted to a 1-px box beside a large face: the
    crops, all of one size, were sized by the large face enlarged as much as the tiny one and
    asked for a 27 GB batch. Each crop now has its own scale, so the batch's size follows the
    largest face at the full detection's scale."""
    tracker = Tracker(detector)
    boxes = np.array([[100, 100, 101, 101], [400, 100, 700, 400]], dtype=np.float32)
    crop_size, sides, _ = tracker._crop_geometry(boxes, (1080, 1920))
    # The large face at det_size/1920 of its size, twice over, on 32-px steps, plus one step.
    assert crop_size <= 2 * 300 * detector.det_size / 1920 + 64
    assert sides[0] <= crop_size / 10  # the tiny box's crop covers a few pixels of the frame


# --- fast motion (issue #15) -------------------------------------------------------------------

FAST_FRAMES = 40


@pytest.fixture(scope="module")
def pool(detector, photo) -> list[motion_clips.SourceFace]:
    return motion_clips.source_faces(detector, photo)


@pytest.fixture(scope="module", params=["dance", "crossing"])
def fast(request, detector, photo, pool) -> dict:
    """A fast-motion clip tracked with the defaults, and the figures of it and of per-frame
    detection (tests/motion_clips.py's ``measure``: % IOD, fractions, counts)."""
    clip = getattr(motion_clips, request.param)(photo, pool, frames=FAST_FRAMES)
    frames = clip.tensors()
    reference = motion_clips.detect_each(detector, frames)
    result, tracker = track(detector, frames)
    return {
        "clip": clip.name,
        "tracked": motion_clips.measure(clip, reference, result),
        "detection": motion_clips.measure(clip, reference, reference),
        "full": tracker.full_detections / len(frames),
    }


def test_fast_faces_follow_per_frame_detection(fast):
    tracked = fast["tracked"]
    # Measured (dance, crossing): error 1.9 and 2.4% IOD (before: 6.3 and 8.0% on the 80-frame
    # clips, 11.9% on the real dancers); recall 96% and 98.6%; full detection on 10 and
    # 9 of 40 frames (before: 31% and 24%; the bound is a quarter); 1 and 0 faces away
    # from every true face.
    assert tracked["error_pct_iod"] < 5, fast
    assert tracked["recall"] >= 0.94, fast
    # A quarter (the bound; 24% on the 80-frame clip, benchmarks/results), and one more
    # frame for another CPU's rounding, which can move one triggered detection.
    assert fast["full"] <= 0.25 + 1 / FAST_FRAMES, fast
    assert tracked["false_vs_truth"] <= 2, fast


def test_fast_faces_do_not_lag(fast):
    tracked, detection = fast["tracked"], fast["detection"]
    assert detection["mean_speed_px_per_frame"] > 10, fast  # the clip is fast
    # Measured against per-frame detection, face by face along the true motion: 0.2 and 0.6% IOD
    # behind (before: 4.8 and 4.6% against the truth, lag from the smoothing). Against the truth
    # the lag holds the detector's own bias for each face: 1.6 and -0.9% (detection: 0.6, -2.3).
    assert abs(tracked["lag_vs_detection_pct_iod"]) < 2, fast
    assert abs(tracked["lag_pct_iod"] - detection["lag_pct_iod"]) < 2, fast
    # The shake (second difference of the error to the truth) stays the detector's: 13.3 and
    # 14.6% IOD tracked, 13.9 and 14.5% per-frame detection.
    assert tracked["jitter_pct_iod"] < 1.15 * detection["jitter_pct_iod"], fast
