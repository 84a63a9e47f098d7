"""5-point face alignment: similarity fit, crop (warp) and paste back, batched on any device.

Conventions
-----------
- Images are float tensors [B, 3, H, W] (or [3, H, W] for one image) in any value range.
- Points are pixel coordinates (x, y) with pixel centres at integers: pixel i covers
  [i - 0.5, i + 0.5]. This is OpenCV's convention (``cv2.warpAffine``), and the half-pixel
  offsets to ``grid_sample(align_corners=False)``'s normalised coordinates are applied here.
- A face's matrix M [2, 3] maps *image* pixel coordinates to *crop* pixel coordinates:
  crop_xy = M @ [x, y, 1]. The same matrix is passed to ``warp_faces`` and ``paste_faces``.
- Faces are routed to frames by ``frame_index`` [N] (long); ``None`` means one image.

Resampling is bilinear and anti-aliased by supersampling: where the destination grid is coarser
than the source by a factor f, each destination pixel takes k x k bilinear subsamples
(k = ceil(f)) and tent-filters them over +-1 destination pixel, like PIL's antialiased bilinear
resize; for f <= 1 (k = 1) it is plain bilinear, equal to cv2.warpAffine's INTER_LINEAR. Faces
are grouped by k (a handful of groups, never a loop per face); each group is one
``grid_sample`` over a small region per face, never the full frame. Region sizes depend on the
faces, so each call synchronises with the host a few times.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# GPEN's 5 landmarks for a 512 crop: left eye, right eye, nose tip, left and right mouth corner.
TEMPLATE_512 = torch.tensor(
    [
        [202.0407, 242.8840],
        [309.4302, 242.2900],
        [256.0768, 303.9592],
        [211.9598, 366.8282],
        [300.8911, 366.3363],
    ]
)

# The paste mask: zero within MASK_INSET of the crop border, rising to one over MASK_FEATHER
# (both as fractions of the crop size). GPEN's own mask is 0.5 at 5% and leaks to the border.
MASK_INSET = 0.05
MASK_FEATHER = 0.10

# Slack in ceil() so that exact factors (scale 0.25 -> 4) are not rounded up by float error.
_CEIL_SLACK = 1e-3


def template(size: int) -> torch.Tensor:
    """GPEN's 5-point template [5, 2] for a ``size`` crop: TEMPLATE_512 scaled by size / 512."""
    return TEMPLATE_512 * (size / 512)


def similarity_transform(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) src -> dst.

    src: [N, K, 2] points, dst: [K, 2] or [N, K, 2]. Returns M [N, 2, 3] = [[a, -b, tx], [b, a, ty]]
    minimising sum |M @ [src, 1] - dst|^2 (Umeyama's solution, in closed form for 2-D).
    """
    work = torch.float64  # centred sums of squares of pixel coordinates lose digits in fp32
    s = src.to(work)
    d = dst.to(device=src.device, dtype=work).expand_as(s)
    s_mean, d_mean = s.mean(1, keepdim=True), d.mean(1, keepdim=True)
    sc, dc = s - s_mean, d - d_mean  # [N, K, 2]
    norm = (sc**2).sum((1, 2))  # [N]
    a = (sc * dc).sum((1, 2)) / norm
    b = (sc[..., 0] * dc[..., 1] - sc[..., 1] * dc[..., 0]).sum(1) / norm
    rot = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], 1)  # [N, 2, 2]
    t = d_mean[:, 0] - (rot @ s_mean[:, 0, :, None])[..., 0]  # [N, 2]
    return torch.cat([rot, t[..., None]], 2).to(src.dtype)


def invert_affine(matrices: torch.Tensor) -> torch.Tensor:
    """Inverse of each affine map M [N, 2, 3] (as a 2x3 matrix [A | t] -> [A^-1 | -A^-1 t])."""
    a, b, c = matrices[:, 0, 0], matrices[:, 0, 1], matrices[:, 0, 2]
    d, e, f = matrices[:, 1, 0], matrices[:, 1, 1], matrices[:, 1, 2]
    det = a * e - b * d
    adjugate = torch.stack([torch.stack([e, -b], -1), torch.stack([-d, a], -1)], 1)
    inv_a = adjugate / det[:, None, None]
    inv_t = -(inv_a @ torch.stack([c, f], -1)[..., None])
    return torch.cat([inv_a, inv_t], 2)


def affine_scale(matrices: torch.Tensor) -> torch.Tensor:
    """Linear scale [N] of each M [N, 2, 3]: sqrt|det A|, > 1 where the destination is larger."""
    a = matrices[:, :, :2]
    return (a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]).abs().sqrt()


def paste_mask(size: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The feathered crop-space paste mask [1, 1, size, size] in [0, 1] (cached; do not modify).

    An eroded rectangle blurred by a Gaussian truncated at the erosion radius: exactly 0 within
    ``MASK_INSET * size`` of the crop border, exactly 1 in the middle, separable.
    """
    return _paste_mask(size, torch.device(device or "cpu"), dtype)


@functools.lru_cache(maxsize=16)
def _paste_mask(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    inset = round(MASK_INSET * size)
    radius = max(1, round(MASK_FEATHER * size / 2))
    sigma = radius / 3
    box = torch.zeros(size, dtype=torch.float64)
    box[inset + radius : size - inset - radius] = 1  # the eroded rectangle
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    profile = F.conv1d(box[None, None], (kernel / kernel.sum())[None, None], padding=radius)[0, 0]
    profile = profile / profile.max()
    return (profile[:, None] * profile[None, :]).to(device, dtype)[None, None]


def _mask_support(size: int) -> tuple[float, float]:
    """Crop coordinates (lo, hi) outside which the bilinearly sampled paste mask is exactly 0."""
    inset = round(MASK_INSET * size)
    return inset - 1.0, size - inset + 0.0


def warp_faces(
    image: torch.Tensor,
    matrices: torch.Tensor,
    size: int,
    frame_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Crop faces: sample each image at its matrix's preimage of a ``size`` x ``size`` grid.

    image: [B, C, H, W] or [C, H, W]; matrices: [N, 2, 3] image -> crop pixel coordinates;
    frame_index: [N] long, the frame of each face (None for a single image).
    Returns [N, C, size, size] in the image's dtype. Outside the image the frame is mirrored
    (cv2.BORDER_REFLECT). Faces larger than the crop are anti-aliased by supersampling.
    """
    frames = _as_batch(image)
    n = matrices.shape[0]
    fi = _frame_index(frame_index, frames.shape[0], n, frames.device)
    work = _work_dtype(frames)
    matrices = matrices.to(frames.device, work)
    inv = invert_affine(matrices)  # crop -> image
    ks = _supersampling(1 / affine_scale(matrices))
    out = frames.new_empty(n, frames.shape[1], size, size)
    for k, sel in _groups(ks):
        out[sel] = _warp_group(frames, inv[sel], fi[sel], size, k).to(frames.dtype)
    return out


def paste_faces(
    image: torch.Tensor,
    faces: torch.Tensor,
    matrices: torch.Tensor,
    frame_index: torch.Tensor | None = None,
    blend: float = 1.0,
) -> torch.Tensor:
    """Paste crops back into their frames through the feathered paste mask.

    image: [B, C, H, W] or [C, H, W]; faces: [N, C, S, S]; matrices: [N, 2, 3] image -> crop,
    as given to ``warp_faces``; frame_index: [N] long (None for a single image).
    Each pixel becomes image + alpha * (colour - image) with alpha = blend * max_i(mask_i) and
    colour the mask-weighted mean of the faces covering it, so overlapping faces blend convexly.
    Pixels where every mask is 0 are returned bit-identical. Faces that shrink on the way back
    are anti-aliased by supersampling. Returns a new tensor shaped like ``image``.
    """
    frames = _as_batch(image)
    size = faces.shape[-1]
    mask = paste_mask(size, frames.device, _work_dtype(frames)).expand(faces.shape[0], -1, -1, -1)
    # Premultiplied colour and coverage, resampled together.
    source = torch.cat([faces.to(mask.device, mask.dtype) * mask, mask], 1)
    sums, peak = _splat(frames, source, matrices, frame_index)
    alpha = blend * peak  # [B, 1, H, W]
    colour = sums[:, :-1] / sums[:, -1:].clamp_min(torch.finfo(sums.dtype).tiny)
    mixed = (frames + alpha * (colour - frames)).to(frames.dtype)
    out = torch.where(alpha > 0, mixed, frames)
    return out if image.dim() == 4 else out[0]


def paste_alpha(
    image: torch.Tensor,
    matrices: torch.Tensor,
    size: int,
    frame_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """The union (max) of the faces' paste masks in the frames: [B, 1, H, W] (or [1, H, W]).

    With blend=1 this is ``paste_faces``'s alpha; wherever it is 0, the paste leaves pixels
    bit-identical. ``image`` only gives the frame shape, device and dtype.
    """
    frames = _as_batch(image)
    mask = paste_mask(size, frames.device, _work_dtype(frames))
    _, peak = _splat(frames, mask.expand(matrices.shape[0], -1, -1, -1), matrices, frame_index)
    return peak if image.dim() == 4 else peak[0]


def _as_batch(image: torch.Tensor) -> torch.Tensor:
    if image.dim() not in (3, 4) or not image.is_floating_point():
        raise ValueError(f"expected a float image [C, H, W] or [B, C, H, W], got {image.shape}")
    return image if image.dim() == 4 else image[None]


def _frame_index(
    frame_index: torch.Tensor | None, frames: int, faces: int, device: torch.device
) -> torch.Tensor:
    if frame_index is None:
        if frames != 1:
            raise ValueError("frame_index is required when the batch has more than one frame")
        return torch.zeros(faces, dtype=torch.long, device=device)
    return frame_index.to(device=device, dtype=torch.long)


def _work_dtype(frames: torch.Tensor) -> torch.dtype:
    # Half-precision coordinates are off by a tenth of a pixel at 512: resample in fp32.
    return torch.float64 if frames.dtype == torch.float64 else torch.float32


def _supersampling(factor: torch.Tensor) -> torch.Tensor:
    """Samples per destination pixel and axis [N] for a source/destination pixel ratio [N]."""
    return torch.ceil(factor - _CEIL_SLACK).clamp_min(1).long()


def _groups(ks: torch.Tensor):
    """(k, indices) for each distinct supersampling factor."""
    for k in torch.unique(ks).tolist():
        yield k, (ks == k).nonzero()[:, 0]


def _sample_points(
    matrices: torch.Tensor, origin: torch.Tensor, height: int, width: int, k: int
) -> torch.Tensor:
    """Source coordinates [n, rows, cols, 2] of the subsamples of a height x width region.

    matrices: [n, 2, 3] destination -> source; origin: [n, 2] destination (x, y) of the
    region's top-left pixel. The layout is the one ``_reduce`` expects (see ``_offsets``).
    """
    dtype, device = matrices.dtype, matrices.device
    x = _offsets(width, k, dtype, device)[None, None, :] + origin[:, 0, None, None]  # [n, 1, c]
    y = _offsets(height, k, dtype, device)[None, :, None] + origin[:, 1, None, None]  # [n, r, 1]
    a = matrices[:, :, :, None, None]  # [n, 2, 3, 1, 1]
    sx = a[:, 0, 0] * x + a[:, 0, 1] * y + a[:, 0, 2]
    sy = a[:, 1, 0] * x + a[:, 1, 1] * y + a[:, 1, 2]
    return torch.stack([sx, sy], -1)


def _offsets(count: int, k: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Destination coordinates of the subsamples along one axis of ``count`` pixels.

    k per pixel, 1/k apart, from -(k - 1)/k to count - 1/k: each pixel's tent filter in
    ``_reduce`` (support +-1 pixel, as in PIL's antialiased bilinear) centres on it. k = 1 gives
    the pixel centres.
    """
    j = torch.arange(count * k + k - 1, dtype=dtype, device=device)
    return (j - (k - 1)) / k


def _reduce(samples: torch.Tensor, k: int) -> torch.Tensor:
    """Tent-filter and decimate subsamples laid out by ``_offsets``: [n, C, hk+k-1, wk+k-1] ->
    [n, C, h, w]. The tent is two k-boxes (weights 1, 2, .., k, .., 2, 1 over k^2)."""
    if k == 1:
        return samples
    return F.avg_pool2d(F.avg_pool2d(samples, k, stride=1), k)


def _reflect(coord: torch.Tensor, size: int) -> torch.Tensor:
    """Mirror coordinates about the image edges -0.5 and size - 0.5, as grid_sample does."""
    t = torch.remainder(coord + 0.5, 2 * size)
    return (size - (t - size).abs() - 0.5).clamp(0, size - 1)


def _normalise(points: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Pixel coordinates -> grid_sample's align_corners=False coordinates (edges at -1, 1)."""
    scale = points.new_tensor([2 / width, 2 / height])
    return (points + 0.5) * scale - 1


def _warp_group(
    frames: torch.Tensor, inv: torch.Tensor, fi: torch.Tensor, size: int, k: int
) -> torch.Tensor:
    """Warp faces sharing supersampling factor k: [n, C, size, size] in the work dtype."""
    _, _, h, w = frames.shape
    origin = inv.new_zeros(inv.shape[0], 2)
    points = _sample_points(inv, origin, size, size, k)  # [n, Sk, Sk, 2] image (x, y)
    points = torch.stack([_reflect(points[..., 0], w), _reflect(points[..., 1], h)], -1)
    # The smallest region of each frame that bilinear sampling at these points reads.
    lo = points.flatten(1, 2).amin(1).floor().long()  # [n, 2]
    hi = points.flatten(1, 2).amax(1).floor().long() + 1
    hi = torch.minimum(hi, hi.new_tensor([w - 1, h - 1]))
    rw, rh = (hi - lo + 1).amax(0).tolist()
    lo = torch.minimum(lo, lo.new_tensor([w - rw, h - rh]))  # common size, inside the frame
    region = _gather_regions(frames, fi, lo, rw, rh).to(inv.dtype)
    grid = _normalise(points - lo[:, None, None, :].to(points.dtype), rw, rh)
    samples = F.grid_sample(region, grid, "bilinear", "border", align_corners=False)
    return _reduce(samples, k)


def _gather_regions(
    frames: torch.Tensor, fi: torch.Tensor, lo: torch.Tensor, width: int, height: int
) -> torch.Tensor:
    """Regions [n, C, height, width] of frames[fi] with top-left corners lo [n, 2] (x, y)."""
    ys = lo[:, 1, None] + torch.arange(height, device=lo.device)  # [n, height]
    xs = lo[:, 0, None] + torch.arange(width, device=lo.device)  # [n, width]
    pixels = frames.permute(0, 2, 3, 1)[fi[:, None, None], ys[:, :, None], xs[:, None, :]]
    return pixels.permute(0, 3, 1, 2)


def _splat(
    frames: torch.Tensor,
    source: torch.Tensor,
    matrices: torch.Tensor,
    frame_index: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-warp crops into their frames and accumulate them.

    source: [N, C, S, S] crops whose last channel is the coverage mask (zero near the border).
    Returns (sums [B, C, H, W]: per-pixel sum over faces, peak [B, 1, H, W]: per-pixel max of
    the last channel), both in the work dtype.
    """
    b, _, h, w = frames.shape
    n, c = source.shape[:2]
    fi = _frame_index(frame_index, b, n, frames.device)
    matrices = matrices.to(frames.device, source.dtype)
    sums = source.new_zeros(b * h * w, c)
    peak = source.new_zeros(b * h * w)
    ks = _supersampling(affine_scale(matrices))
    for k, sel in _groups(ks):
        values, index = _splat_group(source[sel], matrices[sel], fi[sel], h, w, k)
        sums.index_add_(0, index, values)
        peak.scatter_reduce_(0, index, values[:, -1], "amax")
    sums = sums.view(b, h, w, c).permute(0, 3, 1, 2)
    return sums, peak.view(b, 1, h, w)


def _splat_group(
    source: torch.Tensor, matrices: torch.Tensor, fi: torch.Tensor, h: int, w: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample crops sharing supersampling factor k over their frame regions.

    Returns values [n * rh * rw, C] and their flat frame-pixel indices [n * rh * rw].
    """
    c, size = source.shape[1], source.shape[-1]
    lo, hi = _paste_bounds(invert_affine(matrices), size, h, w)
    rw, rh = (hi - lo + 1).clamp_min(1).amax(0).tolist()
    lo = torch.minimum(lo, lo.new_tensor([w - rw, h - rh]))  # common size, inside the frame
    points = _sample_points(matrices, lo.to(matrices.dtype), rh, rw, k)  # crop (x, y)
    grid = _normalise(points, size, size)
    samples = F.grid_sample(source, grid, "bilinear", "zeros", align_corners=False)
    samples = _reduce(samples, k)  # [n, C, rh, rw]
    ys = lo[:, 1, None] + torch.arange(rh, device=lo.device)
    xs = lo[:, 0, None] + torch.arange(rw, device=lo.device)
    index = (fi[:, None, None] * h + ys[:, :, None]) * w + xs[:, None, :]  # [n, rh, rw]
    return samples.permute(0, 2, 3, 1).reshape(-1, c), index.reshape(-1)


def _paste_bounds(
    inv: torch.Tensor, size: int, h: int, w: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive pixel bounds lo, hi [n, 2] (x, y) of each mask's footprint, clipped to the frame.

    inv: [n, 2, 3] crop -> image. A pixel's subsamples reach up to one pixel from its centre.
    """
    a, b = _mask_support(size)
    corners = inv.new_tensor([[a, a, 1], [b, a, 1], [a, b, 1], [b, b, 1]])  # [4, 3]
    image_corners = corners @ inv.transpose(1, 2)  # [n, 4, 2]
    limit = inv.new_tensor([w - 1, h - 1])
    lo = torch.minimum((image_corners.amin(1) - 1).floor().clamp_min(0), limit)
    hi = torch.minimum((image_corners.amax(1) + 1).ceil(), limit).clamp_min(0)
    return lo.long(), hi.long()


__all__ = [
    "MASK_FEATHER",
    "MASK_INSET",
    "TEMPLATE_512",
    "affine_scale",
    "invert_affine",
    "paste_alpha",
    "paste_faces",
    "paste_mask",
    "similarity_transform",
    "template",
    "warp_faces",
]
