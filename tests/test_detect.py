"""Face detection: the real RetinaFace mobilenet0.25 weights on the real Solvay conference photo."""

import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from streamgpen.errors import UserError
from streamgpen.faces.detect import FaceDetector
from streamgpen.faces.types import Face
from streamgpen.models import weights

SHARED = Path(__file__).resolve().parents[2] / "shared"
SOLVAY_FACES = 29
MOBILENET = "detection_mobilenet0.25_Final.pth"


def shared(relative: str) -> Path:
    path = SHARED / relative
    assert path.exists(), f"missing shared file {path}: the tests need ../shared beside the repo"
    return path


@pytest.fixture(scope="module")
def solvay() -> np.ndarray:
    image = cv2.imread(str(shared("media/Solvay_conference_1927.png")))
    assert image is not None and image.shape == (568, 1328, 3)
    return image


@pytest.fixture(scope="module")
def solvay_faces(detector, solvay) -> list[Face]:
    return detector.detect_numpy(solvay)


def as_rgb_batch(bgr: np.ndarray, batch: int) -> torch.Tensor:
    rgb = torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1])).permute(2, 0, 1)
    return rgb.expand(batch, -1, -1, -1).contiguous()


def boxes(faces: list[Face]) -> torch.Tensor:
    return torch.from_numpy(np.stack([face.box for face in faces]))


def assert_same_faces(ours: list[Face], reference: list[Face], atol: float) -> None:
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference, strict=True):
        np.testing.assert_allclose(a.box, b.box, atol=atol)
        np.testing.assert_allclose(a.landmarks, b.landmarks, atol=atol)
        assert a.score == pytest.approx(b.score, abs=1e-4)


def test_finds_every_face_of_the_solvay_photo(solvay_faces):
    assert len(solvay_faces) == SOLVAY_FACES
    scores = [face.score for face in solvay_faces]
    assert min(scores) > 0.9
    assert scores == sorted(scores, reverse=True)
    for face in solvay_faces:
        assert face.box.shape == (4,) and face.landmarks.shape == (5, 2)
        x1, y1, x2, y2 = face.box
        assert np.all((face.landmarks >= (x1, y1)) & (face.landmarks <= (x2, y2)))
        left_eye, right_eye = face.landmarks[0], face.landmarks[1]
        assert left_eye[0] < right_eye[0]


def test_large_image_is_downscaled_and_mapped_back(detector, solvay, solvay_faces):
    upscaled = cv2.resize(solvay, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)
    assert max(upscaled.shape[:2]) > detector.det_size
    faces = detector.detect_numpy(upscaled)
    assert len(faces) == SOLVAY_FACES
    iou = box_iou(boxes(faces) / 2, boxes(solvay_faces))
    best_iou, match = iou.max(dim=1)
    assert best_iou.min() > 0.8
    assert sorted(match.tolist()) == list(range(SOLVAY_FACES))
    for face, j in zip(faces, match.tolist(), strict=True):
        reference = solvay_faces[j]
        size = reference.box[2] - reference.box[0]
        assert np.abs(face.landmarks / 2 - reference.landmarks).max() < 0.1 * size


def test_batch_gives_the_faces_of_each_single_image(detector, solvay, solvay_faces):
    batch = detector.detect(as_rgb_batch(solvay, 2))
    assert len(batch) == 2
    for faces in batch:
        assert_same_faces(faces, solvay_faces, atol=1e-2)


def test_float_input_in_unit_range_matches_uint8(detector, solvay, solvay_faces):
    frames = as_rgb_batch(solvay, 1).float() / 255
    assert_same_faces(detector.detect(frames)[0], solvay_faces, atol=1e-2)


@pytest.mark.parametrize("kind", ["gray", "noise"])
def test_image_without_faces_gives_none(detector, kind):
    rng = np.random.default_rng(0)
    if kind == "gray":
        image = np.full((480, 640, 3), 128, np.uint8)
    else:
        image = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    assert detector.detect_numpy(image) == []


def test_rejects_wrong_layouts(detector):
    with pytest.raises(ValueError, match="B, 3, H, W"):
        detector.detect(torch.zeros(3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        detector.detect_numpy(np.zeros((64, 64), np.uint8))


def test_missing_weights_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="weights not found"):
        FaceDetector("mobile0.25", tmp_path / "absent.pth")


class Payload:
    """Pickles as a call to open(marker, 'w'): loading it unsafely creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def faulty_detector_file(fault: str, path: Path, tmp_path: Path) -> str:
    """Write a broken stand-in for the mobilenet weights at ``path``; the reason it is refused."""
    real = shared(f"weights/{MOBILENET}").read_bytes()
    if fault == "corrupt":
        path.write_bytes(random.Random(0).randbytes(len(real)))
        return "not a PyTorch checkpoint"
    if fault == "truncated":
        path.write_bytes(real[: len(real) // 2])
        return "truncated or corrupt"
    if fault == "pickled-code":
        torch.save({"weight": torch.zeros(2), "payload": Payload(tmp_path / "marker")}, path)
        return "refused: it contains pickled code (io.open)"
    state = weights.load_state_dict(shared(f"weights/{MOBILENET}"))
    if fault == "nan":
        state["body.stage1.0.0.weight"] = torch.full_like(state["body.stage1.0.0.weight"], np.nan)
        torch.save(state, path)
        return "body.stage1.0.0.weight holds NaN or infinite values"
    # wrong-architecture: the same network with one layer of another width
    state["ClassHead.0.conv1x1.bias"] = torch.zeros(6)
    torch.save(state, path)
    return "not a retinaface_mobile0.25 checkpoint (ClassHead.0.conv1x1.bias has shape [6]"


@pytest.mark.parametrize(
    "fault", ["corrupt", "truncated", "pickled-code", "nan", "wrong-architecture"]
)
def test_faulty_detector_file_is_one_line_naming_file_and_remedy(fault, tmp_path):
    path = tmp_path / MOBILENET
    reason = faulty_detector_file(fault, path, tmp_path)
    with pytest.raises(UserError) as refused:
        FaceDetector("mobile0.25", path)
    message = str(refused.value)
    url = weights.source_url(weights.MODELS["retinaface_mobile0.25"])
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert reason in message
    assert message.endswith(f"; replace it with {MOBILENET} (download it from {url})")
    assert not (tmp_path / "marker").exists()


def test_other_networks_weights_are_refused_by_name(tmp_path):
    # The mobilenet file given for the ResNet-50 network: was a RuntimeError from load_state_dict.
    path = shared(f"weights/{MOBILENET}")
    with pytest.raises(UserError) as refused:
        FaceDetector("resnet50", path)
    message = str(refused.value)
    assert message.startswith(f"{path}: not a retinaface_resnet50 checkpoint (")
    assert "replace it with detection_Resnet50_Final.pth" in message


def test_the_detector_runs_without_cudnn_autotuning(detector):
    # Restorer turns cuDNN's autotuner on for GPEN's fixed shapes; the detector's shapes change
    # with every photo and every set of tracking crops, so it runs with the autotuner off and
    # leaves the setting as it found it.
    seen = []
    hook = detector.net.register_forward_pre_hook(
        lambda *_: seen.append(torch.backends.cudnn.benchmark)
    )
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        detector.detect(torch.zeros(1, 3, 64, 64))
        assert seen == [False] and torch.backends.cudnn.benchmark is True
    finally:
        hook.remove()
        torch.backends.cudnn.benchmark = saved
