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
- Masks [N, 1, S, S] are crop-space paste weights in [0, 1], exactly 0 on the rows and columns
  within ``round(MASK_INSET * S)`` of the crop border (the footprint bounds rely on it, and
  ``paste_faces`` checks it); ``None`` is the feathered box ``paste_mask``.

Resampling: where the destination grid is no coarser than the source it is plain bilinear, equal
to cv2.warpAffine's INTER_LINEAR. Where it is coarser by a factor f, each destination pixel takes
k x k bilinear subsamples (k = ceil(f)) filtered by Keys' cubic (a = -0.75, OpenCV's INTER_CUBIC
kernel; support +-2 destination pixels) as a separable strided depthwise convolution: sharper
than a tent, still without moire (see the tests' Solvay round trip and zone plates). The paste
resamples colour and masks separately, the masks by a tent (+-1 pixel), so alpha stays in [0, 1]
and never rings around a mask's holes. A face more than twice the crop's size is first averaged
over p x p blocks (p = ceil(f / 2)) of the box around it, then warped with the remaining factor
(<= 2): one pass over the face and one resample of the crop, whatever the face's size. Faces are
grouped by (p, k) (a handful of groups, never a loop per face); each group is one
``grid_sample`` over a small region per face, never the full frame, and the paste composites
only the box around the footprints. Region sizes depend on the faces, so each call synchronises
with the host a few times.

Detail: a face larger in the image than the crop loses the image's frequencies above the crop's
resolution. ``paste_faces(keep_detail=True)`` puts them back: the colour becomes
restored + w * (image - roundtrip(image)), roundtrip being the image warped into the crop and
pasted back with the same matrices and masks, and w ramping from 0 (face no larger than the crop)
to 1 (DETAIL_FULL times larger), so a face growing across the threshold does not pop. Restored
crops are in the image's value range. The image is whatever the faces land on: pasting into
frames upsampled F times (with matrices composed with the output -> input scaling), the high
band comes from the upsampled background.
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

# Image pixels per crop pixel at which keep_detail takes all of the image's lost detail (the
# weight ramps linearly from 0 at 1, a face the crop's size).
DETAIL_FULL = 1.5

# Slack in ceil() so that exact factors (scale 0.25 -> 4) are not rounded up by float error.
_CEIL_SLACK = 1e-3

# Support of the anti-aliasing kernels, in destination pixels (Keys' cubic: +-2).
_RADIUS = 2
_COLOUR, _COVERAGE = 0, 1  # rows of _taps: the colour kernel, the coverage tent
# Keys' cubic with a = -0.75 (OpenCV's INTER_CUBIC) as the anti-aliasing kernel: see the tests'
# measurements (Solvay round trip, zone plate) against a = -0.5, Lanczos-3 and the tent.
_CUBIC_A = -0.75


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


def detail_weight(matrices: torch.Tensor) -> torch.Tensor:
    """keep_detail's weight [N] in [0, 1] of each face's image -> crop matrix [N, 2, 3]:
    0 where the face is no larger in the image than the crop, 1 from DETAIL_FULL times larger."""
    growth = 1 / affine_scale(matrices)  # image pixels per crop pixel
    return ((growth - 1) / (DETAIL_FULL - 1)).clamp(0, 1)


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
    (cv2.BORDER_REFLECT). Faces larger than the crop are anti-aliased (see the module's notes).
    """
    frames = _as_batch(image)
    fi = _frame_index(frame_index, frames.shape[0], matrices.shape[0], frames.device)
    matrices = matrices.to(frames.device, _work_dtype(frames))
    return _warp(frames, matrices, size, fi).to(frames.dtype)


def _warp(frames: torch.Tensor, matrices: torch.Tensor, size: int, fi: torch.Tensor):
    """``warp_faces`` in the work dtype (matrices'): [N, C, size, size]."""
    inv = invert_affine(matrices)  # crop -> image
    pools, ks = _warp_factors(1 / affine_scale(matrices))
    out = matrices.new_empty(matrices.shape[0], frames.shape[1], size, size)
    for (pool, k), sel in _groups(pools, ks):
        out[sel] = _warp_group(frames, inv[sel], fi[sel], size, pool, k)
    return out


def paste_faces(
    image: torch.Tensor,
    faces: torch.Tensor,
    matrices: torch.Tensor,
    frame_index: torch.Tensor | None = None,
    blend: float = 1.0,
    *,
    masks: torch.Tensor | None = None,
    keep_detail: bool = True,
) -> torch.Tensor:
    """Paste crops back into their frames through their paste masks.

    image: [B, C, H, W] or [C, H, W]; faces: [N, C, S, S]; matrices: [N, 2, 3] image -> crop,
    as given to ``warp_faces``; frame_index: [N] long (None for a single image); masks:
    [N, 1, S, S] per-face weights (see the module's conventions; None: ``paste_mask``).
    Each pixel becomes image + alpha * (colour - image) with alpha = blend * max_i(mask_i) and
    colour the mask-weighted mean of the faces covering it, so overlapping faces blend convexly.
    keep_detail: faces larger in the image than the crop keep the image's detail the crop cannot
    hold (see the module's notes). Pixels where every mask is 0 are returned bit-identical.
    Returns a new tensor shaped like ``image``.
    """
    frames = _as_batch(image)
    work = _work_dtype(frames)
    n, c, size = faces.shape[0], faces.shape[1], faces.shape[-1]
    fi = _frame_index(frame_index, frames.shape[0], n, frames.device)
    matrices = matrices.to(frames.device, work)
    masks = _checked_masks(masks, n, size, frames.device, work)
    colour, detail = faces.to(frames.device, work), None
    if keep_detail:
        colour, detail = _less_detail(frames, colour, matrices, fi)
    sums, peak, box = _splat(frames, colour, masks, matrices, fi, detail)
    alpha = blend * peak  # [B, 1, h, w]
    gain = alpha / sums[:, -1:].clamp_min(torch.finfo(work).tiny)  # alpha / coverage
    keep = 1 - alpha if detail is None else 1 - alpha + gain * sums[:, c : c + 1]
    out = _composite(frames, box, alpha, keep, sums[:, :c], gain)
    return out if image.dim() == 4 else out[0]


def _composite(
    frames: torch.Tensor,
    box: tuple[slice, slice],
    alpha: torch.Tensor,
    keep: torch.Tensor,
    sums: torch.Tensor,
    gain: torch.Tensor,
) -> torch.Tensor:
    """A copy of frames whose box becomes image * keep + sums * gain (= image + alpha *
    (colour - image)) where alpha > 0, and stays bit-identical elsewhere."""
    out = frames.clone()
    region, target = frames[:, :, box[0], box[1]], out[:, :, box[0], box[1]]
    if frames.dtype != keep.dtype:  # half-precision frames: compose in the work dtype
        mixed = torch.addcmul(region.to(keep.dtype) * keep, sums, gain).to(frames.dtype)
        target.copy_(torch.where(alpha > 0, mixed, region))
        return out
    # In place, three passes over the box: a large face's paste is memory-bound.
    torch.mul(region, keep, out=target)
    target.addcmul_(sums, gain)
    torch.where(alpha > 0, target, region, out=target)
    return out


def paste_alpha(
    image: torch.Tensor,
    matrices: torch.Tensor,
    size: int,
    frame_index: torch.Tensor | None = None,
    *,
    masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The union (max) of the faces' paste masks in the frames: [B, 1, H, W] (or [1, H, W]).

    With blend=1 this is ``paste_faces``'s alpha for the same ``masks``; wherever it is 0, the
    paste leaves pixels bit-identical. ``image`` only gives the frame shape, device and dtype.
    """
    frames = _as_batch(image)
    work = _work_dtype(frames)
    n = matrices.shape[0]
    fi = _frame_index(frame_index, frames.shape[0], n, frames.device)
    masks = _checked_masks(masks, n, size, frames.device, work)
    colour = masks.new_empty(n, 0, size, size)
    _, peak, box = _splat(frames, colour, masks, matrices.to(frames.device, work), fi, None)
    alpha = frames.new_zeros(frames.shape[0], 1, *frames.shape[2:], dtype=work)
    alpha[:, :, box[0], box[1]] = peak
    return alpha if image.dim() == 4 else alpha[0]


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


def _checked_masks(
    masks: torch.Tensor | None, n: int, size: int, device, dtype: torch.dtype
) -> torch.Tensor:
    """The faces' masks [n, 1, size, size] in the work dtype: ``paste_mask`` for None, else
    ``masks`` once checked against the conventions (one small reduction, one sync)."""
    if masks is None:
        return paste_mask(size, device, dtype).expand(n, -1, -1, -1)
    if masks.shape != (n, 1, size, size):
        raise ValueError(f"masks must be [{n}, 1, {size}, {size}], got {tuple(masks.shape)}")
    masks = masks.to(device, dtype)
    inset = round(MASK_INSET * size)
    low, high = masks.aminmax()
    strips = (masks[..., :inset, :], masks[..., size - inset :, :], masks[..., :inset])
    strips += (masks[..., size - inset :],)
    border = torch.cat([s.flatten() for s in strips]).abs().amax() if inset else low * 0
    if torch.stack([border, -low, high - 1]).amax().item() > 0:  # one sync
        raise ValueError(
            f"masks must be in [0, 1] and exactly 0 within {inset} px (MASK_INSET) of the border"
        )
    return masks


def _less_detail(
    frames: torch.Tensor, colour: torch.Tensor, matrices: torch.Tensor, fi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """keep_detail's crops and weights: (colour - w * warp(image) [N, C, S, S], w [N]).

    Pasted with the image weighted by w, they give restored + w * (image - roundtrip(image)).
    (colour, None) when no face is larger than the crop.
    """
    weight = detail_weight(matrices)
    large = weight.nonzero()[:, 0]
    if large.numel() == 0:
        return colour, None
    lost = _warp(frames, matrices[large], colour.shape[-1], fi[large])  # in the work dtype
    return colour.index_add(0, large, lost * -weight[large, None, None, None]), weight


def _warp_factors(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool, k) [N] for source/destination pixel ratios [N]: the integer box pre-averaging,
    then the samples per destination pixel and axis for the remaining factor (<= 2)."""
    pool = torch.ceil(factor / 2 - _CEIL_SLACK).clamp_min(1).long()
    return pool, _supersampling(factor / pool)


def _supersampling(factor: torch.Tensor) -> torch.Tensor:
    """Samples per destination pixel and axis [N] for a source/destination pixel ratio [N]."""
    return torch.ceil(factor - _CEIL_SLACK).clamp_min(1).long()


def _groups(*keys: torch.Tensor):
    """(values, indices) for each distinct combination of the per-face keys [N] (long)."""
    stacked = torch.stack(keys, 1)  # [N, K]
    for row in torch.unique(stacked, dim=0).tolist():
        yield row, (stacked == stacked.new_tensor(row)).all(1).nonzero()[:, 0]


def _sample_points(
    matrices: torch.Tensor, origin: torch.Tensor, height: int, width: int, k: int
) -> torch.Tensor:
    """Source coordinates [n, rows, cols, 2] of the subsamples of a height x width region.

    matrices: [n, 2, 3] destination -> source; origin: [n, 2] destination (x, y) of the
    region's top-left pixel. The layout is the one ``_reduce`` expects (see ``_offsets``).
    """
    dtype, device = matrices.dtype, matrices.device
    x = _offsets(width, k, dtype, device)  # [cols]
    y = _offsets(height, k, dtype, device)  # [rows]
    a, b = matrices[:, None, None, :, 0], matrices[:, None, None, :, 1]  # [n, 1, 1, 2]
    shift = (matrices[:, :, :2] @ origin[:, :, None])[..., 0] + matrices[:, :, 2]  # [n, 2]
    along_x = x[None, None, :, None] * a + shift[:, None, None, :]  # [n, 1, cols, 2]
    return along_x + y[None, :, None, None] * b  # [n, rows, cols, 2]: one pass over the grid


def _offsets(count: int, k: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Destination coordinates of the subsamples along one axis of ``count`` pixels.

    k = 1: the pixel centres. Else k per pixel, 1/k apart, reaching _RADIUS pixels beyond the
    first and last centre (the kernels' support): from -_RADIUS + 1/k to count - 1 + _RADIUS - 1/k.
    """
    if k == 1:
        return torch.arange(count, dtype=dtype, device=device)
    j = torch.arange((count - 1 + 2 * _RADIUS) * k - 1, dtype=dtype, device=device)
    return (j - (_RADIUS * k - 1)) / k


def _reduce(samples: torch.Tensor, k: int, kinds: tuple[int, ...]) -> torch.Tensor:
    """Filter and decimate subsamples laid out by ``_offsets``: [n, C, rows, cols] -> [n, C, h, w].

    kinds: per channel, _COLOUR (the cubic) or _COVERAGE (the tent). Separable: one strided
    depthwise convolution per axis.
    """
    if k == 1:
        return samples
    taps = _taps(k, samples.device, samples.dtype)[list(kinds)]  # [C, 2 * _RADIUS * k - 1]
    c = samples.shape[1]
    rows = F.conv2d(samples, taps[:, None, None, :], stride=(1, k), groups=c)
    return F.conv2d(rows, taps[:, None, :, None], stride=(k, 1), groups=c)


@functools.lru_cache(maxsize=64)
def _taps(k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[2, 2 * _RADIUS * k - 1]: the colour kernel and the coverage tent at the subsample
    offsets t / k (in destination pixels), each normalised to sum 1."""
    t = torch.arange(1 - _RADIUS * k, _RADIUS * k, dtype=torch.float64) / k
    rows = torch.stack([_cubic(t), (1 - t.abs()).clamp_min(0)])
    return (rows / rows.sum(1, keepdim=True)).to(device, dtype)


def _cubic(t: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = _CUBIC_A (support +-2)."""
    x, a = t.abs(), _CUBIC_A
    near = (a + 2) * x**3 - (a + 3) * x**2 + 1
    far = a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _reflect(coord: torch.Tensor, size: int) -> torch.Tensor:
    """Mirror coordinates about the image edges -0.5 and size - 0.5, as grid_sample does."""
    t = torch.remainder(coord + 0.5, 2 * size)
    return (size - (t - size).abs() - 0.5).clamp(0, size - 1)


def _normalise(points: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Pixel coordinates -> grid_sample's align_corners=False coordinates (edges at -1, 1)."""
    scale = points.new_tensor([2 / width, 2 / height])
    return (points + 0.5) * scale - 1


def _to_grid(matrices: torch.Tensor, size: int) -> torch.Tensor:
    """M [n, 2, 3] followed by ``_normalise`` onto a size x size grid, as one affine map."""
    return matrices * (2 / size) + matrices.new_tensor([0, 0, 1 / size - 1])


def _warp_group(
    frames: torch.Tensor, inv: torch.Tensor, fi: torch.Tensor, size: int, pool: int, k: int
) -> torch.Tensor:
    """Warp faces sharing (pool, k): [n, C, size, size] in the work dtype."""
    _, _, h, w = frames.shape
    points = _sample_points(inv, inv.new_zeros(inv.shape[0], 2), size, size, k)  # image (x, y)
    lo, hi = torch.aminmax(points.flatten(1, 2), dim=1)  # [n, 2] each
    edge = lo.new_tensor([w - 0.5, h - 0.5])
    if bool((lo < -0.5).any() | (hi > edge).any()):  # mirrored beyond the frame
        points = torch.stack([_reflect(points[..., 0], w), _reflect(points[..., 1], h)], -1)
        lo, hi = torch.aminmax(points.flatten(1, 2), dim=1)
    source = frames
    if pool > 1:
        source, fi, corner = _pooled(frames, fi, lo, hi, pool, inv.dtype)
        points, lo, hi = ((t - corner) / pool for t in (points, lo, hi))
    sh, sw = source.shape[-2:]
    # The smallest region of each source that bilinear sampling at these points reads.
    lo = lo.floor().long().clamp_min(0)
    hi = torch.minimum(hi.floor().long() + 1, lo.new_tensor([sw - 1, sh - 1]))
    rw, rh = (hi - lo + 1).amax(0).tolist()
    lo = torch.minimum(lo, lo.new_tensor([sw - rw, sh - rh]))  # common size, inside the source
    region = _gather_regions(source, fi, lo, rw, rh).to(inv.dtype)
    grid = _normalise(points - lo[:, None, None, :].to(points.dtype), rw, rh)
    samples = F.grid_sample(region, grid, "bilinear", "border", align_corners=False)
    return _reduce(samples, k, (_COLOUR,) * samples.shape[1])


def _pooled(
    frames: torch.Tensor,
    fi: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    pool: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The box of frames fi.min() .. fi.max() around the points within [lo, hi] [n, 2] (x, y),
    averaged over pool x pool blocks (blocks cut by the frame's edge average the pixels they
    hold): (pooled [F, C, h', w'], fi [n] into it, the image (x, y) of block (0, 0)'s centre).
    One pass over a view of the frames."""
    _, _, h, w = frames.shape
    first, last = fi.amin().item(), fi.amax().item()
    start = lo.amin(0).floor().long() - pool  # bilinear reads one block beyond
    stop = hi.amax(0).ceil().long() + pool + 1
    x0, y0 = (start.clamp_min(0) // pool * pool).tolist()
    x1, y1 = torch.minimum(stop, stop.new_tensor([w, h])).tolist()
    box = frames[first : last + 1, :, y0:y1, x0:x1]  # a view
    pooled = _block_means(_block_means(box, pool, 2, dtype), pool, 3, dtype)
    return pooled, fi - first, lo.new_tensor([x0 + (pool - 1) / 2, y0 + (pool - 1) / 2])


def _block_means(x: torch.Tensor, pool: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Means (in dtype) of consecutive pool-long blocks of x along dim, the last one possibly
    shorter. Splitting a dimension of a view copies nothing (on the CPU 5 times faster than
    avg_pool2d over a view of a 12 Mpx photo)."""
    whole = x.shape[dim] // pool * pool
    means = x.narrow(dim, 0, whole).unflatten(dim, (-1, pool)).mean(dim + 1, dtype=dtype)
    if whole == x.shape[dim]:
        return means
    rest = x.narrow(dim, whole, x.shape[dim] - whole).mean(dim, keepdim=True, dtype=dtype)
    return torch.cat([means, rest], dim)


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
    colour: torch.Tensor,
    masks: torch.Tensor,
    matrices: torch.Tensor,
    fi: torch.Tensor,
    detail: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[slice, slice]]:
    """Inverse-warp crops and their masks into their frames and accumulate them.

    colour: [N, C, S, S] (C may be 0); masks: [N, 1, S, S]; detail: [N] weights or None.
    Returns, over the box (row, column slices) around every footprint: sums [B, C', h, w], the
    sums over faces of mask * colour, (mask * detail,) and mask; peak [B, 1, h, w], the max mask.
    """
    b, _, h, w = frames.shape
    size, c = masks.shape[-1], colour.shape[1]
    lo, hi = _paste_bounds(invert_affine(matrices), size, h, w)
    x0, y0 = lo.amin(0).tolist() if lo.numel() else (0, 0)
    x1, y1 = hi.amax(0).tolist() if hi.numel() else (-1, -1)
    box = (x0, y0, max(x1 - x0 + 1, 0), max(y1 - y0 + 1, 0))  # x, y, width, height
    slices = (slice(y0, y1 + 1), slice(x0, x1 + 1))
    if detail is not None:  # mask * detail resamples like the mask: w * tent(mask)
        masks = torch.cat([masks * detail[:, None, None, None], masks], 1)
    source = torch.cat([colour, masks], 1)  # [N, C', S, S]
    grids, ks = _to_grid(matrices, size), _supersampling(affine_scale(matrices))
    if b == 1 and source.shape[0] == 1:  # one face: the box is its footprint, its values the sums
        values, _ = _splat_group(source, c, grids, lo, hi, ks.item(), box)
        return values, values[:, -1:], slices
    sums = source.new_zeros(source.shape[1], b * box[2] * box[3])
    peak = source.new_zeros(b * box[2] * box[3])
    for (k,), sel in _groups(ks):
        values, at = _splat_group(source[sel], c, grids[sel], lo[sel], hi[sel], k, box)
        index = _flat_index(at, values.shape[-2:], fi[sel], box)
        sums.index_add_(1, index, values.transpose(0, 1).reshape(source.shape[1], -1))
        peak.scatter_reduce_(0, index, values[:, -1].flatten(), "amax")
    sums = sums.view(source.shape[1], b, box[3], box[2]).transpose(0, 1)
    return sums, peak.view(b, 1, box[3], box[2]), slices


def _splat_group(
    source: torch.Tensor,
    colours: int,
    grids: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    k: int,
    box: tuple[int, int, int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample crops (``colours`` colour channels, then coverage ones, the mask last) sharing
    supersampling factor k over their footprints [lo, hi] [n, 2] (x, y), inside box (x, y,
    width, height), all of a common size.

    Returns values [n, C', rh, rw] (the colours times the mask) and each region's top-left
    pixel [n, 2] (x, y) relative to the box.
    """
    corner = lo.new_tensor(box[:2])
    rw, rh = (hi - lo + 1).amax(0).tolist()
    at = torch.minimum(lo - corner, lo.new_tensor([box[2] - rw, box[3] - rh]))  # in the box
    points = _sample_points(grids, (at + corner).to(grids.dtype), rh, rw, k)  # crop, normalised
    samples = F.grid_sample(source, points, "bilinear", "border", align_corners=False)
    kinds = (_COLOUR,) * colours + (_COVERAGE,) * (source.shape[1] - colours)
    values = _reduce(samples, k, kinds)  # [n, C', rh, rw]
    values[:, :colours] *= values[:, -1:]
    return values, at


def _flat_index(
    at: torch.Tensor, shape: torch.Size, fi: torch.Tensor, box: tuple[int, int, int, int]
) -> torch.Tensor:
    """Flat indices [n * rh * rw] into the sums [B, box height, box width] of regions of
    ``shape`` (rh, rw) whose top-left pixels in the box are at [n, 2] (x, y), in frames fi."""
    rh, rw = shape
    first = (fi * box[3] + at[:, 1]) * box[2] + at[:, 0]  # [n]
    rows = first[:, None, None] + box[2] * torch.arange(rh, device=at.device)[:, None]
    return (rows + torch.arange(rw, device=at.device)).flatten()  # one pass over the regions


def _paste_bounds(
    inv: torch.Tensor, size: int, h: int, w: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive pixel bounds lo, hi [n, 2] (x, y) of each mask's footprint, clipped to the frame.

    inv: [n, 2, 3] crop -> image. The coverage tent reaches one pixel from a pixel's centre.
    """
    inset = round(MASK_INSET * size)
    a, b = inset - 1.0, size - inset + 0.0  # bilinear sampling of the mask is 0 outside (a, b)
    corners = inv.new_tensor([[a, a, 1], [b, a, 1], [a, b, 1], [b, b, 1]])  # [4, 3]
    image_corners = corners @ inv.transpose(1, 2)  # [n, 4, 2]
    limit = inv.new_tensor([w - 1, h - 1])
    lo = torch.minimum((image_corners.amin(1) - 1).floor().clamp_min(0), limit)
    hi = torch.minimum((image_corners.amax(1) + 1).ceil(), limit).clamp_min(0)
    return lo.long(), hi.long()


__all__ = [
    "DETAIL_FULL",
    "MASK_FEATHER",
    "MASK_INSET",
    "TEMPLATE_512",
    "affine_scale",
    "detail_weight",
    "invert_affine",
    "paste_alpha",
    "paste_faces",
    "paste_mask",
    "similarity_transform",
    "template",
    "warp_faces",
]
