"""Detect, align, restore and paste back every face of an image or a batch of frames.

This is the core that photos and video share. Pixels live on the torch device as float RGB in
[0, 1], [B, 3, H, W]; only face coordinates come back to the host.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from streamgpen.config import (
    DetectorConfig,
    EnhancerConfig,
    FaceConfig,
    MaskKind,
    ModelConfig,
    TemporalMode,
    UpscaleConfig,
    value_of,
)
from streamgpen.errors import UserError
from streamgpen.faces.align import (
    paste_faces,
    paste_mask,
    similarity_transform,
    template,
    warp_faces,
)
from streamgpen.faces.clahe import clahe_luminance
from streamgpen.faces.color_match import match_color
from streamgpen.faces.detect import DEFAULT_DET_SIZE, FaceDetector
from streamgpen.faces.temporal import FlowSmoother, LatentSmoother
from streamgpen.faces.types import Face, FaceBatch, nearest_to_center
from streamgpen.models import weights
from streamgpen.runtime.device import as_device
from streamgpen.runtime.restorer import IDENTITY, Identity, Restorer

GPEN_MODELS = ("GPEN-BFR-512", "GPEN-BFR-256", "GPEN-BFR-1024", "GPEN-BFR-2048")
DETECTORS = ("retinaface_resnet50", "retinaface_mobile0.25")


@dataclass
class EnhanceResult:
    """An enhanced image (same layout and dtype as the input) and the faces found in it.

    ``image`` is an HxWx3 BGR array from ``enhance``, a [1, 3, H, W] float RGB tensor in [0, 1]
    on the device from ``enhance_tensor``.
    """

    image: np.ndarray | torch.Tensor
    faces: list[Face]
    crops: torch.Tensor = field(repr=False, default=None)
    restored: torch.Tensor = field(repr=False, default=None)


def build_restorer(
    config: ModelConfig = ModelConfig(),
    device: torch.device | str | None = None,
    weights_dir: Path | None = None,
    *,
    progress: bool = True,
    halves: bool = False,
) -> Restorer:
    """The restorer for ``--model``/``--model-path``; weights are fetched on first use.
    ``halves``: GPEN's encoder and decoder run (and are captured) apart, ``--temporal ema``."""
    device = as_device(device)
    name = value_of(config.name)
    if config.path is not None:
        network = weights.load_gpen(Path(config.path), device="cpu")
    elif name == IDENTITY:
        network = Identity()
    elif name in GPEN_MODELS:
        path = weights.ensure(name, weights.weights_dir(weights_dir), progress=progress)
        network = weights.load_gpen(path)
    else:
        choices = ", ".join((*GPEN_MODELS, IDENTITY))
        raise UserError(f"unknown model {name!r} (choose {choices}, or --model-path FILE)")
    return Restorer(
        network,
        device,
        config.batch_size,
        precision=value_of(config.precision),
        compile=config.compile,
        halves=halves and not isinstance(network, Identity),
    )


def build_detector(
    name: str = "retinaface_resnet50",
    device: torch.device | str | None = None,
    weights_dir: Path | None = None,
    det_size: int = DEFAULT_DET_SIZE,
    threshold: float = 0.9,
    min_face: int = 10,
    *,
    progress: bool = True,
) -> FaceDetector:
    """The RetinaFace detector for ``--detector``, its weights from the weights directory."""
    name = value_of(name)
    if name not in DETECTORS:
        raise UserError(f"unknown detector {name!r} (choose {', '.join(DETECTORS)})")
    path = weights.ensure(name, weights.weights_dir(weights_dir), progress=progress)
    spec = weights.MODELS[name]
    return FaceDetector(spec.network_name, path, as_device(device), det_size, threshold, min_face)


def required_weights(config: EnhancerConfig) -> list[str]:
    """The weights files (by model name) that building ``config``'s enhancer will load."""
    names = [value_of(config.detector.name)]
    model = value_of(config.model.name)
    if config.model.path is None and model in GPEN_MODELS:
        names.insert(0, model)
    if value_of(config.faces.mask) == MaskKind.PARSE:
        names.append(value_of(config.faces.parse_model))
    upsampler = config.upscale.bg_upsampler
    if config.upscale.factor != 1 and upsampler in weights.MODELS:
        names.append(upsampler)
    return names


class Enhancer:
    """Face enhancement of whole images: ``Enhancer(model=..., device=...).enhance(bgr_uint8)``.

    ``blend`` mixes restored and original faces (1: fully restored); ``clahe`` equalises each
    crop's luminance before the model; ``only_center_face`` keeps the face nearest the centre;
    ``temporal`` steadies each video track's face over the frames (``off``, ``ema``, ``flow``:
    see :mod:`streamgpen.faces.temporal`; faces without a track key, photos, are never touched).
    The keywords are those of :class:`~streamgpen.config.EnhancerConfig`'s tree, flattened;
    :meth:`from_config` takes the tree itself. ``restorer``/``face_detector`` supply ready ones.
    """

    def __init__(
        self,
        model: str = "GPEN-BFR-512",
        *,
        model_path: Path | None = None,
        detector: str = "retinaface_resnet50",
        device: str | torch.device | None = None,
        weights_dir: Path | None = None,
        batch_size: int = 8,
        precision: str = "auto",
        compile: bool = False,
        det_size: int = DEFAULT_DET_SIZE,
        det_threshold: float = 0.9,
        min_face: int = 10,
        blend: float = 1.0,
        clahe: bool = False,
        only_center_face: bool = False,
        mask: str = "parse",
        parse_model: str = "parsenet",
        color_match: bool = False,
        temporal: str = "flow",
        upscale: float = 1.0,
        bg_upsampler: str = "none",
        bg_tile: int = 400,
        restorer: Restorer | None = None,
        face_detector: FaceDetector | None = None,
        progress: bool = True,
    ):
        config = EnhancerConfig(
            model=ModelConfig(
                name=model,
                path=model_path,
                precision=precision,
                compile=compile,
                batch_size=batch_size,
            ),
            detector=DetectorConfig(
                name=detector, det_size=det_size, threshold=det_threshold, min_face=min_face
            ),
            faces=FaceConfig(
                blend=blend,
                clahe=clahe,
                only_center_face=only_center_face,
                mask=mask,
                parse_model=parse_model,
                color_match=color_match,
                temporal=temporal,
            ),
            upscale=UpscaleConfig(factor=upscale, bg_upsampler=bg_upsampler, bg_tile=bg_tile),
            device="auto" if device is None else str(device),
            weights_dir=weights_dir,
        )
        self._build(config, restorer, face_detector, progress)

    @classmethod
    def from_config(
        cls,
        config: EnhancerConfig,
        *,
        restorer: Restorer | None = None,
        face_detector: FaceDetector | None = None,
        progress: bool = True,
    ) -> Enhancer:
        """An enhancer for a configuration tree (what the CLI builds)."""
        enhancer = cls.__new__(cls)
        enhancer._build(config, restorer, face_detector, progress)
        return enhancer

    def _build(self, config, restorer, face_detector, progress: bool) -> None:
        faces = config.faces
        if not 0.0 <= faces.blend <= 1.0:
            raise UserError(f"--blend must be in [0, 1], not {faces.blend}")
        if not config.upscale.factor >= 1:
            raise UserError(f"--upscale must be 1 or more, not {config.upscale.factor}")
        self.config = config
        self.device = as_device(config.device)
        self.temporal = TemporalMode(value_of(faces.temporal))
        self.restorer = restorer or build_restorer(
            config.model,
            self.device,
            config.weights_dir,
            progress=progress,
            halves=self.temporal == TemporalMode.EMA,
        )
        if self.temporal == TemporalMode.EMA and self.restorer.is_identity:
            raise UserError("--temporal ema mixes GPEN's latents: the identity model has none")
        self._smoother = _smoother(self.temporal)
        self.detector = face_detector or _detector(config, self.device, progress)
        self.parser = _parser(config, self.device, self.restorer.dtype, progress)
        self.upsampler = _upsampler(config, self.device, self.restorer.dtype, progress)
        self.size = self.restorer.size
        self.template = template(self.size).to(self.device)
        self.blend = faces.blend
        self.clahe = faces.clahe
        self.only_center_face = faces.only_center_face
        self.color_match = faces.color_match
        self.upscale = float(config.upscale.factor)

    def with_options(
        self,
        *,
        blend: float | None = None,
        upscale: float | None = None,
        only_center_face: bool | None = None,
        mask: MaskKind | str | None = None,
    ) -> Enhancer:
        """A copy that shares this enhancer's models (nothing is loaded) with a request's own
        blend, upscale factor, centre-face choice or paste mask; None keeps this one's.

        ``mask="parse"`` needs the face parser this enhancer was built with (``UserError``
        otherwise); ``mask="box"`` pastes the feathered box.
        """
        faces = self.config.faces
        changes = {
            "blend": faces.blend if blend is None else blend,
            "only_center_face": faces.only_center_face
            if only_center_face is None
            else only_center_face,
            "mask": faces.mask if mask is None else MaskKind(value_of(mask)),
        }
        if changes["mask"] == MaskKind.PARSE and self.parser is None:
            raise UserError("mask parse: this enhancer was started without a face parser")
        factor = self.config.upscale.factor if upscale is None else upscale
        if not 0.0 <= changes["blend"] <= 1.0:
            raise UserError(f"blend must be in [0, 1], not {changes['blend']}")
        if not factor >= 1:
            raise UserError(f"upscale must be 1 or more, not {factor}")
        view = copy.copy(self)  # the models are shared; only the attributes below differ
        view.config = replace(
            self.config,
            faces=replace(faces, **changes),
            upscale=replace(self.config.upscale, factor=factor),
        )
        view.parser = self.parser if changes["mask"] == MaskKind.PARSE else None
        view.blend = changes["blend"]
        view.only_center_face = changes["only_center_face"]
        view.upscale = float(factor)
        # Tracks' history is per view: a view serves one request's run (a job, a stream).
        view._smoother = _smoother(self.temporal)
        return view

    def warmup(self, height: int = 720, width: int = 1280) -> None:
        """Run every stage once at start-up (CUDA graph capture, cuDNN autotuning), so the first
        frame is not slower than the others."""
        self.restorer.warmup()
        frame = torch.zeros(1, 3, height, width, device=self.device)
        self.detect(frame)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # --- numpy in, numpy out: the Python API ------------------------------------------------

    def enhance(self, bgr: np.ndarray) -> EnhanceResult:
        """Enhance every face of an HxWx3 BGR image (uint8 or uint16); returns the same layout."""
        return self._on_host(self.enhance_tensor, bgr)

    def enhance_aligned(self, bgr: np.ndarray) -> EnhanceResult:
        """Restore an image that already is an aligned face: straight through the model."""
        return self._on_host(self.enhance_aligned_tensor, bgr)

    def _on_host(self, enhance, bgr: np.ndarray) -> EnhanceResult:
        result = enhance(self.upload(bgr))
        return replace(result, image=self.download(result.image, bgr.dtype))

    # --- a whole image on the device: photos decoded there, and the numpy API above ---------

    def enhance_tensor(self, frame: torch.Tensor) -> EnhanceResult:
        """Enhance every face of [1, 3, H, W] float RGB in [0, 1] on the device; the result's
        ``image`` is the same layout, still on the device."""
        faces = self.detect(frame)[0]
        batch = self.align(frame, [faces])
        self.restore(batch)
        self.parse(batch)
        image = self.paste(self.background(frame), batch)
        return EnhanceResult(image, faces, batch.crops, batch.restored)

    def enhance_aligned_tensor(self, frame: torch.Tensor) -> EnhanceResult:
        """``enhance_aligned`` of [1, 3, H, W] float RGB in [0, 1] on the device, kept there."""
        crop = _resize(frame, (self.size, self.size)) * 2 - 1
        if self.clahe:
            crop = clahe_luminance(crop)
        restored = self.restorer(crop)
        background = self.background(frame)
        out = _resize((restored + 1) / 2, tuple(background.shape[-2:]))
        return EnhanceResult(background + self.blend * (out - background), [], crop, restored)

    def upload(self, bgr: np.ndarray) -> torch.Tensor:
        """HxWx3 BGR uint8/uint16 -> [1, 3, H, W] float RGB in [0, 1] on the device."""
        scale = float(np.iinfo(bgr.dtype).max)
        t = torch.from_numpy(np.ascontiguousarray(bgr)).to(self.device)
        return (t.permute(2, 0, 1).flip(0).float() / scale)[None]

    @staticmethod
    def download(frame: torch.Tensor, dtype) -> np.ndarray:
        """[1, 3, H, W] float RGB in [0, 1] -> HxWx3 BGR of ``dtype``."""
        scale = float(np.iinfo(dtype).max)
        out = (frame[0].flip(0).permute(1, 2, 0) * scale).round_().clamp_(0, scale)
        return (
            out.to(torch.int32 if dtype == np.uint16 else torch.uint8).cpu().numpy().astype(dtype)
        )

    # --- tensor stages: shared with the video pipeline --------------------------------------

    def detect(self, frames: torch.Tensor) -> list[list[Face]]:
        """Faces per frame of [B, 3, H, W] float RGB in [0, 1]."""
        found = self.detector.detect(frames)
        if self.only_center_face:
            h, w = frames.shape[-2:]
            found = [_center_face(faces, w, h) for faces in found]
        return found

    def align(self, frames: torch.Tensor, faces_per_frame: list[list[Face]]) -> FaceBatch:
        """Warp every face of every frame to the template, in one batched call."""
        size = (frames.shape[-2], frames.shape[-1])
        faces = [f for fs in faces_per_frame for f in fs]
        index = [i for i, fs in enumerate(faces_per_frame) for _ in fs]
        frame_index = torch.tensor(index, dtype=torch.long, device=self.device)
        if not faces:
            empty = frames.new_zeros(0, 3, self.size, self.size)
            return FaceBatch([], frame_index, frames.new_zeros(0, 2, 3), empty, size)
        landmarks = torch.from_numpy(np.stack([f.landmarks for f in faces])).to(self.device)
        matrices = similarity_transform(landmarks.float(), self.template)
        crops = warp_faces(frames, matrices, self.size, frame_index) * 2 - 1
        return FaceBatch(faces, frame_index, matrices, crops, size)

    def restore(self, batch: FaceBatch, on_batch: Callable[[int], None] | None = None) -> FaceBatch:
        """Run the restorer on the batch's crops (CLAHE first when asked); ``on_batch(n)``
        after each of the restorer's batches."""
        self.restore_many([batch], on_batch)
        return batch

    def restore_many(
        self, batches: Sequence[FaceBatch], on_batch: Callable[[int], None] | None = None
    ) -> None:
        """Restore the faces of several batches (images of any sizes: every crop has the
        model's size) in one restorer call, so that they share its device batches; each batch
        gets its own ``restored``. The service batches concurrent requests so. With
        ``temporal``, the faces of batches with track keys are steadied per track, in order."""
        crops = torch.cat([b.crops for b in batches])  # [N, 3, S, S], N over all batches
        if self.clahe:
            crops = clahe_luminance(crops)
        keys = [k for b in batches for k in (b.tracks or [None] * len(b.faces))]
        smoother = self._smoother if any(k is not None for k in keys) else None
        if isinstance(smoother, LatentSmoother):
            restored = self.restorer(crops, on_batch, mix=smoother.mixer(keys, crops))
        elif isinstance(smoother, FlowSmoother):
            plan = smoother.plan(keys, crops)
            restored = smoother.blend(plan, self.restorer(crops, on_batch))
        else:
            restored = self.restorer(crops, on_batch)
        for batch, part in zip(
            batches, restored.split([len(b.faces) for b in batches]), strict=True
        ):
            batch.restored = part

    def parse(self, batch: FaceBatch) -> FaceBatch:
        """The paste masks of the restored faces (``--mask parse``), one parser call per batch."""
        self.parse_many([batch])
        return batch

    def parse_many(self, batches: Sequence[FaceBatch]) -> None:
        """:meth:`parse` of several batches in one parser call (see :meth:`restore_many`)."""
        batches = [b for b in batches if b.faces]
        if self.parser is None or not batches:
            return
        masks = self.parser.masks(torch.cat([b.restored for b in batches]))
        for batch, part in zip(batches, masks.split([len(b.faces) for b in batches]), strict=True):
            batch.masks = part

    def background(self, frames: torch.Tensor) -> torch.Tensor:
        """The frames [B, 3, H, W] at the output's size (``--upscale``: the background upsampler's
        result; the frames themselves at 1x), what the faces are pasted into."""
        return self.upsampler(frames, self.upscale)

    def paste(
        self, background: torch.Tensor, batch: FaceBatch, blend: float | None = None
    ) -> torch.Tensor:
        """Blend the restored faces into ``background`` (the frames, or :meth:`background`'s
        larger ones: the faces land at its resolution); ``blend``: this call's, else the
        configured one."""
        if not batch.faces:
            return background
        restored = (batch.restored.float() + 1) / 2
        if self.color_match:
            restored = match_color(restored, (batch.crops.float() + 1) / 2, self._weights(batch))
        matrices = output_matrices(batch.matrices, batch.frame_size, background.shape[-2:])
        blend = self.blend if blend is None else blend
        return paste_faces(
            background, restored, matrices, batch.frame_index, blend, masks=batch.masks
        )

    def _weights(self, batch: FaceBatch) -> torch.Tensor:
        """Where a face's colour is measured: its paste mask [N, 1, S, S]."""
        if batch.masks is not None:
            return batch.masks
        box = paste_mask(self.size, self.device)
        return box.expand(len(batch.faces), -1, -1, -1)

    def forget_tracks(self, input_number: int) -> None:
        """Forget the temporal history of the tracks of one video input (``FaceBatch.tracks``'
        first element): that input has ended."""
        if self._smoother is not None:
            self._smoother.memory.forget_input(input_number)


def _smoother(mode: TemporalMode) -> LatentSmoother | FlowSmoother | None:
    """A fresh per-track history for ``--temporal`` (None: off)."""
    if mode == TemporalMode.EMA:
        return LatentSmoother()
    if mode == TemporalMode.FLOW:
        return FlowSmoother()
    return None


def _detector(config: EnhancerConfig, device: torch.device, progress: bool) -> FaceDetector:
    det = config.detector
    return build_detector(
        det.name,
        device,
        config.weights_dir,
        det.det_size,
        det.threshold,
        det.min_face,
        progress=progress,
    )


def _parser(config: EnhancerConfig, device: torch.device, dtype: torch.dtype, progress: bool):
    """The face parser for ``--mask parse`` (None for the box mask)."""
    if value_of(config.faces.mask) != MaskKind.PARSE:
        return None
    from streamgpen.faces.parse import build_parser

    return build_parser(
        value_of(config.faces.parse_model),
        device=device,
        dtype=dtype,
        weights_dir=config.weights_dir,
        progress=progress,
    )


def _upsampler(config: EnhancerConfig, device: torch.device, dtype: torch.dtype, progress: bool):
    """The background upsampler of ``--bg-upsampler`` (a resize when the output is not larger)."""
    from streamgpen.runtime.upsampler import build_upsampler

    name = config.upscale.bg_upsampler if config.upscale.factor != 1 else "none"
    return build_upsampler(
        name,
        device=device,
        dtype=dtype,
        weights_dir=config.weights_dir,
        tile=config.upscale.bg_tile,
        progress=progress,
    )


def output_matrices(
    matrices: torch.Tensor, frame_size: tuple[int, int], output_size: tuple[int, int]
) -> torch.Tensor:
    """Image->crop matrices [N, 2, 3] of ``frame_size`` (h, w) frames re-expressed for outputs
    of ``output_size``: an output pixel's centre (x + 0.5) * w / W - 0.5 in the frame."""
    (h, w), (out_h, out_w) = frame_size, output_size
    sx, sy = w / out_w, h / out_h
    linear = matrices[:, :, :2]
    scale = linear.new_tensor([[sx, 0.0], [0.0, sy]])
    offset = linear.new_tensor([(sx - 1) / 2, (sy - 1) / 2])
    shifted = matrices[:, :, 2] + linear @ offset
    return torch.cat([linear @ scale, shifted[..., None]], 2)


def _center_face(faces: list[Face], width: int, height: int) -> list[Face]:
    index = nearest_to_center(faces, width, height)
    return [] if index is None else [faces[index]]


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
