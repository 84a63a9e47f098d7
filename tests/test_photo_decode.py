"""Photo decoding: torchvision's JPEG path (forced on the CPU, as CUDA would choose it) against
cv2's, on JPEGs made from the real Solvay photo; the pixel limit read from image headers; atomic
writes, the face log and folder walks."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from streamgpen.apps.bench_photos import bench_jpeg_decode
from streamgpen.errors import UserError
from streamgpen.faces.types import Face
from streamgpen.files import temp_path
from streamgpen.media.facelog import FaceLog
from streamgpen.media.images import (
    MAX_PIXELS,
    Photo,
    copy_file,
    decode_photo,
    image_size,
    iter_folder,
    read_photo,
    write_image,
)

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


# The pixel limit, read from the header before decoding


def zeros_zlib(n: int, chunk: int) -> bytes:
    """A zlib stream of ``n`` zero bytes, made in milliseconds: one compressed ``chunk`` ended by
    a full flush (byte-aligned, history reset, so copies concatenate), repeated; then an empty
    final block and the Adler-32 of zeros (a = 1, b = n mod 65521)."""
    assert n % chunk == 0
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    adler = ((n % 65521) << 16) | 1
    return b"\x78\xda" + block * (n // chunk) + b"\x03\x00" + struct.pack(">I", adler)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def black_png(width: int, height: int, rows_per_block: int) -> bytes:
    """A valid 8-bit RGB PNG, all black, of any size."""
    row = 1 + 3 * width  # filter byte + pixels
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zeros_zlib(row * height, row * rows_per_block)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", pixels)
        + png_chunk(b"IEND", b"")
    )


PEAK_RSS = """
import resource, sys
from pathlib import Path
from streamgpen.errors import UserError
from streamgpen.media.images import read_photo
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_photo(Path(sys.argv[1]))
except UserError as e:
    print(e)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_black_png_helper_decodes():
    image = cv2.imdecode(np.frombuffer(black_png(300, 200, 50), np.uint8), cv2.IMREAD_UNCHANGED)
    assert image.shape == (200, 300, 3) and image.max() == 0


def test_decompression_bomb_png_is_refused_from_its_header(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(black_png(20000, 20000, 500))
    assert path.stat().st_size < 1_200_000  # measured: 1,167,105 bytes for 1.2 GB of pixels
    run = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(path)], capture_output=True, text=True, check=True
    )
    message, grown = run.stdout.splitlines()
    assert message == f"{path}: 20000x20000 = 400 Mpx is over the 179 Mpx limit"
    # Measured (peak RSS over the imports): the old read_photo decoded it, +2.35 GB (the 1.2 GB
    # image and libpng's buffers); the refusal costs +2 MB (the file's bytes).
    assert int(grown) < 100_000_000


def test_pixel_limit_is_a_keyword_of_both_readers(tmp_path):
    path = tmp_path / "small.png"
    path.write_bytes(black_png(300, 200, 50))
    assert MAX_PIXELS == 178_956_970
    with pytest.raises(UserError, match=r"300x200 = 0 Mpx is over the 0 Mpx limit"):
        read_photo(path, max_pixels=59_999)
    with pytest.raises(UserError, match=r"300x200"):
        decode_photo(path, CPU, max_pixels=59_999)
    assert read_photo(path, max_pixels=60_000).color.shape == (200, 300, 3)
    big = tmp_path / "big.png"
    big.write_bytes(black_png(20000, 20000, 500))
    with pytest.raises(UserError, match="400 Mpx is over the 300 Mpx limit"):
        decode_photo(big, CPU, on_device=True, max_pixels=300_000_000)


def pillow_bytes(fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (53, 37)).save(buffer, fmt, **options)
    return buffer.getvalue()


def cv2_bytes(ext: str, params: tuple[int, ...] = ()) -> bytes:
    ok, data = cv2.imencode(ext, np.zeros((37, 53, 3), np.uint8), list(params))
    assert ok
    return data.tobytes()


@pytest.mark.parametrize(
    "make",
    [
        lambda: cv2_bytes(".png"),
        lambda: cv2_bytes(".jpg"),
        lambda: pillow_bytes("JPEG", progressive=True, exif=exif_orientation(6, ">")),
        lambda: cv2_bytes(".webp"),  # lossy, VP8
        lambda: cv2_bytes(".webp", (cv2.IMWRITE_WEBP_QUALITY, 101)),  # lossless, VP8L
        lambda: pillow_bytes("WEBP", exif=b"Exif\0\0"),  # extended, VP8X
        lambda: cv2_bytes(".tif"),
        lambda: pillow_bytes("TIFF", byteorder=">"),
        lambda: pillow_bytes("TIFF", big_tiff=True),
        lambda: cv2_bytes(".bmp"),
        lambda: pillow_bytes("GIF"),
        lambda: cv2_bytes(".jp2"),
        lambda: pillow_bytes("JPEG2000", no_jp2=True),  # a raw codestream
    ],
    ids=[
        "png", "jpeg", "jpeg-exif", "webp-lossy", "webp-lossless", "webp-extended", "tiff",
        "tiff-big-endian", "bigtiff", "bmp", "gif", "jp2", "j2k",
    ],
)  # fmt: skip
def test_image_size_from_headers(make):
    assert image_size(make()) == (53, 37)


def test_image_size_of_other_or_broken_headers_is_unknown():
    assert image_size(cv2_bytes(".ppm")) is None  # left to cv2's own guard
    assert image_size(cv2_bytes(".png")[:20]) is None
    assert image_size(b"RIFF\0\0\0\0WEBPVP8 ") is None


def test_photo_has_no_unused_max_value():
    assert [f.name for f in dataclasses.fields(Photo)] == ["path", "color", "alpha", "grayscale"]
    assert not hasattr(Photo, "max_value")


# Writing: atomic, with the permissions of a normal new file


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_photos_have_normal_permissions(tmp_path, umask_022):
    image = np.zeros((8, 8, 3), np.uint8)
    write_image(tmp_path / "out" / "a.png", image)
    copy_file(tmp_path / "out" / "a.png", tmp_path / "out" / "b.png")
    for name in ("a.png", "b.png"):
        # Measured on the old code: 0600 (tempfile.mkstemp's mode survived the rename).
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o644
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png", "b.png"]


def test_failed_copy_is_one_line_and_leaves_nothing(tmp_path):
    # The old atomic_path let the OSError out as a traceback.
    with pytest.raises(UserError, match="cannot write"):
        copy_file(tmp_path / "absent.png", tmp_path / "b.png")
    assert os.listdir(tmp_path) == []


FACE = Face(
    box=np.array([1.0, 2.0, 30.0, 40.0]),
    landmarks=np.array([[5.0, 6.0], [15.0, 6.0], [10.0, 12.0], [6.0, 20.0], [14.0, 20.0]]),
    score=0.99,
)


def test_face_log_is_renamed_into_place_with_normal_permissions(tmp_path, umask_022):
    path = tmp_path / "faces.json"
    log = FaceLog(path)
    log.write(FACE, file="a.png")
    assert not path.exists()  # still under its temporary name
    log.close()
    log.close()  # a second close does nothing
    assert [json.loads(line)["file"] for line in path.read_text().splitlines()] == ["a.png"]
    assert path.stat().st_mode & 0o777 == 0o644  # old code: 0600
    assert os.listdir(tmp_path) == ["faces.json"]


def test_face_log_keeps_its_lines_after_an_exception(tmp_path):
    path = tmp_path / "faces.json"
    with pytest.raises(KeyboardInterrupt), FaceLog(path) as log:
        log.write(FACE, file="a.png")
        log.write(FACE, file="b.png")
        raise KeyboardInterrupt
    assert [json.loads(line)["file"] for line in path.read_text().splitlines()] == [
        "a.png",
        "b.png",
    ]
    assert os.listdir(tmp_path) == ["faces.json"]


# Folder walks


def test_folder_walk_skips_temporary_files_and_the_output_folder(tmp_path):
    source = tmp_path / "in"
    for name in ("a.jpg", "sub/b.png", "out/a.jpg", "out/sub/b.png", "notes.txt", ".hidden.png"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(b"x")
    temp_path(source / "c.png").write_bytes(b"partial")  # a killed run's leftover
    expected = [source / "a.jpg", source / "sub" / "b.png"]
    assert list(iter_folder(source, exclude=source / "out")) == expected
    # Another spelling of the same folder is still the same folder.
    spelled = tmp_path / "in" / "sub" / ".." / "out"
    assert list(iter_folder(source, exclude=spelled)) == expected
    everything = [source / "a.jpg", source / "out" / "a.jpg", source / "out" / "sub" / "b.png"]
    assert list(iter_folder(source)) == [*everything, source / "sub" / "b.png"]
    # An output folder that holds the input (writing in place) leaves nothing out.
    assert list(iter_folder(source, exclude=tmp_path)) == list(iter_folder(source))
