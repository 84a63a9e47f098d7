"""The README's Python example, run as written: on the CPU, with the weights placed by hand."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import torch

from streamgpen.faces.parse import build_network
from streamgpen.models.gpen import GPEN
from streamgpen.models.weights import MODELS

README = Path(__file__).resolve().parents[1] / "README.md"
MOBILENET = "detection_mobilenet0.25_Final.pth"


def python_example(marker: str = "from streamgpen import Enhancer") -> str:
    """The README's one Python code block holding ``marker`` (the library's example; the
    service's client example is run by tests/test_serve.py)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    chosen = [block for block in blocks if marker in block]
    assert len(chosen) == 1, blocks
    return chosen[0]


def test_readme_python_example_runs_as_written(shared_dir, tmp_path):
    # What the README says it needs: photo.jpg, and the three weights files in weights/.
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(shared_dir / "weights" / MOBILENET, weights / MOBILENET)
    torch.manual_seed(0)  # GPEN-BFR-256's architecture, random weights (the real ones can't be had)
    torch.save(GPEN.from_config(MODELS["GPEN-BFR-256"].config).state_dict(),
               weights / "GPEN-BFR-256.pth")  # fmt: skip
    torch.save(build_network("bisenet").state_dict(), weights / "parsing_bisenet.pth")
    solvay = cv2.imread(str(shared_dir / "media" / "Solvay_conference_1927.png"))
    photo = solvay[:200, :400]  # the top left: 5 faces (few, for a fast test)
    cv2.imwrite(str(tmp_path / "photo.jpg"), photo)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMGPEN_")}
    # Nowhere to download from: the example must not need the network.
    env.update(STREAMGPEN_WEIGHTS_URL="http://127.0.0.1:9", HOME=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", python_example()], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "5 faces"
    out = cv2.imread(str(tmp_path / "photo_enhanced.jpg"))
    assert out is not None and out.shape == cv2.imread(str(tmp_path / "photo.jpg")).shape
