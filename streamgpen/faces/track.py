"""Face tracking for video: full-frame detection every few frames, cheap following in between.

Between full-frame detections each face is re-detected inside a square crop around where it is
predicted to be (its last position moved by its velocity): all the crops of a frame go through
the detector's network as one [K, 3, S, S] batch, cut out on the device with ``roi_align``. The
crops start on the network's coarsest stride grid (32 px) of the full frame, so the network sees
a followed face exactly as a full-frame detection would: same pixels, same anchors, and the same
landmarks. When the faces move together (a pan), the strips along the edges they move from and
toward are searched too, so faces coming in or going out are restored on every frame they show;
a confident face the detector misses is predicted for up to ``COAST_FRAMES`` frames rather than
dropped. Boxes and landmarks are smoothed per track with a One-Euro filter that follows the
track's velocity, so that the aligned face crops downstream do not jitter and moving faces do
not lag.

Measured (``benchmarks/track_motion.py``, ``benchmarks/results/track-motion-cpu.json``, 80
frames), mean landmark error against per-frame detection in % of the inter-ocular distance (IOD),
before and after the stride-aligned crops and the velocity: the sample's slow pan 5.3 -> 1.1
(recall 99.85% -> 100%); ``dance`` (faces moving 12 px a frame on average, up to 25, turning and
scaling) 6.3 -> 1.9, with full detection on 31% -> 24% of the frames; ``crossing`` (faces
walking across each other) 8.0 -> 2.5. Lag along the motion against the true landmarks: 4.8 ->
1.0 and 4.6 -> 0.6 (per-frame detection's own: 0.4 and -0.1).

Shapes: K tracks, N measurements of a frame. A face's geometry is kept as 7 points [7, 2]: the
box's top-left and bottom-right corners, then the 5 landmarks.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torchvision.ops import roi_align

from streamgpen.faces.detect import FaceDetector
from streamgpen.faces.types import Face, TrackedFace

# The One-Euro filter's parameters, chosen on a 640x360 pan over the Solvay photo (faces ~25x32
# px, ~8 px/frame at 25 fps) and a static noisy clip of it, mobilenet0.25 on CPU (the numbers are
# in tests/test_track.py's doc). With the velocity followed, a lower beta would smooth moving
# faces more at the cost of lag: on the 40-frame dance clip beta 20 / 5 / 2 give a jitter of
# 13.8 / 12.2 / 10.2% IOD and a lag of 1.3 / 1.7 / 2.3% IOD.
DEFAULT_MIN_CUTOFF = 1.0
DEFAULT_BETA = 20.0

# Faces closer to the frame border than this fraction of their size are treated as leaving.
EDGE_MARGIN = 0.25
# Faces smaller than this, in pixels, are followed enlarged to it; larger ones at the full
# detection's scale, where the follower finds what it would (a face seen at another scale moves
# its landmarks). On a zoomed-out pan of the photo (faces ~28 px, 30 frames), error against
# per-frame detection 3.0% IOD with none enlarged, 2.9% at 20 px, 10.1% at 40 px (all enlarged).
MIN_FOLLOW_FACE = 20
# A track the detector and the follower both miss is predicted for at most this many frames, if
# it was last seen at least this sure and inside the frame (then it is gone, or never was).
COAST_FRAMES = 3
COAST_SCORE = 0.8
# A track whose face another covers is followed, unseen, for at most this many frames. On the
# crossing clip (faces walking across each other at ~13 px a frame), recall against per-frame
# detection 97.3% and 13 faces it does not find when a covered track is dropped, 97.8% and 7
# when it is kept 4, 8 or 12 frames; 8 covers a crossing at half that speed.
HIDDEN_FRAMES = 8
# The followed faces' mean step (pixels a frame) from which the picture is taken to move in from
# an edge (a pan), and that edge probed for new faces: the sample pans at ~8 px a frame, a still
# camera's faces move well under 1.
PROBE_MIN_STEP = 2.0
# How deep into the frame an edge's strip reaches, in sizes of the largest followed face (plus
# the faces' step): a face crossing the edge is found in it. Measured on the sample's recall
# against per-frame detection: 99.4% at 1.25, 99.8% at 1.5, 99.6% at 2.
PROBE_DEPTH = 1.5
# How much of each new measured step a track's velocity takes (an exponential average): on the
# 40-frame dance clip, 0.3 lags (1.8% IOD, error 2.6%), 1.0 follows the detector's noise (recall
# 96% against 98%, twice the false faces); 0.6 gives lag 1.3%, error 2.0%.
VELOCITY_GAIN = 0.6
# A prediction moves a face at most this many of its sizes a frame: a track continued on the
# wrong face would otherwise fling its prediction away.
MAX_STEP = 1.0
# A detection continues a track whose predicted box it overlaps by ``match_iou``; failing that,
# the one whose box centre is within this many of its sizes (a face whose velocity is not known
# yet moves out of its box's overlap at ~10 px a frame). On the 40-frame clips: recall against
# per-frame detection 98% / 96.5% with it, 96% / 96.5% without; false faces 1 / 0 and 2 / 4.
MATCH_REACH = 0.8
# The smoother follows a track's velocity only from this speed (face sizes a second) up, fully:
# at rest the velocity is the detector's noise. On the static noisy clip, mean landmark motion
# 0.0096 IOD a frame with it, 0.0148 with the velocity followed at every speed.
PREDICT_SPEED = 1.0


class Tracker:
    """Follows the faces of a video stream; feed it the frames in order with ``update``.

    Full-frame detection runs on the first frame, every ``detect_every`` frames, and on any frame
    where a track seen on the frame before is lost inside the frame (one lost at the frame's edge
    has left; one already missed once was not found by that detection either). In between, each
    track is re-detected in a crop of ``crop_scale`` times its box size around where its velocity
    puts it, at the lower ``follow_threshold``: a face found at the detector's own threshold is
    then kept while it scores above ``follow_threshold``, so a face whose score hovers around the
    detector threshold does not flicker. ``frames`` and ``full_detections`` count the frames seen
    and the full-frame detections run.
    """

    def __init__(
        self,
        detector: FaceDetector,
        detect_every: int = 5,
        *,
        crop_scale: float = 2.0,
        follow_threshold: float = 0.5,
        match_iou: float = 0.3,
        min_cutoff: float = DEFAULT_MIN_CUTOFF,
        beta: float = DEFAULT_BETA,
        derivative_cutoff: float = 1.0,
    ) -> None:
        """Set up a tracker around ``detector`` (its network is shared, not copied).

        crop_scale: the follow crop's side over the track box's longer side (plus the stride
        grid's 32 px); a face moving more than about (crop_scale - 1) / 2 box sizes further than
        its velocity says is lost (and found again by the full-frame detection that follows).
        match_iou: the IoU a detection needs with a track's predicted box to continue it.
        min_cutoff (Hz), beta, derivative_cutoff (Hz): the One-Euro filter's parameters; see
        ``_OneEuro``. min_cutoff=inf turns smoothing off.
        """
        if detect_every < 1:
            raise ValueError(f"detect_every must be >= 1, got {detect_every}")
        self.detector = detector
        self.detect_every = detect_every
        self.crop_scale = crop_scale
        self.match_iou = match_iou
        # Same network and weights, lower threshold: a shallow copy shares the module.
        self._follower = copy.copy(detector)
        self._follower.threshold = follow_threshold
        # The coarsest feature map's step in network pixels: crops on this grid see the anchors
        # and the features of the full frame.
        self._stride = max(detector.net.cfg["steps"])
        self._filter = _OneEuro(min_cutoff, beta, derivative_cutoff)
        self.frames = 0
        self.full_detections = 0
        self._next_id = 0
        self.reset()

    def reset(self) -> None:
        """Forget every track (after a stream reconnect); the next frame runs a full detection.

        Track ids keep increasing and the counters keep counting across resets.
        """
        self._ids = np.zeros(0, dtype=np.int64)
        self._points = np.zeros((0, 7, 2), dtype=np.float32)
        self._scores = np.zeros(0, dtype=np.float32)
        self._misses = np.zeros(0, dtype=np.int64)  # frames each track has gone unseen
        self._velocity = np.zeros((0, 2), dtype=np.float32)  # [K, 2] box centre, px a second
        self._measured = np.zeros(0, dtype=np.int64)  # frames each track was seen on
        self._time: float | None = None  # the last frame's timestamp
        self._filter.reset()
        self._next_full = self.frames

    @torch.inference_mode()
    def update(self, frame: torch.Tensor, timestamp: float) -> list[TrackedFace]:
        """Track the faces of the next frame.

        frame: [3, H, W] or [1, 3, H, W] RGB on the detector's device, floating point in [0, 1]
        (or uint8). timestamp: the frame's time in seconds, increasing. Returns the faces in
        track order (oldest track first).
        """
        image = frame if frame.ndim == 4 else frame.unsqueeze(0)
        if image.ndim != 4 or image.shape[:2] != (1, 3):
            raise ValueError(f"expected a [3, H, W] frame, got {tuple(frame.shape)}")
        size = image.shape[-2:]
        predicted = self._predict(timestamp)
        full = self.frames >= self._next_full
        followed = None
        if not full:
            followed = self._follow(image, predicted)
            points, _, found = followed
            hidden = _covered(predicted, points[found], self.match_iou)
            lost = ~found & ~hidden & (self._misses == 0) & _inside(predicted, size)
            lost &= self._scores >= self.detector.threshold  # a full detection would find it
            full = bool(lost.any())
        if full:
            measured = self._detect_and_match(image, predicted, followed)
        else:
            measured = self._continue(image, predicted, followed)
        self.frames += 1
        return self._commit(*measured, timestamp, full)

    def _predict(self, timestamp: float) -> np.ndarray:
        """Where each track's face is at ``timestamp`` [K, 7, 2]: its last points moved by its
        velocity, at most ``MAX_STEP`` of its size."""
        dt = 0.0 if self._time is None else max(timestamp - self._time, 0.0)
        sides = (self._points[:, 1] - self._points[:, 0]).max(axis=1)  # [K]
        step = self._velocity * dt  # [K, 2]
        length = np.linalg.norm(step, axis=1)
        step *= np.minimum(1.0, MAX_STEP * sides / np.maximum(length, 1e-9))[:, None]
        return self._points + step[:, None, :]

    def _continue(
        self, image: torch.Tensor, predicted: np.ndarray, followed: tuple[np.ndarray, ...]
    ) -> tuple[np.ndarray, ...]:
        """A frame without full detection: the followed tracks, the faces new at the edges, and
        the tracks missed kept as predictions (``_predictions``). Returns what
        ``_detect_and_match`` does."""
        points, scores, found = followed
        source = np.flatnonzero(found)
        source, kept, kept_scores = self._probe_edges(image, source, points[source], scores[source])
        # A face the edge probe finds where the follower lost one (the follower loses faces cut
        # by the edge) continues that track.
        new, lost = np.flatnonzero(source < 0), np.flatnonzero(~found)
        match = self._match(kept[new], predicted[lost])
        source[new[match >= 0]] = lost[match[match >= 0]]
        lost = np.setdiff1d(lost, source)
        covered = _covered(predicted[lost], kept, self.match_iou)
        return self._predictions(
            (source, kept, kept_scores), lost, covered, predicted, image.shape[-2:]
        )

    def _detect_and_match(
        self,
        image: torch.Tensor,
        predicted: np.ndarray,
        followed: tuple[np.ndarray, ...] | None,
    ) -> tuple[np.ndarray, ...]:
        """Full-frame detection, matched to the tracks; unmatched tracks survive if followed,
        or, for a few frames, predicted (``_predictions``).

        Returns, per measurement, the index of the track it continues (-1: a new track), its
        points [N, 7, 2], scores [N], whether it is a prediction [N] and whether that is of a
        hidden face [N].
        """
        faces = self.detector.detect(image)[0]
        self.full_detections += 1
        # The schedule is keyed to the frame count, not to this detection: an extra one (a track
        # lost) does not shift the later ones, so a fresh tracker started on the schedule (an
        # archive's segment, warmed up from a multiple of detect_every) detects on the frames the
        # single run does and merges with its state.
        self._next_full = (self.frames // self.detect_every + 1) * self.detect_every
        det_points = _points_of(faces)
        det_scores = np.array([face.score for face in faces], dtype=np.float32)
        track_of_det = self._match(det_points, predicted)
        lone = np.setdiff1d(np.arange(len(self._ids)), track_of_det)
        if followed is None:
            followed = self._follow(image, predicted[lone])
        else:
            followed = tuple(part[lone] for part in followed)
        kept_points, kept_scores, found = followed
        # A followed or predicted track that overlaps a detection lost that detection to another
        # track: it duplicates that face, or its face is behind it.
        duplicate = _covered(kept_points, det_points, self.match_iou)
        covered = duplicate | _covered(predicted[lone], det_points, self.match_iou)
        found &= ~duplicate
        measured = (
            np.concatenate([track_of_det, lone[found]]),
            np.concatenate([det_points, kept_points[found]]),
            np.concatenate([det_scores, kept_scores[found]]),
        )
        lost = ~found
        return self._predictions(measured, lone[lost], covered[lost], predicted, image.shape[-2:])

    def _match(self, det_points: np.ndarray, predicted: np.ndarray) -> np.ndarray:
        """For each detection [N, 7, 2], the track it continues (-1: none): by IoU with the
        tracks' predicted boxes [K, 7, 2], then, among the rest, by centre distance within
        ``MATCH_REACH`` box sizes."""
        match = _greedy_match(_iou(_boxes(det_points), _boxes(predicted)), self.match_iou)
        if not len(det_points) or not len(predicted):
            return match
        near = 1 - _centre_distance(det_points, predicted) / MATCH_REACH  # > 0: within reach
        near[match >= 0] = -1
        near[:, match[match >= 0]] = -1
        return np.where(match >= 0, match, _greedy_match(near, 1e-9))

    def _predictions(
        self, measured: tuple, lost: np.ndarray, covered: np.ndarray, predicted: np.ndarray, size
    ) -> tuple[np.ndarray, ...]:
        """The ``measured`` (source, points, scores) and, of the tracks ``lost`` this frame, those
        kept where their velocity puts them: a confident face (``COAST_SCORE``) inside the frame
        unseen for fewer than ``COAST_FRAMES`` frames is shown there (a face the detector misses
        for a frame, from a blink, a turn or motion blur, then stays restored instead of popping
        back to the raw face); one ``covered`` by another face is hidden behind it for fewer
        than ``HIDDEN_FRAMES``, not shown (it would be pasted over the face in front) but
        followed, so that it keeps its track when it comes out.

        Returns source, points [N, 7, 2], scores [N], whether each is a prediction [N] and
        whether that is hidden [N]."""
        source, points, scores = measured
        misses, inside = self._misses[lost], _inside(predicted[lost], size)
        confident = self._scores[lost] >= COAST_SCORE
        shown = lost[~covered & inside & confident & (misses < COAST_FRAMES)]
        hidden = lost[covered & inside & (misses < HIDDEN_FRAMES)]
        kept = np.concatenate([shown, hidden])
        is_hidden = np.zeros(len(source) + len(kept), bool)
        is_hidden[len(source) + len(shown) :] = True
        return (
            np.concatenate([source, kept]),
            np.concatenate([points, predicted[kept]]),
            np.concatenate([scores, self._scores[kept]]),
            np.arange(len(is_hidden)) >= len(source),
            is_hidden,
        )

    def _probe_edges(
        self, image: torch.Tensor, source: np.ndarray, points: np.ndarray, scores: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Add the faces crossing the edges the picture moves from and toward (a pan) on the
        frame they show, not at the next full detection: the detector runs on the two strips
        along those edges, ``PROBE_DEPTH`` faces deep plus the faces' step, as one batch.

        Measured on the sample's pan: of the 37 faces that per-frame detection found and
        tracking missed, 32 were faces coming in not yet detected, or going out. The far strip
        starts on the stride grid, where the network sees the faces as in the full frame: 4 faces
        at the far edge scoring ~0.9 were missed otherwise (recall 99.6% against 99.9%).
        """
        if len(source) == 0:
            return source, points, scores
        # [2] the followed faces' mean step since the last frame, x and y, in pixels
        step = (points[:, :2].mean(axis=1) - self._points[source, :2].mean(axis=1)).mean(axis=0)
        reach = PROBE_DEPTH * float((points[:, 1] - points[:, 0]).max())
        size = image.shape[-2:]  # (H, W)
        for axis in np.flatnonzero(np.abs(step) >= PROBE_MIN_STEP):  # 0: x, 1: y
            extent = size[1 - axis]  # x: the width, y: the height
            depth = min(extent, int(np.ceil(reach + abs(step[axis]))))
            if max(size) <= self.detector.det_size:  # seen unscaled: the grid is in pixels
                depth = extent - (extent - depth) // self._stride * self._stride
            starts = (0, extent - depth)  # both edges, strips of one shape: one detector call
            strips = torch.cat([image.narrow(3 - axis, start, depth) for start in starts])
            for start, faces in zip(starts, self.detector.detect(strips), strict=True):
                source, points, scores = self._add_new(
                    faces, axis, start, size, (source, points, scores)
                )
        return source, points, scores

    def _add_new(self, faces: list[Face], axis: int, start: int, size, tracked) -> tuple:
        """``tracked`` (source, points, scores) with the strip's ``faces`` that are new: their
        centre in the frame, overlapping no tracked face."""
        source, points, scores = tracked
        new = _points_of(faces)
        new[..., axis] += start
        centre = new[:, :2].mean(axis=1)  # [N, 2]; cut by the edge, as the detector sees it
        keep = ((centre >= 0) & (centre < (size[1], size[0]))).all(axis=1)
        if len(points):
            keep &= ~(_iou(_boxes(new), _boxes(points)) >= self.match_iou).any(axis=1)
        fresh = np.flatnonzero(keep)
        return (
            np.concatenate([source, np.full(len(fresh), -1)]),
            np.concatenate([points, new[fresh]]),
            np.concatenate([scores, np.array([faces[i].score for i in fresh], np.float32)]),
        )

    def _crop_geometry(self, boxes: np.ndarray, size) -> tuple[int, np.ndarray, np.ndarray]:
        """The follow crops' size in pixels, their sides [K] and their origins' grid [K] (0: none)
        in frame pixels.

        A crop samples the frame at the full detection's scale (tiny faces, under
        ``MIN_FOLLOW_FACE``, a little enlarged) and its origin lies on the network's stride grid:
        RetinaFace's landmarks shift with the scale a face is seen at and with where it falls
        between anchors, and followed faces must land where a full detection would put them. On
        the 40-frame dance clip, without the grid the followed landmarks are 5.7% IOD from
        per-frame detection, with it 2.0%. The crop covers ``crop_scale`` times the largest face
        plus one grid step (the origin moves back by up to one).
        """
        sides = (boxes[:, 2:] - boxes[:, :2]).max(axis=1)
        full_scale = min(1.0, self.detector.det_size / max(size))
        scales = np.maximum(full_scale, MIN_FOLLOW_FACE / np.maximum(sides, 1.0))  # [K]
        largest = self.crop_scale * float((sides * scales).max())
        crop_size = max(32, int(np.ceil(largest / 32)) * 32) + self._stride
        grid = np.where(scales == full_scale, self._stride / full_scale, 0.0)
        return crop_size, crop_size / scales, grid

    def _follow(
        self, image: torch.Tensor, points: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Re-detect each track inside a square crop around its box, in one batched call.

        points: [K, 7, 2] where the tracks are predicted to be. Returns the new points [K, 7, 2],
        scores [K] and whether each was found [K]; a track is not found when no face in its crop
        is its face (``_pick``) or the face's centre has left the frame.
        """
        count = len(points)
        new_points = points.copy()
        scores = np.zeros(count, dtype=np.float32)
        found = np.zeros(count, dtype=bool)
        if count == 0:
            return new_points, scores, found
        boxes = _boxes(points)
        crop_size, side, grid = self._crop_geometry(boxes, image.shape[-2:])
        origin = np.floor((boxes[:, :2] + boxes[:, 2:]) / 2 - (side - grid)[:, None] / 2)
        # Inside the frame where it can be: the network's own padding at the crop's top and left
        # edges is then the full frame's. Crops reaching over the edge lost faces near it: on
        # the pan, 5 track ids changed at the edges (1 with the part outside filled with the
        # network's mean colour rather than black) and 11 full detections ran instead of 8.
        height, width = image.shape[-2:]
        origin = np.clip(origin, 0, np.maximum(np.array([width, height]) - side[:, None], 0))
        on_grid = grid > 0
        origin[on_grid] = np.floor(origin[on_grid] / grid[on_grid, None]) * grid[on_grid, None]
        rois = np.concatenate([np.zeros((count, 1)), origin, origin + side[:, None]], axis=1)
        if not image.is_floating_point():
            image = image.float() / 255.0
        # aligned=True: a box [0, W] spans the whole image, as the detector's decoded boxes do.
        # sampling_ratio=0 averages ceil(side / crop_size) samples per output pixel, which keeps
        # large faces from aliasing when they are shrunk to crop_size.
        crops = roi_align(
            image,
            torch.from_numpy(rois).to(image),
            crop_size,
            spatial_scale=1.0,
            sampling_ratio=0,
            aligned=True,
        )
        scale = (side / crop_size)[:, None, None]
        for k, faces in enumerate(self._follower.detect(crops)):
            if not faces:
                continue
            candidates = _points_of(faces) * scale[k] + origin[k]
            best = self._pick(candidates, points[k])
            if best < 0:
                continue
            centre = candidates[best, :2].mean(axis=0)
            if 0 <= centre[0] < width and 0 <= centre[1] < height:
                new_points[k], scores[k], found[k] = candidates[best], faces[best].score, True
        return new_points, scores, self._unique(new_points, found, points)

    def _unique(
        self, new_points: np.ndarray, found: np.ndarray, expected: np.ndarray
    ) -> np.ndarray:
        """``found`` [K] less the tracks that found another track's face (a face passing in
        front of theirs): of two found boxes overlapping by more than the detector's NMS
        threshold (one face, to the detector), the one farther from its prediction loses it.
        On the 80-frame crossing clip, tracks moved to another face 6 times without this, 0
        with it."""
        tracks = np.flatnonzero(found)
        boxes = _boxes(new_points[tracks])
        fit = np.diagonal(_iou(boxes, _boxes(expected[tracks])))
        same = np.triu(_iou(boxes, boxes) > self.detector.nms_threshold, k=1)
        for a, b in zip(*np.nonzero(same), strict=True):
            found[tracks[a if fit[a] < fit[b] else b]] = False
        return found

    def _pick(self, candidates: np.ndarray, expected: np.ndarray) -> int:
        """Which of a crop's faces [M, 7, 2] continues the track predicted at ``expected``
        [7, 2] (-1: none): the one overlapping it most by ``match_iou``, else the nearest within
        ``MATCH_REACH`` box sizes (see ``_match``)."""
        overlap = _iou(_boxes(expected[None]), _boxes(candidates))[0]
        best = int(overlap.argmax())
        if overlap[best] >= self.match_iou:
            return best
        distance = _centre_distance(candidates, expected[None])[:, 0]
        best = int(distance.argmin())
        return best if distance[best] <= MATCH_REACH else -1

    def _commit(
        self,
        source: np.ndarray,
        points: np.ndarray,
        scores: np.ndarray,
        coasted: np.ndarray,
        hidden: np.ndarray,
        timestamp: float,
        detector_run: bool,
    ) -> list[TrackedFace]:
        """Make the measurements the new tracks, smooth them and build the frame's faces.

        source: per measurement, the index of the track it continues, -1 for a new track;
        coasted: whether it is a prediction of a track not seen this frame; hidden: whether that
        face is behind another (kept, not returned).
        """
        continued = source >= 0
        ids = np.full(len(source), -1, dtype=np.int64)
        ids[continued] = self._ids[source[continued]]
        fresh = int((~continued).sum())
        ids[~continued] = np.arange(self._next_id, self._next_id + fresh)
        self._next_id += fresh
        order = np.argsort(ids, kind="stable")
        ids, source, points, scores = ids[order], source[order], points[order], scores[order]
        coasted, hidden = coasted[order], hidden[order]
        velocity, measured = self._velocities(source, points, coasted, timestamp)
        misses = np.zeros(len(ids), dtype=np.int64)
        misses[coasted] = self._misses[source[coasted]] + 1  # a coasted track continues one
        self._ids, self._points, self._scores = ids, points.astype(np.float32), scores
        self._velocity, self._measured, self._misses = velocity, measured, misses
        self._time = timestamp
        smooth = self._filter(points, source, timestamp, velocity)
        return [
            TrackedFace(
                face=Face(box=_frozen(p[:2].reshape(4)), landmarks=_frozen(p[2:]), score=float(s)),
                track_id=int(i),
                detector_run=detector_run,
            )
            for p, s, i, h in zip(smooth, scores, ids, hidden, strict=True)
            if not h
        ]

    def _velocities(
        self, source: np.ndarray, points: np.ndarray, coasted: np.ndarray, timestamp: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each measurement's track velocity [N, 2] (px a second) and frames seen [N]: a track
        seen again takes ``VELOCITY_GAIN`` of its box centre's new step (all of its first), a
        predicted one keeps its velocity, a new one starts at rest."""
        continued = source >= 0
        velocity = np.zeros((len(source), 2), dtype=np.float32)
        velocity[continued] = self._velocity[source[continued]]
        measured = np.zeros(len(source), dtype=np.int64)
        measured[continued] = self._measured[source[continued]]
        measured[~coasted] += 1
        seen = continued & ~coasted
        dt = 0.0 if self._time is None else timestamp - self._time
        if dt <= 0 or not seen.any():
            return velocity, measured
        moved = (points[seen, :2].mean(axis=1) - self._points[source[seen], :2].mean(axis=1)) / dt
        gain = np.where(measured[seen] == 2, 1.0, VELOCITY_GAIN)[:, None]
        velocity[seen] += gain * (moved - velocity[seen])
        return velocity, measured


class _OneEuro:
    """The One-Euro filter (Casiez et al., CHI 2012), one per track, vectorised over tracks,
    here following each track's velocity.

    A low-pass filter whose cutoff rises with speed: ``cutoff = min_cutoff + beta * speed``. At
    rest the low ``min_cutoff`` (Hz) removes jitter; when the face moves the cutoff rises and lag
    falls. Here speed is the face's mean point speed in face sizes per second (the derivative
    itself low-passed at ``derivative_cutoff`` Hz), and one cutoff applies to all 7 points of a
    face, so that the filter moves the face rigidly instead of bending its landmarks, and so that
    the parameters do not depend on the face's size in pixels. The filtered value steps from the
    last one moved by the track's velocity (from ``PREDICT_SPEED`` up), not from the last one
    itself: a face moving steadily is then not held back. On the 40-frame dance clip, lag along
    the motion 4.4% IOD without that step, 1.3% with it.
    """

    def __init__(self, min_cutoff: float, beta: float, derivative_cutoff: float) -> None:
        self.min_cutoff = min_cutoff
        self.beta = beta
        self.derivative_cutoff = derivative_cutoff
        self.reset()

    def reset(self) -> None:
        self._value = np.zeros((0, 7, 2), dtype=np.float32)
        self._velocity = np.zeros((0, 7, 2), dtype=np.float32)
        self._time: float | None = None

    def __call__(
        self, points: np.ndarray, source: np.ndarray, timestamp: float, motion: np.ndarray
    ) -> np.ndarray:
        """Filter this frame's measurements [N, 7, 2]; ``source`` as in ``Tracker._commit``,
        ``motion`` [N, 2] each track's velocity in pixels a second."""
        continued = source >= 0
        previous = points.copy()
        previous[continued] = self._value[source[continued]]
        velocity = np.zeros_like(points)
        velocity[continued] = self._velocity[source[continued]]
        # Equal or decreasing timestamps would divide by zero; treat them as a 1 ms step.
        dt = 1e-3 if self._time is None else max(timestamp - self._time, 1e-3)
        self._time = timestamp
        velocity = velocity + _alpha(self.derivative_cutoff, dt) * (
            (points - previous) / dt - velocity
        )
        box_size = np.sqrt(np.prod(np.maximum(points[:, 1] - points[:, 0], 1.0), axis=1))
        speed = np.linalg.norm(velocity, axis=2).mean(axis=1) / box_size
        alpha = _alpha(self.min_cutoff + self.beta * speed, dt)[:, None, None]
        follow = np.clip(speed / PREDICT_SPEED, 0.0, 1.0) * continued  # [N]
        previous = previous + (follow[:, None] * motion * dt)[:, None, :]
        value = previous + alpha * (points - previous)
        self._value, self._velocity = value.astype(np.float32), velocity.astype(np.float32)
        return self._value


def _alpha(cutoff: float | np.ndarray, dt: float) -> float | np.ndarray:
    """The smoothing factor of a first-order low-pass at ``cutoff`` Hz sampled every ``dt`` s."""
    return 1.0 / (1.0 + 1.0 / (2.0 * math.pi * cutoff * dt))


def _points_of(faces: list[Face]) -> np.ndarray:
    """The faces' box corners and landmarks as [N, 7, 2]."""
    points = np.zeros((len(faces), 7, 2), dtype=np.float32)
    for k, face in enumerate(faces):
        points[k, :2] = face.box.reshape(2, 2)
        points[k, 2:] = face.landmarks
    return points


def _boxes(points: np.ndarray) -> np.ndarray:
    """The x1, y1, x2, y2 boxes [N, 4] of points [N, 7, 2]."""
    return points[:, :2].reshape(-1, 4)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU [N, M] of boxes a [N, 4] and b [M, 4]."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def _inside(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Whether each face's box [N] lies inside a frame of ``size`` (height, width), with margin.

    A face within a quarter of its size of the border is leaving (or cut by the edge): the
    follower's crop around it is partly outside the frame and loses it, which is no reason for
    a full detection; the next scheduled one finds it again if it stays.
    """
    boxes = _boxes(points)
    margin = EDGE_MARGIN * (boxes[:, 2:] - boxes[:, :2]).max(axis=1)
    return (
        (boxes[:, :2] >= margin[:, None]).all(axis=1)
        & (boxes[:, 2] <= size[1] - margin)
        & (boxes[:, 3] <= size[0] - margin)
    )


def _greedy_match(iou: np.ndarray, min_iou: float) -> np.ndarray:
    """For each row, the column it is matched to (-1: none); highest IoU pairs first.

    Greedy rather than optimal assignment: faces rarely overlap, so the two agree, and a handful
    of candidate pairs sort faster than scipy's solver starts.
    """
    match = np.full(iou.shape[0], -1, dtype=np.int64)
    rows, cols = np.nonzero(iou >= min_iou)
    taken: set[int] = set()
    for k in np.argsort(-iou[rows, cols], kind="stable"):
        row, col = int(rows[k]), int(cols[k])
        if match[row] < 0 and col not in taken:
            match[row] = col
            taken.add(col)
    return match


def _covered(points: np.ndarray, others: np.ndarray, min_iou: float) -> np.ndarray:
    """Whether each face of points [N, 7, 2] overlaps one of others [M, 7, 2] by ``min_iou``."""
    return (_iou(_boxes(points), _boxes(others)) >= min_iou).any(axis=1)


def _centre_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distances [N, M] between the box centres of a [N, 7, 2] and b [M, 7, 2], in b's box
    sizes; inf where the boxes' sizes differ by more than 1.5x (another face)."""
    centre_a, centre_b = a[:, :2].mean(axis=1), b[:, :2].mean(axis=1)
    side_a = (a[:, 1] - a[:, 0]).max(axis=1)
    side_b = np.maximum((b[:, 1] - b[:, 0]).max(axis=1), 1.0)
    distance = np.linalg.norm(centre_a[:, None] - centre_b[None], axis=2) / side_b[None]
    ratio = side_a[:, None] / side_b[None]
    return np.where((ratio < 1.5) & (ratio > 1 / 1.5), distance, np.inf)


def _frozen(array: np.ndarray) -> np.ndarray:
    """A read-only float32 copy, as ``Face`` holds."""
    array = np.array(array, dtype=np.float32)
    array.flags.writeable = False
    return array
