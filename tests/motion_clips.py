"""Fast-motion clips for the tracker, made from the Solvay photo's faces, and their measurements.

Issue #15: on a real clip of four people dancing (682x360, small faces moving fast) the tracker
was 11.9% of the inter-ocular distance (IOD) from per-frame detection. These clips stand in for
it, deterministically (seeded): face patches cut from the photo (a feathered ellipse each) are
moved, scaled and turned in the image plane over a blurred background, with motion blur over a
part of the frame interval and sensor noise. Since each patch's transform is known, so are its
true landmarks: the detector's on the photo upscaled 2x (where the faces are ~75 px wide and
their landmarks are steady), mapped through the transform at the frame's time.

- ``dance``: faces at 0.7-1.25x the photo's size (boxes ~25-55 px, IOD ~11-23 px), each on its
  own Lissajous path at up to 10-22 px a frame across and 4-10 down, turning +-15-30 degrees
  with a period of 18-40 frames and growing or shrinking by up to 5% a frame.
- ``crossing``: pairs of faces on rows, walking in opposite directions at 12-20 px a frame,
  crossing in the middle with their faces overlapping (the nearer hides part of the other).

The measurements (``measure``) compare a tracker's faces to per-frame detection (error in % of
the IOD, recall, false faces) and to the truth: the error, the lag (the signed error along the
face's motion, % IOD, positive when behind; and as a delay in frames), and the jitter (the
second difference over three frames of the error to the truth, % IOD: steady lag or bias does
not count, shake does).

Shapes: T frames, F faces, H x W frame size.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from streamgpen.faces.detect import FaceDetector
from streamgpen.faces.types import Face, TrackedFace

PHOTO = Path(__file__).resolve().parents[2] / "shared" / "media" / "Solvay_conference_1927.png"
WIDTH, HEIGHT, FPS = 640, 360, 25.0
SEED = 15  # the number
# The shutter stays open this fraction of the frame interval: a face moving 20 px a frame is
# blurred over 8 px, as a 1/60 s exposure at 25 fps would.
SHUTTER = 0.4
SHUTTER_SAMPLES = 4
NOISE = 3.0  # sensor noise, in 8-bit levels
# A true face counts (for the truth measurements) while at least this far inside the frame, in
# IODs, and while faces in front of it cover its landmarks by less than half.
INSIDE_IODS = 1.0
COVERED = 0.5
# Per-frame detection and tracking agree on a face when their boxes overlap by this IoU (as the
# sample's test in tests/test_video.py counts); a tracked face with no detection this close
# within FALSE_WINDOW frames either side is a false face.
MATCH_IOU = 0.3
FALSE_WINDOW = 2
# The lag is measured where the true face moves at least this many pixels a frame.
MOVING = 3.0


@dataclass(frozen=True, kw_only=True)
class SourceFace:
    """A face of the photo: its box centre, box size (w, h) and landmarks [5, 2], photo pixels."""

    centre: np.ndarray
    size: np.ndarray
    landmarks: np.ndarray


@dataclass(frozen=True, kw_only=True)
class Path2D:
    """One face's motion over T frames: centre [T, 2] in frame pixels, scale [T] over the
    photo's size, angle [T] in radians (counter-clockwise on screen), depth order (larger: in
    front). ``at(t)`` samples it between frames (the shutter's sub-samples)."""

    centre: np.ndarray
    scale: np.ndarray
    angle: np.ndarray
    depth: int

    def at(self, t: float) -> tuple[np.ndarray, float, float]:
        frames = np.arange(len(self.scale))
        x = np.interp(t, frames, self.centre[:, 0])
        y = np.interp(t, frames, self.centre[:, 1])
        return (
            np.array([x, y]),
            float(np.interp(t, frames, self.scale)),
            float(np.interp(t, frames, self.angle)),
        )


@dataclass(frozen=True, kw_only=True)
class Clip:
    """A generated clip: frames [T, H, W, 3] uint8 RGB, true landmarks [T, F, 5, 2] in frame
    pixels, whether each true face counts [T, F] (inside the frame, not hidden), at ``fps``."""

    name: str
    frames: np.ndarray
    truth: np.ndarray
    visible: np.ndarray
    fps: float = FPS

    def tensors(self) -> torch.Tensor:
        """The frames as the tracker takes them: [T, 3, H, W] float RGB in [0, 1]."""
        return torch.from_numpy(self.frames).permute(0, 3, 1, 2).float() / 255


def load_photo(path: Path = PHOTO) -> np.ndarray:
    """The Solvay photo, [568, 1328, 3] uint8 RGB."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"cannot read {path}: the clips need ../shared beside the repo")
    return np.ascontiguousarray(bgr[..., ::-1])


def source_faces(detector: FaceDetector, photo: np.ndarray) -> list[SourceFace]:
    """The photo's faces, found on the photo upscaled 2x (steadier landmarks), left to right."""
    big = cv2.resize(photo, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    full_size = copy.copy(detector)  # the same network, seeing the upscaled photo unshrunk
    full_size.det_size = max(big.shape)
    faces = full_size.detect(torch.from_numpy(big).permute(2, 0, 1)[None])[0]
    found = [
        SourceFace(
            centre=(f.box[:2] + f.box[2:]) / 4,
            size=(f.box[2:] - f.box[:2]) / 2,
            landmarks=np.asarray(f.landmarks, np.float64) / 2,
        )
        for f in faces
    ]
    return sorted(found, key=lambda f: float(f.centre[0]))


def _matrix(face: SourceFace, centre: np.ndarray, scale: float, angle: float) -> np.ndarray:
    """The 2x3 map from photo pixels to frame pixels: the face's centre to ``centre``, scaled
    and turned about it (``angle`` counter-clockwise as seen on screen, y pointing down)."""
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    linear = np.array([[cos, sin], [-sin, cos]])
    return np.concatenate([linear, (centre - linear @ face.centre)[:, None]], axis=1)


def _patch(photo: np.ndarray, face: SourceFace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The face's patch of the photo: colour [h, w, 3] float32, a feathered elliptical mask
    [h, w] (the face with its hair and chin, not its neighbours') and the patch's top-left
    corner in the photo [2]."""
    half = face.size.max()
    corner = np.maximum(np.floor(face.centre - half), 0).astype(int)
    end = np.minimum(np.ceil(face.centre + half), photo.shape[1::-1]).astype(int)
    colour = photo[corner[1] : end[1], corner[0] : end[0]].astype(np.float32)
    mask = np.zeros(colour.shape[:2], np.float32)
    axes = (int(face.size[0] * 0.72), int(face.size[1] * 0.66))
    centre = face.centre - corner - (0, 0.05 * face.size[1])
    cv2.ellipse(mask, (int(centre[0]), int(centre[1])), axes, 0, 0, 360, 1.0, -1)
    return colour, cv2.GaussianBlur(mask, (0, 0), sigmaX=0.08 * float(face.size[0])), corner


def background(photo: np.ndarray) -> np.ndarray:
    """The photo blurred past recognising a face, at the frame size: [H, W, 3] float32."""
    small = cv2.resize(photo, (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA).astype(np.float32)
    return cv2.GaussianBlur(small, (0, 0), sigmaX=10)


def render(
    name: str, photo: np.ndarray, faces: list[SourceFace], paths: list[Path2D], seed: int
) -> Clip:
    """Composite the faces along their paths, back to front, with motion blur and noise."""
    rng = np.random.default_rng(seed)
    count = len(paths[0].scale)
    base = background(photo)
    patches = [_patch(photo, face) for face in faces]
    order = sorted(range(len(paths)), key=lambda j: paths[j].depth)
    frames = np.zeros((count, HEIGHT, WIDTH, 3), np.uint8)
    truth = np.zeros((count, len(paths), 5, 2))
    visible = np.zeros((count, len(paths)), bool)
    offsets = (np.arange(SHUTTER_SAMPLES) + 0.5) / SHUTTER_SAMPLES * SHUTTER - SHUTTER / 2
    for t in range(count):
        image = base.copy()
        front = np.zeros((len(paths), HEIGHT, WIDTH), np.float32)  # each face's blurred alpha
        for j in order:
            colour, alpha = _blurred(patches[j], faces[j], paths[j], t + offsets)
            image = image * (1 - alpha[..., None]) + colour
            front[j] = alpha
            m = _matrix(faces[j], *paths[j].at(t))
            truth[t, j] = faces[j].landmarks @ m[:, :2].T + m[:, 2]
        visible[t] = _visible(truth[t], front, [paths[j].depth for j in range(len(paths))])
        image += rng.normal(0, NOISE, image.shape[:2])[..., None]
        frames[t] = np.clip(image, 0, 255).round().astype(np.uint8)
    return Clip(name=name, frames=frames, truth=truth, visible=visible)


def _blurred(
    patch: tuple[np.ndarray, np.ndarray, np.ndarray],
    face: SourceFace,
    path: Path2D,
    times: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The face's patch warped into the frame, averaged over the shutter's sub-frame ``times``:
    premultiplied colour [H, W, 3] and alpha [H, W]. Each warp fills only the part of the frame
    the patch can reach."""
    rgb, mask, corner = patch
    colour = np.zeros((HEIGHT, WIDTH, 3), np.float32)
    alpha = np.zeros((HEIGHT, WIDTH), np.float32)
    h, w = mask.shape
    for time in times:
        m = _matrix(face, *path.at(float(time)))
        m[:, 2] += m[:, :2] @ corner  # from patch pixels
        ends = np.array([[0, 0], [w, 0], [0, h], [w, h]]) @ m[:, :2].T + m[:, 2]
        low = np.clip(np.floor(ends.min(axis=0)).astype(int), 0, (WIDTH, HEIGHT))
        high = np.clip(np.ceil(ends.max(axis=0)).astype(int), 0, (WIDTH, HEIGHT))
        size = tuple(int(v) for v in high - low)
        if min(size) <= 0:
            continue
        m[:, 2] -= low
        a = cv2.warpAffine(mask, m, size, flags=cv2.INTER_LINEAR)
        c = cv2.warpAffine(rgb, m, size, flags=cv2.INTER_LINEAR)
        roi = np.s_[low[1] : high[1], low[0] : high[0]]
        colour[roi] += c * a[..., None]
        alpha[roi] += a
    return colour / len(times), alpha / len(times)


def _visible(landmarks: np.ndarray, alphas: np.ndarray, depth: list[int]) -> np.ndarray:
    """[F] whether each true face is inside the frame and mostly uncovered by the faces in front."""
    count = len(depth)
    result = np.zeros(count, bool)
    for j in range(count):
        iod = float(np.linalg.norm(landmarks[j, 1] - landmarks[j, 0]))
        low, high = landmarks[j].min(axis=0), landmarks[j].max(axis=0)
        margin = INSIDE_IODS * iod
        inside = (low >= margin).all() and high[0] < WIDTH - margin and high[1] < HEIGHT - margin
        if not inside:
            continue
        x, y = np.clip(landmarks[j].round().astype(int), 0, (WIDTH - 1, HEIGHT - 1)).T
        cover = 1 - np.prod([1 - alphas[k][y, x] for k in range(count) if depth[k] > depth[j]], 0)
        result[j] = float(np.mean(cover)) < COVERED
    return result


def dance(
    photo: np.ndarray,
    pool: list[SourceFace],
    frames: int = 60,
    faces: int = 6,
    seed: int = SEED,
    speed: float = 1.0,
) -> Clip:
    """Faces moving fast on their own paths, turning and changing size (see the module doc);
    ``speed`` multiplies their speeds. ``pool``: ``source_faces`` of ``photo``."""
    rng = np.random.default_rng(seed)
    chosen = [pool[k] for k in rng.choice(len(pool), size=faces, replace=False)]
    t = np.arange(frames, dtype=np.float64)
    paths = []
    for j in range(faces):
        ax, ay = rng.uniform(70, 150), rng.uniform(25, 60)
        # peak px/frame over amplitude: radians a frame
        wx, wy = speed * rng.uniform(10, 22) / ax, speed * rng.uniform(4, 10) / ay
        cx = rng.uniform(ax + 50, WIDTH - ax - 50)
        cy = rng.uniform(ay + 50, HEIGHT - ay - 50)
        px, py, pa, ps = rng.uniform(0, 2 * math.pi, 4)
        turn, turn_rate = math.radians(rng.uniform(10, 20)), rng.uniform(0.16, 0.35)
        grow, scale = rng.uniform(0.1, 0.2), rng.uniform(0.9, 1.3)
        centre = np.stack([cx + ax * np.sin(wx * t + px), cy + ay * np.sin(wy * t + py)], axis=1)
        paths.append(
            Path2D(
                centre=centre,
                scale=scale * np.exp(0.2 * np.sin(grow * t + ps)),
                angle=turn * np.sin(turn_rate * t + pa),
                depth=j,
            )
        )
    return render("dance", photo, chosen, paths, seed)


def crossing(
    photo: np.ndarray, pool: list[SourceFace], frames: int = 60, pairs: int = 3, seed: int = SEED
) -> Clip:
    """Pairs of faces walking across each other in opposite directions (see the module doc).
    ``pool``: ``source_faces`` of ``photo``."""
    rng = np.random.default_rng(seed + 1)
    chosen = [pool[k] for k in rng.choice(len(pool), size=2 * pairs, replace=False)]
    t = np.arange(frames, dtype=np.float64)
    paths = []
    for k in range(pairs):
        row = HEIGHT * (k + 1) / (pairs + 1)
        reach = rng.uniform(200, 250)
        rate = rng.uniform(12, 20) / reach
        cross = frames * (k + 1) / (pairs + 1) + rng.uniform(-4, 4)  # when they meet
        scale = rng.uniform(0.8, 1.2)
        apart = rng.uniform(0.15, 0.5) * float(chosen[2 * k].size[1]) * scale  # rows' offset
        for side in (1, -1):
            bob = 6 * np.sin(rng.uniform(0.3, 0.5) * t + rng.uniform(0, 2 * math.pi))
            x = WIDTH / 2 + side * reach * np.sin(rate * (t - cross))
            paths.append(
                Path2D(
                    centre=np.stack([x, row + side * apart / 2 + bob], axis=1),
                    scale=np.full(frames, scale * rng.uniform(0.9, 1.1)),
                    angle=math.radians(10) * np.sin(rng.uniform(0.2, 0.4) * t + side),
                    depth=2 * k + (side > 0),
                )
            )
    return render("crossing", photo, chosen, paths, seed + 1)


# --- measurements ------------------------------------------------------------------------------


def _iod(landmarks: np.ndarray) -> float:
    return float(np.linalg.norm(landmarks[1] - landmarks[0]))


def _boxes(faces: list[Face]) -> np.ndarray:
    return np.stack([face.box for face in faces]).reshape(-1, 4) if faces else np.zeros((0, 4))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU [N, M] of x1, y1, x2, y2 boxes a [N, 4] and b [M, 4]."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area_a, area_b = (np.prod(x[:, 2:] - x[:, :2], axis=1) for x in (a, b))
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def against_detection(reference: list[list[Face]], faces: list[list[Face]]) -> dict:
    """Faces [T][...] against per-frame detection [T][...]: mean landmark error in % of the
    detection's IOD, the fraction of detected faces found (recall) and the false faces."""
    errors, total, false = [], 0, 0
    for ref, got in zip(reference, faces, strict=True):
        total += len(ref)
        if ref and got:
            overlap = box_iou(_boxes(ref), _boxes(got))
            for r, face in enumerate(ref):
                best = int(overlap[r].argmax())
                if overlap[r, best] >= MATCH_IOU:
                    distance = np.linalg.norm(face.landmarks - got[best].landmarks, axis=1)
                    errors.append(100 * distance.mean() / _iod(face.landmarks))
    for k, got in enumerate(faces):
        near = _boxes([f for frame in reference[max(0, k - FALSE_WINDOW) : k + FALSE_WINDOW + 1]
                       for f in frame])  # fmt: skip
        if got:
            best = box_iou(_boxes(got), near).max(axis=1, initial=0)
            false += int((best < MATCH_IOU).sum())
    return {
        "error_pct_iod": float(np.mean(errors)) if errors else math.nan,
        "recall": len(errors) / max(total, 1),
        "false_faces": false,
    }


def assign_truth(clip: Clip, faces: list[list[Face]]) -> np.ndarray:
    """Each counted true face's landmarks as given by ``faces``: [T, F, 5, 2], NaN where none
    matches. A face matches the nearest true face by landmark centre, within one true IOD."""
    found = np.full(clip.truth.shape, np.nan)
    for t, got in enumerate(faces):
        if not got:
            continue
        centres = np.stack([f.landmarks.mean(axis=0) for f in got])  # [N, 2]
        pairs = []
        for j in np.flatnonzero(clip.visible[t]):
            distance = np.linalg.norm(centres - clip.truth[t, j].mean(axis=0), axis=1)
            pairs += [(d / _iod(clip.truth[t, j]), j, n) for n, d in enumerate(distance)]
        taken_truth, taken_face = set(), set()
        for score, j, n in sorted(pairs):
            if score <= 1 and j not in taken_truth and n not in taken_face:
                found[t, j] = got[n].landmarks
                taken_truth.add(j)
                taken_face.add(n)
    return found


def against_truth(clip: Clip, faces: list[list[Face]], reference: list[list[Face]]) -> dict:
    """Error, lag and jitter of ``faces`` against the clip's true landmarks, in % IOD.

    The lag is the error of the landmarks' centre along the true motion (positive: behind), as
    a delay in frames too; against the truth it holds the detector's own bias for the face,
    so it is also measured against ``reference`` (per-frame detection), face by face: what the
    tracking adds. The jitter is the error's second difference over three frames of the same
    true face: shake, which a steady lag or bias does not add to."""
    found, detected = assign_truth(clip, faces), assign_truth(clip, reference)
    iod = np.linalg.norm(clip.truth[:, :, 1] - clip.truth[:, :, 0], axis=-1)  # [T, F]
    error = found - clip.truth  # [T, F, 5, 2]
    seen = ~np.isnan(error[..., 0, 0])
    distance = np.linalg.norm(error, axis=-1).mean(axis=-1) / iod  # [T, F]
    centre = clip.truth.mean(axis=2)  # [T, F, 2]
    velocity = np.full_like(centre, np.nan)
    velocity[1:-1] = (centre[2:] - centre[:-2]) / 2  # px a frame, central difference
    speed = np.linalg.norm(velocity, axis=-1)
    direction = velocity / np.where(speed >= MOVING, speed, np.nan)[..., None]
    behind = -(error.mean(axis=2) * direction).sum(axis=-1)  # [T, F] px, NaN where still
    moving = seen & (speed >= MOVING)
    behind_detection = -((found - detected).mean(axis=2) * direction).sum(axis=-1)
    both = moving & ~np.isnan(behind_detection)
    shake = np.linalg.norm(error[2:] - 2 * error[1:-1] + error[:-2], axis=-1).mean(axis=-1)
    steady = seen[2:] & seen[1:-1] & seen[:-2]
    return {
        "false_vs_truth": _false_faces(clip, faces),
        "truth_error_pct_iod": float(100 * distance[seen].mean()),
        "truth_recall": float(seen.sum() / clip.visible.sum()),
        "lag_pct_iod": float(100 * (behind / iod)[moving].mean()),
        "lag_frames": float(behind[moving].sum() / speed[moving].sum()),
        "lag_vs_detection_pct_iod": float(100 * (behind_detection / iod)[both].mean()),
        "jitter_pct_iod": float(100 * (shake / iod[1:-1])[steady].mean()),
        "mean_speed_px_per_frame": float(speed[moving].mean()),
    }


def _false_faces(clip: Clip, faces: list[list[Face]]) -> int:
    """The faces with no true face (hidden or not) within one IOD of their landmarks' centre."""
    false = 0
    for truth, got in zip(clip.truth, faces, strict=True):
        centres = truth.mean(axis=1)  # [F, 2]
        iods = np.linalg.norm(truth[:, 1] - truth[:, 0], axis=1)
        for face in got:
            distance = np.linalg.norm(centres - face.landmarks.mean(axis=0), axis=1) / iods
            false += int(distance.min() > 1)
    return false


def track_jitter(frames: list[list[TrackedFace]]) -> float:
    """The tracked landmarks' mean second difference over three frames of the same track, in
    % of the IOD: the shake, where the truth is unknown (on a slow pan the true second
    difference is near zero)."""
    history: dict[int, list[np.ndarray]] = {}
    shake = []
    for frame in frames:
        seen = set()
        for face in frame:
            points = history.setdefault(face.track_id, [])
            points.append(np.asarray(face.face.landmarks, np.float64))
            seen.add(face.track_id)
            if len(points) >= 3:
                a, b, c = points[-3:]
                shake.append(100 * np.linalg.norm(a - 2 * b + c, axis=1).mean() / _iod(b))
        for track in set(history) - seen:
            del history[track]  # a gap ends the run of frames
    return float(np.mean(shake)) if shake else math.nan


def faces_of(frames: list[list[TrackedFace]]) -> list[list[Face]]:
    """The faces of tracked frames."""
    return [[t.face for t in frame] for frame in frames]


def detect_each(detector: FaceDetector, frames: torch.Tensor) -> list[list[Face]]:
    """Per-frame detection [T][...] of frames [T, 3, H, W], unsmoothed: the reference."""
    return [detector.detect(frame[None])[0] for frame in frames]


def track_ids_swapped(clip: Clip, frames: list[list[TrackedFace]]) -> int:
    """How often a track continues on another true face than the one it was on (an id swap),
    counting only faces within half an IOD of a true face: where two faces overlap, the nearest
    true face flips between them without the track changing face."""
    swaps, last = 0, {}
    for t, tracked in enumerate(frames):
        for face in tracked:
            j = _true_face(clip, t, face.face, reach=0.5)
            if j is None:
                continue
            if last.get(face.track_id, j) != j:
                swaps += 1
            last[face.track_id] = j
    return swaps


def _true_face(clip: Clip, t: int, face: Face, reach: float) -> int | None:
    """The counted true face nearest ``face`` at frame ``t``, within ``reach`` IODs, or None."""
    best, index = reach, None
    for j in np.flatnonzero(clip.visible[t]):
        truth = clip.truth[t, j]
        d = np.linalg.norm(face.landmarks.mean(axis=0) - truth.mean(axis=0)) / _iod(truth)
        if d <= best:
            best, index = d, int(j)
    return index


def measure(
    clip: Clip, reference: list[list[Face]], tracked: list[list[TrackedFace]] | list[list[Face]]
) -> dict:
    """Everything above for one run over ``clip``: against ``reference`` (per-frame detection)
    and against the truth, plus track id swaps when ``tracked`` carries track ids."""
    faces = [[getattr(f, "face", f) for f in frame] for frame in tracked]
    report = against_detection(reference, faces) | against_truth(clip, faces, reference)
    if tracked and any(isinstance(f, TrackedFace) for frame in tracked for f in frame):
        report["id_swaps"] = track_ids_swapped(clip, tracked)
    return report
