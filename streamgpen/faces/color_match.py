"""``--color-match``: a restored face's colour statistics matched to its input crop's.

Users of every restoration network report skin that comes back redder, greyer or darker than it
went in: the generator's prior pulls the colour towards its training set. The fix keeps what the
network adds (detail, contrast) and gives back what it should not change (the colour cast):
in YCbCr, the restored luma gets the input's mean (its spread, which carries GPEN's restored
detail, is kept) and both chroma channels get the input's mean and standard deviation. The
statistics are weighted by the paste mask, so the background around the face, which the paste
throws away, does not bias them.
"""

from __future__ import annotations

import torch

# BT.601 luma weights (Kr, Kb): what the colour of a photo's face is judged in; any fixed
# YCbCr matrix would do, since the mapping is undone exactly after the match.
_KR, _KB = 0.299, 0.114
# Chroma spread gain limits: a restored face with almost no chroma left (a grey face) would
# otherwise get an unbounded gain that amplifies its noise into colour speckle.
_GAIN_RANGE = (0.25, 4.0)


def match_color(
    restored: torch.Tensor, reference: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``restored`` [N, 3, S, S] RGB (any range) with ``reference``'s colour statistics.

    reference: [N, 3, S, S] the input crops, same range; weights: [N, 1, S, S] >= 0, where the
    statistics are taken (the paste masks). Returns a new tensor like ``restored``.
    """
    if restored.shape[0] == 0:
        return restored
    work = torch.float32 if restored.dtype != torch.float64 else torch.float64
    ours, theirs = to_ycbcr(restored.to(work)), to_ycbcr(reference.to(work))
    w = weights.to(work)
    w = w / w.sum((2, 3), keepdim=True).clamp_min(torch.finfo(work).tiny)
    mean_ours, std_ours = _moments(ours, w)  # [N, 3, 1, 1]
    mean_theirs, std_theirs = _moments(theirs, w)
    gain = (std_theirs / std_ours.clamp_min(1e-6)).clamp(*_GAIN_RANGE)
    gain[:, :1] = 1  # luma keeps the restored spread: that is GPEN's detail
    matched = (ours - mean_ours) * gain + mean_theirs
    return to_rgb(matched).to(restored.dtype)


def _moments(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and standard deviation per channel: ([N, C, 1, 1], [N, C, 1, 1])."""
    mean = (x * w).sum((2, 3), keepdim=True)
    var = ((x - mean) ** 2 * w).sum((2, 3), keepdim=True)
    return mean, var.sqrt()


def to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] RGB -> BT.601 YCbCr (full range, chroma centred on 0), same scale."""
    r, g, b = rgb.unbind(1)
    y = _KR * r + (1 - _KR - _KB) * g + _KB * b
    return torch.stack([y, (b - y) / (2 * (1 - _KB)), (r - y) / (2 * (1 - _KR))], 1)


def to_rgb(ycbcr: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_ycbcr`."""
    y, cb, cr = ycbcr.unbind(1)
    r = y + 2 * (1 - _KR) * cr
    b = y + 2 * (1 - _KB) * cb
    g = (y - _KR * r - _KB * b) / (1 - _KR - _KB)
    return torch.stack([r, g, b], 1)
