"""Contrast-limited adaptive histogram equalisation (CLAHE), batched in torch on the device.

It follows OpenCV's algorithm (256 bins, clip limit relative to the mean bin height, excess spread
evenly, bilinear interpolation between the four nearest tiles' mappings) so that ``--clahe`` gives
what GPEN users know from cv2, without sending every face crop to the CPU.
"""

from __future__ import annotations

import torch

LUMA = (0.299, 0.587, 0.114)


def clahe(gray: torch.Tensor, clip_limit: float = 2.0, tiles: int = 8) -> torch.Tensor:
    """Equalise ``gray`` [N, H, W] with values in [0, 1]; H and W divisible by ``tiles``."""
    n, h, w = gray.shape
    th, tw = h // tiles, w // tiles
    levels = (gray * 255).round().clamp(0, 255).long()  # [N, H, W]
    per_tile = levels.view(n, tiles, th, tiles, tw).permute(0, 1, 3, 2, 4)
    per_tile = per_tile.reshape(n, tiles * tiles, th * tw)
    hist = torch.zeros(n, tiles * tiles, 256, device=gray.device)
    hist.scatter_add_(2, per_tile, torch.ones_like(per_tile, dtype=hist.dtype))
    limit = max(clip_limit * th * tw / 256, 1.0)
    excess = (hist - limit).clamp(min=0).sum(-1, keepdim=True)
    hist = hist.clamp(max=limit) + excess / 256
    lut = (hist.cumsum(-1) / (th * tw)).clamp(0, 1).view(n, tiles, tiles, 256)

    y0, y1, wy = _tile_coords(h, th, tiles, gray.device)
    x0, x1, wx = _tile_coords(w, tw, tiles, gray.device)
    batch = torch.arange(n, device=gray.device)[:, None, None]
    y0, y1, wy = y0[None, :, None], y1[None, :, None], wy[None, :, None]
    x0, x1, wx = x0[None, None, :], x1[None, None, :], wx[None, None, :]
    top = lut[batch, y0, x0, levels] * (1 - wx) + lut[batch, y0, x1, levels] * wx
    bottom = lut[batch, y1, x0, levels] * (1 - wx) + lut[batch, y1, x1, levels] * wx
    return top * (1 - wy) + bottom * wy


def _tile_coords(length: int, tile: int, tiles: int, device):
    # Each pixel's position between tile centres; the outer half-tiles use the edge tile alone.
    pos = ((torch.arange(length, device=device) + 0.5) / tile - 0.5).clamp(0, tiles - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=tiles - 1)
    return lo, hi, pos - lo


def clahe_luminance(rgb: torch.Tensor, clip_limit: float = 2.0, tiles: int = 8) -> torch.Tensor:
    """CLAHE on the luminance of RGB crops [N, 3, H, W] in [-1, 1]; chroma kept (same range)."""
    unit = (rgb.float() + 1) / 2
    luma = torch.tensor(LUMA, device=rgb.device).view(1, 3, 1, 1)
    y = (unit * luma).sum(1)  # [N, H, W]
    y_eq = clahe(y, clip_limit, tiles)
    out = unit + (y_eq - y)[:, None]
    return (out.clamp(0, 1) * 2 - 1).to(rgb.dtype)
