"""Full-reference photo metrics: PSNR, SSIM and LPIPS of an output against its ground truth.

The metrics are torchmetrics' (``torchmetrics.functional.image`` and ``torchmetrics.image``), not
our own: torchmetrics is maintained (by Lightning AI), pure torch and already part
of torch's ecosystem, so it adds one small dependency. pyiqa pulls in many more (it bundles dozens
of models and their requirements) and piq has been unmaintained since 2023.

Conventions (those of the face restoration papers' BasicSR scripts): RGB, values scaled to [0, 1]
from the file's depth (8 or 16 bits, so depths may differ between the pair), no border cropped,
alpha ignored, gray images as three equal channels.

- PSNR: ``10 log10(1 / MSE)`` over all pixels and channels (dB; infinite for identical images).
- SSIM: Wang et al. 2004, an 11-pixel Gaussian window of sigma 1.5, K1 0.01, K2 0.03, averaged
  over the channels and every pixel, the window reflected at the image's borders (BasicSR and
  skimage leave the 5 border pixels out instead: their figures can differ slightly, most on
  small images).
- LPIPS: Zhang et al. 2018, torchmetrics' copy of the released linear layers (bundled with
  torchmetrics) on torchvision's ImageNet backbone (AlexNet by default), which torchvision
  downloads into torch hub's cache. It is never downloaded here: without the backbone in the
  cache, LPIPS is reported as not available, with the file to put there (:func:`lpips_status`).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torchvision
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

# LPIPS's networks (``--lpips-net``) -> torchvision's backbone.
LPIPS_BACKBONES = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}


def to_tensor(bgr: np.ndarray) -> torch.Tensor:
    """HxWx3 BGR uint8 or uint16 (:func:`streamgpen.media.images.read_photo`'s ``color``) ->
    [1, 3, H, W] float32 RGB in [0, 1]."""
    scale = 65535.0 if bgr.dtype == np.uint16 else 255.0
    rgb = np.ascontiguousarray(bgr[..., ::-1])
    return torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).float() / scale


def psnr(output: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of [1, 3, H, W] images in [0, 1] (inf when they are identical)."""
    return float(peak_signal_noise_ratio(output, reference, data_range=1.0))


def ssim(output: torch.Tensor, reference: torch.Tensor) -> float:
    """SSIM of [1, 3, H, W] images in [0, 1] (1: identical)."""
    return float(structural_similarity_index_measure(output, reference, data_range=1.0))


@dataclass(frozen=True, kw_only=True)
class LpipsStatus:
    """Whether LPIPS with ``net`` can run here; ``reason``: one line saying why not and how to
    get it."""

    net: str
    available: bool
    reason: str | None = None


def backbone_file(net: str) -> tuple[Path, str]:
    """Where torchvision keeps ``net``'s ImageNet backbone (torch hub's cache: ``$TORCH_HOME``,
    else ``~/.cache/torch``) and the URL it comes from."""
    weights = torchvision.models.get_model_weights(LPIPS_BACKBONES[net]).DEFAULT
    name = Path(urlparse(weights.url).path).name
    return Path(torch.hub.get_dir()) / "checkpoints" / name, weights.url


def lpips_status(net: str) -> LpipsStatus:
    """Whether the backbone and the linear layers LPIPS needs are on disk (nothing is fetched)."""
    from torchmetrics.functional.image import lpips as tm_lpips

    linear = Path(tm_lpips.__file__).parent / "lpips_models" / f"{net}.pth"
    if not linear.is_file():
        reason = f"LPIPS not available: torchmetrics' linear layers {linear} are missing"
        return LpipsStatus(net=net, available=False, reason=reason + " (reinstall torchmetrics)")
    path, url = backbone_file(net)
    if not path.is_file():
        reason = (
            f"LPIPS not available: torchvision's {LPIPS_BACKBONES[net]} weights are not in "
            f"{path.parent} (download {url} there, or set TORCH_HOME to a folder whose "
            "hub/checkpoints has it)"
        )
        return LpipsStatus(net=net, available=False, reason=reason)
    return LpipsStatus(net=net, available=True)


class Lpips:
    """LPIPS of image pairs with one network, built once (``status`` must be available)."""

    def __init__(self, status: LpipsStatus, device: torch.device):
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        self.device = device
        # normalize=True: the inputs are in [0, 1] (LPIPS itself works in [-1, 1]).
        metric = LearnedPerceptualImagePatchSimilarity(net_type=status.net, normalize=True)
        self._metric = metric.to(device)

    @torch.inference_mode()
    def __call__(self, output: torch.Tensor, reference: torch.Tensor) -> float:
        """LPIPS of [1, 3, H, W] images in [0, 1] (0: identical; lower is closer)."""
        self._metric.reset()
        value = self._metric(output.to(self.device), reference.to(self.device))
        return float(value)


def load_lpips(status: LpipsStatus, device: torch.device) -> tuple[Lpips | None, LpipsStatus]:
    """The LPIPS metric when its weights are present and load; otherwise None and the status
    saying why (a corrupt backbone file is named, not a traceback)."""
    if not status.available:
        return None, status
    try:
        return Lpips(status, device), status
    except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
        path, url = backbone_file(status.net)
        reason = f"LPIPS not available: {path} does not load ({e}); download {url} again"
        return None, LpipsStatus(net=status.net, available=False, reason=" ".join(reason.split()))


@dataclass(frozen=True, kw_only=True)
class ImageScores:
    """One pair's figures (``lpips`` None when LPIPS is not available)."""

    psnr: float
    ssim: float
    lpips: float | None


def score(output: np.ndarray, reference: np.ndarray, lpips: Lpips | None) -> ImageScores:
    """The figures of two same-sized HxWx3 BGR images (uint8 or uint16, either)."""
    if output.shape != reference.shape:
        raise ValueError(f"output {output.shape} and reference {reference.shape} differ in size")
    out, ref = to_tensor(output), to_tensor(reference)
    return ImageScores(
        psnr=psnr(out, ref),
        ssim=ssim(out, ref),
        lpips=None if lpips is None else lpips(out, ref),
    )
