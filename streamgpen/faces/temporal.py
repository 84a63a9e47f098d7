"""Temporal stabilisation of a video's restored faces, per track (``--temporal ema|flow``).

GPEN restores every frame on its own, so a face's details (eyes, skin, its outline) change from
frame to frame even where the input barely does. Both modes work in the aligned crop space, where
a tracked face stays put whatever it does in the frame: what they carry over from the previous
frame is pasted with the *current* frame's matrix, so it cannot trail the face across the frame.
Only what changes inside the crop (a turn, an expression, the alignment's own jitter) could lag,
and that is what the weights below watch.

- ``ema`` (:class:`LatentSmoother`): between GPEN's encoder and decoder, each face's style code
  and encoder features are mixed with its track's previous (already mixed) ones,
  ``s_t = lerp(x_t, s_{t-1}, keep)``, frame after frame (frame t uses t-1's mixed state even in
  the same device batch). ``keep`` falls with the change of the aligned input crop since the
  track's previous frame (:func:`crop_change`): :data:`KEEP_EMA` up to :data:`STILL`, none from
  :data:`CUT` on.
- ``flow`` (:class:`FlowSmoother`): the track's previous output crop, carried into the current
  crop by the optical flow between the previous and the current aligned *input* crops (OpenCV's
  DIS on a :data:`FLOW_SIZE` grey copy), is blended into the current output, per pixel, where
  the flow passes the forward-backward check and the two outputs agree (:data:`KEEP_FLOW`,
  :data:`AGREEMENT`).

Reset rules, both modes: a track key met for the first time starts fresh (its output is exactly
what it would be with ``off``); so does a track whose crop changed by :data:`CUT` or more since
its previous frame (a cut under a kept track, or motion too fast to smooth); a key unseen in
:data:`FORGET_CALLS` of its input's calls is forgotten, and an input that ends is forgotten whole
(bounded memory). Discontinuities need nothing here: the track keys change there
(``FaceBatch.tracks``).

The figures behind the constants are in ``benchmarks/temporal.py`` and its results.
Shapes: N faces of a call, n of a device batch, S crop size, P probe side, F flow size.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from streamgpen.quality.temporal import SourceMotion, flow_estimator, source_motion
from streamgpen.runtime.restorer import LatentMix

# The probe of a crop's change: its luma area-averaged to P x P, mean removed, unit norm. 16 is
# the coarsest that still separates a face from another: on the sample (960x540, 40 frames, 563
# same-track pairs) 1 - cosine was 0.014 median, 0.12 p95, 0.37 at most between a track's frames
# and 0.21 at least, 0.66 median, against another face's crop.
PROBE = 16
# Full smoothing up to STILL, none from CUT on (linear between). CUT is under every other-face
# change measured, on the sample and on a generated clip of faces moving 10-22 px a frame and
# turning (tests/motion_clips.dance: 0.20 at least), so a cut is a reset. Of the sample's crops
# 61% are under STILL and 1.8% past CUT; of that fast clip's (0.057 median, 0.25 p95), 8% and 8%.
STILL = 0.02
CUT = 0.2
# The most a track's past is kept, per frame. An EMA keeps (1 - keep) / (1 + keep) of white
# noise's variance (0.25 at 0.6), and follows a change inside the crop a keep / (1 - keep) frames
# late (1.5 at 0.6, where the crop is still enough to get the whole keep). The sample's face
# crops' warping error along their own flow (40 frames, tiny GPEN fixture; input 2.55, off 4.21,
# 8-bit levels) saturates: ema 3.57 at 0.6, 3.56 at 0.75, 3.57 at 0.85 (3.44 with no motion
# gating at all): what is left is the output not following the content's motion inside the
# crop, which only flow compensates. flow: 1.87 at 0.6, 1.42 at 0.75, 1.15 at 0.85: 0.6 comes
# near the input's own figure (the floor); more keeps the past beyond what the input does.
KEEP_EMA = 0.6
KEEP_FLOW = 0.6
# flow: the previous output counts where it agrees with the current one: weight
# exp(-(d / AGREEMENT)^2), d the mean absolute difference over RGB in [-1, 1] units. A random
# GPEN-BFR-256's consecutive outputs, carried, differ by 0.034 median, 0.08 p90 on the sample
# (kept nearly whole); 0.1 instead of 0.25 left 2.27 of the figures above instead of 1.87.
AGREEMENT = 0.25
# The flow's resolution: DIS (medium preset) on 128 x 128 luma, both directions, took 2-4 ms a
# face on this (loaded) 2-core machine; benchmarks/temporal.py measures each mode's whole cost.
FLOW_SIZE = 128
# The flows of a call's faces run on this many host threads at once: one after another they cost
# the device worker's thread 5 ms a face (one core, benchmarks/temporal.py), 20 ms a frame of four
# faces, where a GPU restores the four in a few; DIS is deterministic, so threads change nothing.
FLOW_WORKERS = 4
# A track unseen in this many of its input's calls (restore_many's with faces of that input: a
# chunk of frames) is forgotten: it has left, or was lost and comes back under a new key anyway.
# Calls of other inputs do not count (inputs sharing a smoother take turns at the device).
FORGET_CALLS = 8
# Luma weights (BT.601), what cv2.cvtColor's RGB2GRAY uses too.
LUMA = (0.299, 0.587, 0.114)


def luma(crops: torch.Tensor, size: int) -> torch.Tensor:
    """crops [N, 3, S, S] RGB in [-1, 1] -> their luma area-averaged to [N, size, size], fp32."""
    weights = crops.new_tensor(LUMA, dtype=torch.float32).view(1, 3, 1, 1)
    grey = (crops.float() * weights).sum(1, keepdim=True)
    return F.adaptive_avg_pool2d(grey, size)[:, 0]


def probes(crops: torch.Tensor) -> torch.Tensor:
    """The change probes [N, P*P] of crops [N, 3, S, S]: luma at P x P, zero mean, unit norm."""
    flat = luma(crops, PROBE).flatten(1)
    flat = flat - flat.mean(1, keepdim=True)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-6)


def crop_change(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """How much crops changed between frames, from their probes [n, P*P]: 1 - cosine, [n]
    (0: the same picture; about 0.2 and more: another face)."""
    return 1 - (current * previous).sum(1)


def keep_weight(change: torch.Tensor, keep: float) -> torch.Tensor:
    """The share of a track's past kept for a crop change [n]: ``keep`` up to STILL, falling
    linearly to 0 at CUT and beyond (a fresh start)."""
    return keep * ((CUT - change) / (CUT - STILL)).clamp(0, 1)


def waves(keys: Sequence[Hashable | None]) -> list[list[int]]:
    """The positions of ``keys`` in rounds that can be processed together: round k holds each
    track's k-th face of the call, so a face's previous frame is always in an earlier round (or
    an earlier call). Faces without a key (photos) are in no round."""
    rounds: list[list[int]] = []
    seen: dict[Hashable, int] = {}
    for position, key in enumerate(keys):
        if key is None:
            continue
        k = seen.get(key, 0)
        seen[key] = k + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(position)
    return rounds


def input_of(key: Hashable) -> Hashable:
    """The input a track key belongs to: a video's keys are (input, generation, track id)
    (``FaceBatch.tracks``); any other key is taken to be of one unnamed input."""
    return key[0] if isinstance(key, tuple) else None


class TrackMemory:
    """Per-track state with the reset rules' bookkeeping: ``get`` / ``put`` by key, within
    calls (:meth:`begin_call`). A key is forgotten when its input's last ``forget_after`` calls
    did not see it, counting only the calls that held faces of that input: inputs sharing one
    smoother (the service's streams, a run's cameras and files) take turns, and a track seen
    every tenth call is alive. An input that ends is forgotten whole (:meth:`forget_input`).
    Thread-safe: the service's streams end in their own threads."""

    def __init__(self, forget_after: int = FORGET_CALLS):
        self.forget_after = forget_after
        self._states: dict[Hashable, object] = {}
        self._seen: dict[Hashable, int] = {}  # key -> its input's call count when last seen
        self._calls: dict[Hashable, int] = {}  # input -> calls that held its faces
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._states)

    def begin_call(self, keys: Sequence[Hashable | None]) -> None:
        """A new call with faces of ``keys``: for each input among them, forget its tracks
        unseen in its last ``forget_after`` calls."""
        inputs = {input_of(k) for k in keys if k is not None}
        with self._lock:
            for name in inputs:
                self._calls[name] = self._calls.get(name, 0) + 1
            stale = [
                k
                for k, last in self._seen.items()
                if input_of(k) in inputs and self._calls[input_of(k)] - last > self.forget_after
            ]
            for key in stale:
                del self._states[key], self._seen[key]

    def get(self, key: Hashable):
        """The track's state, None for a track this memory does not know."""
        return self._states.get(key)

    def put(self, key: Hashable, state) -> None:
        """The track's state after this call's face (seen now)."""
        with self._lock:
            self._states[key] = state
            self._seen[key] = self._calls.get(input_of(key), 0)

    def forget_input(self, name: Hashable) -> None:
        """Forget every track of the input ``name`` (it has ended)."""
        with self._lock:
            for key in [k for k in self._states if input_of(k) == name]:
                del self._states[key], self._seen[key]
            self._calls.pop(name, None)

    def reset(self) -> None:
        """Forget every track."""
        with self._lock:
            self._states.clear()
            self._seen.clear()
            self._calls.clear()


@dataclass(frozen=True)
class _Latents:
    """One track's last frame for ``ema``: its crop's probe [P*P], its mixed latents (z [S'],
    then the features [C, r, r] from r = 4 up)."""

    probe: torch.Tensor
    latents: tuple[torch.Tensor, ...]


class LatentSmoother:
    """``--temporal ema``: GPEN's latents averaged per track (see the module's docstring).

    Memory: one face's latents per track, in the model's precision: 8.0 MB for GPEN-BFR-256 and
    64 MB for GPEN-BFR-512 in fp16 (the full-resolution feature maps are most of it).
    """

    def __init__(self, keep: float = KEEP_EMA, forget_after: int = FORGET_CALLS):
        if not 0 <= keep < 1:
            raise ValueError(f"keep must be in [0, 1), not {keep}")
        self.keep = keep
        self.memory = TrackMemory(forget_after)

    def mixer(self, keys: Sequence[Hashable | None], crops: torch.Tensor) -> LatentMix:
        """The mixing of one call's faces, for the restorer (``Restorer(..., mix=)``): ``keys``
        [N] their tracks (None: no history), ``crops`` [N, 3, S, S] what it restores. The
        restorer calls it on its device batches in order, each once."""
        self.memory.begin_call(keys)
        probe = probes(crops)  # [N, P*P]

        def mix(start: int, z: torch.Tensor, features: list[torch.Tensor]) -> None:
            latents = [z, *features]
            for row in range(z.shape[0]):
                key = keys[start + row]
                if key is not None:
                    self._mix_face(key, probe[start + row], [t[row] for t in latents])

        return mix

    def _mix_face(self, key: Hashable, probe: torch.Tensor, latents: list[torch.Tensor]) -> None:
        """Mix one face's ``latents`` (views of its batch's rows: z [S'], features [C, r, r]) in
        place with its track's last frame, and make the result the track's last frame.

        Face by face, in place: a face's rows are dense in the batch's (channels-last) tensors,
        where gathering rows of several faces (index_select, stack) took 250 ms a face of
        GPEN-BFR-256 on this CPU against 15.
        """
        state = self.memory.get(key)
        if state is not None:
            change = crop_change(probe[None], state.probe[None])  # [1]
            keep = keep_weight(change, self.keep)  # 0 at a cut: exactly this frame's latents
            for now, before in zip(latents, state.latents, strict=True):
                now.lerp_(before, keep.to(now.dtype))
        self.memory.put(key, _Latents(probe, tuple(t.clone() for t in latents)))

    def reset(self) -> None:
        """Forget every track."""
        self.memory.reset()


@dataclass(frozen=True)
class _Output:
    """One track's last frame for ``flow``: its crop's probe [P*P] and luma at F x F (uint8,
    host), and its output crop [3, S, S] fp32 in [-1, 1]."""

    probe: np.ndarray
    grey: np.ndarray
    output: torch.Tensor


@dataclass(frozen=True)
class FlowPlan:
    """One call's faces for :meth:`FlowSmoother.blend`: their keys [N], their input crops'
    probes [N, P*P] and luma [N, F, F] uint8 on the host (taken before GPEN runs), and, by
    position, the flows being computed for the faces whose previous frame is carried (see
    :func:`_face_motion`)."""

    keys: Sequence[Hashable | None]
    probes: np.ndarray
    greys: np.ndarray
    flows: dict[int, Future[SourceMotion]]


class FlowSmoother:
    """``--temporal flow``: each track's previous output carried by the crops' optical flow and
    blended into the current one where they agree (see the module's docstring).

    :meth:`plan` takes the call's input crops (one small download) and starts their flows on
    :data:`FLOW_WORKERS` host threads (OpenCV lets go of the GIL), :meth:`blend` takes the
    restored ones and waits for the flows: on CUDA they are computed while the device restores.
    Memory: one output crop per track (3 MB at 512, fp32).
    """

    def __init__(
        self,
        keep: float = KEEP_FLOW,
        agreement: float = AGREEMENT,
        flow_size: int = FLOW_SIZE,
        forget_after: int = FORGET_CALLS,
    ):
        if not 0 <= keep < 1:
            raise ValueError(f"keep must be in [0, 1), not {keep}")
        self.keep = keep
        self.agreement = agreement
        self.flow_size = flow_size
        self.memory = TrackMemory(forget_after)

    def plan(self, keys: Sequence[Hashable | None], crops: torch.Tensor) -> FlowPlan:
        """One call's faces: ``keys`` [N] their tracks (None: no history), ``crops``
        [N, 3, S, S] RGB in [-1, 1], the restorer's input. Starts their flows."""
        self.memory.begin_call(keys)
        grey = ((luma(crops, self.flow_size) + 1) * 127.5).round_().clamp_(0, 255)
        probe, greys = probes(crops).cpu().numpy(), grey.to(torch.uint8).cpu().numpy()
        flows, pool = {}, _flow_pool()
        for r, previous in enumerate(self._previous_frames(keys, probe, greys)):
            # Nothing to carry: a new track, or a cut away (another face, or too fast).
            if previous is not None and 1 - float(probe[r] @ previous[0]) < CUT:
                flows[r] = pool.submit(_face_motion, previous[1], greys[r])
        return FlowPlan(keys=keys, probes=probe, greys=greys, flows=flows)

    def blend(self, plan: FlowPlan, restored: torch.Tensor) -> torch.Tensor:
        """The restored crops [N, 3, S, S] (fp32, [-1, 1]) of :meth:`plan`'s faces, steadied:
        a new tensor, frame after frame per track."""
        rounds = waves(plan.keys)
        flows = [self._flows(plan, rows) for rows in rounds]
        # Dense NCHW: the crops (and so GPEN's output) come channels-last from the alignment,
        # where gathering and stacking whole faces was several times slower on the CPU.
        out = restored.clone(memory_format=torch.contiguous_format)
        for rows, (carried, flow, valid) in zip(rounds, flows, strict=True):
            if carried:
                previous = torch.stack([self.memory.get(plan.keys[r]).output for r in carried])
                index = torch.tensor(carried, device=out.device)
                now = out.index_select(0, index)
                out.index_copy_(0, index, self._carry(now, previous, flow, valid))
            for r in rows:
                state = _Output(plan.probes[r], plan.greys[r], out[r].clone())
                self.memory.put(plan.keys[r], state)
        return out

    def _previous_frames(
        self, keys: Sequence[Hashable | None], probe: np.ndarray, greys: np.ndarray
    ) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Each face's track's previous input frame (probe [P*P], luma [F, F]), None where it
        has none: the face before it in this call, else the memory's."""
        last: dict[Hashable, int] = {}
        before: list[tuple[np.ndarray, np.ndarray] | None] = []
        for r, key in enumerate(keys):
            state = None if key is None else self.memory.get(key)
            if key in last:
                before.append((probe[last[key]], greys[last[key]]))
            else:
                before.append(None if state is None else (state.probe, state.grey))
            if key is not None:
                last[key] = r
        return before

    def _flows(self, plan: FlowPlan, rows: list[int]):
        """For the faces at ``rows`` (one per track) that carry their previous frame: their
        positions, the flows [m, F, F, 2] from each one's crop to its previous one, and where
        they pass the forward-backward check [m, F, F] bool."""
        carried = [r for r in rows if r in plan.flows]
        if not carried:
            return carried, None, None
        motions = [plan.flows[r].result() for r in carried]
        return (
            carried,
            np.stack([m.backward for m in motions]),
            np.stack([m.valid for m in motions]),
        )

    def _carry(
        self, now: torch.Tensor, previous: torch.Tensor, flow: np.ndarray, valid: np.ndarray
    ) -> torch.Tensor:
        """now [m, 3, S, S] blended with previous [m, 3, S, S] carried along ``flow``
        [m, F, F, 2] (from now's crop to previous's, F-pixel units), where ``valid`` [m, F, F]
        and the two agree."""
        size, device = now.shape[-1], now.device
        scale = size / flow.shape[1]
        motion = torch.from_numpy(flow).to(device).permute(0, 3, 1, 2)  # [m, 2, F, F]
        motion = F.interpolate(motion, size=(size, size), mode="bilinear") * scale
        trusted = torch.from_numpy(valid).to(device, torch.float32)[:, None]
        trusted = F.interpolate(trusted, size=(size, size), mode="bilinear")  # [m, 1, S, S]
        carried = F.grid_sample(
            previous, sampling_grid(motion), mode="bilinear", padding_mode="border",
            align_corners=False,
        )  # fmt: skip
        difference = (carried - now).abs().mean(1, keepdim=True)
        weight = self.keep * trusted * torch.exp(-((difference / self.agreement) ** 2))
        return torch.lerp(now, carried, weight)

    def reset(self) -> None:
        """Forget every track."""
        self.memory.reset()


def sampling_grid(motion: torch.Tensor) -> torch.Tensor:
    """grid_sample's grid [m, S, S, 2] (align_corners=False) of the positions p + motion(p),
    motion [m, 2, S, S] in pixels (x, y)."""
    size = motion.shape[-1]
    pixels = torch.arange(size, device=motion.device, dtype=motion.dtype)
    ys, xs = torch.meshgrid(pixels, pixels, indexing="ij")
    where = torch.stack([xs, ys], dim=-1) + motion.permute(0, 2, 3, 1)  # [m, S, S, 2]
    return where.mul_(2 / size).add_(1 / size - 1)


_POOL_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None
_ESTIMATORS = threading.local()  # one DIS per thread: an OpenCV algorithm object is not shared


def _flow_pool() -> ThreadPoolExecutor:
    """The process's flow threads, started on first use."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(FLOW_WORKERS, thread_name_prefix="streamgpen-flow")
        return _POOL


def _face_motion(previous: np.ndarray, now: np.ndarray) -> SourceMotion:
    """A face's motion from its ``previous`` luma [F, F] uint8 to ``now``'s: what ``streamgpen
    eval`` measures between frames (the flow from now to previous, where each pixel's content
    was, and where it passes the forward-backward check), with this thread's DIS."""
    estimator = getattr(_ESTIMATORS, "dis", None)
    if estimator is None:
        estimator = _ESTIMATORS.dis = flow_estimator()
    return source_motion(estimator, previous, now)
