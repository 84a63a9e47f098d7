"""Photos and folders: real detector, real photo, the CLI as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from streamgpen.align import paste_alpha, similarity_transform, template
from streamgpen.enhancer import Enhancer
from streamgpen.runtime import Identity, Restorer

MOBILENET = "detection_mobilenet0.25_Final.pth"


@pytest.fixture(scope="session")
def solvay(shared_dir) -> Path:
    return shared_dir / "media" / "Solvay_conference_1927.png"


@pytest.fixture(scope="session")
def identity_enhancer(detector) -> Enhancer:
    return Enhancer(
        restorer=Restorer(Identity(), torch.device("cpu")), face_detector=detector, device="cpu"
    )


def enhance_cli(*args, weights_dir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "streamgpen", "enhance", *map(str, args)]
    cmd += ["--detector", "retinaface_mobile0.25", "--weights-dir", str(weights_dir), "--device"]
    cmd += ["cpu"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def union_mask(landmarks: np.ndarray, shape: tuple[int, int], size: int = 512) -> np.ndarray:
    """Where the paste masks of faces with these landmarks reach (dilated for JSON rounding)."""
    matrices = similarity_transform(torch.from_numpy(landmarks).float(), template(size))
    frame = torch.zeros(1, 3, *shape)
    index = torch.zeros(len(landmarks), dtype=torch.long)
    alpha = paste_alpha(frame, matrices, size, index)[0, 0].numpy() > 0
    return cv2.dilate(alpha.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0


def test_identity_model_changes_nothing_outside_the_faces(solvay, weights_dir, tmp_path):
    out, faces_json = tmp_path / "out.png", tmp_path / "faces.jsonl"
    run = enhance_cli(
        solvay,
        "-o",
        out,
        "--model",
        "identity",
        "--faces-json",
        faces_json,
        weights_dir=weights_dir,
    )
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in faces_json.read_text().splitlines()]
    assert len(records) == 29
    assert {r["frame"] for r in records} == {0} and {r["track"] for r in records} == {None}
    assert all(r["file"] == str(solvay) and r["detector_run"] for r in records)
    source, result = cv2.imread(str(solvay)), cv2.imread(str(out))
    assert result.shape == source.shape
    assert psnr(source, result) >= 40
    inside = union_mask(np.array([r["landmarks"] for r in records]), source.shape[:2])
    assert np.array_equal(result[~inside], source[~inside])
    assert not np.array_equal(result[inside], source[inside])


def test_aligned_crops_put_landmarks_on_the_template(solvay, identity_enhancer, detector):
    image = cv2.imread(str(solvay))
    result = identity_enhancer.enhance(image)
    assert len(result.faces) == 29
    redetected = detector.detect((result.crops + 1) / 2)
    assert all(faces for faces in redetected), "a face was lost by alignment"
    landmarks = np.stack([faces[0].landmarks for faces in redetected])  # [29, 5, 2]
    # Per face, the mean distance of the 5 re-detected landmarks from the template: the least-
    # squares fit and the detector's noise on ~25 px faces leave a few percent.
    error = np.linalg.norm(landmarks - template(512).numpy(), axis=2).mean(1) / 512
    assert error.mean() <= 0.03
    assert error.max() <= 0.05


def test_gpen_runs_end_to_end_on_cpu(solvay, weights_dir, tiny_state_dict, tmp_path):
    checkpoint = tmp_path / "tiny_gpen.pth"
    torch.save(tiny_state_dict, checkpoint)
    out, faces_dir = tmp_path / "out.jpg", tmp_path / "faces"
    run = enhance_cli(
        solvay,
        "-o",
        out,
        "--model-path",
        checkpoint,
        "--batch-size",
        "8",
        "--save-faces",
        faces_dir,
        "--clahe",
        weights_dir=weights_dir,
    )
    assert run.returncode == 0, run.stderr
    result = cv2.imread(str(out))
    assert result.shape == cv2.imread(str(solvay)).shape
    assert len(list(faces_dir.glob("*_restored.png"))) == 29
    crop = cv2.imread(str(next(faces_dir.glob("*_compare.png"))))
    assert crop.shape == (64, 128, 3)
    assert "29 face(s)" in run.stderr


def test_only_center_face_and_draw(solvay, weights_dir, tmp_path):
    faces_json = tmp_path / "faces.jsonl"
    run = enhance_cli(
        solvay,
        "-o",
        tmp_path / "out.png",
        "--model",
        "identity",
        "--only-center-face",
        "--draw",
        "--faces-json",
        faces_json,
        weights_dir=weights_dir,
    )
    assert run.returncode == 0, run.stderr
    assert len(faces_json.read_text().splitlines()) == 1


def make_bad_folder(root: Path, solvay: Path) -> dict[str, Path]:
    """A folder of real images in awkward formats, broken files and a face-free picture."""
    photo = cv2.imread(str(solvay))[:284, :664]  # the front row's left half, a dozen faces
    files = {
        "good": root / "good.png",
        "gray": root / "sub" / "gray.png",
        "rgba": root / "rgba.png",
        "cmyk": root / "cmyk.jpg",
        "deep": root / "deep.png",
        "noface": root / "noface.png",
        "empty": root / "empty.jpg",
        "truncated": root / "truncated.jpg",
        "text": root / "notes.png",
    }
    files["gray"].parent.mkdir(parents=True)
    cv2.imwrite(str(files["good"]), photo)
    cv2.imwrite(str(files["gray"]), cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY))
    alpha = np.tile(np.linspace(0, 255, photo.shape[1], dtype=np.uint8), (photo.shape[0], 1))
    cv2.imwrite(str(files["rgba"]), np.dstack([photo, alpha]))
    Image.fromarray(photo[..., ::-1]).convert("CMYK").save(files["cmyk"], quality=95)
    cv2.imwrite(str(files["deep"]), photo.astype(np.uint16) * 257)
    gradient = np.tile(np.linspace(0, 255, 300, dtype=np.uint8), (200, 1))
    cv2.imwrite(str(files["noface"]), cv2.merge([gradient, gradient[::-1], gradient]))
    files["empty"].write_bytes(b"")
    jpeg = cv2.imencode(".jpg", photo)[1]
    files["truncated"].write_bytes(jpeg.tobytes()[: len(jpeg) // 3])
    files["text"].write_text("not an image\n")
    return files


def test_folder_of_awkward_and_broken_files(solvay, weights_dir, tmp_path):
    files = make_bad_folder(tmp_path / "in", solvay)
    out = tmp_path / "out"
    run = enhance_cli(tmp_path / "in", "-o", out, "--model", "identity", weights_dir=weights_dir)
    assert run.returncode != 0, "a folder run with bad files must exit non-zero"
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("streamgpen: error:")]
    assert len(errors) == 3 and all(
        any(files[k].name in line for line in errors) for k in ("empty", "truncated", "text")
    ), run.stderr
    for key in ("empty", "truncated", "text"):
        assert not (out / files[key].name).exists()
    assert not [p for p in out.rglob("*") if ".partial" in p.name]

    gray = cv2.imread(str(out / "sub" / "gray.png"), cv2.IMREAD_UNCHANGED)
    assert gray.ndim == 2
    rgba = cv2.imread(str(out / "rgba.png"), cv2.IMREAD_UNCHANGED)
    source_rgba = cv2.imread(str(files["rgba"]), cv2.IMREAD_UNCHANGED)
    assert rgba.shape[2] == 4 and np.array_equal(rgba[..., 3], source_rgba[..., 3])
    deep = cv2.imread(str(out / "deep.png"), cv2.IMREAD_UNCHANGED)
    assert deep.dtype == np.uint16
    source_deep = cv2.imread(str(files["deep"]), cv2.IMREAD_UNCHANGED)
    assert psnr(deep / 257.0, source_deep / 257.0) >= 40
    cmyk = cv2.imread(str(out / "cmyk.jpg"))
    assert cmyk is not None and cmyk.shape == (284, 664, 3)
    assert (out / "noface.png").read_bytes() == files["noface"].read_bytes()
    assert (out / "good.png").exists()


def test_exif_orientation_is_honoured(solvay, identity_enhancer, tmp_path):
    photo = Image.open(solvay).convert("RGB").crop((0, 0, 664, 284))
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers rotate it 90 degrees clockwise
    photo.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)
    from streamgpen.io.images import read_photo

    upright = read_photo(path).color
    assert upright.shape[:2] == (284, 664)


def test_very_large_image_detects_on_a_downscaled_copy(identity_enhancer, solvay):
    canvas = np.full((9000, 12000, 3), 128, np.uint8)
    group = cv2.resize(cv2.imread(str(solvay)), None, fx=8, fy=8, interpolation=cv2.INTER_CUBIC)
    canvas[2000 : 2000 + group.shape[0], 600 : 600 + group.shape[1]] = group
    result = identity_enhancer.enhance(canvas)
    assert result.image.shape == canvas.shape
    assert len(result.faces) >= 20
    box = result.faces[0].box
    assert box[2] - box[0] > 100, "boxes must be in original pixels"
