"""``--upscale``, colour matching, GPEN-BFR-2048: geometry, invariants and loading, on the CPU.

Real weights are unavailable here: the identity model and seeded random networks of the real
architectures stand in, and the checks are the ones that hold for any weights.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from probe import ffprobe

from streamgpen.config import BG_UPSAMPLERS, ModelConfig
from streamgpen.enhancer import Enhancer, build_restorer, output_matrices
from streamgpen.faces.align import paste_alpha, template, warp_faces
from streamgpen.faces.color_match import match_color
from streamgpen.faces.overlay import draw_faces
from streamgpen.faces.types import Face
from streamgpen.models import weights
from streamgpen.models.gpen import GPEN, GPENConfig
from streamgpen.runtime.restorer import Identity, Restorer
from streamgpen.runtime.upsampler import ResizeUpsampler

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "solvay_pan.mp4"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def solvay_bgr(shared_dir) -> np.ndarray:
    return cv2.imread(str(shared_dir / "media" / "Solvay_conference_1927.png"))


def identity_box(detector, **options) -> Enhancer:
    return Enhancer(
        restorer=Restorer(Identity(256), CPU),
        face_detector=detector,
        device=CPU,
        mask="box",
        **options,
    )


def test_registry_and_cli_name_the_same_upsamplers():
    registered = [name for name, spec in weights.MODELS.items() if spec.kind == "sr"]
    assert list(BG_UPSAMPLERS) == ["none", *registered]


def test_output_matrices_map_output_pixels_to_the_same_crop():
    # A crop warped from a 2x (and 1.5x) resize with the re-expressed matrices lands where the
    # crop of the original does: the output->input pixel-centre map is exact, so a smooth image
    # gives the same crop up to the resize's own interpolation error.
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(90.0), torch.arange(120.0), indexing="ij")
    waves = torch.stack([torch.sin(xx / 9), torch.cos(yy / 7), torch.sin((xx + yy) / 11)])
    image = (0.5 + 0.4 * waves)[None]  # in [0, 1], as frames are
    landmarks = template(64)[None] * 0.8 + torch.tensor([20.0, 10.0])
    from streamgpen.faces.align import similarity_transform

    matrices = similarity_transform(landmarks, template(64))
    reference = warp_faces(image, matrices, 64)
    for factor in (2.0, 1.5):
        big = ResizeUpsampler()(image, factor)
        assert big.shape[-2:] == (round(90 * factor), round(120 * factor))
        out = output_matrices(matrices, (90, 120), tuple(big.shape[-2:]))
        crop = warp_faces(big, out, 64)
        # The crop's middle (its border reaches past the frame, mirrored about other edges).
        error = (crop - reference)[..., 16:48, 16:48].abs().max()
        assert error < 1e-2, error  # measured: 1.2e-3 (2x), 1.9e-3 (1.5x), amplitude 0.4
    same = output_matrices(matrices, (90, 120), (90, 120))
    assert torch.equal(same, matrices)  # 1x: the matrices exactly, so 1x output is unchanged


def test_upscale_2_photo_equals_the_resize_outside_the_faces(detector, solvay_bgr):
    enhancer = identity_box(detector, upscale=2.0)
    result = enhancer.enhance(solvay_bgr)
    h, w = solvay_bgr.shape[:2]
    assert result.image.shape == (2 * h, 2 * w, 3)
    resized = enhancer.download(enhancer.background(enhancer.upload(solvay_bgr)), np.uint8)
    assert psnr(result.image, resized) >= 40  # identity model: faces equal the input's
    batch = enhancer.align(enhancer.upload(solvay_bgr), [result.faces])
    matrices = output_matrices(batch.matrices, (h, w), (2 * h, 2 * w))
    alpha = paste_alpha(torch.zeros(1, 3, 2 * h, 2 * w), matrices, 256)[0, 0].numpy()
    outside = alpha == 0
    assert outside.mean() > 0.5 and len(result.faces) == 29
    np.testing.assert_array_equal(result.image[outside], resized[outside])


def test_draw_follows_the_upscale():
    image = np.zeros((40, 40, 3), np.uint8)
    face = Face(box=np.float32([4, 4, 9, 9]), landmarks=np.full((5, 2), 6.5, np.float32), score=0.9)
    drawn = draw_faces(image, [face], scale=2.0)
    # Pixel 4 spans [3.5, 4.5], so x = 4 becomes (4 + 0.5) * 2 - 0.5 = 8.5 in the 2x image and
    # 9 becomes 18.5: the box runs from 8 to 18 (cv2 rounds halves down here); the landmarks
    # at 6.5 land on 13.5.
    assert drawn[10:17, 8].any(1).all() and drawn[10:17, 18].any(1).all()
    assert not drawn[10:17, 20].any() and not drawn[10:17, 6].any()
    assert drawn[13, 13].any()


def test_color_match_gives_back_the_input_colour_and_keeps_the_detail():
    torch.manual_seed(0)
    reference = torch.rand(2, 3, 32, 32) * 0.5 + 0.25
    detail = torch.randn(2, 1, 32, 32) * 0.05
    # "Restored": more detail, a red cast and a darker, greyer face.
    restored = reference * 0.7 + detail + torch.tensor([0.08, -0.02, -0.04])[:, None, None]
    weights_ = torch.ones(2, 1, 32, 32)
    matched = match_color(restored, reference, weights_)
    ref_mean = reference.mean((2, 3))
    assert (restored.mean((2, 3)) - ref_mean).abs().max() > 0.05
    # The colour cast is gone: means within 1% of the range (measured 2.7e-3).
    assert (matched.mean((2, 3)) - ref_mean).abs().max() < 0.01
    # Luma spread (GPEN's detail) is the restored one, not the input's.
    luma = lambda x: 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # noqa: E731
    assert torch.allclose(luma(matched).std((1, 2)), luma(restored).std((1, 2)), rtol=1e-4)
    # An input matched to itself is itself.
    assert torch.allclose(match_color(reference, reference, weights_), reference, atol=1e-5)


def test_color_match_reaches_the_paste(detector, solvay_bgr):
    # Colour-matching identity crops to themselves changes nothing measurable.
    plain = identity_box(detector).enhance(solvay_bgr).image
    matched = identity_box(detector, color_match=True).enhance(solvay_bgr).image
    assert psnr(plain, matched) > 50  # measured 58 dB: float rounding of the YCbCr round trip


def test_gpen_2048_loads_by_path_and_by_name_and_restores(tmp_path):
    # The official channel table to 2048 (8 * channel_multiplier * narrow channels there); a
    # narrow, shallow random generator keeps the CPU forward to seconds.
    config = GPENConfig(2048, style_dim=32, n_mlp=2, channel_multiplier=1, narrow=0.5)
    torch.manual_seed(0)
    state = GPEN.from_config(config).state_dict()
    path = tmp_path / "GPEN-BFR-2048.pth"
    torch.save(state, path)
    model = weights.load_gpen(path)
    assert model.size == 2048
    by_name = build_restorer(
        ModelConfig(name="GPEN-BFR-2048"), CPU, weights_dir=tmp_path, progress=False
    )
    assert by_name.size == 2048
    with torch.no_grad():
        out = by_name(torch.rand(1, 3, 2048, 2048) * 2 - 1)
    assert out.shape == (1, 3, 2048, 2048) and torch.isfinite(out).all()


def streamgpen(*args, weights_dir: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "streamgpen", "enhance", *map(str, args), "--model", "identity",
        "--detector", "retinaface_mobile0.25", "--weights-dir", str(weights_dir),
        "--device", "cpu", "--mask", "box", "--quiet",
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def clip_head(path: Path, frames: int) -> Path:
    """The sample's first ``frames`` frames with the audio of that time (as test_video does)."""
    from test_video import sample_head

    return sample_head(path, frames)


def test_upscale_2_video_keeps_timing_and_audio(weights_dir, tmp_path):
    source = clip_head(tmp_path / "head.mp4", 4)
    out = tmp_path / "up.mp4"
    result = streamgpen(
        source, "-o", out, "--upscale", "2", "--preset", "ultrafast", weights_dir=weights_dir
    )
    assert result.returncode == 0, result.stderr
    (size,) = ffprobe(source, "v:0", "stream=width,height")
    width, height = (int(v) for v in size.split(","))
    assert ffprobe(out, "v:0", "stream=width,height") == [f"{2 * width},{2 * height}"]
    # ffprobe's reading: every frame's pts, and the audio packets' pts and sizes, unchanged.
    assert ffprobe(out, "v:0", "frame=pts") == ffprobe(source, "v:0", "frame=pts")
    assert len(ffprobe(out, "v:0", "frame=pts")) == 4
    audio = "packet=pts,size"
    assert ffprobe(out, "a:0", audio) == ffprobe(source, "a:0", audio) != []


def test_upscale_photo_cli_and_bad_upsampler(weights_dir, tmp_path, shared_dir):
    photo = tmp_path / "in.png"
    image = cv2.imread(str(shared_dir / "media" / "Solvay_conference_1927.png"))
    cv2.imwrite(str(photo), image[:200, :300])
    out = tmp_path / "out.png"
    result = streamgpen(photo, "-o", out, "--upscale", "2", weights_dir=weights_dir)
    assert result.returncode == 0, result.stderr
    assert cv2.imread(str(out)).shape == (400, 600, 3)
    bad = streamgpen(photo, "-o", out, "--upscale", "2", "--bg-upsampler", "ESRGAN9",
                     weights_dir=weights_dir)  # fmt: skip
    assert bad.returncode != 0
    assert bad.stderr.count("\n") == 1 and "RealESRGAN_x2plus" in bad.stderr
