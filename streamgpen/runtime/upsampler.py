"""The background upsampler for ``--upscale F``: whole frames made F times larger on the device.

An upsampler is called as ``up(frames, scale)``: ``frames`` [B, 3, H, W] float RGB in [0, 1] on the
device (any float dtype), ``scale`` >= 1; it returns [B, 3, round(H*scale), round(W*scale)] in
[0, 1], same dtype and device (``scale == 1``: the input itself). Two kinds:

- :class:`ResizeUpsampler` (``--bg-upsampler none``): a bicubic resize.
- :class:`NetworkUpsampler`: a single-image super-resolution network loaded by spandrel
  (Real-ESRGAN's RRDBNet and SRVGGNetCompact, or any SR checkpoint spandrel knows), tiled so that
  4K frames fit in memory, then resized from its native scale to the one asked for.

:func:`build_upsampler` turns ``--bg-upsampler NAME|PATH`` into one. Checkpoints are read only by
:func:`streamgpen.models.weights.load_state_dict` (``weights_only``: pickled code never runs).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple, Protocol

import spandrel
import torch
import torch.nn.functional as F
from spandrel import ImageModelDescriptor, ModelDescriptor, ModelLoader, UnsupportedModelError

from streamgpen.errors import UserError
from streamgpen.models import weights
from streamgpen.models.weights import ModelSpec
from streamgpen.runtime.device import as_device
from streamgpen.runtime.restorer import to_channels_last

NONE = "none"
# Context around each tile, in input pixels. Tiles' cores do not overlap in the output: the
# overlap is only read, then cropped off (as Real-ESRGAN's own tiler does), so a pixel comes out as
# untiled when its receptive field fits in the overlap. The real networks' theoretical field is far
# larger (RRDBNet x4plus: 23 blocks x 15 convolutions, ~350 px) than any affordable overlap; what
# matters is how fast trained weights' influence decays, which cannot be measured without the
# weights. Real-ESRGAN's inference defaults to 10 px (tile_pad); 16 is a multiple of 4 (x2plus
# reads 2x2 pixel blocks, see NetworkUpsampler) and costs (400 + 32)^2 / 400^2 = 1.17x the
# untiled work on the default 400 px tile.
DEFAULT_TILE_OVERLAP = 16


class Upsampler(Protocol):
    """``up(frames, scale)``: [B, 3, H, W] in [0, 1], scale >= 1 -> [B, 3, round(H*scale),
    round(W*scale)] in [0, 1], same dtype and device; ``scale == 1`` returns ``frames``."""

    def __call__(self, frames: torch.Tensor, scale: float) -> torch.Tensor: ...


def output_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The (height, width) a ``height`` x ``width`` frame has after upscaling by ``scale``."""
    return round(height * scale), round(width * scale)


def _check_scale(scale: float) -> None:
    if not scale >= 1:
        raise UserError(f"--upscale must be at least 1, not {scale}")


def resize(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``frames`` [B, C, h, w] in [0, 1] resized to [B, C, *size], anti-aliased, same dtype.

    Enlarging is bicubic: the sharpest kernel F.interpolate has (bilinear is visibly softer at 2x
    and more; nearest makes blocks), and enlarging needs no anti-aliasing since it adds no
    frequency above the new Nyquist limit; its overshoot at edges is clamped back to [0, 1].
    Shrinking (a network's native scale above the one asked for) averages: an exact factor (x4 to
    x2) is ``area``, the mean of each block, in any dtype; any other is anti-aliased bilinear,
    computed in float32 because torch's anti-aliased kernels lack fp16/bf16 on the CPU.
    """
    height, width = frames.shape[-2:]
    if (height, width) == tuple(size):
        return frames
    if size[0] > height or size[1] > width:
        out = F.interpolate(frames, size=size, mode="bicubic", align_corners=False)
        return out.clamp_(0, 1)
    if height % size[0] == 0 and width % size[1] == 0:
        return F.interpolate(frames, size=size, mode="area")
    out = F.interpolate(
        frames.float(), size=size, mode="bilinear", align_corners=False, antialias=True
    )
    return out.to(frames.dtype)


class ResizeUpsampler:
    """``--bg-upsampler none``: the frame enlarged by :func:`resize` (bicubic), on its device."""

    native_scale = 1

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor, scale: float) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, 3, round(H*scale), round(W*scale)], same dtype."""
        _check_scale(scale)
        if scale == 1:
            return frames
        return resize(frames, output_size(*frames.shape[-2:], scale))


class Span(NamedTuple):
    """One tile along one axis: the output core [start, end) and the input read [lo, hi)."""

    start: int
    end: int
    lo: int
    hi: int


def tile_spans(length: int, tile: int, overlap: int) -> list[Span]:
    """The tiles covering ``length`` pixels: cores of ``tile`` (0: one core), each read with
    ``overlap`` pixels of context either side where the frame has them."""
    if tile <= 0 or tile >= length:
        return [Span(0, length, 0, length)]
    return [
        Span(
            start,
            min(start + tile, length),
            max(0, start - overlap),
            min(length, start + tile + overlap),
        )
        for start in range(0, length, tile)
    ]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def network_dtype(
    descriptor: ImageModelDescriptor, device: torch.device, dtype: torch.dtype
) -> torch.dtype:
    """The dtype ``descriptor`` runs in: the run's ``dtype``, except float32 on the CPU (its
    fp16/bf16 convolutions are slower than fp32 ones, where they exist at all) and for an
    architecture spandrel marks as not supporting that half type (it would overflow or fail)."""
    if device.type == "cpu":
        return torch.float32
    if dtype == torch.float16 and not descriptor.supports_half:
        return torch.float32
    if dtype == torch.bfloat16 and not descriptor.supports_bfloat16:
        return torch.float32
    return dtype


class NetworkUpsampler:
    """A spandrel super-resolution network as an :class:`Upsampler`.

    It runs on ``device`` in :func:`network_dtype` (``dtype`` on CUDA, float32 on the CPU),
    channels-last (oneDNN's and cuDNN's fast layout: 174 ms against 237 ms per 320x180 frame for
    an RRDBNet x2 of 1 block and 16 features on this machine's CPU), on tiles of ``tile`` input
    pixels (0: untiled) read with ``tile_overlap`` pixels of context, the whole batch per tile.
    Tile and overlap are rounded up to the network's size multiple (4 for x2plus, which folds 2x2
    pixel blocks into channels) so that every tile reads the same blocks as the whole frame
    would. The network's native scale then goes to the one asked for by :func:`resize`: a x4
    network at ``scale`` 2 is shrunk by area, at ``scale`` 6 enlarged bicubic.
    """

    def __init__(
        self,
        descriptor: ImageModelDescriptor,
        device: torch.device | str,
        *,
        dtype: torch.dtype,
        tile: int,
        tile_overlap: int,
    ):
        if tile < 0:
            raise UserError(f"--bg-tile must be 0 (untiled) or a tile size in pixels, not {tile}")
        if tile_overlap < 0:
            raise ValueError(f"tile_overlap must be >= 0, not {tile_overlap}")
        device = as_device(device)
        self.dtype = network_dtype(descriptor, device, dtype)
        self.descriptor = descriptor.to(device=device, dtype=self.dtype).eval()
        to_channels_last(self.descriptor.model)
        self.native_scale = descriptor.scale
        multiple = descriptor.size_requirements.multiple_of
        self.tile = _round_up(tile, multiple)
        self.tile_overlap = _round_up(tile_overlap, multiple)

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor, scale: float) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, 3, round(H*scale), round(W*scale)], same dtype."""
        _check_scale(scale)
        if scale == 1:
            return frames
        native = self._forward(frames.to(self.dtype))
        return resize(native, output_size(*frames.shape[-2:], scale)).to(frames.dtype)

    def _forward(self, frames: torch.Tensor) -> torch.Tensor:
        # frames [B, 3, H, W] in self.dtype -> [B, 3, H*n, W*n] in self.dtype, n the native scale
        batch, _, height, width = frames.shape
        n = self.native_scale
        out = frames.new_empty(batch, 3, height * n, width * n)
        for ys in tile_spans(height, self.tile, self.tile_overlap):
            for xs in tile_spans(width, self.tile, self.tile_overlap):
                region = frames[:, :, ys.lo : ys.hi, xs.lo : xs.hi]
                # spandrel's call pads to the size multiple, clamps to [0, 1] and crops back.
                result = self.descriptor(region.contiguous(memory_format=torch.channels_last))
                core = result[
                    :,
                    :,
                    (ys.start - ys.lo) * n : (ys.end - ys.lo) * n,
                    (xs.start - xs.lo) * n : (xs.end - xs.lo) * n,
                ]
                out[:, :, ys.start * n : ys.end * n, xs.start * n : xs.end * n] = core
        return out


def upsampler_names() -> list[str]:
    """What ``--bg-upsampler`` takes by name: ``none`` and the registered SR models."""
    return [NONE, *(spec.name for spec in weights.MODELS.values() if spec.kind == "sr")]


def build_upsampler(
    name_or_path: str | Path,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    weights_dir: Path | None,
    tile: int,
    tile_overlap: int = DEFAULT_TILE_OVERLAP,
    progress: bool = True,
) -> Upsampler:
    """The upsampler ``--bg-upsampler`` names: ``none`` (:class:`ResizeUpsampler`), a registered
    SR model (its file in ``weights_dir``, or where :func:`streamgpen.models.weights.weights_dir`
    looks when None; downloaded if missing) or the path of any single-image super-resolution
    checkpoint spandrel supports. UserError, one line, for anything else."""
    name = str(name_or_path)
    if name == NONE:
        return ResizeUpsampler()
    if name in upsampler_names():
        path = weights.ensure(name, weights.weights_dir(weights_dir), progress=progress)
        descriptor = load_network(path, weights.get_spec(name))
    elif Path(name).expanduser().is_file():
        descriptor = load_network(Path(name).expanduser())
    else:
        raise UserError(
            f"--bg-upsampler {name!r} is neither a known upsampler "
            f"({', '.join(upsampler_names())}) nor a file"
        )
    return NetworkUpsampler(descriptor, device, dtype=dtype, tile=tile, tile_overlap=tile_overlap)


def load_network(path: Path, spec: ModelSpec | None = None) -> ImageModelDescriptor:
    """The SR network in the checkpoint at ``path``, on the CPU in float32: ``spec``'s
    architecture and scale when given, otherwise any RGB single-image SR model spandrel knows.
    UserError, one line naming the file, for a file that is not one (or that carries code)."""
    state_dict = weights.load_state_dict(path)
    try:
        descriptor = _recognise(state_dict)
    except ValueError as e:
        raise UserError(f"{path}: not a super-resolution checkpoint ({e})") from None
    if spec is not None:
        problem = _spec_problem(spec, descriptor)
        if problem:
            raise UserError(f"{path}: not a {spec.name} checkpoint ({problem})")
        return descriptor
    problem = _sr_problem(descriptor)
    if problem:
        raise UserError(f"{path}: cannot upscale a background: {problem}")
    return descriptor


def upsampler_problem(spec: ModelSpec, state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """How ``state_dict`` differs from ``spec``'s network (spandrel must recognise it as
    ``spec.network_name`` at ``spec.scale``), in one line; None when it is that network."""
    try:
        descriptor = _recognise(state_dict)
    except ValueError as e:
        return str(e)
    return _spec_problem(spec, descriptor)


def _recognise(state_dict: Mapping[str, torch.Tensor]) -> ModelDescriptor:
    """spandrel's model for ``state_dict`` (built on the CPU); ValueError, one line, otherwise."""
    version = f"spandrel {spandrel.__version__}"
    try:
        return ModelLoader().load_from_state_dict(dict(state_dict))
    except UnsupportedModelError:
        raise ValueError(f"{version} recognises no architecture in it") from None
    except Exception as e:
        # A detector matches a few keys; building the model from a dict that only half matches
        # then fails in many ways (KeyError, size-mismatch RuntimeError over many lines, ...).
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{version} could not build it ({type(e).__name__} {reason})") from None


def _sr_problem(descriptor: ModelDescriptor) -> str | None:
    """Why ``descriptor`` cannot upscale an RGB frame on its own, or None."""
    purpose = descriptor.purpose
    if not isinstance(descriptor, ImageModelDescriptor) or purpose != "SR":
        kind = {"FaceSR": "face restoration", "Inpainting": "inpainting"}.get(purpose, purpose)
        return (
            f"a {descriptor.architecture.name} {kind} model (x{descriptor.scale}), "
            "not single-image super-resolution"
        )
    if (descriptor.input_channels, descriptor.output_channels) != (3, 3):
        return (
            f"a {descriptor.architecture.name} model from {descriptor.input_channels} to "
            f"{descriptor.output_channels} channels, not RGB"
        )
    return None


def _spec_problem(spec: ModelSpec, descriptor: ModelDescriptor) -> str | None:
    """How ``descriptor`` differs from ``spec``'s architecture and scale, or None."""
    problem = _sr_problem(descriptor)
    if problem:
        return problem
    network = type(descriptor.model).__name__
    if network != spec.network_name:
        return f"a {network} network, expected {spec.network_name}"
    if descriptor.scale != spec.scale:
        return f"a x{descriptor.scale} {network}, expected x{spec.scale}"
    return None
