"""Colour conversion on the device: decoded YUV 4:2:0 planes to RGB.

Uploading a frame's planes and converting them where the network runs moves half the bytes of
RGB over the bus and takes the conversion off the decoding thread. The matrices are those of the
frame's colour space, as libswscale reads them (unspecified means BT.601). Chroma is upsampled
bilinearly with centred samples; swscale's unscaled path repeats each chroma sample instead, which
is coarser: on a colour test pattern round-tripped through swscale's 4:2:0 encoder, bilinear lands
1.9 levels from the original on average, swscale 5.3 (tests/test_color.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Pixel formats converted on the device, and whether they are full range by definition.
YUV420_FORMATS = {"yuv420p": False, "yuvj420p": True}
# libav's AVColorSpace values -> (Kr, Kb) of the YCbCr matrix; the rest use BT.601's.
_BT601 = (0.299, 0.114)
_LUMA_COEFFICIENTS = {
    1: (0.2126, 0.0722),  # BT.709
    4: (0.30, 0.11),  # FCC
    7: (0.212, 0.087),  # SMPTE 240M
    9: (0.2627, 0.0593),  # BT.2020 non-constant luminance
    10: (0.2627, 0.0593),  # BT.2020 constant luminance, decoded as the NCL matrix like swscale
}
_AVCOL_RANGE_JPEG = 2


def luma_coefficients(space: int) -> tuple[float, float]:
    """(Kr, Kb) for a libav colour-space value."""
    return _LUMA_COEFFICIENTS.get(space, _BT601)


def is_full_range(pix_fmt: str, color_range: int) -> bool:
    """Whether samples span 0-255 (JPEG range) rather than 16-235/240 (MPEG range)."""
    return color_range == _AVCOL_RANGE_JPEG or YUV420_FORMATS.get(pix_fmt, False)


def yuv420_to_rgb(planes: torch.Tensor, space: int, full_range: bool) -> torch.Tensor:
    """Planar YUV 4:2:0 as PyAV lays it out, [H * 3 / 2, W] uint8 (Y, then U, then V rows),
    to [3, H, W] float RGB in [0, 1] on the same device. H and W must be even."""
    rows, width = planes.shape
    height = rows * 2 // 3
    y = planes[:height].float()
    chroma = planes[height:].reshape(2, height // 2, width // 2).float()  # [2, H/2, W/2]: U, V
    chroma = F.interpolate(chroma[None], size=(height, width), mode="bilinear")[0]
    if full_range:
        y = y / 255
        cb, cr = (chroma - 128) / 255
    else:
        y = (y - 16) / 219
        cb, cr = (chroma - 128) / 224
    kr, kb = luma_coefficients(space)
    r = y + 2 * (1 - kr) * cr
    b = y + 2 * (1 - kb) * cb
    g = (y - kr * r - kb * b) / (1 - kr - kb)
    return torch.stack([r, g, b]).clamp_(0, 1)
