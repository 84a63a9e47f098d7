"""Photos and folders: real detector, real photo, the CLI as a user runs it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from streamgpen.enhancer import Enhancer
from streamgpen.faces.align import paste_alpha, similarity_transform, template
from streamgpen.runtime.restorer import Identity, Restorer

MOBILENET = "detection_mobilenet0.25_Final.pth"


@pytest.fixture(scope="session")
def solvay(shared_dir) -> Path:
    return shared_dir / "media" / "Solvay_conference_1927.png"


@pytest.fixture(scope="session")
def identity_enhancer(detector) -> Enhancer:
    return Enhancer(
        restorer=Restorer(Identity(), torch.device("cpu")),
        face_detector=detector,
        device="cpu",
        mask="box",
    )


def enhance_cli(*args, weights_dir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "streamgpen", "enhance", *map(str, args)]
    cmd += ["--detector", "retinaface_mobile0.25", "--weights-dir", str(weights_dir), "--device"]
    cmd += ["cpu", "--mask", "box"]
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


def test_precision_option_reaches_the_restorer(solvay, weights_dir, tiny_state_dict, tmp_path):
    checkpoint = tmp_path / "tiny_gpen.pth"
    torch.save(tiny_state_dict, checkpoint)
    out = tmp_path / "out.png"
    # The top left of the photo: 5 faces (the whole photo's 29 took 50 s of a loaded 2-core CPU).
    photo = tmp_path / "five.png"
    cv2.imwrite(str(photo), cv2.imread(str(solvay))[:200, :400])
    args = (photo, "-o", out, "--model-path", checkpoint)
    run = enhance_cli(*args, "--precision", "bf16", weights_dir=weights_dir)
    assert run.returncode == 0, run.stderr
    assert "5 face(s)" in run.stderr and out.exists()
    run = enhance_cli(*args, "--precision", "fp8", weights_dir=weights_dir)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "streamgpen: error: unknown precision 'fp8' (use auto, fp32, fp16, bf16)"
    ]


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
    from streamgpen.media.images import read_photo

    upright = read_photo(path).color
    assert upright.shape[:2] == (284, 664)


def test_very_large_image_detects_on_a_downscaled_copy(identity_enhancer, solvay):
    # 35 Mpx, the group at 5x (faces ~200 px): far past the detector's 1280 px, as the 108 Mpx
    # canvas of before was, at a third of its cost (56 s on a loaded 2-core CPU).
    canvas = np.full((5000, 7000, 3), 128, np.uint8)
    group = cv2.resize(cv2.imread(str(solvay)), None, fx=5, fy=5, interpolation=cv2.INTER_CUBIC)
    canvas[1000 : 1000 + group.shape[0], 200 : 200 + group.shape[1]] = group
    result = identity_enhancer.enhance(canvas)
    assert result.image.shape == canvas.shape
    assert len(result.faces) >= 20
    box = result.faces[0].box
    assert box[2] - box[0] > 100, "boxes must be in original pixels"


def make_jpeg_folder(root: Path, solvay: Path) -> None:
    """JPEGs torchvision takes (colour, gray, turned by EXIF) and some it leaves to cv2 (CMYK,
    truncated), a PNG and an empty file."""
    photo = Image.open(solvay).convert("RGB").crop((0, 0, 332, 200))  # two faces
    root.mkdir()
    photo.save(root / "colour.jpg", quality=90)
    photo.convert("L").save(root / "gray.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers turn it 90 degrees clockwise
    photo.transpose(Image.Transpose.ROTATE_90).save(root / "turned.jpg", exif=exif, quality=90)
    photo.convert("CMYK").save(root / "cmyk.jpg", quality=90)
    data = (root / "colour.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 3])
    photo.save(root / "lossless.png")
    (root / "empty.jpg").write_bytes(b"")


def test_folder_decoded_by_torchvision_matches_cv2(solvay, identity_enhancer, tmp_path, capsys):
    from streamgpen.apps.photos import PhotoOptions, enhance_photos, plan_outputs

    make_jpeg_folder(tmp_path / "in", solvay)
    summaries = {}
    for on_device in (False, True):
        out = tmp_path / f"out_{on_device}"
        pairs = plan_outputs(tmp_path / "in", out)
        summaries[on_device] = enhance_photos(
            identity_enhancer, pairs, PhotoOptions(quiet=True), device_decode=on_device
        )
    cv2_run, torchvision_run = summaries[False], summaries[True]
    assert torchvision_run.images == cv2_run.images == 5
    assert torchvision_run.faces == cv2_run.faces > 0
    failed = ["empty.jpg", "truncated.jpg"]
    assert sorted(p.name for p in torchvision_run.failed) == failed
    assert sorted(p.name for p in cv2_run.failed) == failed
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 4 and all(sum(name in e for e in errors) == 2 for name in failed)
    for path in sorted((tmp_path / "out_False").iterdir()):
        expected = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        got = cv2.imread(str(tmp_path / "out_True" / path.name), cv2.IMREAD_UNCHANGED)
        assert got.shape == expected.shape, path.name
        # The inputs decode within 1 (see test_photo_decode.MAX_DIFF); measured: identical files.
        assert np.abs(got.astype(int) - expected).max() <= 1, path.name
    assert cv2.imread(str(tmp_path / "out_True" / "gray.jpg"), cv2.IMREAD_UNCHANGED).ndim == 2
    assert cv2.imread(str(tmp_path / "out_True" / "turned.jpg")).shape[:2] == (200, 332)
    assert not list(tmp_path.rglob("*.partial"))


def test_ctrl_c_in_a_folder_run_leaves_no_partial_files(solvay, weights_dir, tmp_path):
    photo = Image.open(solvay).convert("RGB").crop((0, 0, 332, 200))
    (tmp_path / "in").mkdir()
    for i in range(40):
        photo.save(tmp_path / "in" / f"{i:02d}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "streamgpen", "enhance", str(tmp_path / "in"), "-o", str(out)]
    cmd += ["--model", "identity", "--detector", "retinaface_mobile0.25", "--device", "cpu"]
    cmd += ["--weights-dir", str(weights_dir), "--mask", "box"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    # Interrupted once the writer has started: reads, the device and writes are all under way.
    while not list(out.glob("*.png")) and process.poll() is None:
        assert time.monotonic() < deadline, "no photo was ever written"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert not [p for p in out.rglob("*") if ".partial" in p.name]
    assert 0 < len(list(out.glob("*.png"))) < 40


def test_aligned_photos_go_straight_through_the_model(solvay, identity_enhancer, tmp_path):
    from streamgpen.apps.photos import PhotoOptions, enhance_photos, plan_outputs

    face = cv2.imread(str(solvay))[60:124, 40:104]  # 64x64: as a small aligned crop would be
    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "face.jpg"), face, [cv2.IMWRITE_JPEG_QUALITY, 95])
    cv2.imwrite(str(tmp_path / "in" / "deep.png"), face.astype(np.uint16) * 257)
    pairs = plan_outputs(tmp_path / "in", tmp_path / "out")
    options = PhotoOptions(aligned=True, quiet=True)
    summary = enhance_photos(identity_enhancer, pairs, options, device_decode=True)
    assert summary.images == 2 and not summary.failed
    for name, dtype in (("face.jpg", np.uint8), ("deep.png", np.uint16)):
        source = cv2.imread(str(tmp_path / "in" / name), cv2.IMREAD_UNCHANGED)
        out = cv2.imread(str(tmp_path / "out" / name), cv2.IMREAD_UNCHANGED)
        assert out.shape == source.shape and out.dtype == dtype
        scale = np.iinfo(dtype).max / 255
        # The identity model: resized to 512 and back (and re-encoded): measured 45.5 and 47 dB.
        assert psnr(out / scale, source / scale) >= 40
