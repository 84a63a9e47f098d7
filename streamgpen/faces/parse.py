"""Face parsing for the paste-back mask (``--mask parse``), batched on the torch device.

GPEN's own code (``face_enhancement.py``), GFPGAN and CodeFormer paste a restored face through a
mask drawn from a face parser, not a square: the pixels of the restored crop the parser calls face
(skin, features, hair, glasses, ears, neck) are pasted, those it calls background, hat or clothes
keep the original frame. Here the restored crops of a whole batch are parsed in one forward (resize
to the parser's 512 input, normalise, argmax), the kept classes become a 0/1 map, and the map is
resized back to the crop and feathered like GPEN's ``mask_postprocess`` (zero a border, Gaussian
blur), with the border and the blur's support chosen so the mask is exactly 0 within
``align.MASK_INSET`` of the crop border: the paste leaves every pixel outside that support
bit-identical.

Two networks, facexlib's builds and released weights:

- ``parsenet`` (facexlib's ParseNet from PSFRGAN; GPEN's ``ParseNet-latest.pth`` is the same
  architecture): RGB in [-1, 1].
- ``bisenet`` (facexlib's BiSeNet, zllrunning/face-parsing.PyTorch): RGB in [0, 1] normalised
  with the ImageNet mean and std (facexlib's ``inference_parsing.py``).

Both were trained on CelebAMask-HQ's 19 classes, in different orders (the tuples below).

Shapes: N faces, S crop side, P = 512 the parser's input side, C = 19 classes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from facexlib.parsing.bisenet import BiSeNet
from facexlib.parsing.parsenet import ParseNet
from torch import nn

from streamgpen.errors import UserError
from streamgpen.faces.align import MASK_INSET
from streamgpen.models import weights
from streamgpen.models.gpen import compare_shapes
from streamgpen.runtime.device import fixed_algorithms
from streamgpen.runtime.restorer import to_channels_last

PARSER_SIZE = 512  # both networks were trained on 512 x 512 faces; GPEN parses at 512 too
DEFAULT_BATCH_SIZE = 8

# The class order of each network's 19 output channels.
# ParseNet: GPEN's face_parse/face_parsing.py lists it.
PARSENET_CLASSES = (
    "background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear",
    "r_ear", "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
)  # fmt: skip
# BiSeNet: facexlib's inference/inference_parsing.py lists it.
BISENET_CLASSES = (
    "background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear",
    "ear_r", "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat",
)  # fmt: skip
# What is not pasted. GPEN's MASK_COLORMAP is 0 for exactly these three (ParseNet 0, 14, 18) and
# 255 for the rest, so hair, glasses, ears, earrings, necklace and neck are pasted. (facexlib's and
# CodeFormer's helpers also drop neck_l and neck; we follow GPEN.) For BiSeNet the same names are
# dropped: classes 0, 16, 18; 1-15 and 17 (hair) are kept.
DROPPED_CLASSES = frozenset({"background", "hat", "cloth"})

# The feather: GPEN blurs its 512 mask twice with a Gaussian of sigma 4 (GaussianBlur((101, 101),
# 4)), one Gaussian of sigma 4 * sqrt(2) in all; scaled with the crop side, truncated at 3 sigma.
FEATHER_SIGMA_512 = 4 * math.sqrt(2)
FEATHER_TRUNCATE = 3.0


@dataclass(frozen=True)
class ParserNetwork:
    """What a parsing network expects and what its outputs mean.

    ``mean``/``std``: the per-channel (R, G, B) normalisation of its [0, 1] RGB input;
    ``classes``: the name of each output channel.
    """

    name: str
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def kept(self) -> tuple[bool, ...]:
        """For each class, whether its pixels are pasted."""
        return tuple(name not in DROPPED_CLASSES for name in self.classes)


NETWORKS: dict[str, ParserNetwork] = {
    # (x - 0.5) / 0.5: the [-1, 1] of facexlib's restoration helper and GPEN's img2tensor.
    "parsenet": ParserNetwork("parsenet", PARSENET_CLASSES, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "bisenet": ParserNetwork(
        "bisenet", BISENET_CLASSES, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ),
}


def build_network(network_name: str) -> nn.Module:
    """facexlib's ``network_name`` network as ``facexlib.parsing.init_parsing_model`` builds it
    (untrained, on the current default device)."""
    if network_name == "parsenet":
        return ParseNet(in_size=PARSER_SIZE, out_size=PARSER_SIZE, parsing_ch=19)
    if network_name == "bisenet":
        return BiSeNet(num_class=19)
    raise ValueError(f"unknown parsing network {network_name!r}; known: {', '.join(NETWORKS)}")


@functools.cache
def parser_shapes(network_name: str) -> dict[str, tuple[int, ...]]:
    """Every state_dict key and shape of ``network_name``, built on the meta device (no memory)."""
    with torch.device("meta"):
        network = build_network(network_name)
    return {k: tuple(v.shape) for k, v in network.state_dict().items()}


def parser_problem(spec: weights.ModelSpec, state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """How ``state_dict`` differs from the parsing network of ``spec`` (one line), or None."""
    return compare_shapes(parser_shapes(spec.network_name), state_dict)


def kept_pixels(labels: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The 0/1 map of the pixels to paste: labels [N, H, W] (class indices), kept [C] bool
    (whether each class is pasted) -> [N, 1, H, W] float32, 1 where the pixel's class is kept."""
    return kept.to(labels.device)[labels].unsqueeze(1).to(torch.float32)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of [N, C, H, W] to [N, C, size, size], anti-aliased when shrinking."""
    if images.shape[-2:] == (size, size):
        return images
    shrink = size < images.shape[-1]
    return F.interpolate(
        images, (size, size), mode="bilinear", align_corners=False, antialias=shrink
    )


def feather(kept: torch.Tensor, size: int) -> torch.Tensor:
    """GPEN's ``mask_postprocess`` at crop side ``size``, with an exact zero border.

    kept: [N, 1, H, W] in [0, 1] (any H = W) -> [N, 1, size, size] float32 in [0, 1]. GPEN zeroes
    26 px (at 512) and then blurs, which leaks the mask back towards the border; here the zeroed
    border is the inset plus the blur's radius, so the blurred mask is exactly 0 within
    ``round(MASK_INSET * size)`` pixels of the border (0.05 * 512 = 26: GPEN's width) and reaches
    its inner values over the blur's 2 radii after that.
    """
    inset = round(MASK_INSET * size)
    kernel = _gaussian(size, kept.device)  # [K], K = 2 * radius + 1
    radius = kernel.shape[0] // 2
    mask = _zero_border(resize(kept.to(torch.float32), size).clone(), inset + radius)
    mask = F.conv2d(mask, kernel.view(1, 1, 1, -1), padding=(0, radius))
    mask = F.conv2d(mask, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    # The zeros are exact by construction; zeroing again keeps them so when a convolution
    # algorithm (FFT, Winograd on CUDA) leaves rounding noise where the sum is zero.
    return _zero_border(mask.clamp_(0, 1), inset)


@functools.lru_cache(maxsize=16)
def _gaussian(size: int, device: torch.device) -> torch.Tensor:
    """The normalised 1-D feathering kernel [2 * radius + 1] for crop side ``size`` (float32)."""
    sigma = FEATHER_SIGMA_512 * size / 512
    radius = max(1, math.ceil(FEATHER_TRUNCATE * sigma))
    # Cached: a normal tensor even when first made under masks()' inference mode, so that feather
    # stays usable where autograd runs.
    with torch.inference_mode(False):
        taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
        return (kernel / kernel.sum()).to(device, torch.float32)


def _zero_border(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Zero ``width`` pixels along each edge of mask [N, 1, S, S], in place; returns it."""
    if width > 0:
        mask[..., :width, :] = 0
        mask[..., -width:, :] = 0
        mask[..., :, :width] = 0
        mask[..., :, -width:] = 0
    return mask


class FaceParser:
    """Paste masks for restored face crops from a face-parsing network, batched on the device.

    The network runs in ``dtype`` on CUDA and in float32 on the CPU (where half precision is
    slow); at most ``batch_size`` faces go through one forward.
    """

    def __init__(
        self,
        network: nn.Module,
        kind: ParserNetwork,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.kind = kind
        self.device = torch.device(device)
        self.dtype = dtype if self.device.type == "cuda" else torch.float32
        self.batch_size = batch_size
        self.network = to_channels_last(network.to(self.device, self.dtype)).eval()
        self._kept = torch.tensor(kind.kept(), device=self.device)  # [C] bool
        self._mean = torch.tensor(kind.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(kind.std, device=self.device).view(1, 3, 1, 1)

    @torch.inference_mode()
    def masks(self, crops: torch.Tensor) -> torch.Tensor:
        """Paste masks for restored crops: [N, 3, S, S] RGB in [-1, 1] -> [N, 1, S, S] float32
        in [0, 1] on the parser's device, exactly 0 within ``MASK_INSET * S`` of the border.

        One forward per ``batch_size`` faces; N == 0 runs none and returns [0, 1, S, S].
        """
        n, _, height, size = crops.shape
        if height != size:
            raise ValueError(f"expected square crops [N, 3, S, S], got {tuple(crops.shape)}")
        if n == 0:
            return torch.zeros(0, 1, size, size, device=self.device)
        crops = crops.to(self.device, torch.float32)
        kept = torch.cat([self._parse(chunk) for chunk in crops.split(self.batch_size)])
        # The feather's shapes change with the face count: cuDNN's autotuner would time its
        # convolutions again for every new count.
        with fixed_algorithms():
            return feather(kept, size)  # [N, 1, S, S]

    def _parse(self, crops: torch.Tensor) -> torch.Tensor:
        """crops [n, 3, S, S] float32 in [-1, 1] -> kept pixels [n, 1, P, P] float32 (0/1)."""
        rgb = (resize(crops, PARSER_SIZE).clamp(-1, 1) + 1) / 2  # [n, 3, P, P] in [0, 1]
        x = ((rgb - self._mean) / self._std).to(self.dtype, memory_format=torch.channels_last)
        # Both networks return a tuple whose first item is the full-size logits [n, C, P, P].
        logits = self.network(x)[0]
        return kept_pixels(logits.argmax(1), self._kept)


def build_parser(
    name: str,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    weights_dir: Path | None = None,
    progress: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> FaceParser:
    """The face parser ``name``: ``parsenet`` or ``bisenet`` (its file looked up in, or
    downloaded to, :func:`weights.weights_dir` of ``weights_dir``), or the path of a checkpoint of
    either network (which one is read from its keys). UserError, one line, for a missing or
    wrong file."""
    kind, state_dict = _load(name, weights_dir, progress)
    with torch.device("meta"):
        network = build_network(kind.name)
    # The keys and shapes were checked: take the file's tensors as they are.
    network.load_state_dict(state_dict, strict=True, assign=True)
    return FaceParser(network, kind, device=device, dtype=dtype, batch_size=batch_size)


def _load(
    name: str, weights_dir: Path | None, progress: bool
) -> tuple[ParserNetwork, dict[str, torch.Tensor]]:
    """The network and checked state_dict of the parser ``name`` (a registry name or a path)."""
    if name in NETWORKS:
        spec = weights.get_spec(name)
        path = weights.ensure(name, weights.weights_dir(weights_dir), progress=progress)
        return NETWORKS[name], weights.load_checked(spec, path)
    path = Path(name).expanduser()
    if not path.is_file():
        raise UserError(
            f"unknown face parser {name!r}: use {' or '.join(NETWORKS)}, or the path of a "
            "parsing checkpoint"
        )
    state_dict = weights.load_state_dict(path)
    problems = []
    for network_name, kind in NETWORKS.items():
        problem = parser_problem(weights.get_spec(network_name), state_dict)
        if problem is None:
            return kind, state_dict
        problems.append(f"as {network_name}: {problem}")
    raise UserError(f"{path}: not a face parsing checkpoint ({'; '.join(problems)})")


class MaskSmoother:
    """Steadies a video's parsed masks: each track's mask is averaged with its previous one.

    A parser decides every frame anew, so along a face's edge (hair against a dark background,
    the neck against a collar) its labels flicker while the face barely moves. The masks are
    smoothed in crop space, where a tracked face stays put whatever it does in the frame, so
    smoothing them cannot make the mask lag the face's motion (only its shape's changes, by
    ``keep / (1 - keep)`` frames, one at 0.5). Each mask stays exactly 0 at the crop border (a
    convex mix of masks that are). A new track starts from its own mask; the state is per run:
    :meth:`reset` at a discontinuity (the tracker starts over there too).
    """

    def __init__(self, keep: float = 0.5):
        if not 0 <= keep < 1:
            raise ValueError(f"keep must be in [0, 1), not {keep}")
        self.keep = keep
        self._masks: dict[int, torch.Tensor] = {}

    def reset(self) -> None:
        """Forget every track (a cut, a reconnect)."""
        self._masks.clear()

    def __call__(self, masks: torch.Tensor, tracks: list[int]) -> torch.Tensor:
        """masks [N, 1, S, S] of one frame's faces, tracks [N] their track ids -> smoothed
        [N, 1, S, S]. Tracks absent from this frame are forgotten (a face that comes back after
        a gap is a new track to the tracker too)."""
        smoothed = []
        for mask, track in zip(masks, tracks, strict=True):
            previous = self._masks.get(track)
            if previous is not None and previous.shape == mask.shape:
                mask = torch.lerp(mask, previous, self.keep)
            smoothed.append(mask)
        self._masks = dict(zip(tracks, smoothed, strict=True))
        return torch.stack(smoothed) if smoothed else masks


__all__ = [
    "BISENET_CLASSES",
    "DROPPED_CLASSES",
    "NETWORKS",
    "PARSENET_CLASSES",
    "PARSER_SIZE",
    "FaceParser",
    "MaskSmoother",
    "ParserNetwork",
    "build_network",
    "build_parser",
    "feather",
    "kept_pixels",
    "parser_problem",
    "parser_shapes",
]
