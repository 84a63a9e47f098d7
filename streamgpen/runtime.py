"""Running GPEN on batches of aligned face crops: device, precision and batching.

The restorer is the one place that knows how the network is executed. Callers hand it any number of
crops and get the restored crops back in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from streamgpen.errors import UserError

IDENTITY = "identity"


def resolve_device(name: str | None) -> torch.device:
    """The torch device for ``--device`` (``auto``/None: CUDA when available, else CPU)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"--device {name}: CUDA is not available on this machine (use --device cpu)"
        )
    return device


class Identity(nn.Module):
    """A stand-in restorer that returns each crop unchanged: previews detection and alignment."""

    def __init__(self, size: int = 512):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@dataclass
class Restorer:
    """Restores aligned faces with a GPEN-like network in fixed-size batches.

    ``model`` maps [B, 3, S, S] RGB in [-1, 1] to the same; ``size`` is S.
    """

    model: nn.Module
    device: torch.device
    batch_size: int = 8

    def __post_init__(self):
        self.model = self.model.to(self.device).eval()
        self.size = int(self.model.size)
        self.is_identity = isinstance(self.model, Identity)

    @torch.inference_mode()
    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        # crops: [N, 3, S, S] RGB in [-1, 1] -> [N, 3, S, S]
        if self.is_identity or crops.shape[0] == 0:
            return crops
        outs = [
            self.model(crops[i : i + self.batch_size].to(self.device, torch.float32))
            for i in range(0, crops.shape[0], self.batch_size)
        ]
        return torch.cat(outs).clamp_(-1, 1)
