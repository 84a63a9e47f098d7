"""Photo decoding: torchvision's JPEG path (forced on the CPU, as CUDA would choose it) against
cv2's, on JPEGs made from the real Solvay photo."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from streamgpen.bench_photos import bench_jpeg_decode
from streamgpen.errors import UserError
from streamgpen.io.images import decode_photo, read_photo

CPU = torch.device("cpu")
# Largest difference of a pixel value (0-255) between the two decoders. Measured: 0 (both are
# libjpeg-turbo with the same defaults); 1 leaves room for another build rounding differently.
MAX_DIFF = 1


@pytest.fixture(scope="module")
def solvay_rgb(shared_dir: Path) -> Image.Image:
    return Image.open(shared_dir / "media" / "Solvay_conference_1927.png").convert("RGB")


def as_bgr(color: torch.Tensor) -> np.ndarray:
    """[3, H, W] uint8 RGB -> HxWx3 BGR, as cv2 decodes."""
    return color.permute(1, 2, 0).flip(2).cpu().numpy()


def exif_orientation(orientation: int, order: str) -> bytes:
    """An APP1 EXIF payload holding only the orientation tag, little (<) or big (>) endian."""
    mark = b"II" if order == "<" else b"MM"
    entry = struct.pack(order + "HHIHH", 0x0112, 3, 1, orientation, 0)  # SHORT, count 1
    return b"Exif\0\0" + mark + struct.pack(order + "HIH", 42, 8, 1) + entry + b"\0" * 4


def decoded_alike(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The file decoded by torchvision (checked to have been) and by cv2, both as BGR arrays."""
    ours, reference = decode_photo(path, CPU, on_device=True), read_photo(path)
    assert isinstance(ours.color, torch.Tensor), "torchvision should have decoded this file"
    assert ours.grayscale == reference.grayscale and ours.alpha is None
    got = as_bgr(ours.color)
    assert got.shape == reference.color.shape
    return got, reference.color


@pytest.mark.parametrize(
    "variant",
    [
        dict(),  # 4:2:0 baseline
        dict(progressive=True),
        dict(subsampling=0),  # 4:4:4
        dict(subsampling=1, quality=75),  # 4:2:2
        dict(crop=(3, 1, 1330 - 3, 568)),  # odd width and height under 4:2:0
        dict(gray=True),
        dict(gray=True, progressive=True),
    ],
    ids=["baseline", "progressive", "444", "422", "odd-size", "gray", "gray-progressive"],
)
def test_torchvision_decodes_jpegs_like_cv2(variant, solvay_rgb, tmp_path):
    variant = dict(variant)
    image = solvay_rgb.crop(variant.pop("crop", (0, 0, 1328, 568)))
    gray = variant.pop("gray", False)
    path = tmp_path / "photo.jpg"
    (image.convert("L") if gray else image).save(path, **{"quality": 90, **variant})
    got, expected = decoded_alike(path)
    assert read_photo(path).grayscale == gray
    assert np.abs(got.astype(int) - expected).max() <= MAX_DIFF


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_cv2(orientation, order, solvay_rgb, tmp_path):
    path = tmp_path / "oriented.jpg"
    # Non-square, with faces on one side only: any wrong turn or mirror shows.
    solvay_rgb.crop((0, 0, 330, 200)).save(
        path, quality=90, exif=exif_orientation(orientation, order)
    )
    got, expected = decoded_alike(path)
    assert got.shape[:2] == ((200, 330) if orientation <= 4 else (330, 200))
    assert np.abs(got.astype(int) - expected).max() <= MAX_DIFF


def test_gray_jpeg_with_orientation_stays_gray(solvay_rgb, tmp_path):
    path = tmp_path / "gray.jpg"
    solvay_rgb.crop((0, 0, 330, 200)).convert("L").save(path, exif=exif_orientation(6, ">"))
    photo = decode_photo(path, CPU, on_device=True)
    assert photo.grayscale and tuple(photo.color.shape) == (3, 330, 200)
    assert torch.equal(photo.color[0], photo.color[1]) and torch.equal(
        photo.color[0], photo.color[2]
    )


def test_other_files_go_to_cv2_with_the_same_result(solvay_rgb, tmp_path):
    jpeg = tmp_path / "good.jpg"
    solvay_rgb.save(jpeg, quality=90)
    data = jpeg.read_bytes()
    sof = data.index(b"\xff\xc0")
    cases = {
        "cmyk.jpg": None,
        "photo.png": None,
        "truncated.jpg": data[: len(data) // 3],  # no EOI: nvJPEG might not refuse it
        "12bit.jpg": data[: sof + 4] + b"\x0c" + data[sof + 5 :],  # frame header says 12 bits
        "extended.jpg": data[:sof] + b"\xff\xc1" + data[sof + 2 :],  # SOF1: not baseline
        "no-scan.jpg": data[: data.index(b"\xff\xda")] + b"\xff\xd9",  # torchvision raises
        "after-eoi.jpg": data + b"trailing bytes",
    }
    solvay_rgb.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    solvay_rgb.save(tmp_path / "photo.png")
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        try:
            expected = read_photo(path)
        except UserError as e:
            with pytest.raises(UserError) as raised:
                decode_photo(path, CPU, on_device=True)
            assert str(raised.value) == str(e), name
            continue
        photo = decode_photo(path, CPU, on_device=True)
        assert isinstance(photo.color, np.ndarray), name
        assert np.array_equal(photo.color, expected.color), name
        assert photo.grayscale == expected.grayscale, name


def test_cpu_device_decodes_with_cv2_unless_forced(solvay_rgb, tmp_path):
    path = tmp_path / "photo.jpg"
    solvay_rgb.save(path)
    assert isinstance(decode_photo(path, CPU).color, np.ndarray)


def test_bench_jpeg_decode_reports_both_decoders():
    report = bench_jpeg_decode(CPU, size=(640, 480), seconds=0.05)
    assert report["device"] == "cpu" and (report["width"], report["height"]) == (640, 480)
    assert report["cv2_images_per_s"] > 0 and report["torchvision_images_per_s"] > 0
    assert report["speedup"] == pytest.approx(
        report["torchvision_images_per_s"] / report["cv2_images_per_s"]
    )
