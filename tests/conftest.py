"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from streamgpen.models.gpen import GPENConfig

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per worker, for the worker and the streamgpen processes it starts: two workers
    # of two threads each on two cores fight over them (OpenMP's waiting threads spin). Measured
    # on tests/test_photos.py and test_run_faults.py, two workers: 2 min 41 s, 2 min 7 s so.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
MOBILENET = "detection_mobilenet0.25_Final.pth"
# The config of shared/fixtures/gpen/tiny_state_dict.pt (see shared/README.md).
TINY_CONFIG = GPENConfig(64, style_dim=128, n_mlp=8, channel_multiplier=1, narrow=0.25)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ``shared/`` directory beside the checkout; the tests need it."""
    if not SHARED_DIR.is_dir():
        pytest.fail(f"{SHARED_DIR} is missing: the tests need the shared material beside the repo")
    return SHARED_DIR


@pytest.fixture(scope="session")
def tiny_config() -> GPENConfig:
    """The architecture of the tiny seeded GPEN fixture."""
    return TINY_CONFIG


@pytest.fixture(scope="session")
def tiny_state_dict(shared_dir: Path) -> dict[str, torch.Tensor]:
    """The tiny seeded GPEN's state_dict (size 64); do not modify it in place."""
    return torch.load(
        shared_dir / "fixtures" / "gpen" / "tiny_state_dict.pt",
        map_location="cpu",
        weights_only=True,
    )


@pytest.fixture(scope="session")
def weights_dir(shared_dir: Path, tmp_path_factory) -> Path:
    """A weights directory holding the real mobilenet RetinaFace, so nothing is downloaded."""
    directory = tmp_path_factory.mktemp("weights")
    shutil.copy(shared_dir / "weights" / MOBILENET, directory / MOBILENET)
    return directory


@pytest.fixture(scope="session")
def detector(shared_dir: Path):
    """The real mobilenet0.25 RetinaFace on the CPU, shared by the test modules."""
    from streamgpen.faces.detect import FaceDetector

    return FaceDetector("mobile0.25", shared_dir / "weights" / MOBILENET)
