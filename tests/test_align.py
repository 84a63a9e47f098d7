"""Face alignment: similarity fit, warp against OpenCV, anti-aliasing, paste and compositing."""

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from streamgpen.faces.align import (
    TEMPLATE_512,
    affine_scale,
    invert_affine,
    paste_alpha,
    paste_faces,
    paste_mask,
    similarity_transform,
    template,
    warp_faces,
)


def similarity(scale: float, angle: float, tx: float, ty: float) -> torch.Tensor:
    """M [1, 2, 3] = scale * rotation(angle) + (tx, ty)."""
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    return torch.tensor([[[c, -s, tx], [s, c, ty]]], dtype=torch.float32)


def centred(scale: float, angle: float, centre: tuple[float, float], size: int) -> torch.Tensor:
    """Similarity that maps image point ``centre`` to the middle of a ``size`` crop."""
    m = similarity(scale, angle, 0, 0)
    mid = (size - 1) / 2
    m[0, :, 2] = torch.tensor([mid, mid]) - m[0, :, :2] @ torch.tensor(centre, dtype=torch.float32)
    return m


def smooth_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A band-limited random RGB image [3, h, w] in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, h // 8, w // 8, generator=g)
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1)


def checkerboard(h: int, w: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return ((xx + yy) % 2).float().expand(3, -1, -1)


def apply(m: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    return points @ m[..., :2].transpose(-1, -2) + m[..., None, :, 2]


def test_template_scales_linearly():
    assert TEMPLATE_512.shape == (5, 2)
    torch.testing.assert_close(template(512), TEMPLATE_512)
    torch.testing.assert_close(template(256), TEMPLATE_512 / 2)


def test_similarity_recovers_known_transform():
    g = torch.Generator().manual_seed(1)
    n = 8
    scale = 0.2 + 3 * torch.rand(n, generator=g)
    angle = (torch.rand(n, generator=g) - 0.5) * 2 * math.pi
    truth = torch.cat(
        [
            similarity(s, a, *(torch.rand(2, generator=g) * 500).tolist())
            for s, a in zip(scale.tolist(), angle.tolist(), strict=True)
        ]
    )
    src = torch.rand(n, 5, 2, generator=g) * 1000
    fit = similarity_transform(src, apply(truth, src))
    torch.testing.assert_close(fit, truth, rtol=1e-5, atol=1e-3)
    # A shared destination [5, 2] broadcasts over the faces.
    fit = similarity_transform(apply(truth, TEMPLATE_512), TEMPLATE_512)
    torch.testing.assert_close(apply(fit, apply(truth, TEMPLATE_512)), TEMPLATE_512.expand(n, 5, 2))


def test_similarity_is_least_squares_on_noisy_points():
    rng = np.random.default_rng(2)
    src = rng.uniform(0, 800, (6, 5, 2))
    dst = src * 0.7 + rng.normal(0, 5, src.shape)
    fit = similarity_transform(torch.from_numpy(src), torch.from_numpy(dst)).numpy()
    for s, d, m in zip(src, dst, fit, strict=True):
        # The linear least-squares problem in (a, b, tx, ty), solved by numpy.
        rows_x = np.stack([s[:, 0], -s[:, 1], np.ones(5), np.zeros(5)], 1)
        rows_y = np.stack([s[:, 1], s[:, 0], np.zeros(5), np.ones(5)], 1)
        (a, b, tx, ty), *_ = np.linalg.lstsq(
            np.concatenate([rows_x, rows_y]), np.concatenate([d[:, 0], d[:, 1]]), rcond=None
        )
        np.testing.assert_allclose(m, [[a, -b, tx], [b, a, ty]], rtol=1e-9, atol=1e-7)
        # OpenCV's robust estimate agrees closely on mildly noisy points.
        cv, _ = cv2.estimateAffinePartial2D(s, d, method=cv2.LMEDS)
        np.testing.assert_allclose(m, cv, atol=0.05 * 800, rtol=0.05)


def test_similarity_never_reflects():
    src = TEMPLATE_512[None]
    mirrored = TEMPLATE_512 * torch.tensor([-1.0, 1.0])
    m = similarity_transform(src, mirrored)
    assert torch.linalg.det(m[0, :, :2]) > 0


def test_invert_affine():
    m = torch.cat([similarity(2.5, 0.4, 10, -30), torch.tensor([[[1.0, 0.3, 5], [-0.2, 0.8, 7]]])])
    inv = invert_affine(m)
    points = torch.rand(2, 7, 2) * 100
    torch.testing.assert_close(apply(inv, apply(m, points)), points, atol=1e-4, rtol=0)
    torch.testing.assert_close(affine_scale(m[:1]), torch.tensor([2.5]))


def test_warp_matches_cv2_warp_affine():
    image = smooth_image(96, 128) * 255
    m = similarity(1.4, 0.3, -20, -30)  # upscaling, partly outside the image
    crop = warp_faces(image, m, 64)
    ref = cv2.warpAffine(
        image.permute(1, 2, 0).numpy(),
        m[0].numpy(),
        (64, 64),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REFLECT,
    )
    assert crop.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(crop[0].permute(1, 2, 0).numpy(), ref, atol=0.01)


def test_warp_pixel_centres():
    image = torch.arange(3 * 16 * 16, dtype=torch.float32).view(3, 16, 16) ** 1.5
    # An integer translation copies pixels exactly; a half-pixel one averages neighbours.
    crop = warp_faces(image, similarity(1, 0, -3, -5), 8)
    torch.testing.assert_close(crop[0], image[:, 5:13, 3:11])
    crop = warp_faces(image, similarity(1, 0, -2.5, -4), 8)
    torch.testing.assert_close(crop[0], (image[:, 4:12, 2:10] + image[:, 4:12, 3:11]) / 2)


@pytest.mark.parametrize("scale", [0.25, 0.3, 0.5])
def test_warp_downscale_does_not_alias(scale):
    image = checkerboard(512, 512)
    m = centred(scale, 0.2, (256, 256), 96)
    crop = warp_faces(image, m, 96)
    assert crop.std() < 0.02 and abs(crop.mean() - 0.5) < 0.01
    # Plain bilinear sampling at the same points aliases the pattern into strong moire.
    inv = invert_affine(m)
    ys, xs = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    points = apply(inv, torch.stack([xs, ys], -1).view(1, -1, 2)).view(1, 96, 96, 2)
    naive = F.grid_sample(image[None], (points + 0.5) / 256 - 1, align_corners=False)
    assert naive.std() > 0.15


def test_round_trip_restores_the_image_and_leaves_the_rest_bit_identical():
    image = smooth_image(120, 160, seed=3) * 255
    m = centred(2.5, -0.3, (70, 60), 128)
    crops = warp_faces(image, m, 128)
    out = paste_faces(image, crops, m)
    alpha = paste_alpha(image, m, 128)[0]
    assert out.shape == image.shape and alpha.shape == image.shape[1:]
    assert 0 < (alpha > 0).float().mean() < 0.5
    assert torch.equal(out[:, alpha == 0], image[:, alpha == 0])
    err = (out - image)[:, alpha == 1]
    psnr = 10 * torch.log10(255**2 / (err**2).mean())
    assert psnr >= 40


def test_paste_outside_masks_is_bit_identical_for_noise():
    g = torch.Generator().manual_seed(4)
    image = torch.rand(2, 3, 90, 110, generator=g) * 2 - 1
    m = torch.cat([centred(1.7, 0.5, (30, 40), 64), centred(0.8, -1.0, (100, 70), 64)])
    fi = torch.tensor([1, 1])
    faces = torch.rand(2, 3, 64, 64, generator=g)
    out = paste_faces(image, faces, m, fi)
    alpha = paste_alpha(image, m, 64, fi)
    assert torch.equal(out[0], image[0])
    outside = (alpha[1, 0] == 0).expand(3, -1, -1)
    assert torch.equal(out[1][outside], image[1][outside])
    assert not torch.equal(out[1], image[1])


def test_paste_downscale_does_not_alias():
    image = torch.full((3, 80, 80), 0.25)
    m = centred(4.0, 0.3, (40, 40), 256)
    out = paste_faces(image, checkerboard(256, 256)[None], m)
    core = paste_alpha(image, m, 256)[0] == 1
    assert core.sum() > 500
    assert (out[:, core] - 0.5).abs().max() < 0.02


def test_overlapping_faces_never_exceed_unit_weight():
    black = torch.zeros(3, 100, 140)
    m = torch.cat([centred(2.0, 0.0, (60, 50), 128), centred(2.0, 0.2, (85, 55), 128)])
    white = torch.ones(2, 3, 128, 128)
    out = paste_faces(black, white, m)
    alpha = paste_alpha(black, m, 128)
    assert out.max() <= 1 + 1e-6
    single = [paste_alpha(black, m[i : i + 1], 128) for i in range(2)]
    overlap = (single[0] == 1) & (single[1] == 1)
    assert overlap.sum() > 100
    assert torch.allclose(out[:, overlap[0]], torch.ones(()))
    # Over black, white pasted with alpha a is a: alpha is the union (max) of the masks.
    torch.testing.assert_close(out, alpha.expand(3, -1, -1))
    torch.testing.assert_close(alpha, torch.maximum(*single))


def test_overlap_colour_is_a_convex_combination():
    gray = torch.full((3, 100, 140), 0.5)
    m = torch.cat([centred(2.0, 0.0, (60, 50), 128), centred(2.0, 0.2, (85, 55), 128)])
    faces = torch.stack([torch.zeros(3, 128, 128), torch.ones(3, 128, 128)])
    out = paste_faces(gray, faces, m)
    assert out.min() >= 0 and out.max() <= 1
    both = (paste_alpha(gray, m[:1], 128) == 1) & (paste_alpha(gray, m[1:], 128) == 1)
    torch.testing.assert_close(out[:, both[0]], torch.full_like(out[:, both[0]], 0.5))


def test_blend():
    image = smooth_image(64, 64, seed=5)
    m = centred(2.0, 0.1, (32, 32), 64)
    faces = torch.ones(1, 3, 64, 64)
    assert torch.equal(paste_faces(image, faces, m, blend=0.0), image)
    full = paste_faces(image, faces, m)
    half = paste_faces(image, faces, m, blend=0.5)
    torch.testing.assert_close(half, (image + full) / 2)


def test_frame_index_routes_faces():
    frames = torch.stack([smooth_image(72, 96, seed=s) for s in range(3)])
    m = torch.cat(
        [
            centred(1.5, 0.1, (40, 30), 64),
            centred(0.6, -0.2, (50, 40), 64),
            centred(3.0, 0.4, (70, 45), 64),
        ]
    )
    fi = torch.tensor([2, 0, 2])
    crops = warp_faces(frames, m, 64, fi)
    for i, f in enumerate(fi.tolist()):
        torch.testing.assert_close(crops[i : i + 1], warp_faces(frames[f], m[i : i + 1], 64))
    faces = torch.rand(3, 3, 64, 64)
    out = paste_faces(frames, faces, m, fi)
    assert torch.equal(out[1], frames[1])
    torch.testing.assert_close(out[0], paste_faces(frames[0], faces[1:2], m[1:2]))
    torch.testing.assert_close(out[2], paste_faces(frames[2], faces[0::2], m[0::2]))
    with pytest.raises(ValueError):
        warp_faces(frames, m, 64)


def test_paste_mask_shape():
    mask = paste_mask(100)
    assert mask.shape == (1, 1, 100, 100)
    assert mask[0, 0, :5].max() == 0 and mask[0, 0, :, -5:].max() == 0
    assert mask[0, 0, 50, 50] == 1 and mask.min() == 0
    assert paste_mask(100) is mask  # built once per size, device and dtype
